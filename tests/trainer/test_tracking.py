"""The tracker (kubetune.trainer.tracking) against the real libraries: MLflow's file store read back with
MlflowClient, W&B in offline mode read back from its .wandb file, TensorBoard's event files read back with
TensorBoard's EventAccumulator, and a tracking backend that fails without failing anything else."""

from __future__ import annotations

import base64
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from factories import ftj, ftj_manifest
from kubetune.api.finetunejob import FineTuneJob
from kubetune.api.tracking import SECRET_ENVS
from kubetune.contract.progress import StatusReporter
from kubetune.contract.tracking import RUN_KEY_TAG, TrackingTarget
from kubetune.operator import kube
from kubetune.trainer.config import from_finetunejob
from kubetune.trainer.tracking import Tracker, start_training, status_warning, target_of, training_params
from support.harness import start_api
from support.httpserver import JsonHandler, LocalServer
from support.wandbfile import read_offline_run

UID = "3f1c2a9e-uid-tracking"
PASSWORD = "hunter2-very-secret"  # what a credentials Secret would hold
STEPS = [(1, 2.0), (2, 1.5), (3, 1.25), (4, 1.0)]  # (step, loss)


def job(tmp_path: Path, **tracking: Any) -> FineTuneJob:
    return ftj("viggo", uid=UID, spec__tracking=tracking, spec__output={"uri": str(tmp_path / "out")})


def target(tmp_path: Path, **tracking: Any) -> TrackingTarget:
    found = target_of(job(tmp_path, **tracking))
    assert found is not None
    return found


def mlflow_uri(tmp_path: Path) -> str:
    return f"file://{tmp_path / 'mlruns'}"


def train_like(tracker: Tracker, epochs: int = 1) -> None:
    """What rank 0 of a training logs: steps, an epoch, the best checkpoint."""
    for step, loss in STEPS:
        tracker.log_step(step, {"loss": loss, "learning_rate": 1e-3 * step,
                                "grad_norm": torch.tensor(0.5 * step), "tokens_per_second": 100.0 * step})
    for epoch in range(1, epochs + 1):
        tracker.log_epoch(epoch, 4 * epoch, {"train/epoch_loss": 1.4, "val/loss": 0.7, "val/perplexity": 2.0})
    tracker.log_summary({"best/val_perplexity": 2.0}, {"kubetune.bestCheckpoint.uri": "s3://bucket/runs/viggo/best"},
                        step=4)


def mlflow_run(tmp_path: Path, key: str = UID) -> Any:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri(tmp_path))
    experiment = client.get_experiment_by_name("finetune")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


@pytest.fixture(autouse=True, scope="module")
def _no_credentials() -> Iterator[None]:
    """No credentials in the environment but those a test puts there."""
    saved = {name: os.environ.pop(name) for name in SECRET_ENVS if name in os.environ}
    yield
    os.environ.update(saved)


# -------------------------------------------------------------------------------------------- MLflow


def track_mlflow(tmp_path: Path) -> Path:
    tracker = Tracker.open(target(tmp_path, mlflow={"trackingUri": mlflow_uri(tmp_path), "experiment": "finetune"}),
                           tmp_path / "work", params={"hyperparameters.learningRate": 0.001, "baseModel.name": "m"})
    train_like(tracker)
    tracker.finish()
    assert tracker.failures == {}
    return tmp_path


@pytest.fixture(scope="module")
def mlflow_tracked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return track_mlflow(tmp_path_factory.mktemp("mlflow"))


@pytest.fixture
def fresh_mlflow(tmp_path: Path) -> Path:
    """A tracked training of its own, for the tests that log to it again."""
    return track_mlflow(tmp_path)


def test_mlflow_run_is_named_after_the_job_and_keyed_by_its_uid(mlflow_tracked: Path) -> None:
    _, run = mlflow_run(mlflow_tracked)
    assert run.info.run_name == "viggo"
    assert run.data.tags["kubetune.uid"] == UID and run.data.tags["kubetune.job"] == "default/viggo"
    assert run.info.status == "FINISHED"


def test_mlflow_run_holds_the_parameters(mlflow_tracked: Path) -> None:
    _, run = mlflow_run(mlflow_tracked)
    assert run.data.params == {"hyperparameters.learningRate": "0.001", "baseModel.name": "m"}


def test_mlflow_step_metrics_are_logged_at_their_steps(mlflow_tracked: Path) -> None:
    client, run = mlflow_run(mlflow_tracked)

    def history(key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]

    assert history("train/loss") == STEPS
    assert history("train/learning_rate") == [(s, pytest.approx(1e-3 * s)) for s, _ in STEPS]
    assert history("train/grad_norm") == [(s, 0.5 * s) for s, _ in STEPS]  # a tensor, logged as its value
    assert history("train/tokens_per_second") == [(s, 100.0 * s) for s, _ in STEPS]


