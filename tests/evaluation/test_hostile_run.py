"""The evaluator keeps going through hostile predictions (issue 12): `evaluate.run` against an endpoint
that answers with them still writes results.json and the report, with every row, each hostile prediction
scored 0 with its reason, and the reasons counted per candidate.

The endpoint is a small OpenAI-compatible HTTP server that answers each question with a canned completion
(no model, no Ray): what is tested is what the evaluator does with the answers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("matplotlib")

from factories import evj_manifest
from kubetune.api.evaljob import EvalJob
from kubetune.contract.evalplan import EvalPlan, plan
from kubetune.serving import evaluate, scorers
from kubetune.serving.evaluate import Outcome, run
from support.httpserver import JsonHandler, LocalServer

CONTEXT = "CREATE TABLE head (age INTEGER)"
GOLD = "SELECT COUNT(*) FROM head WHERE age > 56"
# question -> (completion, the failure it must score 0 with, or None for a correct answer)
ANSWERS: dict[str, tuple[str, str | None]] = {
    "zeroblob": (("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x<800) "
                  "SELECT zeroblob(999999) FROM c"), "resultTooLarge"),
    "instr": ("SELECT instr(printf('%.*c', 900000, 'x'), printf('%.*c', 300000, 'x') || 'y')", "timeout"),
    "long statement": ("SELECT " + " + ".join(["1"] * 5000), "statementTooLong"),
    "100 KB": ("SELECT 1 " + "-" * 100_000, "predictionTooLong"),
    "right": (GOLD, None),
    "also right": ("select count(*) from head where age > 56", None),
}


class CannedHandler(JsonHandler):
    """/v1/completions that answers a prompt ending in a question with ANSWERS[question]."""

    def do_POST(self) -> None:
        body = self.read_json()
        answer = ANSWERS[body["prompt"].rsplit("Question: ", 1)[-1].strip()][0]
        self.send_json(200, {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": body["model"],
                             "choices": [{"index": 0, "text": answer, "logprobs": None, "finish_reason": "stop"}],
                             "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}})


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    with LocalServer(CannedHandler) as server:
        yield server.url


def sql_plan(workspace: Path, url: str) -> EvalPlan:
    (workspace / "test.jsonl").write_text("".join(
        json.dumps({"question": q, "context": CONTEXT, "answer": GOLD}) + "\n" for q in ANSWERS))
    candidate = {"name": "model", "model": {"endpoint": {"url": url, "model": "canned"}},
                 "prompt": {"template": "Question: {question}"}, "generation": {"maxTokens": 16}}
    manifest = evj_manifest("sql-eval", spec__candidates=[candidate],
                            spec__dataset={"uri": str(workspace / "test.jsonl"), "reference": "{answer}"},
                            spec__scorer={"name": "sqlExecution"}, spec__output={"uri": str(workspace / "out")})
    return plan(EvalJob.from_body(manifest), {}, {}, {})


def outputs(outcome: Outcome) -> tuple[dict[str, Any], str]:
    """(results.json, report.html) as written to the staging folder."""
    return (json.loads((outcome.local_dir / "results.json").read_text()),
            (outcome.local_dir / "report.html").read_text())


def test_every_hostile_prediction_scores_zero_with_its_reason_in_a_complete_results_json(
        endpoint: str, tmp_path: Path) -> None:
    outcome = run(sql_plan(tmp_path, endpoint), tmp_path / "staging", cache_dir=tmp_path / "cache")
    results, report = outputs(outcome)
    predictions = [ex["predictions"]["model"] for ex in results["examples"]]
    assert [(ex["input"]["question"], p["failure"]) for ex, p in zip(results["examples"], predictions, strict=True)
            ] == [(q, failure) for q, (_, failure) in ANSWERS.items()]
    assert [p["score"] for p in predictions] == [0.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    summary = results["candidates"][0]
    assert summary["failures"] == {"predictionTooLong": 1, "resultTooLarge": 1, "statementTooLong": 1,
                                   "timeout": 1}
    assert summary["metrics"] == {"executionAccuracy": pytest.approx(2 / 6)}
    assert "4 predictions could not be scored" in report


def test_a_scorer_that_raises_still_leaves_results_json_and_the_report(
        endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(name: str, *args: Any, **kwargs: Any) -> scorers.Scored:
        raise RuntimeError("a bug in a scorer")

    monkeypatch.setattr(evaluate.scorers, "score", broken)
    outcome = run(sql_plan(tmp_path, endpoint), tmp_path / "staging", cache_dir=tmp_path / "cache")
    results, report = outputs(outcome)
    assert len(results["examples"]) == len(ANSWERS)
    assert results["candidates"][0]["metrics"] == {}
    assert results["candidates"][0]["notes"] == ["scoring failed (RuntimeError): no metrics"]
    assert "scoring failed (RuntimeError)" in report
