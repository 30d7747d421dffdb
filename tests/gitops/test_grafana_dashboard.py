"""deploy/grafana: every metric and label the dashboard queries is one the operator exports."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetune.operator.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD_PATH = ROOT / "deploy" / "grafana" / "kubetune-operator.json"
DASHBOARD = json.loads(DASHBOARD_PATH.read_text())
# Labels Prometheus adds to every scraped series (the ServiceMonitor's target labels).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "endpoint", "container"}
# PromQL words that look like identifiers but are not metrics.
PROMQL_WORDS = {"sum", "by", "without", "rate", "irate", "increase", "histogram_quantile", "clamp_min",
                "clamp_max", "avg", "max", "min", "count", "topk", "bottomk", "on", "ignoring", "group_left",
                "group_right", "offset", "le", "label_values", "and", "or", "unless", "bool"}


def exported() -> dict[str, set[str]]:
    """Sample name -> label names, as the operator's registry serves them on /metrics."""
    metrics = Metrics(lambda: ["Running"], lambda: ["Serving"])
    metrics.reconcile_seconds.labels(handler="launch").observe(0.01)
    metrics.api_request("create", 0.001)
    metrics.api_error("create", 409)
    metrics.transition("Running")
    samples: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    return samples


EXPORTED = exported()


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def expressions() -> list[tuple[str, str]]:
    out = [(p["title"], t["expr"]) for p in panels(DASHBOARD) for t in p.get("targets", [])]
    for var in DASHBOARD["templating"]["list"]:
        if var["type"] == "query":
            out.append((f"variable {var['name']}", var["definition"]))
    return out


EXPRS = expressions()


def metric_names(expr: str) -> set[str]:
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    without_strings = re.sub(r"label_values\(([^,)]+),[^)]*\)", r"\1", without_strings)  # (metric, label)
    without_strings = re.sub(r"\b\d+(\.\d+)?([eE][-+]?\d+)?\b", "", without_strings)  # 0.95, 1e-9, 60
    without_ranges = re.sub(r"\[[^\]]*\]", "", without_strings)
    without_groupings = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", without_ranges)
    without_matchers = re.sub(r"\{[^}]*\}", "", without_groupings)
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", without_matchers))
    return {w for w in words if w not in PROMQL_WORDS and not w.startswith("__")}


def labels_used(expr: str) -> dict[str, set[str]]:
    """metric -> label names in its {matchers}; plus "*" -> labels in by(...) groupings."""
    used: dict[str, set[str]] = {}
    for metric, matchers in re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}", expr):
        used.setdefault(metric, set()).update(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", matchers))
    for grouping in re.findall(r"\bby\s*\(([^)]*)\)", expr):
        used.setdefault("*", set()).update(x.strip() for x in grouping.split(",") if x.strip())
    return used


def test_dashboard_has_queries() -> None:
    assert len(EXPRS) >= 10


@pytest.mark.parametrize(("title", "expr"), EXPRS, ids=[t for t, _ in EXPRS])
def test_every_metric_queried_is_exported_by_the_operator(title: str, expr: str) -> None:
    names = metric_names(expr)
    assert names, f"{title}: no metric in {expr!r}"
    assert names <= set(EXPORTED), f"{title}: {names - set(EXPORTED)} not exported by kubetune.operator.metrics"


@pytest.mark.parametrize(("title", "expr"), EXPRS, ids=[t for t, _ in EXPRS])
def test_every_label_queried_exists(title: str, expr: str) -> None:
    used = labels_used(expr)
    grouped = used.pop("*", set())
    all_labels = set().union(*EXPORTED.values()) | TARGET_LABELS
    for metric, labels in used.items():
        assert labels <= EXPORTED[metric] | TARGET_LABELS, f"{title}: {metric} has no label {labels - EXPORTED[metric]}"
    assert grouped <= all_labels, f"{title}: grouping by unknown labels {grouped - all_labels}"


def test_phase_values_queried_are_phases_the_operator_reports() -> None:
    from kubetune.operator.metrics import EVAL_PHASES, PHASES

    for title, expr in EXPRS:
        for metric, values in re.findall(r'(kubetune_\w+)\{[^}]*phase=~?"([^"]+)"', expr):
            known = EVAL_PHASES if metric == "kubetune_evaljobs" else PHASES
            assert set(values.split("|")) <= set(known), f"{title}: {values}"


def test_every_panel_uses_the_datasource_variable() -> None:
    for panel in panels(DASHBOARD):
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]


def test_panel_ids_are_unique_and_the_grid_does_not_overlap() -> None:
    ids = [p["id"] for p in panels(DASHBOARD)]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in panels(DASHBOARD):
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
