"""The evaluation report: one self-contained HTML page (plots inlined as PNG), its plots as files, a table.

Input is results.json as `evaluate.results_document` writes it, so a report can be rebuilt from a
stored results.json alone (`python -m kubetune.serving.report results.json`).
"""

from __future__ import annotations

import base64
import html
import json
import sys
from pathlib import Path
from typing import Any

PLOTS = ("metrics.png", "tokens.png", "latency.png", "learning_curve.png")


def metric_names(results: dict[str, Any]) -> list[str]:
    """Metric columns, the headline one first."""
    names: list[str] = []
    for c in results["candidates"]:
        names += [m for m in c.get("metrics", {}) if m not in names]
    primary = results.get("primaryMetric")
    if primary in names:
        names.remove(primary)
        names.insert(0, primary)
    return names


def _fmt(value: Any, metric: str = "") -> str:
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


def _seconds(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}s"


def format_table(results: dict[str, Any]) -> str:
    """The candidates x metrics table `kubetune run` prints."""
    metrics = metric_names(results)
    head = ["candidate", *metrics, "prompt tok/req", "compl tok/req", "p95 latency", "errors"]
    rows = []
    for c in results["candidates"]:
        lat = c.get("latency") or {}
        rows.append([c["name"], *(_fmt(c.get("metrics", {}).get(m), m) for m in metrics),
                     _fmt(c.get("promptTokensPerRequest")), _fmt(c.get("completionTokensPerRequest")),
                     _seconds(lat.get("p95Seconds")), str(c.get("errors", 0))])
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(str(v).rjust(w) if i else str(v).ljust(w) for i, (v, w) in enumerate(zip(r, widths,
                                                                                               strict=True)))
             for r in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    gate = results.get("gate")
    if gate:
        lines.append(("PASSED " if gate["passed"] else "FAILED ") + gate["message"])
    notes = [f"{c['name']}: {n}" for c in results["candidates"] for n in c.get("notes", [])]
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)


# -- plots -----------------------------------------------------------------------------------------


