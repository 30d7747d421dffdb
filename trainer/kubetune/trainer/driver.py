"""The driver: pre-flight the data, run `train_func` on a `TorchTrainer`, write the results.

Runs where the Ray job's entrypoint runs (the head pod in a cluster, this process locally).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import ray
import ray.data
import ray.train
from ray.train import CheckpointConfig, DataConfig, RunConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchConfig, TorchTrainer

from kubetune.api.finetunejob import BestCheckpoint, EpochResult
from kubetune.contract.progress import Reporter, StatusReporter
from kubetune.contract.storage import resolve_uri
from kubetune.trainer import checkpoint, consolidate, ops
from kubetune.trainer.config import TrainConfig
from kubetune.trainer.data import DataError, Example, Preflight, preflight, read_rows, split_validation
from kubetune.trainer.engine import model_source, special_tokens
from kubetune.trainer.model import add_special_tokens_to_tokenizer, load_tokenizer
from kubetune.trainer.output import BEST, CHECKPOINTS, RemoteOutput, local_filesystem
from kubetune.trainer.train import train_func

__all__ = ["CHECKPOINTS", "EpochLog", "RemoteOutput", "ResumePoint", "RunResult", "newest_checkpoint", "run"]

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    best: BestCheckpoint | None
    epochs: list[EpochResult]
    preflight: dict[str, Any]
    output_dir: Path
    base_val_perplexity: float | None = None


class EpochLog(UserCallback):
    """On the Ray Train controller after each epoch: metrics.jsonl, the console, and the job status."""

    def __init__(self, cfg: TrainConfig, history: list[EpochResult], echo: bool) -> None:
        self.cfg = cfg
        self.output_dir = cfg.output_dir
        self.history = history
        self.echo = echo
        self._remote: RemoteOutput | None = None

    @property
    def remote(self) -> RemoteOutput | None:  # built where it runs (the controller), not pickled
        if self._remote is None:
            self._remote = RemoteOutput.of(self.cfg)
        return self._remote

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_remote": None}

    def checkpoint_uri(self, checkpoint: Any) -> str | None:
        if checkpoint is None:
            return None
        return self.remote.checkpoint_uri(checkpoint.path) if self.remote else self.cfg.uri_of(checkpoint.path)

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        m = metrics[0]
        epoch = EpochResult(epoch=int(m["epoch"]), train_loss=float(m["train_loss"]),
                            val_loss=float(m["val_loss"]), val_perplexity=float(m["val_perplexity"]),
                            checkpoint_uri=self.checkpoint_uri(checkpoint))
        self.history.append(epoch)
        with (self.output_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({**epoch.to_wire(), "step": m.get("step"), "seconds": m.get("seconds")}) + "\n")
        if self.remote:  # the whole history, every epoch: a retry on a fresh pod reads it back
            self.remote.upload(self.output_dir / "metrics.jsonl", "metrics.jsonl")
        best = min(self.history, key=lambda e: e.val_perplexity)
        if self.echo:
            marker = "  *best*" if best is epoch else ""
            print(f"epoch {epoch.epoch:>3}  train loss {epoch.train_loss:.4f}  val loss {epoch.val_loss:.4f}  "
                  f"val ppl {epoch.val_perplexity:.4f}  ({m.get('seconds', 0):.1f}s){marker}", flush=True)
        reporter: Reporter | None = StatusReporter.from_environment()
        if reporter is not None:
            base = m.get("base_val_perplexity")
            reporter.epoch_done(self.history, BestCheckpoint(
                uri=self.cfg.uri_of(self.output_dir / "best"), epoch=best.epoch, val_perplexity=best.val_perplexity),
                base_val_perplexity=float(base) if base is not None else None)


def load_data(cfg: TrainConfig, tokenizer: Any) -> Preflight:
    """Read, render and tokenize every row before any GPU time is spent; errors name file and row."""
    ds = cfg.spec.dataset
    train_rows = read_rows(resolve_uri(ds.train.uri, cfg.cache_dir), ds.train.format, ds.train.columns)
    if ds.validation is not None:
        val_rows = read_rows(resolve_uri(ds.validation.uri, cfg.cache_dir), ds.validation.format,
                             ds.validation.columns)
    else:
        train_rows, val_rows = split_validation(train_rows, ds.validation_split or 0.1,
                                                cfg.spec.hyperparameters.seed)
    return preflight(train_rows, val_rows, ds.template, tokenizer, ds.max_length, ds.loss_on,
                     ds.truncation_policy)



@dataclass(frozen=True)
class ResumePoint:
    """The epoch checkpoint a retry continues from."""

    location: str  # for the workers: its local path (a local output, a shared PVC) or its URI in the store
    epoch: int
    base_val_perplexity: float | None = None


def newest_checkpoint(output_dir: Path, remote: RemoteOutput | None = None,
                      output_uri: str | None = None) -> ResumePoint | None:
    """The latest complete epoch checkpoint a previous attempt left in the output (a RayJob retry resumes
    it). Complete: every rank's part is there (`checkpoint.missing`); a newer incomplete one (a rank killed
    while writing) is skipped, and nothing is downloaded here: each worker fetches its own part."""
    if remote is not None:
        fs, root = remote.fs, remote.path(CHECKPOINTS)
        fs.invalidate_cache()
    else:
        fs, root = local_filesystem(), str(output_dir / CHECKPOINTS)
    if not fs.exists(root):
        return None
    names = sorted((str(p).rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)), reverse=True)
    for name in (n for n in names if n.startswith("epoch-")):
        path = f"{root}/{name}"
        problems = checkpoint.missing(fs, path)
        if problems:
            log.warning("checkpoint %s is incomplete (%d files missing or short): not resumed from", name,
                        len(problems))
            continue
        state = checkpoint.read_state(fs, path)
        assert state is not None
        where = f"{(output_uri or '').rstrip('/')}/{CHECKPOINTS}/{name}" if remote is not None else path
        base = state.get("base_val_perplexity")
        return ResumePoint(location=where, epoch=int(state["epoch"]),
                           base_val_perplexity=float(base) if base is not None else None)
    return None


def previous_epochs(output_dir: Path, upto: int, remote: RemoteOutput | None = None) -> list[EpochResult]:
    path = output_dir / "metrics.jsonl"
    if remote is not None:  # the store's copy is the truth; the staging dir may be fresh
        path.unlink(missing_ok=True)
        remote.download("metrics.jsonl", path)
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [EpochResult.from_wire({k: v for k, v in r.items() if k not in ("step", "seconds")})
            for r in rows if r["epoch"] <= upto]


def _dataset(examples: list[Example]) -> Any:
    # Ray Data's progress bars and execution plans, twice per epoch, would bury the trainer's own progress
    # lines: off (a dataset keeps the context it was created with, its split coordinator included).
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    return ray.data.from_items([{"input_ids": e.input_ids, "labels": e.labels, "truncated": e.truncated}
                                for e in examples])


class _Tee(io.TextIOBase):
    """Write to the console and to the driver log at once."""

    def __init__(self, *streams: TextIO) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


@contextlib.contextmanager
def driver_log(path: Path) -> Iterator[None]:
    """Everything the driver prints (Ray forwards the workers' output to it) also goes to `path`."""
    with path.open("a") as log, contextlib.redirect_stdout(_Tee(sys.stdout, log)), \
            contextlib.redirect_stderr(_Tee(sys.stderr, log)):
        yield


def run(cfg: TrainConfig, echo: bool = True, on_preflight: Callable[[Preflight], None] | None = None) -> RunResult:
    """Train `cfg` on the Ray cluster this process is connected to; the output also gets driver.log."""
    output_dir = cfg.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    remote = RemoteOutput.of(cfg)
    if remote is not None:  # a retry on the same staging dir: this attempt's log only (the store has the last)
        (output_dir / "driver.log").unlink(missing_ok=True)
    try:
        with driver_log(output_dir / "driver.log"):
            return _run(cfg, output_dir, echo, on_preflight, remote)
    finally:
        if remote is not None:
            remote.upload(output_dir / "driver.log", "driver.log")


def _run(cfg: TrainConfig, output_dir: Path, echo: bool,
         on_preflight: Callable[[Preflight], None] | None, remote: RemoteOutput | None = None) -> RunResult:
    tokenizer = load_tokenizer(model_source(cfg), cfg.cache_dir)
    add_special_tokens_to_tokenizer(tokenizer, special_tokens(cfg))
    data = load_data(cfg, tokenizer)
    if on_preflight:
        on_preflight(data)
    status = StatusReporter.from_environment()
    if status is not None:
        status.preflight(data.summary())

    resume = newest_checkpoint(output_dir, remote, cfg.output_uri)
    resumed_epoch = resume.epoch if resume else 0
    history = previous_epochs(output_dir, resumed_epoch, remote)
    (output_dir / "metrics.jsonl").write_text("".join(
        json.dumps(e.to_wire()) + "\n" for e in history))
    if resume and echo:
        print(f"resuming after epoch {resumed_epoch} from {resume.location}", flush=True)

    # Workers may run on other nodes: they get the checkpoint's URI in the store (each fetches its own
    # part), or the local path where the output is local or a shared PVC; and the dataset sizes (the steps
    # per epoch follow from them).
    for split, examples in (("train", data.train), ("validation", data.val)):
        if len(examples) < cfg.workers:
            raise DataError(f"{split}: {len(examples)} rows for {cfg.workers} workers: each worker needs at "
                            "least one (Ray Data splits the rows equally)")
    cfg = cfg.model_copy(update={"resume_from": resume.location if resume else None,
                                 "train_rows": len(data.train), "validation_rows": len(data.val)})
    ops.build(ops.needed(cfg))  # CPU: DeepSpeed's ops compiled once here, not by every worker at once
    trainer = TorchTrainer(
        train_func,
        train_loop_config=cfg.model_dump(mode="json"),  # validated back into a TrainConfig in each worker
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"GPU": 1} if cfg.use_gpu else {"CPU": cfg.threads_per_worker or 1}),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=RunConfig(
            name=CHECKPOINTS,
            storage_path=remote.root if remote else str(output_dir.resolve()),
            storage_filesystem=remote.pyarrow_filesystem() if remote else None,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.spec.output.keep_checkpoints,
                                               checkpoint_score_attribute="val_perplexity",
                                               checkpoint_score_order="min"),
            # mypy reads ray.train's v1 RunConfig (callbacks: ray.tune Callbacks); Ray Train v2 runs here.
            callbacks=[EpochLog(cfg, list(history), echo)],  # type: ignore[list-item]
        ),
        datasets={"train": _dataset(data.train), "validation": _dataset(data.val)},
        # Equal shards, the same rows to the same worker every epoch (no locality-driven reassignment):
        # an exact resume sees the data an uninterrupted run would have.
        dataset_config=DataConfig(enable_shard_locality=False),
    )
    result = trainer.fit()
    epochs = previous_epochs(output_dir, 10**9)
    best = _best(cfg, remote, epochs)
    base_ppl = (result.metrics or {}).get("base_val_perplexity")
    if base_ppl is None and resume is not None:  # a retry with nothing left to train reports no epoch
        base_ppl = resume.base_val_perplexity
    summary = {
        "job": cfg.job,
        "baseValPerplexity": base_ppl,
        "best": best.to_wire() if best else None,
        "epochs": [e.to_wire() for e in epochs],
        "preflight": data.stats,
    }
    (output_dir / "result.json").write_text(json.dumps(summary, indent=2))
    plot_learning_curve(epochs, output_dir / "learning_curve.png")
    if remote is not None:
        for name in ("metrics.jsonl", "learning_curve.png", "result.json"):  # result.json last: "done"
            remote.upload(output_dir / name, name)
    return RunResult(best=best, epochs=epochs, preflight=data.stats, output_dir=output_dir,
                     base_val_perplexity=float(base_ppl) if base_ppl is not None else None)


