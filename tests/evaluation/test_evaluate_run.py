"""The evaluator end to end: `kubetune.serving.evaluate.run` on a real plan, against real servers.

Two candidates, as a cluster evaluation would have them:
- `tuned`: a tiny Llama checkpoint served by the kubetune Serve app on local Ray (the transformers
  engine), prompted in its special-token format;
- `oracle`: an external OpenAI-compatible endpoint with an API key from a Secret. It stands in for a
  hosted model (no network here): a small HTTP server that answers each prompt with its reference, and
  only with the right Bearer token, so its scores are known (100%) and the key's path is checked.

The evaluator reports into the EvalJob's status on the fake Kubernetes API (schema-checked against the
CRD), exactly as in a pod, and writes results.json, report.html and the plots. One run for the module.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from factories import evj_manifest
from kubetune.api.evaljob import EvalJob
from kubetune.contract.evalplan import EvalPlan, api_key_env, plan
from kubetune.contract.progress import StatusReporter
from kubetune.operator import kube
from kubetune.serving import scorers
from kubetune.serving.evaluate import Outcome, PlanError, run
from kubetune.serving.options import ServeOptions
from kubetune.serving.server import serve_locally, shutdown_local
from support.harness import start_api
from support.httpserver import JsonHandler, LocalServer
from support.workspace import write_workspace
from viggo_like import viggo_like_rows

ROWS = viggo_like_rows(60, seed=21)
TEST_ROWS = ROWS[48:]  # 12 evaluated rows; the first 48 are the workspace's train/valid data
API_KEY = "sk-kubetune-test"
NAME = "viggo-eval"


# -- the external endpoint ------------------------------------------------------------------------


class Oracle(LocalServer):
    """An OpenAI-compatible /v1/completions that answers a prompt ending in a row's sentence with its MR."""

    def __init__(self) -> None:
        super().__init__(OracleHandler)
        self.answers = {r["ref"]: r["mr"] for r in ROWS}
        self.authorizations: list[str | None] = []


class OracleHandler(JsonHandler):
    server: Oracle

    def do_POST(self) -> None:
        body = self.read_json()
        self.server.authorizations.append(self.headers.get("Authorization"))
        if self.headers.get("Authorization") != f"Bearer {API_KEY}":
            self.send_json(401, {"error": {"message": "invalid api key", "type": "invalid_request_error"}})
            return
        question = body["prompt"].rsplit("Sentence: ", 1)[-1].split("\n", 1)[0]
        answer = " " + self.server.answers.get(question, "none()")
        self.send_json(200, {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": body["model"],
                             "choices": [{"index": 0, "text": answer, "logprobs": None, "finish_reason": "stop"}],
                             "usage": {"prompt_tokens": len(body["prompt"].split()),
                                       "completion_tokens": len(answer.split()),
                                       "total_tokens": len(body["prompt"].split()) + len(answer.split())}})


# -- the run --------------------------------------------------------------------------------------


def evaljob(workspace: Path, oracle_url: str) -> EvalJob:
    tuned = {"name": "tuned", "model": {"uri": str(workspace / "base")},
             "prompt": {"template": "<START_Q>{ref}<END_Q><START_A>"},
             "generation": {"maxTokens": 24, "stop": ["<END_A>"]}}
    oracle = {"name": "oracle",
              "model": {"endpoint": {"url": oracle_url, "model": "oracle-1",
                                     "apiKeySecretRef": {"name": "oracle", "key": "api-key"}}},
              "prompt": {"instruction": "Give the meaning representation.",
                         "template": "Sentence: {ref}\nMeaning representation:", "answer": " {mr}",
                         "fewShot": {"k": 3, "source": {"uri": str(workspace / "train.jsonl")}}},
              "generation": {"maxTokens": 48, "stop": ["\n"]}}
    manifest = evj_manifest(NAME, spec__candidates=[tuned, oracle],
                            spec__dataset={"uri": str(workspace / "test.jsonl"), "reference": "{mr}"},
                            spec__gate={"candidate": "tuned", "beats": [{"candidate": "oracle"}]},
                            spec__output={"uri": str(workspace / "eval")}, spec__concurrency=8)
    return EvalJob.from_body(manifest)


@dataclass
class Evaluated:
    outcome: Outcome
    status: dict[str, Any]
    plan: EvalPlan
    oracle: Oracle
    workspace: Path


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Evaluated]:
    workspace = write_workspace(tmp_path_factory.mktemp("eval"), ROWS[:48], n_train=36)
    (workspace / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TEST_ROWS))
    with Oracle() as oracle:
        api, _ = start_api(workspace)
        try:
            job = evaljob(workspace, oracle.url)
            api_obj = job.to_wire()
            api_obj.pop("status", None)
            created = EvalJob.from_body(_create(api, api_obj))
            url = serve_locally(ServeOptions(model_uri=str(workspace / "base"), served_model_name="tuned",
                                             max_model_len=256), name="tuned")
            resolved = plan(created, {"tuned": str(workspace / "base")}, {}, {"tuned": url})
            reporter = StatusReporter(server=api.url, namespace="default", name=NAME, plural="evaljobs")
            os.environ[api_key_env("oracle")] = API_KEY  # what the pod gets from the Secret
            try:
                outcome = run(resolved, workspace / "staging", reporter, cache_dir=workspace / "cache")
            finally:
                os.environ.pop(api_key_env("oracle"), None)
            status = dict(_get(api)["status"])
            yield Evaluated(outcome, status, resolved, oracle, workspace)
        finally:
            shutdown_local()
            api.stop()


