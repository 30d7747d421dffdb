"""spec.output.uri on an object store: the real driver against a local S3 (moto's server).

Ray Train writes the checkpoints straight to the bucket; the driver stages its own files locally and uploads
them; a second run on the same uri resumes from the bucket alone (a fresh staging dir).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from factories import ftj_manifest
from kubetune.api.finetunejob import FineTuneJob
from kubetune.trainer.config import TrainConfig, from_finetunejob
from kubetune.trainer.driver import RunResult, run
from support.s3 import local_s3
from support.workspace import write_workspace
from viggo_like import viggo_like_rows

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

BUCKET = "kubetune-test"
ENV = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
       "TORCH_EXTENSIONS_DIR": str(Path.home() / ".cache" / "kubetune" / "torch_extensions")}


@pytest.fixture(scope="module")
def s3_env() -> Iterator[dict[str, str]]:
    """A local S3 (moto) with one bucket; the AWS_* variables point every client (boto, s3fs) at it."""
    with local_s3(BUCKET) as s3:
        yield s3.env


@pytest.fixture(scope="module")
def s3_ray(s3_env: dict[str, str]) -> Iterator[None]:
    for key, value in ENV.items():
        os.environ.setdefault(key, value)
    import ray

    if ray.is_initialized():  # another module's cluster lacks the AWS_* variables
        ray.shutdown()
    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": {**ENV, **s3_env}}, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_workspace(tmp_path_factory.mktemp("remote"), viggo_like_rows(96, seed=1), n_train=64)


def config(workspace: Path, staging: Path, epochs: int, keep: int) -> TrainConfig:
    body: dict[str, Any] = ftj_manifest(
        "remote",
        spec__baseModel={"uri": str(workspace / "base")},
        spec__dataset__train={"uri": str(workspace / "train.jsonl")},
        spec__dataset__validation={"uri": str(workspace / "valid.jsonl")},
        spec__dataset__maxLength=96,
        spec__hyperparameters={"epochs": epochs, "learningRate": 3e-3, "perDeviceBatchSize": 16,
                               "warmupRatio": 0.0, "scheduler": "constant"},
        spec__deepspeed={"zeroStage": 0, "offloadOptimizer": "none", "precision": "fp32",
                         "gradientCheckpointing": False},
        spec__resources={"workers": 2, "gpusPerWorker": 0},
        spec__output={"uri": f"s3://{BUCKET}/runs/tiny", "keepCheckpoints": keep},
    )
    body["metadata"]["uid"] = "uid-remote"
    return from_finetunejob(FineTuneJob.from_body(body), staging, workers=2, use_gpu=False)


def bucket() -> Any:
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"], skip_instance_cache=True)
    fs.invalidate_cache()
    return fs


def metrics(fs: Any) -> list[dict[str, Any]]:
    return [json.loads(line) for line in fs.cat(f"{BUCKET}/runs/tiny/metrics.jsonl").decode().splitlines()]


def checkpoints(fs: Any) -> list[str]:
    return sorted(p.rsplit("/", 1)[-1] for p in fs.glob(f"{BUCKET}/runs/tiny/checkpoints/epoch-*"))


@pytest.fixture(scope="module")
def first_run(workspace: Path, s3_ray: None, tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    return run(config(workspace, tmp_path_factory.mktemp("staging1"), epochs=2, keep=2))


def test_outputs_land_in_the_bucket(first_run: RunResult) -> None:
    fs, prefix = bucket(), f"{BUCKET}/runs/tiny"
    assert fs.exists(f"{prefix}/best/model.safetensors") and fs.exists(f"{prefix}/best/config.json")
    assert [m["epoch"] for m in metrics(fs)] == [1, 2]
    summary = json.loads(fs.cat(f"{prefix}/result.json"))
    assert summary["best"]["uri"] == f"s3://{prefix}/best"
    assert fs.cat(f"{prefix}/learning_curve.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert fs.exists(f"{prefix}/driver.log")  # the epoch lines come from the controller: log_to_driver=False here
    assert checkpoints(fs) == ["epoch-0001", "epoch-0002"]  # keepCheckpoints: 2
    assert fs.exists(f"{prefix}/checkpoints/epoch-0002/kubetune_state.json")


def test_reported_uris_are_remote(first_run: RunResult) -> None:
    assert first_run.best is not None
    assert first_run.best.uri == f"s3://{BUCKET}/runs/tiny/best"
    assert all(e.checkpoint_uri and e.checkpoint_uri.startswith(f"s3://{BUCKET}/runs/tiny/checkpoints/epoch-")
               for e in first_run.epochs)
    assert first_run.epochs[-1].checkpoint_uri == f"s3://{BUCKET}/runs/tiny/checkpoints/epoch-0002"


@pytest.mark.slow  # a second training run (a minute); the bucket's layout is checked by the tests above
def test_a_retry_on_a_fresh_staging_dir_resumes_from_the_bucket(
        first_run: RunResult, workspace: Path, s3_ray: None, tmp_path_factory: pytest.TempPathFactory) -> None:
    before = metrics(bucket())
    result = run(config(workspace, tmp_path_factory.mktemp("staging2"), epochs=3, keep=2))
    assert [e.epoch for e in result.epochs] == [1, 2, 3]
    after = metrics(bucket())
    assert [m["epoch"] for m in after] == [1, 2, 3]
    def wire(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k not in ("step", "seconds")} for r in rows]

    assert wire(after[:2]) == wire(before)  # epochs 1-2 were not trained again: only epoch 3 ran
    assert [e.val_perplexity for e in result.epochs[:2]] == [e.val_perplexity for e in first_run.epochs]
    assert checkpoints(bucket()) == ["epoch-0002", "epoch-0003"]
    assert "resuming after epoch 2" in bucket().cat(f"{BUCKET}/runs/tiny/driver.log").decode()
    assert json.loads(bucket().cat(f"{BUCKET}/runs/tiny/result.json"))["epochs"][-1]["epoch"] == 3
