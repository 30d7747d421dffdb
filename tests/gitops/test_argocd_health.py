"""The Argo CD health checks in deploy/argocd, run for real in Lua 5.1 (the dialect of Argo CD's gopher-lua).

Two sources of truth are checked: the fixtures in Argo CD's own `health_test.yaml` format (so the
folder can be contributed to argoproj/argo-cd's resource_customizations as it is), and the conditions
kubetune's status functions actually write, for every phase.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import pytest
import yaml

from kube_schema import schema_errors
from kubetune.operator import evalstatus
from kubetune.operator import status as ftj_status

lua51 = pytest.importorskip("lupa.lua51", reason="lupa (with its Lua 5.1 runtime) is a dev dependency")

ROOT = Path(__file__).resolve().parents[2]
CUSTOMIZATIONS = ROOT / "deploy" / "argocd" / "resource_customizations" / "kubetune.io"
KINDS = ["FineTuneJob", "EvalJob"]
CRDS = {"FineTuneJob": ROOT / "crds" / "kubetune.io_finetunejobs.yaml",
        "EvalJob": ROOT / "crds" / "kubetune.io_evaljobs.yaml"}
NOW = "2026-11-20T10:00:00Z"
ARGO_STATUSES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}

Obj = dict[str, Any]


@functools.cache
def crd(kind: str) -> Obj:
    return yaml.safe_load(CRDS[kind].read_text())  # type: ignore[no-any-return]


def health(kind: str, obj: Obj) -> tuple[str, str]:
    """Run `<kind>/health.lua` the way Argo CD does: `obj` is a global table, the script returns hs."""
    runtime = lua51.LuaRuntime(unpack_returned_tuples=True)
    runtime.globals().obj = runtime.table_from(copy.deepcopy(obj), recursive=True)
    script = (CUSTOMIZATIONS / kind / "health.lua").read_text()
    hs = runtime.execute(script)
    return hs["status"], hs["message"]


def health_tests(kind: str) -> list[tuple[str, Obj, str, str]]:
    spec = yaml.safe_load((CUSTOMIZATIONS / kind / "health_test.yaml").read_text())
    cases = []
    for test in spec["tests"]:
        obj = yaml.safe_load((CUSTOMIZATIONS / kind / test["inputPath"]).read_text())
        cases.append((test["inputPath"], obj, test["healthStatus"]["status"], test["healthStatus"]["message"]))
    return cases


CASES = [(kind, *case) for kind in KINDS for case in health_tests(kind)]
CASE_IDS = [f"{kind}-{Path(path).stem}" for kind, path, *_ in CASES]


@pytest.mark.parametrize(("kind", "path", "obj", "status", "message"), CASES, ids=CASE_IDS)
def test_health_matches_argocd_test_fixture(kind: str, path: str, obj: Obj, status: str, message: str) -> None:
    assert health(kind, obj) == (status, message)


@pytest.mark.parametrize(("kind", "path", "obj", "status", "message"), CASES, ids=CASE_IDS)
def test_fixture_is_a_valid_object_of_its_crd(kind: str, path: str, obj: Obj, status: str, message: str) -> None:
    """The fixtures are what the apiserver would store (status schema included), not made-up shapes."""
    assert schema_errors(obj, crd(kind)) == []


@pytest.mark.parametrize("kind", KINDS)
def test_fixtures_cover_every_argocd_outcome_the_check_can_give(kind: str) -> None:
    outcomes = {case[3] for case in CASES if case[0] == kind}
    expected = {"Healthy", "Progressing", "Degraded"} | ({"Suspended"} if kind == "FineTuneJob" else set())
    assert outcomes == expected
    assert outcomes <= ARGO_STATUSES


def test_every_testdata_file_is_used() -> None:
    for kind in KINDS:
        used = {Path(path).name for k, path, *_ in CASES if k == kind}
        assert {p.name for p in (CUSTOMIZATIONS / kind / "testdata").glob("*.yaml")} == used


# --------------------------------------------------------------------------- against the real status code


FTJ_EXPECTED = {
    "Pending": "Progressing", "Waiting": "Progressing", "Queued": "Progressing", "Running": "Progressing",
    "Suspended": "Suspended", "Succeeded": "Healthy", "Failed": "Degraded", "Cancelled": "Degraded",
}


def _ftj(phase: str, generation: int = 4, observed: int = 4) -> Obj:
    state = ftj_status.State(phase, f"{phase}Reason", f"{phase} message")  # type: ignore[arg-type]
    conds = [c.to_wire() for c in ftj_status.conditions(state, observed, [], now=NOW)]
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "job", "namespace": "default", "generation": generation},
            "status": {"observedGeneration": observed, "phase": phase, "conditions": conds}}


@pytest.mark.parametrize(("phase", "expected"), FTJ_EXPECTED.items())
def test_finetunejob_health_of_every_phase_the_operator_writes(phase: str, expected: str) -> None:
    status, message = health("FineTuneJob", _ftj(phase))
    assert status == expected
    assert f"{phase}Reason" in message or expected == "Healthy"


def test_every_finetunejob_phase_is_mapped() -> None:

    from kubetune.api.finetunejob import Phase

    assert set(FTJ_EXPECTED) == {p.value for p in Phase}


@pytest.mark.parametrize("phase", list(FTJ_EXPECTED))
def test_finetunejob_status_of_an_older_generation_is_progressing(phase: str) -> None:
    assert health("FineTuneJob", _ftj(phase, generation=5, observed=4))[0] == "Progressing"


EVJ_EXPECTED = {
    "Pending": "Progressing", "Waiting": "Progressing", "Serving": "Progressing", "Queued": "Progressing",
    "Evaluating": "Progressing", "Succeeded": "Healthy", "Failed": "Degraded",
}


def _evj(phase: str, reason: str, generation: int = 2, observed: int = 2, **gate: str) -> Obj:
    state = evalstatus.State(phase, reason, f"{reason} message", **gate)
    conds = [c.to_wire() for c in evalstatus.conditions(state, observed, [], now=NOW)]
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "EvalJob",
            "metadata": {"name": "eval", "namespace": "default", "generation": generation},
            "status": {"observedGeneration": observed, "phase": phase, "conditions": conds}}


@pytest.mark.parametrize(("phase", "expected"), EVJ_EXPECTED.items())
def test_evaljob_health_of_every_phase_the_operator_writes(phase: str, expected: str) -> None:
    reason = {"Waiting": "WaitingForModel", "Failed": "EvaluationFailed"}.get(phase, phase)
    assert health("EvalJob", _evj(phase, reason))[0] == expected


def test_evaljob_gate_failure_is_degraded_naming_the_gate() -> None:
    verdict = "fine-tuned exactMatch 0.72 < minimum 0.80"
    status, message = health("EvalJob", _evj("Failed", "GateFailed", gate="GateFailed", gate_message=verdict))
    assert (status, message) == ("Degraded", f"Gate failed: {verdict}")


def test_evaljob_failure_that_is_not_the_gate_says_why() -> None:
    status, message = health("EvalJob", _evj("Failed", "ServingFailed"))
    assert (status, message) == ("Degraded", "ServingFailed: ServingFailed message")


def test_every_evaljob_phase_is_mapped() -> None:
    from kubetune.api.evaljob import Phase

    assert set(EVJ_EXPECTED) == {p.value for p in Phase}


@pytest.mark.parametrize("phase", list(EVJ_EXPECTED))
def test_evaljob_status_of_an_older_generation_is_progressing(phase: str) -> None:
    assert health("EvalJob", _evj(phase, phase, generation=3, observed=2))[0] == "Progressing"


# --------------------------------------------------------------------------- the argocd-cm patch


def test_argocd_cm_patch_embeds_exactly_the_lua_files() -> None:
    patch = yaml.safe_load((ROOT / "deploy" / "argocd" / "argocd-cm-patch.yaml").read_text())
    assert (patch["apiVersion"], patch["kind"], patch["metadata"]["name"]) == ("v1", "ConfigMap", "argocd-cm")
    for kind in KINDS:
        key = f"resource.customizations.health.kubetune.io_{kind}"
        assert patch["data"][key] == (CUSTOMIZATIONS / kind / "health.lua").read_text(), (
            f"{key} in argocd-cm-patch.yaml differs from {kind}/health.lua")
