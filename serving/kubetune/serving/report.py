"""The evaluation report: one self-contained HTML page (plots inlined as PNG), its plots as files, a table.

Input is `kubetune.serving.results.EvalResults` (or results.json's wire form, parsed into it), so a
report can be rebuilt from a stored results.json alone (`python -m kubetune.serving.report results.json`).
The page is the jinja2 template `templates/report.html.j2`, autoescaped.
"""

from __future__ import annotations

import base64
import json
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.serving.results import EvalResults, ExampleRecord

if TYPE_CHECKING:
    import jinja2

PLOTS = ("metrics.png", "tokens.png", "latency.png", "learning_curve.png")
Results = EvalResults | Mapping[str, Any]


def metric_names(results: Results) -> list[str]:
    """Metric columns, the headline one first."""
    doc = EvalResults.of(results)
    names: list[str] = []
    for c in doc.candidates:
        names += [m for m in c.metrics if m not in names]
    primary = doc.primary_metric
    if primary in names:
        names.remove(primary)
        names.insert(0, primary)
    return names


def _fmt(value: float | None, metric: str = "") -> str:
    """A metric as a percentage (chrF/BLEU in points); any other number (tokens, seconds) plainly."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if metric in ("chrf", "bleu"):
            return f"{value:.1f}"
        if metric:
            return f"{100 * value:.1f}%"
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.1f}"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


def format_table(results: Results) -> str:
    """The candidates x metrics table `kubetune run` prints."""
    doc = EvalResults.of(results)
    metrics = metric_names(doc)
    head = ["candidate", *metrics, "prompt tok/req", "compl tok/req", "p95 latency", "errors"]
    rows = []
    for c in doc.candidates:
        rows.append([c.name, *(_fmt(c.metrics.get(m), m) for m in metrics),
                     _fmt(c.prompt_tokens_per_request), _fmt(c.completion_tokens_per_request),
                     _seconds(c.latency.p95_seconds if c.latency else None), str(c.errors or 0)])
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(str(v).rjust(w) if i else str(v).ljust(w) for i, (v, w) in enumerate(zip(r, widths,
                                                                                               strict=True)))
             for r in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if doc.gate:
        lines.append(("PASSED " if doc.gate.passed else "FAILED ") + doc.gate.message)
    lines += [f"note: {c.name}: {n}" for c in doc.candidates for n in c.notes]
    return "\n".join(lines)


# -- plots -----------------------------------------------------------------------------------------


def write_plots(results: Results, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doc = EvalResults.of(results)
    names = [c.name for c in doc.candidates]
    metrics = metric_names(doc)
    written = []

    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(metrics) * max(1, len(names)) / 2), 4))
    width = 0.8 / max(1, len(names))
    for i, c in enumerate(doc.candidates):
        values = [c.metrics.get(m) or 0.0 for m in metrics]
        scaled = [v if m in ("chrf", "bleu") else 100 * v for v, m in zip(values, metrics, strict=True)]
        xs = [j + i * width for j in range(len(metrics))]
        bars = ax.bar(xs, scaled, width, label=c.name)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(metrics))], metrics, rotation=15)
    ax.set_ylabel("score (%; chrF/BLEU points)")
    ax.set_title(f"{doc.scorer}: scores per candidate")
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(_save(fig, out / "metrics.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    prompt = [c.prompt_tokens_per_request or 0 for c in doc.candidates]
    compl = [c.completion_tokens_per_request or 0 for c in doc.candidates]
    ax.bar(names, prompt, label="prompt")
    ax.bar(names, compl, bottom=prompt, label="completion")
    ax.set_ylabel("tokens per request")
    ax.set_title("Tokens per request (what each answer costs)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(_save(fig, out / "tokens.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    mean = [c.latency.mean_seconds if c.latency else 0 for c in doc.candidates]
    p95 = [c.latency.p95_seconds if c.latency else 0 for c in doc.candidates]
    slots = range(len(names))
    ax.bar([x - 0.2 for x in slots], mean, 0.4, label="mean")
    ax.bar([x + 0.2 for x in slots], p95, 0.4, label="p95")
    ax.set_xticks(list(slots), names)
    ax.set_ylabel("seconds per request")
    ax.set_title("Latency (under the evaluation's concurrency)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(_save(fig, out / "latency.png"))

    curve = doc.learning_curve
    if curve:
        fig, ax = plt.subplots(figsize=(6, 4))
        epochs = [e.epoch for e in curve]
        ax.plot(epochs, [e.val_perplexity for e in curve], marker="o", label="validation perplexity")
        ax.plot(epochs, [math.exp(e.train_loss) for e in curve], marker=".", linestyle="--",
                label="exp(train loss)")
        if doc.base_val_perplexity:
            ax.axhline(doc.base_val_perplexity, color="grey", linestyle=":", label="base model")
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_xticks(epochs)
        ax.set_title("Fine-tuning run")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(_save(fig, out / "learning_curve.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- HTML ------------------------------------------------------------------------------------------


def worst_examples(results: Results, candidate: str, n: int = 20) -> list[ExampleRecord]:
    """The n lowest-scoring kept examples of a candidate that are not fully right: failed requests first,
    then by score (ties in row order)."""
    scored = []
    for ex in EvalResults.of(results).examples:
        p = ex.predictions.get(candidate)
        if p is None or p.dropped:
            continue
        if p.error is None and p.score is not None and p.score >= 1.0:
            continue
        scored.append((p.error is None, p.score if p.score is not None else 0.0, ex.index, ex))
    scored.sort(key=lambda t: t[:3])
    return [t[3] for t in scored[:n]]


@dataclass(frozen=True)
class _Plot:
    name: str
    data: str  # base64 PNG


@dataclass(frozen=True)
class _CandidateRow:
    name: str
    model: str
    metrics: list[str]
    examples: int
    dropped: int
    errors: int
    prompt_tokens: str
    completion_tokens: str
    mean_latency: str
    p95_latency: str


@dataclass(frozen=True)
class _WorstRow:
    row: int
    input: str
    prediction: str
    reference: str
    score: str


@dataclass(frozen=True)
class _Worst:
    name: str
    rows: list[_WorstRow]


@cache
def _environment() -> jinja2.Environment:
    import jinja2

    return jinja2.Environment(loader=jinja2.PackageLoader("kubetune.serving", "templates"),
                              autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def _worst_rows(doc: EvalResults, candidate: str) -> list[_WorstRow]:
    rows = []
    for ex in worst_examples(doc, candidate):
        p = ex.predictions[candidate]
        text = p.text if p.error is None else f"(request failed: {p.error})"
        inp = "; ".join(f"{k}: {v}" for k, v in ex.input.items() if v != ex.reference)
        rows.append(_WorstRow(row=ex.row, input=inp[:600], prediction=text, reference=ex.reference,
                              score="-" if p.score is None else format(p.score, ".2f")))
    return rows


def render_html(results: Results, out: Path, plots: list[Path] | None = None) -> str:
    """The page; `plots` (default: those of PLOTS found in `out`) are inlined in that order."""
    doc = EvalResults.of(results)
    metrics = metric_names(doc)
    candidates = [
        _CandidateRow(name=c.name, model=c.model or "", metrics=[_fmt(c.metrics.get(m), m) for m in metrics],
                      examples=c.examples or 0, dropped=c.dropped or 0, errors=c.errors or 0,
                      prompt_tokens=_fmt(c.prompt_tokens_per_request),
                      completion_tokens=_fmt(c.completion_tokens_per_request),
                      mean_latency=_seconds(c.latency.mean_seconds if c.latency else None),
                      p95_latency=_seconds(c.latency.p95_seconds if c.latency else None))
        for c in doc.candidates]
    paths = plots if plots is not None else [out / name for name in PLOTS if (out / name).exists()]
    return _environment().get_template("report.html.j2").render(
        results=doc, metrics=metrics, candidates=candidates,
        notes=[f"{c.name}: {n}" for c in doc.candidates for n in c.notes],
        plots=[_Plot(p.name, base64.b64encode(p.read_bytes()).decode()) for p in paths],
        worst=[_Worst(c.name, _worst_rows(doc, c.name)) for c in doc.candidates])


def write_report(results: Results, out: Path) -> Path:
    """Plots and report.html into `out`; returns the report's path."""
    doc = EvalResults.of(results)
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(doc, out)
    path = out / "report.html"
    path.write_text(render_html(doc, out, plots))
    return path


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print("usage: python -m kubetune.serving.report results.json", file=sys.stderr)
        return 2
    src = Path(args[0])
    results = EvalResults.from_wire(json.loads(src.read_text()))
    print(write_report(results, src.parent))
    print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
