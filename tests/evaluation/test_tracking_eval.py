"""An evaluation's scores go to the experiment-tracking run of the FineTuneJob it evaluates, found by the
FineTuneJob's uid (nothing passed through status): the plan names the run, `evaluate.run` logs to it.

The candidates answer from a small OpenAI-compatible server (no model, no Ray); MLflow is a file store read
back with MlflowClient, TensorBoard's events are read back with its EventAccumulator."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("matplotlib")

from factories import evj_manifest, ftj
from kubetune.api.evaljob import EvalJob
from kubetune.api.finetunejob import FineTuneJob
from kubetune.contract.evalplan import EvalPlan, evaljob_for, plan
from kubetune.contract.tracking import RUN_KEY_TAG, run_key
from kubetune.serving.evaluate import Outcome, run
from kubetune.trainer.tracking import Tracker, target_of
from support.httpserver import JsonHandler, LocalServer

UID = "7d2f8a44-evaluated-ftj"
ROWS = [{"ref": f"sentence {i}", "mr": "inform(name[A])" if i % 2 else "inform(name[B])"} for i in range(6)]
EVALUATION = {"dataset": {"uri": "test.jsonl", "reference": "{mr}"}, "scorer": {"name": "exactMatch"},
              "baselinePrompt": {"template": "Sentence: {ref}\nMR:"}, "generation": {"maxTokens": 16}}


class Canned(JsonHandler):
    """The fine-tuned model answers inform(name[A]) (right on half the rows), the base model nonsense."""

    def do_POST(self) -> None:
        body = self.read_json()
        text = "inform(name[A])" if body["model"] == "fine-tuned" else "no idea"
        self.send_json(200, {"id": "c", "object": "text_completion", "created": 0, "model": body["model"],
                             "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}],
                             "usage": {"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8}})


def trained(root: Path, uid: str | None = UID) -> FineTuneJob:
    evaluation = {**EVALUATION, "dataset": {"uri": str(root / "test.jsonl"), "reference": "{mr}"}}
    job = ftj("viggo", uid=uid or "set-below", spec__output={"uri": str(root / "out")}, spec__evaluation=evaluation,
              spec__tracking={"mlflow": {"trackingUri": f"file://{root / 'mlruns'}"}, "tensorboard": {}})
    if uid is None:  # a local `kubetune run`: no uid
        job.metadata.uid = None
    return job


def evaluation_plan(job: FineTuneJob, url: str) -> EvalPlan:
    evaljob = EvalJob.from_body(evaljob_for(job, "base-model"))
    return plan(evaljob, {"fine-tuned": "s3://b/best", "base-few-shot": "base-model"}, {job.metadata.name: job},
                {"fine-tuned": url, "base-few-shot": url})


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Outcome, Path]]:
    root = tmp_path_factory.mktemp("tracked-eval")
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    job = trained(root)
    training = Tracker.open(target_of(job), root / "train-work", params={"hyperparameters.epochs": 10})
    training.log_epoch(1, 4, {"val/perplexity": 2.0})
    training.finish()  # the training's run, FINISHED
    with LocalServer(Canned) as server:
        outcome = run(evaluation_plan(job, server.url), root / "staging", cache_dir=root / "cache")
    yield outcome, root


def mlflow_run(root: Path) -> Any:
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=f"file://{root / 'mlruns'}")
    experiment = client.get_experiment_by_name("kubetune")
    (found,) = client.search_runs([experiment.experiment_id])  # one run: the training's
    return found


def test_the_plan_names_the_finetunejobs_run(tmp_path: Path) -> None:
    tracking = evaluation_plan(trained(tmp_path), "http://127.0.0.1:1/v1").tracking
    assert tracking is not None
    assert (tracking.run.key, tracking.run.kind, tracking.run.name) == (UID, "FineTuneJob", "viggo")


def test_a_local_run_is_found_by_the_same_key_as_the_training_used(tmp_path: Path) -> None:
    job = trained(tmp_path, uid=None)
    training, evaluation = target_of(job), evaluation_plan(job, "http://127.0.0.1:1/v1").tracking
    assert training is not None and evaluation is not None
    assert evaluation.run.key == training.run.key == run_key("default", "viggo", None, str(tmp_path / "out"))
    assert run_key("default", "viggo", None, str(tmp_path / "other")) != training.run.key


def test_an_evaljob_of_no_finetunejob_logs_to_its_own_run() -> None:
    candidate = {"name": "gpt", "model": {"endpoint": {"url": "http://127.0.0.1:1/v1", "model": "gpt"}},
                 "prompt": {"template": "{ref}"}}
    job = EvalJob.from_body({**evj_manifest(spec__candidates=[candidate], spec__tracking={"tensorboard": {}}),
                             "metadata": {"name": "viggo-eval", "namespace": "default", "uid": "evj-uid"}})
    tracking = plan(job, {}, {}, {}).tracking
    assert tracking is not None and (tracking.run.key, tracking.run.kind) == ("evj-uid", "EvalJob")
    assert tracking.spec.tensorboard is not None
    assert tracking.spec.tensorboard.log_uri == "s3://bucket/viggo/eval/tensorboard"


def test_no_tracking_no_run() -> None:
    uris = {"fine-tuned": "s3://b/best", "base": "m"}
    assert plan(EvalJob.from_body(evj_manifest()), uris, {"viggo": ftj("viggo")}, uris).tracking is None


def test_the_scores_per_model_are_in_the_trainings_mlflow_run(evaluated: tuple[Outcome, Path]) -> None:
    outcome, root = evaluated
    found = mlflow_run(root)
    assert found.data.tags[RUN_KEY_TAG] == UID
    scores = {f"eval/{c.name}/{m}": v for c in outcome.results.candidates for m, v in c.metrics.items()}
    assert scores and {k: found.data.metrics[k] for k in scores} == scores
    assert found.data.metrics["eval/fine-tuned/exactMatch"] > found.data.metrics["eval/base-few-shot/exactMatch"]


def test_the_report_and_the_evaljob_are_tags_of_the_run(evaluated: tuple[Outcome, Path]) -> None:
    outcome, root = evaluated
    tags = mlflow_run(root).data.tags
    assert tags["kubetune.eval.report"] == outcome.report
    assert tags["kubetune.eval.job"] == "default/viggo-eval"


def test_the_evaluation_leaves_the_trainings_run_finished(evaluated: tuple[Outcome, Path]) -> None:
    found = mlflow_run(evaluated[1])
    assert found.info.status == "FINISHED" and found.data.params == {"hyperparameters.epochs": "10"}


def test_the_scores_are_in_the_trainings_tensorboard_folder(evaluated: tuple[Outcome, Path]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    outcome, root = evaluated
    events = EventAccumulator(str(root / "out" / "tensorboard" / "viggo"))  # where the training wrote
    events.Reload()
    tuned = next(c for c in outcome.results.candidates if c.name == "fine-tuned")
    assert [e.value for e in events.Scalars("eval/fine-tuned/exactMatch")] == [tuned.metrics["exactMatch"]]
    assert [e.step for e in events.Scalars("val/perplexity")] == [4]