def _create(api: Any, body: dict[str, Any]) -> dict[str, Any]:
    from support.client import SyncKube

    created: dict[str, Any] = SyncKube(api.url).create(body)
    return created


def _get(api: Any) -> dict[str, Any]:
    from support.client import SyncKube

    got: dict[str, Any] = SyncKube(api.url).get(kube.evj_ref("default", NAME))
    return got


def candidate(evaluated: Evaluated, name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in evaluated.status["candidates"] if c["name"] == name)
    return found


# -- what lands in the EvalJob's status ------------------------------------------------------------


def test_status_has_each_candidates_metrics(evaluated: Evaluated) -> None:
    assert [c["name"] for c in evaluated.status["candidates"]] == ["tuned", "oracle"]
    assert candidate(evaluated, "oracle")["metrics"]["exactMatch"] == 1.0
    assert set(candidate(evaluated, "tuned")["metrics"]) >= {"exactMatch", "functionAccuracy"}
    assert candidate(evaluated, "tuned")["examples"] == len(TEST_ROWS)


def test_status_has_latency_and_tokens_per_request(evaluated: Evaluated) -> None:
    for name in ("tuned", "oracle"):
        c = candidate(evaluated, name)
        assert 0 < c["latency"]["meanSeconds"] <= c["latency"]["p95Seconds"]
        assert c["promptTokensPerRequest"] > 0 and c["completionTokensPerRequest"] > 0
        assert c["errors"] == 0


def test_the_few_shot_prompt_costs_more_tokens_than_the_special_token_format(evaluated: Evaluated) -> None:
    results = evaluated.outcome.results
    assert results.candidate("oracle").prompt.count("Sentence: ") == 4  # three worked examples, then the row
    assert results.candidate("oracle").prompt.startswith("Give the meaning representation.")
    assert results.candidate("tuned").prompt == f"<START_Q>{TEST_ROWS[0]['ref']}<END_Q><START_A>"


def test_status_has_the_gate_verdict_and_the_report_location(evaluated: Evaluated) -> None:
    gate = evaluated.status["gate"]
    assert gate["passed"] is False and gate["metric"] == "exactMatch"
    assert "tuned exactMatch > oracle exactMatch" in gate["message"]
    assert evaluated.status["report"]["uri"] == f"{evaluated.workspace / 'eval'}/report.html"


def test_progress_counts_every_request_of_every_candidate(evaluated: Evaluated) -> None:
    assert evaluated.status["progress"]["done"] == evaluated.status["progress"]["total"] == 2 * len(TEST_ROWS)


# -- the endpoint candidate -----------------------------------------------------------------------


def test_the_api_key_from_the_secret_is_sent_as_a_bearer_token(evaluated: Evaluated) -> None:
    assert evaluated.oracle.authorizations == [f"Bearer {API_KEY}"] * len(TEST_ROWS)


def test_a_missing_api_key_fails_before_any_request_naming_the_field(evaluated: Evaluated, tmp_path: Path) -> None:
    asked = len(evaluated.oracle.authorizations)
    with pytest.raises(PlanError, match=r"^spec\.candidates\[1\]\.model\.endpoint\.apiKeySecretRef: .*"
                                        r'Secret "oracle" or its key "api-key"'):
        run(evaluated.plan, tmp_path, cache_dir=evaluated.workspace / "cache")
    assert len(evaluated.oracle.authorizations) == asked


# -- the outputs ----------------------------------------------------------------------------------


def test_outputs_are_published_to_output_uri(evaluated: Evaluated) -> None:
    out = evaluated.workspace / "eval"
    for name in ("results.json", "report.html", "metrics.png", "tokens.png", "latency.png"):
        assert (out / name).stat().st_size > 0, name


def test_results_json_has_every_rows_prediction_for_every_candidate(evaluated: Evaluated) -> None:
    results = json.loads((evaluated.workspace / "eval" / "results.json").read_text())
    assert [e["reference"] for e in results["examples"]] == [r["mr"] for r in TEST_ROWS]
    for example in results["examples"]:
        assert set(example["predictions"]) == {"tuned", "oracle"}
        assert example["predictions"]["oracle"]["text"].strip() == example["reference"]


def test_metrics_are_the_scorer_applied_to_the_recorded_predictions(evaluated: Evaluated) -> None:
    results = evaluated.outcome.results
    texts = [e.predictions["tuned"].text for e in results.examples]
    again = scorers.score("viggo", texts, [r["mr"] for r in TEST_ROWS])
    assert candidate(evaluated, "tuned")["metrics"] == pytest.approx(again.metrics)


def test_the_report_shows_both_candidates_and_their_worst_examples(evaluated: Evaluated) -> None:
    page = (evaluated.workspace / "eval" / "report.html").read_text()
    assert "Worst 12 examples: tuned" in page
    assert "Worst examples: oracle</h2><p>Every kept example scored 1.0." in page
    assert page.count("src='data:image/png;base64,") == 3  # no learning curve: no FineTuneJob here