def _best(cfg: TrainConfig, remote: RemoteOutput | None, epochs: list[EpochResult]) -> BestCheckpoint | None:
    """<output>/best: the consolidated Hugging Face checkpoint of the epoch with the lowest validation
    perplexity, which the workers wrote when that epoch ended (its marker says which epoch it holds)."""
    if not epochs:
        return None
    fs, root = (remote.fs, remote.path(BEST)) if remote else (local_filesystem(), str(cfg.output_dir / BEST))
    if remote is not None:
        fs.invalidate_cache()
    marker = consolidate.read_marker(fs, root)
    best = min(epochs, key=lambda e: e.val_perplexity)
    if marker is None or int(marker["epoch"]) != best.epoch:
        raise RuntimeError(f"{BEST}/ holds {'no complete model' if marker is None else 'epoch ' + str(marker['epoch'])}"
                           f", but the best epoch is {best.epoch}")
    return BestCheckpoint(uri=cfg.uri_of(cfg.output_dir / BEST), epoch=best.epoch, val_perplexity=best.val_perplexity)


def plot_learning_curve(epochs: list[EpochResult], path: Path) -> None:
    """Train loss and validation perplexity per epoch, the best epoch marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not epochs:
        return
    xs = [e.epoch for e in epochs]
    fig, loss_ax = plt.subplots(figsize=(7, 4))
    loss_ax.plot(xs, [e.train_loss for e in epochs], "o-", color="tab:blue", label="train loss")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("train loss", color="tab:blue")
    ppl_ax = loss_ax.twinx()
    ppl_ax.plot(xs, [e.val_perplexity for e in epochs], "s-", color="tab:orange", label="val perplexity")
    ppl_ax.set_ylabel("validation perplexity", color="tab:orange")
    best = min(epochs, key=lambda e: e.val_perplexity)
    ppl_ax.annotate(f"best: {best.val_perplexity:.3f}", (best.epoch, best.val_perplexity),
                    textcoords="offset points", xytext=(0, 10), ha="center")
    loss_ax.set_xticks(xs)
    fig.suptitle("kubetune: learning curve")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
