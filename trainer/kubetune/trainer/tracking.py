"""Experiment tracking (`spec.tracking`): one `Tracker` fanning out to MLflow, W&B and TensorBoard.

Rank 0 of the training opens it (`start_training`), logs the job's parameters, then step metrics
(`log_step`: whatever the loop has: loss, learning rate, grad norm, tokens/s), epoch metrics
(`log_epoch`: validation loss and perplexity) and at the end the best checkpoint's URI (a tag, the
weights stay where they are). The evaluator logs the scores to the same run (kubetune.serving.tracking).
Runs are found again by their key (`kubetune.contract.tracking`): a retry continues its run.

Tracking never fails the job: every backend call is guarded; the first failure is reported once (a
console warning and the job's `status.trackingWarning`, the message bounded and with the credentials
blanked), later ones are counted, and a backend that keeps failing is dropped. Each library is imported
only when a job uses it, in the process that logs (none of them in the operator).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from kubetune.api.finetunejob import FineTuneJob
from kubetune.api.tracking import (
    SECRET_ENVS,
    WANDB_API_KEY_ENV,
    MlflowTracking,
    TensorBoardTracking,
    WandbMode,
    WandbTracking,
)
from kubetune.contract.progress import StatusReporter
from kubetune.contract.redact import excerpt
from kubetune.contract.storage import LOCAL_SCHEMES, resolve_uri, storage_options
from kubetune.contract.tracking import RUN_KEY_TAG, TrackingRun, TrackingTarget, training_target

if TYPE_CHECKING:
    from kubetune.trainer.config import TrainConfig

log = logging.getLogger(__name__)

FAILURES_IN_A_ROW = 3  # a backend failing this many calls in a row is dropped for the rest of the run
MLFLOW_FLUSH_SECONDS = 10.0  # step metrics go to MLflow in batches, at most this often (and at every epoch)
MLFLOW_BATCH = 1000  # MLflow's limit of metrics per log_batch request
MLFLOW_PARAMS_BATCH = 100  # ... and of params
MLFLOW_PARAM_LENGTH = 6000  # the longest param value MLflow stores
# MLflow's client retries a failing request for minutes by default; a training step must not wait that long.
MLFLOW_CLIENT_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                          "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
WANDB_INIT_TIMEOUT = 60.0

Params = Mapping[str, Any]
Warn = Callable[[str], None]


class TrackingError(RuntimeError):
    """A backend cannot be used as configured (its credentials did not reach the pod, say)."""


def secret_values() -> list[str | None]:
    """The credentials in this process's environment: blanked out of every message."""
    return [os.environ.get(name) for name in SECRET_ENVS]


def metric_values(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Plain floats (a 0-d tensor becomes its value); None and non-numbers are left out."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if value is None or isinstance(value, bool | str):
            continue
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out


class Backend(Protocol):
    name: str

    def start(self, params: Params) -> None: ...

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


# -- files: a local folder mirrored to a URI -----------------------------------------------------------


@dataclass
class Mirror:
    """A local folder copied to `uri` (a path, pvc:// or an object store) file by file, changed files only."""

    local: Path
    uri: str
    cache_dir: Path
    pattern: str = "**/*"  # which files under `local`
    _sent: dict[str, tuple[int, int]] = field(default_factory=dict)

    def sync(self) -> None:
        files = sorted(p for p in self.local.glob(self.pattern) if p.is_file()) if self.local.exists() else []
        changed = [f for f in files if self._sent.get(str(f)) != (f.stat().st_size, f.stat().st_mtime_ns)]
        if not changed:
            return
        if "://" not in self.uri or self.uri.startswith(LOCAL_SCHEMES):
            target = resolve_uri(self.uri, self.cache_dir)
            for f in changed:
                dest = target / f.relative_to(self.local)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, dest)
        else:
            import fsspec  # type: ignore[import-untyped]

            fs, root = fsspec.core.url_to_fs(self.uri, **storage_options(self.uri))
            for f in changed:
                fs.put_file(str(f), f"{root.rstrip('/')}/{f.relative_to(self.local).as_posix()}")
        for f in changed:
            self._sent[str(f)] = (f.stat().st_size, f.stat().st_mtime_ns)


# -- MLflow ---------------------------------------------------------------------------------------------


