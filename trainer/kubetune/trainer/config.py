"""The trainer's config: the FineTuneJob's validated spec plus what only the run knows.

One pydantic model, built once by `from_finetunejob` where the Ray job's entrypoint runs. It reaches the
Ray Train workers as `train_loop_config=cfg.model_dump(mode="json")` and is validated back there with
`TrainConfig.model_validate` (every API rule re-checked): the spec is read as the API models spell it,
never copied field by field into another shape.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, model_validator

from kubetune.api.common import ApiModel
from kubetune.api.finetunejob import FineTuneJob, FineTuneJobSpec
from kubetune.contract.tracking import TrackingTarget
from kubetune.trainer.tracking import target_of

DEEPSPEED_CONFIG_ENV = "KUBETUNE_DEEPSPEED_CONFIG"  # a raw DeepSpeed JSON file (the operator mounts it)


class TrainConfig(ApiModel):
    """Everything `train_func` needs: the FineTuneJob's spec and the run's workers, paths and resume point."""

    model_config = ApiModel.model_config | {"frozen": True}

    job: str = Field(description="namespace/name of the FineTuneJob, for logs and result.json.")
    spec: FineTuneJobSpec = Field(
        description="The FineTuneJob's spec, with baseModel a name or a uri (fineTuneJobRef resolved) and local "
        "paths made absolute (Ray workers do not run in the driver's working directory).")
    workers: int = Field(description="Ray Train workers actually used (one per GPU on a cluster).", ge=1)
    use_gpu: bool = Field(description="Whether the workers train on GPUs (one each) or on CPUs.")
    output_dir: Path = Field(
        description="Local directory the driver writes to: the output itself (a path, a mounted pvc://) or "
        "the staging directory of an object-store output.")
    output_uri: str = Field(
        description="The output in the user's terms (spec.output.uri when it is a URI, else output_dir): "
        "every URI reported in the FineTuneJob's status starts with it.", min_length=1)
    cache_dir: Path = Field(description="Where remote models, data and checkpoints are fetched to.")
    deepspeed_config_file: Path | None = Field(
        default=None, description=f"A raw DeepSpeed JSON config (${DEEPSPEED_CONFIG_ENV}), used instead of "
        "spec.deepspeed.")
    threads_per_worker: int | None = Field(
        default=None, description="torch intra-op threads of each worker (a local CPU run sets them to the cores "
        "it gives the worker); None leaves torch's default.", ge=1)
    progress_bar: bool = Field(
        default=False, description="A local run whose console is a terminal: progress as a tqdm bar drawn by the "
        "Ray driver instead of lines.")
    resume_from: str | None = Field(
        default=None, description="The epoch checkpoint a retry continues from, found by the driver: its URI "
        "in the store for an object-store output (workers fetch it), else its local path.")
    train_rows: int | None = Field(
        default=None, description="Training examples in the Ray Data dataset (set by the driver): each of the "
        "workers streams rows // workers of them per epoch, which fixes the steps per epoch.", ge=1)
    validation_rows: int | None = Field(
        default=None, description="Validation examples in the Ray Data dataset (set by the driver).", ge=1)
    tracking: TrackingTarget | None = Field(
        default=None, description="spec.tracking resolved: the backends and the run rank 0 logs to.")

    @model_validator(mode="after")
    def _base_model_resolved(self) -> TrainConfig:
        if self.spec.base_model.fine_tune_job_ref is not None:
            raise ValueError("spec.baseModel.fineTuneJobRef must be resolved to a uri before training (the "
                             "operator does this; locally, point baseModel.uri at the first run's best/)")
        return self

    def uri_of(self, path: str | Path) -> str:
        """A path under output_dir in the user's terms: pvc://claim/run/best, not /mnt/pvc/claim/run/best.

        What goes into the FineTuneJob's status must be mountable by the next job's RayJob (the operator
        mounts the claims named by pvc:// URIs), so it must not be a pod-local path.
        """
        relative = Path(path).resolve().relative_to(self.output_dir.resolve())
        base = self.output_uri.rstrip("/")
        return base if str(relative) == "." else f"{base}/{relative}"


def _absolute(uri: str | None) -> str | None:
    """Local paths made absolute: Ray workers do not run in the driver's working directory."""
    if uri is None or ("://" in uri and not uri.startswith("file://")):
        return uri
    return str(Path(uri.removeprefix("file://")).resolve())


def from_finetunejob(job: FineTuneJob, output_dir: Path, workers: int | None = None,
                     use_gpu: bool | None = None, cache_dir: Path | None = None) -> TrainConfig:
    """The trainer's config of a FineTuneJob (workers/GPU overridable for local runs)."""
    spec = job.spec.model_copy(deep=True)
    spec.base_model.uri = _absolute(spec.base_model.uri)
    spec.dataset.train.uri = str(_absolute(spec.dataset.train.uri))
    if spec.dataset.validation is not None:
        spec.dataset.validation.uri = str(_absolute(spec.dataset.validation.uri))
    res = spec.resources
    gpus = res.gpus_per_worker > 0 if use_gpu is None else use_gpu
    output = Path(output_dir).resolve()
    raw = os.environ.get(DEEPSPEED_CONFIG_ENV)
    return TrainConfig(
        job=f"{job.metadata.namespace}/{job.metadata.name}",
        spec=spec,
        # DeepSpeed wants one process per GPU: a pod with gpusPerWorker GPUs hosts that many Ray Train workers.
        workers=workers or res.workers * (max(1, res.gpus_per_worker) if gpus else 1),
        use_gpu=gpus,
        output_dir=output,
        output_uri=spec.output.uri if "://" in spec.output.uri else str(output),
        cache_dir=(cache_dir or Path(output_dir) / ".cache").resolve(),
        deepspeed_config_file=Path(raw) if raw else None,
        tracking=target_of(job),
    )
