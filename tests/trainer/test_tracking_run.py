"""spec.tracking end to end: the real trainer (tiny Llama, 2 Ray Train workers, gloo) logs one run to MLflow
(file store), W&B (offline) and TensorBoard at once, and each is read back with the library's own reader."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from factories import ftj_manifest
from kubetune.api.finetunejob import FineTuneJob
from kubetune.contract.tracking import RUN_KEY_TAG
from kubetune.trainer.config import from_finetunejob
from kubetune.trainer.driver import RunResult, run
from support.wandbfile import read_offline_run
from support.workspace import write_workspace
from viggo_like import viggo_like_rows

# By name (make test-slow): a minute of Ray Train; the tracker's pieces are in test_tracking.py (make test).
pytestmark = pytest.mark.slow

UID = "0b5e7c1d-tracked-run"
ENV = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
       "TORCH_EXTENSIONS_DIR": str(Path.home() / ".cache" / "kubetune" / "torch_extensions")}


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunResult, Path]]:
    root = tmp_path_factory.mktemp("tracked")
    write_workspace(root, viggo_like_rows(48, seed=3), n_train=32)
    body = ftj_manifest("tracked", spec__baseModel={"uri": str(root / "base")},
                        spec__dataset__train={"uri": str(root / "train.jsonl")},
                        spec__dataset__validation={"uri": str(root / "valid.jsonl")},
                        spec__dataset__maxLength=96,
                        spec__hyperparameters={"epochs": 2, "learningRate": 3e-3, "perDeviceBatchSize": 8,
                                               "scheduler": "constant"},
                        spec__deepspeed={"zeroStage": 0, "offloadOptimizer": "none", "precision": "fp32",
                                         "gradientCheckpointing": False},
                        spec__resources={"workers": 2, "gpusPerWorker": 0},
                        spec__output={"uri": str(root / "out")},
                        spec__tracking={"mlflow": {"trackingUri": f"file://{root / 'mlruns'}"},
                                        "wandb": {"project": "kubetune-e2e", "mode": "offline"},
                                        "tensorboard": {}})
    body["metadata"]["uid"] = UID  # 32 training rows, 2 workers, batch 8: 2 optimizer steps per epoch
    cfg = from_finetunejob(FineTuneJob.from_body(body), root / "out", workers=2, use_gpu=False)
    for key, value in ENV.items():
        os.environ.setdefault(key, value)
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": ENV}, log_to_driver=False)
    try:
        yield run(cfg, echo=False), root
    finally:
        ray.shutdown()


def mlflow_run(root: Path) -> tuple[Any, Any]:
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=f"file://{root / 'mlruns'}")
    experiment = client.get_experiment_by_name("kubetune")
    (found,) = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{UID}'")
    return client, found


def test_mlflow_has_the_jobs_parameters(tracked: tuple[RunResult, Path]) -> None:
    _, found = mlflow_run(tracked[1])
    params = found.data.params
    assert params["hyperparameters.learningRate"] == "0.003" and params["deepspeed.zeroStage"] == "0"
    assert params["baseModel.uri"].endswith("/base") and params["job.uid"] == UID and params["totalSteps"] == "4"
    assert found.info.status == "FINISHED"


def test_mlflow_has_every_optimizer_steps_loss_and_learning_rate(tracked: tuple[RunResult, Path]) -> None:
    client, found = mlflow_run(tracked[1])
    history = {key: [(m.step, m.value) for m in client.get_metric_history(found.info.run_id, key)]
               for key in ("train/loss", "train/learning_rate")}
    assert [s for s, _ in history["train/loss"]] == [1, 2, 3, 4]
    assert [v for _, v in history["train/learning_rate"]] == [pytest.approx(3e-3)] * 4  # constant schedule
    # (DeepSpeed keeps no gradient norm at ZeRO-0, so none is logged here; ZeRO-1..3 have one.)


def test_mlflow_epoch_metrics_match_the_jobs_epochs(tracked: tuple[RunResult, Path]) -> None:
    result, root = tracked
    client, found = mlflow_run(root)
    logged = [(m.step, m.value) for m in client.get_metric_history(found.info.run_id, "val/perplexity")]
    assert logged == [(2 * e.epoch, pytest.approx(e.val_perplexity)) for e in result.epochs]


def test_mlflow_names_the_best_checkpoint_the_job_reports(tracked: tuple[RunResult, Path]) -> None:
    result, root = tracked
    _, found = mlflow_run(root)
    assert result.best is not None
    assert found.data.tags["kubetune.bestCheckpoint.uri"] == result.best.uri
    assert found.data.metrics["best/val_perplexity"] == pytest.approx(result.best.val_perplexity)


def test_wandb_offline_run_is_in_the_output_with_the_same_metrics(tracked: tuple[RunResult, Path]) -> None:
    result, root = tracked
    (folder,) = (root / "out" / "wandb").glob(f"offline-run-*-{UID}")
    wandb_run = read_offline_run(folder)
    assert [s for s, _ in wandb_run.series("train/loss")] == [1, 2, 3, 4]
    assert [v for _, v in wandb_run.series("val/perplexity")] == [pytest.approx(e.val_perplexity)
                                                                  for e in result.epochs]
    assert result.best is not None and wandb_run.summary["kubetune.bestCheckpoint.uri"] == result.best.uri


def test_tensorboard_events_are_under_the_output(tracked: tuple[RunResult, Path]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, root = tracked
    events = EventAccumulator(str(root / "out" / "tensorboard" / "tracked"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.value for e in events.Scalars("val/perplexity")] == [pytest.approx(e.val_perplexity, rel=1e-6)
                                                                   for e in result.epochs]