class MlflowBackend:
    """One MLflow run per key, found by the `kubetune.runKey` tag in the experiment (created if missing)."""

    name = "mlflow"

    def __init__(self, spec: MlflowTracking, run: TrackingRun, attach: bool) -> None:
        self.spec, self.run, self.attach = spec, run, attach
        self.client: Any = None
        self.run_id: str | None = None
        self._pending: list[Any] = []
        self._last_flush = time.monotonic()

    def start(self, params: Params) -> None:
        creds = self.spec.credentials_secret_ref
        if creds is not None:
            missing = [env for env in creds.env() if not os.environ.get(env)]
            if missing:
                raise TrackingError(f"mlflow.credentialsSecretRef: ${', $'.join(missing)} empty: Secret "
                                    f"{creds.name!r} or one of its keys does not exist")
        for name, value in MLFLOW_CLIENT_DEFAULTS.items():
            os.environ.setdefault(name, value)
        if self.spec.tracking_uri.startswith("file:"):
            # MLflow 3 refuses its file store unless asked: a file:// URI in the spec is that request.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import RunStatus
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.spec.tracking_uri)
        experiment_id = self._experiment()
        found = self.client.search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{self.run.key}'",
                                        max_results=1)
        if found:
            self.run_id = found[0].info.run_id
            if not self.attach:  # a retry of the training: the run goes on
                self.client.update_run(self.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        else:
            tags = {RUN_KEY_TAG: self.run.key, "kubetune.kind": self.run.kind,
                    "kubetune.job": f"{self.run.namespace}/{self.run.name}"}
            if self.run.uid:
                tags["kubetune.uid"] = self.run.uid
            created = self.client.create_run(experiment_id, run_name=self.run.name, tags=tags)
            self.run_id = created.info.run_id
            self.attach = False  # a run of its own after all: this process ends it
        if params:
            self._log_params(params)

    def _experiment(self) -> str:
        experiment = self.client.get_experiment_by_name(self.spec.experiment)
        if experiment is not None:
            return str(experiment.experiment_id)
        try:
            return str(self.client.create_experiment(self.spec.experiment))
        except Exception:  # another job created it meanwhile
            experiment = self.client.get_experiment_by_name(self.spec.experiment)
            if experiment is None:
                raise
            return str(experiment.experiment_id)

    def _log_params(self, params: Params) -> None:
        """New parameters only: MLflow keeps a parameter's first value (a retry logs the same ones again)."""
        from mlflow.entities import Param

        assert self.run_id is not None
        have = self.client.get_run(self.run_id).data.params
        todo = [Param(k, str(v)[:MLFLOW_PARAM_LENGTH]) for k, v in params.items() if k not in have]
        for start in range(0, len(todo), MLFLOW_PARAMS_BATCH):
            self.client.log_batch(self.run_id, params=todo[start:start + MLFLOW_PARAMS_BATCH])

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending += [Metric(k, v, now, step) for k, v in metrics.items()]
        if len(self._pending) >= MLFLOW_BATCH or time.monotonic() - self._last_flush >= MLFLOW_FLUSH_SECONDS:
            self.flush()

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        assert self.run_id is not None
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        while self._pending:
            assert self.run_id is not None
            batch = self._pending[:MLFLOW_BATCH]
            self.client.log_batch(self.run_id, metrics=batch)
            del self._pending[:len(batch)]

    def close(self) -> None:
        self.flush()
        if not self.attach and self.run_id is not None:
            self.client.set_terminated(self.run_id, status="FINISHED")


# -- Weights & Biases -------------------------------------------------------------------------------


class WandbBackend:
    """A W&B run whose id is the key (`resume="allow"`): a retry, and the evaluation, continue it."""

    name = "wandb"
    STEP = "trainer/step"

    def __init__(self, spec: WandbTracking, run: TrackingRun, work_dir: Path, files: Mirror | None) -> None:
        self.spec, self.run, self.work_dir, self.files = spec, run, work_dir, files
        self.wandb_run: Any = None

    def start(self, params: Params) -> None:
        online = self.spec.mode == WandbMode.ONLINE
        if online and self.spec.api_key_secret_ref is not None and not os.environ.get(WANDB_API_KEY_ENV):
            ref = self.spec.api_key_secret_ref
            raise TrackingError(f"wandb.apiKeySecretRef: ${WANDB_API_KEY_ENV} is empty: Secret {ref.name!r} or "
                                f"its key {ref.key!r} does not exist")
        import wandb

        self.work_dir.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(console="off", x_disable_stats=True, x_disable_machine_info=True, silent=True,
                                  init_timeout=WANDB_INIT_TIMEOUT,
                                  **({"base_url": self.spec.base_url} if self.spec.base_url else {}))
        self.wandb_run = wandb.init(
            project=self.spec.project, entity=self.spec.entity, id=self.run.key, name=self.run.name,
            resume="allow", mode=self.spec.mode.value, dir=str(self.work_dir), config=dict(params),
            tags=["kubetune", self.run.kind], reinit="create_new", settings=settings)
        self.wandb_run.define_metric(self.STEP)
        for pattern in ("train/*", "val/*", "epoch", "best/*"):
            self.wandb_run.define_metric(pattern, step_metric=self.STEP)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.wandb_run.log({self.STEP: step, **metrics})

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.wandb_run.summary[key] = value

    def flush(self) -> None:
        if self.files is not None:
            self.files.sync()

    def close(self) -> None:
        self.wandb_run.finish()
        if self.files is not None:
            import wandb

            wandb.teardown()  # W&B's service process closes the run's files: only then are they complete
            self.files.sync()


# -- TensorBoard --------------------------------------------------------------------------------------


class TensorBoardBackend:
    """Event files in `<logUri>/<run name>`: written there (a path, a mounted pvc://) or, for an object store,
    written locally and uploaded at every epoch and at the end."""

    name = "tensorboard"

    def __init__(self, spec: TensorBoardTracking, run: TrackingRun, scratch: Path, cache_dir: Path) -> None:
        assert spec.log_uri is not None  # TrackingSpec.with_defaults fills it in
        uri = f"{spec.log_uri.rstrip('/')}/{run.name}"
        if "://" not in uri or uri.startswith(LOCAL_SCHEMES):
            self.local, self.mirror = resolve_uri(uri, cache_dir), None
        else:
            self.local = scratch / "tensorboard" / run.name
            self.mirror = Mirror(self.local, uri, cache_dir)
        self.writer: Any = None
        self.last_step = 0

    def start(self, params: Params) -> None:
        from tensorboardX import SummaryWriter  # type: ignore[import-untyped]

        self.local.mkdir(parents=True, exist_ok=True)
        # tensorboardX names the file by the second and the host only and opens it with "wb": a second writer
        # in the same folder within the same second (the evaluation attaching to the training's run, a
        # retry) would truncate the first one's events. The suffix makes every writer's file its own.
        suffix = f".{os.getpid()}.{secrets.token_hex(4)}"
        self.writer = SummaryWriter(logdir=str(self.local), flush_secs=30, filename_suffix=suffix)
        if params:
            rows = "\n".join(f"| {k} | {str(v).replace('|', '/')} |" for k, v in params.items())
            self.writer.add_text("params", f"| parameter | value |\n|---|---|\n{rows}", 0)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.last_step = max(self.last_step, step)
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.writer.add_text(key, value, self.last_step)

    def flush(self) -> None:
        self.writer.flush()
        if self.mirror is not None:
            self.mirror.sync()

    def close(self) -> None:
        self.writer.close()
        if self.mirror is not None:
            self.mirror.sync()


# -- the tracker ----------------------------------------------------------------------------------------


class Tracker:
    """The job's tracking run on every configured backend; no call ever raises."""

    def __init__(self, backends: list[Backend], warn: Warn | None = None) -> None:
        self.backends = backends
        self.warn = warn
        self.failures: dict[str, int] = {}
        self._in_a_row: dict[str, int] = {}
        self.warned = False

    @classmethod
    def disabled(cls) -> Tracker:
        """A tracker that logs nothing (ranks other than 0, jobs without spec.tracking)."""
        return cls([])

    @classmethod
    def open(cls, target: TrackingTarget | None, work_dir: Path, *, params: Params | None = None,
             files_uri: str | None = None, attach: bool = False, warn: Warn | None = None,
             cache_dir: Path | None = None) -> Tracker:
        """Create (or continue) the run of `target` and log `params`.

        `work_dir`: local scratch (W&B's files, TensorBoard events bound for an object store); `files_uri`:
        where W&B's offline files are copied (the job's output); `attach`: log to the run without taking
        over its status (the evaluation adds its scores to the training's run).
        """
        if target is None:
            return cls.disabled()
        spec, run = target.spec, target.run
        cache = cache_dir or work_dir / "cache"
        tracker = cls([], warn)
        if spec.mlflow is not None:
            tracker.backends.append(MlflowBackend(spec.mlflow, run, attach))
        if spec.wandb is not None:
            # The run's transaction log and files; not W&B's own debug logs.
            files = (Mirror(work_dir / "wandb", f"{files_uri.rstrip('/')}/wandb", cache, f"offline-run-*-{run.key}/*")
                     if files_uri and spec.wandb.mode == WandbMode.OFFLINE else None)
            tracker.backends.append(WandbBackend(spec.wandb, run, work_dir, files))
        if spec.tensorboard is not None:
            try:
                tracker.backends.append(TensorBoardBackend(spec.tensorboard, run, work_dir, cache))
            except (ValueError, OSError) as exc:  # a logUri that does not resolve here
                tracker._failed("tensorboard", exc)
        for backend in list(tracker.backends):
            try:
                backend.start(params or {})
            except Exception as exc:  # noqa: BLE001 - whatever the library raises, training goes on
                tracker._failed(backend.name, exc)
                tracker.backends.remove(backend)  # no run to log to
        return tracker

    @property
    def active(self) -> bool:
        return bool(self.backends)

    def _call(self, what: Callable[[Backend], None]) -> None:
        for backend in list(self.backends):
            try:
                what(backend)
            except Exception as exc:  # noqa: BLE001 - a tracking failure never fails the job
                self._failed(backend.name, exc)
                if self._in_a_row[backend.name] >= FAILURES_IN_A_ROW:
                    log.warning("experiment tracking: %s failed %d times in a row; not logging to it any more",
                                backend.name, FAILURES_IN_A_ROW)
                    self.backends.remove(backend)
            else:
                self._in_a_row[backend.name] = 0

    def _failed(self, backend: str, exc: BaseException) -> None:
        self.failures[backend] = self.failures.get(backend, 0) + 1
        self._in_a_row[backend] = self._in_a_row.get(backend, 0) + 1
        message = (f"experiment tracking: {backend} failed ({type(exc).__name__}: "
                   f"{excerpt(str(exc), secrets=secret_values())}); the job goes on")
        if self.warned:
            log.debug("%s", message)
            return
        self.warned = True
        log.warning("%s", message)
        if self.warn is not None:
            try:
                self.warn(message)
            except Exception as warn_exc:  # noqa: BLE001 - reporting the warning is best effort too
                log.warning("could not report the tracking warning: %s", type(warn_exc).__name__)

    def log_params(self, params: Params) -> None:
        """More parameters (MLflow keeps a parameter's first value)."""
        self._call(lambda b: _log_params(b, params))

    def log_step(self, step: int, metrics: Mapping[str, Any]) -> None:
        """One optimizer step's metrics; a name without a '/' is put under `train/`."""
        if not self.backends:
            return
        values = {(k if "/" in k else f"train/{k}"): v for k, v in metric_values(metrics).items()}
        if values:
            self._call(lambda b: b.log_metrics(step, values))

    def log_epoch(self, epoch: int, step: int, metrics: Mapping[str, Any]) -> None:
        """One epoch's metrics (`val/loss`, `val/perplexity`, ...) at the step it ended on; flushes."""
        values = {"epoch": float(epoch), **metric_values(metrics)}
        def log_and_flush(backend: Backend) -> None:
            backend.log_metrics(step, values)
            backend.flush()

        self._call(log_and_flush)

    def log_summary(self, metrics: Mapping[str, Any], tags: Mapping[str, str], step: int = 0) -> None:
        """Final values and tags (the best checkpoint, the evaluation's scores)."""
        values = metric_values(metrics)
        if values and self.backends:
            self._call(lambda b: b.log_metrics(step, values))
        if tags and self.backends:
            self._call(lambda b: b.set_tags(dict(tags)))

    def finish(self) -> None:
        """Flush and close every backend (MLflow: the run ends FINISHED unless attached)."""
        self._call(lambda b: b.close())
        self.backends = []
        if self.failures:
            counts = ", ".join(f"{name}: {n}" for name, n in sorted(self.failures.items()))
            log.warning("experiment tracking: failed calls (%s)", counts)


def _log_params(backend: Backend, params: Params) -> None:
    if isinstance(backend, MlflowBackend):
        backend._log_params(params)
    elif isinstance(backend, WandbBackend):
        backend.wandb_run.config.update(dict(params), allow_val_change=True)


# -- the training's run -----------------------------------------------------------------------------------


def status_warning(plural: str, reporter: StatusReporter | None = None) -> Warn:
    """Surface a tracking warning: on stderr, and in the job's `status.trackingWarning` (through `reporter`,
    by default the pod's own: in a cluster only)."""

    def warn(message: str) -> None:
        sys.stderr.write(f"warning: {message}\n")
        target = reporter or StatusReporter.from_environment(plural)
        if target is not None:
            target.patch({"trackingWarning": message[:1024]})

    return warn


def target_of(job: FineTuneJob) -> TrackingTarget | None:
    """The FineTuneJob's run, with a local tensorboard.logUri made absolute (Ray workers do not run in the
    driver's working directory). Called where the driver builds the TrainConfig."""
    meta = job.metadata
    target = training_target(job.spec.tracking, meta.namespace, meta.name, meta.uid, job.spec.output.uri)
    tb = target.spec.tensorboard if target else None
    if target is None or tb is None or tb.log_uri is None or "://" in tb.log_uri:
        return target
    absolute = TensorBoardTracking(log_uri=str(Path(tb.log_uri).resolve()))
    return target.model_copy(update={"spec": target.spec.model_copy(update={"tensorboard": absolute})})


def training_params(cfg: TrainConfig, total_steps: int) -> dict[str, Any]:
    """What a training run is logged with: model, data, hyperparameters, DeepSpeed, cluster, job."""
    spec = cfg.spec
    run = cfg.tracking.run if cfg.tracking else None
    params: dict[str, Any] = {"job": cfg.job, "job.uid": run.uid if run else None, "workers": cfg.workers,
                              "useGpu": cfg.use_gpu, "totalSteps": total_steps}
    base = spec.base_model
    params |= {"baseModel.name": base.name, "baseModel.revision": base.revision, "baseModel.uri": base.uri}
    ds = spec.dataset
    params |= {"dataset.train": ds.train.uri, "dataset.validation": ds.validation.uri if ds.validation else None,
               "dataset.validationSplit": ds.validation_split, "dataset.maxLength": ds.max_length,
               "dataset.lossOn": ds.loss_on, "dataset.specialTokens": ",".join(ds.template.special_tokens)}
    params |= _flat("hyperparameters", spec.hyperparameters.to_wire())
    params |= _flat("deepspeed", spec.deepspeed.to_wire())
    res = spec.resources
    params |= {"resources.workers": res.workers, "resources.gpusPerWorker": res.gpus_per_worker,
               "resources.gpuType": res.gpu_type}
    return {k: v for k, v in params.items() if v is not None and v != ""}


def _flat(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out |= _flat(f"{prefix}.{key}", sub)
        return out
    return {prefix: value}


def start_training(cfg: TrainConfig, rank: int, total_steps: int) -> Tracker:
    """Rank 0's tracker for the training in `cfg` (a TrainConfig); a disabled one elsewhere."""
    target = cfg.tracking
    if rank != 0 or target is None:
        return Tracker.disabled()
    return Tracker.open(target, cfg.cache_dir / "tracking", params=training_params(cfg, total_steps),
                        files_uri=cfg.output_uri, warn=status_warning("finetunejobs"), cache_dir=cfg.cache_dir)


def finish_training(tracker: Tracker, cfg: TrainConfig, best: Mapping[str, Any] | None, step: int) -> None:
    """The best checkpoint's URI (where the driver keeps it: `<output>/best`) as a tag, then close."""
    if best is not None and tracker.active:
        uri = cfg.uri_of(cfg.output_dir / "best")
        tracker.log_summary({"best/val_perplexity": best["val_perplexity"], "best/epoch": best["epoch"]},
                            {"kubetune.bestCheckpoint.uri": uri, "kubetune.bestCheckpoint.epoch": str(best["epoch"])},
                            step=step)
    tracker.finish()
