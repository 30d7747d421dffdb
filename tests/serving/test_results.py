"""results.json as typed models, and the report's template (autoescaped, shipped with the package)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubetune.serving.report import render_html
from kubetune.serving.results import EvalResults


def document() -> dict[str, Any]:
    """A results.json as `evaluate.results_document` writes it (every key present)."""
    return {
        "evalJob": {"name": "e", "namespace": "default"}, "createdAt": "2026-01-01T00:00:00Z",
        "scorer": "viggo", "primaryMetric": "exactMatch", "seconds": 1.5, "rows": 1,
        "candidates": [{
            "name": "tuned", "model": "runs/ft/best", "endpoint": "http://x/v1", "service": "e-tuned",
            "metrics": {"exactMatch": 0.0}, "examples": 1, "dropped": 0, "errors": 0,
            "latency": {"meanSeconds": 0.5, "p95Seconds": 0.5}, "promptTokensPerRequest": 10.0,
            "completionTokensPerRequest": 4.0, "prompt": "<Q>a & b<A>", "notes": [], "failures": {}, "fineTuneJob": "ft",
            "served": True, "seconds": 0.6}],
        "gate": None, "learningCurve": [], "baseValPerplexity": None,
        "examples": [{"index": 0, "row": 1, "input": {"ref": "a & b"}, "reference": "inform(name[<x>])",
                      "predictions": {"tuned": {
                          "text": "<script>alert(1)</script>", "error": None, "score": 0.0, "dropped": None, "failure": None,
                          "latencySeconds": 0.5, "promptTokens": 10, "completionTokens": 4,
                          "details": {"parsedPrediction": None}}}}],
    }


def test_results_json_round_trips_with_the_same_keys() -> None:
    results = EvalResults.from_wire(document())
    assert results.candidate("tuned").fine_tune_job == "ft"
    assert results.examples[0].predictions["tuned"].completion_tokens == 4
    assert json.loads(results.to_json()) == document()


def test_an_unknown_key_in_results_json_is_rejected() -> None:
    broken = document()
    broken["examples"][0]["predictions"]["tuned"]["txet"] = "typo"
    with pytest.raises(ValueError, match="txet"):
        EvalResults.of(broken)


def test_the_report_escapes_what_models_and_datasets_wrote(tmp_path: Path) -> None:
    page = render_html(document(), tmp_path, plots=[])
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;Q&gt;a &amp; b&lt;A&gt;" in page
    assert "Worst 1 examples: tuned" in page


def test_the_report_template_ships_with_the_package() -> None:
    import importlib.resources

    template = importlib.resources.files("kubetune.serving") / "templates" / "report.html.j2"
    assert template.is_file()
    pyproject = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    assert '"kubetune.serving" = ["templates/*.j2"]' in pyproject
