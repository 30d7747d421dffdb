"""The trainer's one-screen config: everything `train_func` needs, resolved from a FineTuneJob.

The FineTuneJob spec is the user's contract; this is the recipe's view of it: plain values, local paths,
the number of workers actually used. It travels to the Ray workers as a dict (`asdict`).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kubetune.api.finetunejob import FineTuneJob


@dataclass
class TrainConfig:
    # what to train
    job: str                                  # namespace/name, for logs and reports
    model_name: str | None                    # Hugging Face id (token from $HF_TOKEN) ...
    model_revision: str | None
    model_uri: str | None                     # ... or a directory: local, pvc://, s3:// ...
    gguf_file: str | None                     # ... optionally a GGUF file inside it
    special_tokens: list[str]
    stop: str | None
    prompt: str
    completion: str
    loss_on: str                              # "all" (the seed) or "completion"
    max_length: int
    # data
    train_uri: str
    train_format: str
    train_columns: dict[str, str] | None
    val_uri: str | None
    val_format: str | None
    val_columns: dict[str, str] | None
    validation_split: float | None
    # optimisation
    epochs: int
    learning_rate: float
    batch_size: int                           # per worker per micro-step
    grad_accum: int
    warmup_ratio: float
    weight_decay: float
    scheduler: str
    max_grad_norm: float
    seed: int
    patience: int | None
    target_perplexity: float | None
    # DeepSpeed and resources
    deepspeed: dict[str, Any]                 # DeepSpeedSpec in wire form
    hyperparameters: dict[str, Any]           # Hyperparameters in wire form (for deepspeed_config)
    deepspeed_config_file: str | None
    workers: int
    use_gpu: bool
    # where things go
    output_dir: str
    cache_dir: str
    keep_checkpoints: int
    output_uri: str | None = None             # spec.output.uri, as the user wrote it (pvc://, a path)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def uri_of(self, path: str | Path) -> str:
        """A path under output_dir in the user's terms: pvc://claim/run/best, not /mnt/pvc/claim/run/best.

        What goes into the FineTuneJob's status must be mountable by the next job's RayJob (the operator
        mounts the claims named by pvc:// URIs), so it must not be a pod-local path.
        """
        relative = Path(path).resolve().relative_to(Path(self.output_dir).resolve())
        base = (self.output_uri or self.output_dir).rstrip("/")
        return base if str(relative) == "." else f"{base}/{relative}"


def _absolute(uri: str | None) -> str | None:
    """Local paths made absolute: Ray workers do not run in the driver's working directory."""
    if uri is None or ("://" in uri and not uri.startswith("file://")):
        return uri
    return str(Path(uri.removeprefix("file://")).resolve())


def from_finetunejob(job: FineTuneJob, output_dir: Path, workers: int | None = None,
                     use_gpu: bool | None = None, cache_dir: Path | None = None) -> TrainConfig:
    """Resolve a FineTuneJob into the trainer's config (workers/GPU overridable for local runs)."""
    spec, ds, hp = job.spec, job.spec.dataset, job.spec.hyperparameters
    base = spec.base_model
    if base.fine_tune_job_ref is not None:
        raise ValueError("spec.baseModel.fineTuneJobRef must be resolved to a uri before training "
                         "(the operator does this; locally, point baseModel.uri at the first run's best/)")
    gpus = spec.resources.gpus_per_worker > 0 if use_gpu is None else use_gpu
    early = hp.early_stopping
    return TrainConfig(
        job=f"{job.metadata.namespace}/{job.metadata.name}",
        model_name=base.name, model_revision=base.revision, model_uri=_absolute(base.uri), gguf_file=base.gguf_file,
        special_tokens=list(ds.template.special_tokens), stop=ds.template.stop,
        prompt=ds.template.prompt, completion=ds.template.completion,
        loss_on=ds.loss_on, max_length=ds.max_length,
        train_uri=str(_absolute(ds.train.uri)), train_format=ds.train.format, train_columns=ds.train.columns,
        val_uri=_absolute(ds.validation.uri) if ds.validation else None,
        val_format=ds.validation.format if ds.validation else None,
        val_columns=ds.validation.columns if ds.validation else None,
        validation_split=ds.validation_split,
        epochs=hp.epochs, learning_rate=hp.learning_rate, batch_size=hp.per_device_batch_size,
        grad_accum=hp.gradient_accumulation_steps, warmup_ratio=hp.warmup_ratio,
        weight_decay=hp.weight_decay, scheduler=hp.scheduler, max_grad_norm=hp.max_grad_norm, seed=hp.seed,
        patience=early.patience if early else None,
        target_perplexity=early.target_perplexity if early else None,
        deepspeed=spec.deepspeed.to_wire(), hyperparameters=hp.to_wire(),
        deepspeed_config_file=os.environ.get("KUBETUNE_DEEPSPEED_CONFIG"),
        # DeepSpeed wants one process per GPU: a pod with gpusPerWorker GPUs hosts that many Ray Train workers.
        workers=workers or spec.resources.workers * (max(1, spec.resources.gpus_per_worker) if gpus else 1),
        use_gpu=gpus,
        output_dir=str(Path(output_dir).resolve()),
        cache_dir=str((cache_dir or Path(output_dir) / ".cache").resolve()),
        keep_checkpoints=spec.output.keep_checkpoints,
        output_uri=spec.output.uri if "://" in spec.output.uri else str(Path(output_dir).resolve()),
    )