def test_mlflow_epoch_metrics_are_logged_at_the_step_the_epoch_ended(mlflow_tracked: Path) -> None:
    client, run = mlflow_run(mlflow_tracked)
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val/perplexity")] == [(4, 2.0)]
    assert run.data.metrics["val/loss"] == 0.7 and run.data.metrics["epoch"] == 1.0


def test_mlflow_run_names_the_best_checkpoint_without_uploading_it(mlflow_tracked: Path) -> None:
    client, run = mlflow_run(mlflow_tracked)
    assert run.data.tags["kubetune.bestCheckpoint.uri"] == "s3://bucket/runs/viggo/best"
    assert run.data.metrics["best/val_perplexity"] == 2.0
    assert client.list_artifacts(run.info.run_id) == []


def test_a_retry_continues_the_same_mlflow_run(fresh_mlflow: Path) -> None:
    again = Tracker.open(target(fresh_mlflow, mlflow={"trackingUri": mlflow_uri(fresh_mlflow),
                                                        "experiment": "finetune"}),
                         fresh_mlflow / "work", params={"hyperparameters.learningRate": 0.002, "retry": 1})
    again.log_step(5, {"loss": 0.9})
    again.finish()
    client, run = mlflow_run(fresh_mlflow)  # still one run with the key
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3, 4, 5]
    # MLflow keeps a parameter's first value: the retry adds new ones and does not fail on changed ones.
    assert run.data.params["hyperparameters.learningRate"] == "0.001" and run.data.params["retry"] == "1"
    assert again.failures == {}


def test_attaching_logs_to_the_run_without_reopening_it(fresh_mlflow: Path) -> None:
    _, before = mlflow_run(fresh_mlflow)
    attached = Tracker.open(target(fresh_mlflow, mlflow={"trackingUri": mlflow_uri(fresh_mlflow),
                                                         "experiment": "finetune"}),
                            fresh_mlflow / "work", attach=True)
    attached.log_summary({"eval/fine-tuned/exactMatch": 0.8}, {"kubetune.eval.report": "s3://b/report.html"})
    attached.finish()
    _, run = mlflow_run(fresh_mlflow)
    assert run.data.metrics["eval/fine-tuned/exactMatch"] == 0.8
    assert (run.info.status, run.info.end_time) == ("FINISHED", before.info.end_time)  # the training's ending


# ---------------------------------------------------------------------------------------- W&B offline


@pytest.fixture(scope="module")
def wandb_tracked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp_path = tmp_path_factory.mktemp("wandb")
    tracker = Tracker.open(target(tmp_path, wandb={"project": "kubetune-tests", "mode": "offline"}),
                           tmp_path / "work", params={"hyperparameters.learningRate": 0.001},
                           files_uri=str(tmp_path / "out"))
    train_like(tracker)
    tracker.finish()
    assert tracker.failures == {}
    return tmp_path


def offline_run(root: Path) -> Any:
    (folder,) = (root / "out" / "wandb").glob(f"offline-run-*-{UID}")  # copied to the job's output
    return read_offline_run(folder)


def test_wandb_offline_run_has_the_uid_as_id_and_the_parameters_as_config(wandb_tracked: Path) -> None:
    run = offline_run(wandb_tracked)
    assert (run.run_id, run.name, run.project) == (UID, "viggo", "kubetune-tests")
    assert run.config["hyperparameters.learningRate"] == 0.001
    assert "FineTuneJob" in run.tags


def test_wandb_offline_run_holds_step_and_epoch_metrics(wandb_tracked: Path) -> None:
    run = offline_run(wandb_tracked)
    assert run.series("train/loss") == STEPS
    assert run.series("train/grad_norm") == [(s, 0.5 * s) for s, _ in STEPS]
    assert run.series("val/perplexity") == [(4, 2.0)]


def test_wandb_offline_run_names_the_best_checkpoint(wandb_tracked: Path) -> None:
    run = offline_run(wandb_tracked)
    assert run.summary["kubetune.bestCheckpoint.uri"] == "s3://bucket/runs/viggo/best"


# ---------------------------------------------------------------------------------------- TensorBoard