def write_plots(results: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [c["name"] for c in results["candidates"]]
    metrics = metric_names(results)
    written = []

    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(metrics) * max(1, len(names)) / 2), 4))
    width = 0.8 / max(1, len(names))
    for i, c in enumerate(results["candidates"]):
        values = [c.get("metrics", {}).get(m) or 0.0 for m in metrics]
        scaled = [v if m in ("chrf", "bleu") else 100 * v for v, m in zip(values, metrics, strict=True)]
        xs = [j + i * width for j in range(len(metrics))]
        bars = ax.bar(xs, scaled, width, label=c["name"])
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(metrics))], metrics, rotation=15)
    ax.set_ylabel("score (%; chrF/BLEU points)")
    ax.set_title(f"{results['scorer']}: scores per candidate")
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(_save(fig, out / "metrics.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    prompt = [c.get("promptTokensPerRequest") or 0 for c in results["candidates"]]
    compl = [c.get("completionTokensPerRequest") or 0 for c in results["candidates"]]
    ax.bar(names, prompt, label="prompt")
    ax.bar(names, compl, bottom=prompt, label="completion")
    ax.set_ylabel("tokens per request")
    ax.set_title("Tokens per request (what each answer costs)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(_save(fig, out / "tokens.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    mean = [(c.get("latency") or {}).get("meanSeconds", 0) for c in results["candidates"]]
    p95 = [(c.get("latency") or {}).get("p95Seconds", 0) for c in results["candidates"]]
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], mean, 0.4, label="mean")
    ax.bar([x + 0.2 for x in xs], p95, 0.4, label="p95")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("seconds per request")
    ax.set_title("Latency (under the evaluation's concurrency)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(_save(fig, out / "latency.png"))

    curve = results.get("learningCurve") or []
    if curve:
        fig, ax = plt.subplots(figsize=(6, 4))
        epochs = [e["epoch"] for e in curve]
        ax.plot(epochs, [e["valPerplexity"] for e in curve], marker="o", label="validation perplexity")
        ax.plot(epochs, [2.718281828 ** e["trainLoss"] for e in curve], marker=".", linestyle="--",
                label="exp(train loss)")
        if results.get("baseValPerplexity"):
            ax.axhline(results["baseValPerplexity"], color="grey", linestyle=":", label="base model")
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


def worst_examples(results: dict[str, Any], candidate: str, n: int = 20) -> list[dict[str, Any]]:
    """The n lowest-scoring kept examples of a candidate that are not fully right: failed requests first,
    then by score (ties in row order)."""
    scored = []
    for ex in results["examples"]:
        p = ex["predictions"].get(candidate)
        if p is None or p.get("dropped"):
            continue
        score = p.get("score")
        if p.get("error") is None and score is not None and score >= 1.0:
            continue
        scored.append((p.get("error") is None, score if score is not None else 0.0, ex["index"], ex))
    scored.sort(key=lambda t: t[:3])
    return [t[3] for t in scored[:n]]


def render_html(results: dict[str, Any], out: Path, plots: list[Path] | None = None) -> str:
    """The page; `plots` (default: those of PLOTS found in `out`) are inlined in that order."""
    e = html.escape
    metrics = metric_names(results)
    job = results["evalJob"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>kubetune eval {e(job['name'])}</title>",
             ("<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
             "vertical-align:top;font-size:13px}th{background:#f4f4f4}td.n{text-align:right}"
             "pre{white-space:pre-wrap;margin:0;font-size:12px}.pass{color:#070}.fail{color:#b00}"
             "img{max-width:100%;border:1px solid #eee;margin:4px}</style></head><body>"),
             f"<h1>Evaluation {e(job['namespace'])}/{e(job['name'])}</h1>",
             (f"<p>Scorer <b>{e(results['scorer'])}</b> on {results['rows']} rows; headline metric "
             f"<b>{e(str(results.get('primaryMetric')))}</b>; {results['seconds']} s.</p>")]
    gate = results.get("gate")
    if gate:
        cls = "pass" if gate["passed"] else "fail"
        parts.append(f"<p class='{cls}'><b>Gate {'passed' if gate['passed'] else 'FAILED'}</b>: "
                     f"{e(gate['message'])}</p>")
    parts.append("<h2>Candidates</h2><table><tr><th>candidate</th><th>model</th>"
                 + "".join(f"<th>{e(m)}</th>" for m in metrics)
                 + "<th>rows</th><th>dropped</th><th>errors</th><th>prompt tok/req</th><th>compl tok/req</th>"
                   "<th>mean latency</th><th>p95 latency</th></tr>")
    for c in results["candidates"]:
        lat = c.get("latency") or {}
        parts.append(
            f"<tr><td><b>{e(c['name'])}</b></td><td>{e(str(c.get('model') or ''))}</td>"
            + "".join(f"<td class=n>{_fmt(c.get('metrics', {}).get(m), m)}</td>" for m in metrics)
            + f"<td class=n>{c.get('examples', 0)}</td><td class=n>{c.get('dropped', 0)}</td>"
              f"<td class=n>{c.get('errors', 0)}</td><td class=n>{_fmt(c.get('promptTokensPerRequest'))}</td>"
              f"<td class=n>{_fmt(c.get('completionTokensPerRequest'))}</td>"
              f"<td class=n>{_seconds(lat.get('meanSeconds'))}</td>"
              f"<td class=n>{_seconds(lat.get('p95Seconds'))}</td></tr>")
    parts.append("</table>")
    notes = [f"{c['name']}: {n}" for c in results["candidates"] for n in c.get("notes", [])]
    if notes:
        parts.append("<ul>" + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
    parts.append("<h2>Plots</h2>")
    for path in plots if plots is not None else [out / name for name in PLOTS if (out / name).exists()]:
        data = base64.b64encode(path.read_bytes()).decode()
        parts.append(f"<img alt='{path.name}' src='data:image/png;base64,{data}'>")
    parts.append("<h2>Prompts (first row)</h2>")
    for c in results["candidates"]:
        parts.append(f"<h3>{e(c['name'])}</h3><pre>{e(c.get('prompt', ''))}</pre>")
    for c in results["candidates"]:
        worst = worst_examples(results, c["name"])
        if not worst:
            parts.append(f"<h2>Worst examples: {e(c['name'])}</h2><p>Every kept example scored 1.0.</p>")
            continue
        parts.append(f"<h2>Worst {len(worst)} examples: {e(c['name'])}</h2><table><tr><th>#</th><th>input</th>"
                     "<th>prediction</th><th>reference</th><th>score</th></tr>")
        for ex in worst:
            p = ex["predictions"][c["name"]]
            text = p["text"] if p.get("error") is None else f"(request failed: {p['error']})"
            inp = "; ".join(f"{k}: {v}" for k, v in ex["input"].items() if v != ex["reference"])
            parts.append(f"<tr><td class=n>{ex['row']}</td><td><pre>{e(inp[:600])}</pre></td>"
                         f"<td><pre>{e(text)}</pre></td><td><pre>{e(ex['reference'])}</pre></td>"
                         f"<td class=n>{'-' if p.get('score') is None else format(p['score'], '.2f')}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "".join(parts)


def write_report(results: dict[str, Any], out: Path) -> Path:
    """Plots and report.html into `out`; returns the report's path."""
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(results, out)
    path = out / "report.html"
    path.write_text(render_html(results, out, plots))
    return path


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print("usage: python -m kubetune.serving.report results.json", file=sys.stderr)
        return 2
    src = Path(args[0])
    results = json.loads(src.read_text())
    print(write_report(results, src.parent))
    print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