def events(folder: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def text(accumulator: Any, tag: str) -> str:
    return str(accumulator.Tensors(f"{tag}/text_summary")[-1].tensor_proto.string_val[0].decode())


@pytest.fixture(scope="module")
def tensorboard_tracked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp_path = tmp_path_factory.mktemp("tensorboard")
    tracker = Tracker.open(target(tmp_path, tensorboard={}), tmp_path / "work",
                           params={"hyperparameters.learningRate": 0.001})
    train_like(tracker)
    tracker.finish()
    assert tracker.failures == {}
    return tmp_path / "out" / "tensorboard" / "viggo"  # the default logUri: <output>/tensorboard, one folder per job


def test_tensorboard_scalars_read_back_at_their_steps(tensorboard_tracked: Path) -> None:
    acc = events(tensorboard_tracked)
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == STEPS
    assert [(e.step, e.value) for e in acc.Scalars("val/perplexity")] == [(4, 2.0)]


def test_tensorboard_texts_hold_the_parameters_and_the_best_checkpoint(tensorboard_tracked: Path) -> None:
    acc = events(tensorboard_tracked)
    assert "| hyperparameters.learningRate | 0.001 |" in text(acc, "params")
    assert text(acc, "kubetune.bestCheckpoint.uri") == "s3://bucket/runs/viggo/best"


def test_two_writers_in_the_same_second_keep_each_others_events(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from tensorboardX import event_file_writer  # type: ignore[import-untyped]

    now = time.time()  # both files would be named after the same second: the evaluation attaching to the training
    monkeypatch.setattr(event_file_writer, "time", SimpleNamespace(time=lambda: now))  # its clock only
    training = Tracker.open(target(tmp_path, tensorboard={}), tmp_path / "work")
    training.log_epoch(1, 4, {"val/perplexity": 2.0})
    training.finish()
    evaluation = Tracker.open(target(tmp_path, tensorboard={}), tmp_path / "work", attach=True)
    evaluation.log_summary({"eval/fine-tuned/exactMatch": 0.5}, {})
    evaluation.finish()
    acc = events(tmp_path / "out" / "tensorboard" / "viggo")
    assert [e.step for e in acc.Scalars("val/perplexity")] == [4]
    assert [e.value for e in acc.Scalars("eval/fine-tuned/exactMatch")] == [0.5]


@pytest.fixture
def s3_bucket(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A local S3 (moto's server) with one bucket; the AWS_* variables point s3fs at it."""
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():
        monkeypatch.setenv(key, value)
    import boto3
    import s3fs  # type: ignore[import-untyped]

    boto3.client("s3").create_bucket(Bucket="kubetune-tb")
    yield s3fs.S3FileSystem(endpoint_url=f"http://{host}:{port}")
    server.stop()


def test_tensorboard_events_reach_an_object_store_at_every_epoch(tmp_path: Path, s3_bucket: Any) -> None:
    tracker = Tracker.open(target(tmp_path, tensorboard={"logUri": "s3://kubetune-tb/runs"}), tmp_path / "work")
    tracker.log_step(1, {"loss": 2.0})
    tracker.log_epoch(1, 1, {"val/perplexity": 3.0})
    assert s3_bucket.glob("kubetune-tb/runs/viggo/events.out.tfevents.*")  # uploaded before the run ends
    tracker.log_epoch(2, 2, {"val/perplexity": 2.5})
    tracker.finish()
    s3_bucket.invalidate_cache()
    s3_bucket.get("kubetune-tb/runs/viggo", str(tmp_path / "downloaded"), recursive=True)
    acc = events(tmp_path / "downloaded")
    assert [(e.step, e.value) for e in acc.Scalars("val/perplexity")] == [(1, 3.0), (2, 2.5)]
    assert tracker.failures == {}


# ------------------------------------------------------------------------------------------- failures


class EchoingAuthServer(JsonHandler):
    """An MLflow server that refuses everyone and quotes the credentials it was sent in its error."""

    def do_GET(self) -> None:
        self._deny()

    def do_POST(self) -> None:
        self._deny()

    def _deny(self) -> None:
        auth = self.headers.get("Authorization", "")
        seen = base64.b64decode(auth.split()[-1]).decode() if auth.startswith("Basic ") else auth
        self.send_json(401, {"error_code": "UNAUTHENTICATED", "message": f"bad credentials {seen}"})


@pytest.fixture
def refusing_mlflow(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)  # what the pod gets from the Secret
    with LocalServer(EchoingAuthServer) as server:
        yield server.base


def refused_target(tmp_path: Path, server: str) -> TrackingTarget:
    return target(tmp_path, tensorboard={}, mlflow={
        "trackingUri": server, "credentialsSecretRef": {"name": "mlflow", "usernameKey": "u", "passwordKey": "p"}})


def test_a_refused_backend_is_reported_once_without_the_secret(tmp_path: Path, refusing_mlflow: str) -> None:
    warnings: list[str] = []
    tracker = Tracker.open(refused_target(tmp_path, refusing_mlflow), tmp_path / "work", warn=warnings.append)
    train_like(tracker)
    tracker.finish()
    assert len(warnings) == 1 and "mlflow" in warnings[0] and "UNAUTHENTICATED" in warnings[0]
    assert PASSWORD not in warnings[0] and "<redacted>" in warnings[0]
    assert tracker.failures == {"mlflow": 1}


def test_the_other_backends_log_on_when_one_is_refused(tmp_path: Path, refusing_mlflow: str) -> None:
    tracker = Tracker.open(refused_target(tmp_path, refusing_mlflow), tmp_path / "work", warn=lambda _: None)
    train_like(tracker)
    tracker.finish()
    acc = events(tmp_path / "out" / "tensorboard" / "viggo")
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == STEPS


def test_a_backend_failing_mid_run_is_counted_then_dropped(tmp_path: Path) -> None:
    warnings: list[str] = []
    tracker = Tracker.open(target(tmp_path, tensorboard={}, mlflow={"trackingUri": mlflow_uri(tmp_path),
                                                                      "experiment": "finetune"}),
                           tmp_path / "work", warn=warnings.append)
    _, run = mlflow_run(tmp_path)
    shutil.rmtree(Path(run.info.artifact_uri.removeprefix("file://")).parent)  # the store loses the run
    for epoch in range(1, 6):
        tracker.log_epoch(epoch, epoch, {"val/perplexity": 3.0 - 0.1 * epoch})  # flushes: fails on MLflow
    tracker.finish()
    assert tracker.failures == {"mlflow": 3}  # dropped after 3 failures in a row
    assert len(warnings) == 1
    acc = events(tmp_path / "out" / "tensorboard" / "viggo")
    assert [e.step for e in acc.Scalars("val/perplexity")] == [1, 2, 3, 4, 5]


def test_credentials_that_did_not_reach_the_pod_are_named(tmp_path: Path) -> None:
    warnings: list[str] = []
    tracker = Tracker.open(target(tmp_path, mlflow={"trackingUri": "https://mlflow.example.com",
                                                    "credentialsSecretRef": {"name": "mlflow-creds",
                                                                             "tokenKey": "token"}}),
                           tmp_path / "work", warn=warnings.append)
    assert not tracker.active
    assert warnings == [("experiment tracking: mlflow failed (TrackingError: mlflow.credentialsSecretRef: "
                         "$MLFLOW_TRACKING_TOKEN empty: Secret 'mlflow-creds' or one of its keys does not exist); "
                         "the job goes on")]


def test_the_warning_lands_in_the_finetunejobs_status(tmp_path: Path, refusing_mlflow: str) -> None:
    from support.client import SyncKube

    api, _ = start_api(tmp_path)
    try:
        SyncKube(api.url).create(ftj_manifest("viggo"))
        reporter = StatusReporter(server=api.url, namespace="default", name="viggo")
        tracker = Tracker.open(refused_target(tmp_path, refusing_mlflow), tmp_path / "work",
                               warn=status_warning("finetunejobs", reporter))
        train_like(tracker)
        tracker.finish()
        status = SyncKube(api.url).get(kube.ftj_ref("default", "viggo"))["status"]
    finally:
        api.stop()
    assert status["trackingWarning"].startswith("experiment tracking: mlflow failed (RestException: UNAUTHENTICATED")
    assert PASSWORD not in str(status)


# ---------------------------------------------------------------------------------------- the training


def test_only_rank_0_tracks(tmp_path: Path) -> None:
    cfg = from_finetunejob(job(tmp_path, tensorboard={}), tmp_path / "out", workers=2, use_gpu=False)
    assert not start_training(cfg, rank=1, total_steps=8).active
    assert not (tmp_path / "out" / "tensorboard").exists()
    tracker = start_training(cfg, rank=0, total_steps=8)
    assert tracker.active
    tracker.finish()


def test_training_parameters_name_model_data_optimisation_and_job(tmp_path: Path) -> None:
    spec_job = ftj("viggo", uid=UID, spec__tracking={"tensorboard": {}}, spec__output={"uri": str(tmp_path)},
                   spec__baseModel={"name": "meta-llama/Llama-2-7b-hf",
                                    "tokenSecretRef": {"name": "hf-token", "key": "token"}})
    params = training_params(from_finetunejob(spec_job, tmp_path, workers=2, use_gpu=False), total_steps=80)
    assert params["baseModel.name"] == "meta-llama/Llama-2-7b-hf"
    assert params["dataset.train"] == "s3://bucket/viggo/train.jsonl"
    assert params["hyperparameters.learningRate"] == 1e-5 and params["deepspeed.zeroStage"] == 3
    assert (params["job"], params["job.uid"], params["totalSteps"], params["workers"]) == (
        "default/viggo", UID, 80, 2)
    assert not any("hf-token" in str(v) or "tokenSecretRef" in k for k, v in params.items())
