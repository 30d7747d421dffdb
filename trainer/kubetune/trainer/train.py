"""`train_func`: what every Ray Train worker runs, top to bottom, once per job.

load model + tokenizer -> add special tokens -> DeepSpeed engine -> resume from the newest epoch checkpoint
(weights, optimizer and LR schedule exactly) -> for each epoch: train on this worker's Ray Data shard,
streamed in length-grouped batches; validation perplexity over all shards; a sharded DeepSpeed checkpoint
(each rank writes its part) reported to Ray Train, which keeps the best `keepCheckpoints` by
`val_perplexity` (and the latest); when the epoch is the best so far, its consolidated Hugging Face
checkpoint streamed into <output>/best -> early stop.

Why the consolidated copy is written when a new best appears (not once at the end): the engine holds exactly
those weights then, so nothing is loaded back (at the end, a best epoch that is not the last would mean
re-reading a sharded checkpoint, optimizer state included, into an already-partitioned ZeRO-3 engine); the
copy costs 2 bytes per parameter against the 12-16 of the epoch checkpoint written anyway; and the best
model survives a job that is killed later. A kill between an epoch's checkpoint and its best copy is
repaired on resume (the resumed epoch is the best one and its copy is missing: it is written first).

The pieces that need no Ray live in engine.py, checkpoint.py, consolidate.py and data.py (the GPU check
runs them without Ray).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import ray.train
import torch
import torch.distributed as dist

from kubetune.api.finetunejob import EpochResult, Progress
from kubetune.contract.progress import Bar, ConsoleReporter, Reporter, StatusReporter
from kubetune.trainer import checkpoint, consolidate
from kubetune.trainer.checkpoint import STATE_FILE
from kubetune.trainer.config import TrainConfig
from kubetune.trainer.data import Example, collate, stream_batches
from kubetune.trainer.deepspeed_config import deepspeed_config
from kubetune.trainer.engine import (
    initialize,
    load_for_training,
    mean_loss,
    model_source,
    pad_token_id,
    special_tokens,
    to_device,
    train_step,
    training_dtype,
)
from kubetune.trainer.output import BEST, CHECKPOINTS, RemoteOutput, location, output_filesystem
from kubetune.trainer.schedule import lr_lambda, warmup_steps_for
from kubetune.trainer.tracking import finish_training, start_training

__all__ = ["STATE_FILE", "model_source", "special_tokens", "train_func"]

REPORT_EVERY = 5  # optimizer steps between progress reports (and at the end of every epoch)


@dataclass
class EpochMetrics:
    epoch: int
    train_loss: float
    val_loss: float
    val_perplexity: float
    step: int
    seconds: float


def ray_bar(total: int, initial: int) -> Bar:
    """A tqdm bar of this Ray worker that the driver draws on its terminal (Ray's tqdm_ray)."""
    from ray.experimental import tqdm_ray

    bar = tqdm_ray.tqdm(total=total, unit="step")
    bar.update(initial)  # type: ignore[no-untyped-call]
    return bar


# ------------------------------------------------------------------------------------------------ data

def _ints(value: Any) -> list[int]:
    return [int(v) for v in (value.tolist() if hasattr(value, "tolist") else value)]


def shard_examples(split: str) -> Iterator[Example]:
    """This worker's shard of a Ray Data dataset of tokenized examples, streamed (one pass per call)."""
    for r in ray.train.get_dataset_shard(split).iter_rows():
        yield Example(input_ids=_ints(r["input_ids"]), labels=_ints(r["labels"]), truncated=bool(r["truncated"]))


def rows_per_worker(rows: int | None, split: str, world: int) -> int:
    """Ray Data splits every dataset into equal shards (DataConfig's streaming_split(equal=True): rows //
    workers each), so every worker runs the same number of steps (DeepSpeed needs that)."""
    if rows is None:  # not told by the driver: count this worker's shard (one extra pass)
        return sum(1 for _ in ray.train.get_dataset_shard(split).iter_rows())
    return rows // world


def epoch_batches(split: str, rows: int, batch_size: int, pad_id: int, *, seed: int, epoch: int, rank: int,
                  shuffle: bool) -> Iterator[dict[str, torch.Tensor]]:
    """This worker's batches of `split` for one epoch, streamed from its shard and length-grouped."""
    for examples in stream_batches(shard_examples(split), batch_size, seed=seed, epoch=epoch, rank=rank,
                                   shuffle=shuffle, limit=rows):
        yield collate(examples, pad_id)


# ----------------------------------------------------------------------------------------- checkpoints

def _checkpoint_location(cfg: TrainConfig, found: Any) -> str:
    """Where a checkpoint Ray Train restored lives, for every worker: a local path, or its store URI."""
    remote = RemoteOutput.of(cfg)
    return remote.checkpoint_uri(found.path) if remote else str(found.path)


def _epoch_of(where: str) -> int:
    fs, path = location(where)
    state = checkpoint.read_state(fs, path)
    return int(state["epoch"]) if state else -1


def resume_directory(cfg: TrainConfig, rank: int) -> Path | None:
    """The newest epoch checkpoint to continue from, as a local directory holding what this rank needs:
    Ray Train's own restore (a restart inside this run) or the one the driver found (a retried job)."""
    candidates = [cfg.resume_from] if cfg.resume_from else []
    restored = ray.train.get_checkpoint()
    if restored is not None:
        candidates.append(_checkpoint_location(cfg, restored))
    if not candidates:
        return None
    newest = max(candidates, key=_epoch_of)
    fs, path = location(newest)
    if "://" not in newest or newest.startswith("file://"):
        return Path(path)
    return checkpoint.fetch(fs, path, rank, cfg.cache_dir / "resume" / PurePosixPath(path).name)


def save_epoch_checkpoint(engine: Any, cfg: TrainConfig, state: dict[str, Any], metrics: dict[str, Any],
                          epoch: int, rank: int) -> None:
    """Every rank writes its part of the epoch's sharded checkpoint and reports it to Ray Train.

    A local output (a path, a shared PVC) is Ray Train's storage itself: the ranks write straight into
    `<output>/checkpoints/epoch-NNNN` (no copy of a checkpoint that can be a terabyte). For an object store
    each rank writes a local directory that Ray Train uploads into the same checkpoint directory."""
    name = f"epoch-{epoch:04d}"
    if RemoteOutput.of(cfg) is None:
        directory = cfg.output_dir / CHECKPOINTS / name
        if rank == 0:
            checkpoint.remove(directory)  # what a killed attempt at this epoch left
        dist.barrier()
        checkpoint.save(engine, directory, state, rank)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
                         checkpoint_dir_name=name, checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)
        return
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint.save(engine, Path(tmp), state, rank)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)


def publish_best(engine: Any, tokenizer: Any, cfg: TrainConfig, best: dict[str, Any], rank: int) -> None:
    """The best epoch's consolidated Hugging Face checkpoint, streamed into <output>/best (every rank)."""
    fs, root = output_filesystem(cfg)
    consolidate.publish_model(engine.module, tokenizer, fs, f"{root}/{BEST}", rank=rank,
                              metadata={"epoch": best["epoch"], "val_perplexity": best["val_perplexity"]})
    dist.barrier()


def best_is_missing(cfg: TrainConfig, state: dict[str, Any]) -> bool:
    """After a resume: the resumed epoch is the best one but <output>/best does not hold it (the previous
    attempt was killed between the epoch's checkpoint and its best copy). Rank 0 decides for all."""
    decision = [False]
    if dist.get_rank() == 0 and state["best"] is not None and state["best"]["epoch"] == state["epoch"]:
        fs, root = output_filesystem(cfg)
        marker = consolidate.read_marker(fs, f"{root}/{BEST}")
        decision[0] = marker is None or marker.get("epoch") != state["epoch"]
    dist.broadcast_object_list(decision, src=0)
    return bool(decision[0])


# ------------------------------------------------------------------------------------------- the job

def train_func(config: dict[str, Any]) -> None:
    cfg = TrainConfig.model_validate(config)  # what the driver sent: `TrainConfig.model_dump(mode="json")`
    hp, ds = cfg.spec.hyperparameters, cfg.spec.deepspeed
    early = hp.early_stopping
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = torch.device("cuda", context.get_local_rank()) if cfg.use_gpu else torch.device("cpu")
    if cfg.threads_per_worker:  # a local CPU run: the cores this worker has (local.local_plan)
        torch.set_num_threads(cfg.threads_per_worker)
    torch.manual_seed(hp.seed)

    # 1. Model and tokenizer, with the template's special tokens (same ids on every worker).
    model, tokenizer = load_for_training(model_source(cfg), cfg.cache_dir, special_tokens(cfg),
                                         dtype=training_dtype(ds.precision, cfg.use_gpu),
                                         gradient_checkpointing=ds.gradient_checkpointing)
    pad_id = pad_token_id(tokenizer)

    # 2. This worker's data, streamed from its Ray Data shard each epoch: the same rows on every worker.
    train_rows = rows_per_worker(cfg.train_rows, "train", world)
    val_rows = rows_per_worker(cfg.validation_rows, "validation", world)
    batches_per_epoch = math.ceil(train_rows / hp.per_device_batch_size)
    steps_per_epoch = max(1, batches_per_epoch // hp.gradient_accumulation_steps)
    total_steps = steps_per_epoch * hp.epochs

    def val_batches() -> Iterator[dict[str, torch.Tensor]]:
        return epoch_batches("validation", val_rows, hp.per_device_batch_size, pad_id, seed=hp.seed, epoch=0,
                             rank=rank, shuffle=False)

    # 3. DeepSpeed: ZeRO stage, offload and precision from the spec (or the user's raw config).
    raw = json.loads(cfg.deepspeed_config_file.read_text()) if cfg.deepspeed_config_file else None
    ds_config = deepspeed_config(ds, hp, world_size=world, on_gpu=cfg.use_gpu, raw=raw)
    schedule = lr_lambda(hp.scheduler, warmup_steps_for(hp.warmup_ratio, total_steps), total_steps)
    engine, _ = initialize(model, ds_config, schedule)

    # A retry continues from the newest epoch checkpoint: weights, optimizer, LR schedule, position.
    state = checkpoint.new_state(world)
    resume = resume_directory(cfg, rank)
    if resume is not None:
        state = checkpoint.load(engine, resume, world)
        if best_is_missing(cfg, state):
            publish_best(engine, tokenizer, cfg, state["best"], rank)

    # Step progress from rank 0: into the FineTuneJob's status in a cluster, on the console locally.
    reporter: Reporter | None = (StatusReporter.from_environment() or ConsoleReporter(
        bar=ray_bar if cfg.progress_bar else None)) if rank == 0 else None
    tracker = start_training(cfg, rank, total_steps)  # spec.tracking, on rank 0 (a no-op elsewhere)
    if "base_val_perplexity" not in state:  # the baseline every epoch is compared with
        state["base_val_perplexity"] = math.exp(min(mean_loss(engine, val_batches(), device), 50.0))
    history = [EpochResult.from_wire(h) for h in state["history"]]
    best = state["best"]
    started = time.monotonic()

    # 4. Epochs.
    for epoch in range(state["epoch"] + 1, hp.epochs + 1):
        if state.get("stopped"):  # early stopping ended the run before a retry
            break
        epoch_start = time.monotonic()
        engine.train()
        losses: list[float] = []
        window_tokens, window_start = 0, time.monotonic()  # real tokens on this worker since the last report
        learning_rate: float | None = None
        norm: float | None = None
        for i, cpu_batch in enumerate(epoch_batches("train", train_rows, hp.per_device_batch_size, pad_id,
                                                    seed=hp.seed, epoch=epoch, rank=rank, shuffle=True)):
            last = i == batches_per_epoch - 1
            window_tokens += int(cpu_batch["attention_mask"].sum())  # no padding, no device sync
            result = train_step(engine, to_device(cpu_batch, device),
                                norm=(state["step"] + 1) % REPORT_EVERY == 0 or last)
            losses.append(float(result.loss))
            if result.applied:
                state["step"] += 1
                learning_rate = result.learning_rate
                norm = result.grad_norm if result.grad_norm is not None else norm
                recent = losses[-hp.gradient_accumulation_steps:]  # this optimizer step's micro-batches
                tracker.log_step(state["step"], {"loss": sum(recent) / len(recent),
                                                 "learning_rate": result.learning_rate,
                                                 "grad_norm": result.grad_norm})
            # Every rank takes the same steps, so all reach the all-reduce below together.
            if (result.applied and state["step"] % REPORT_EVERY == 0) or last:
                tokens = torch.tensor([window_tokens], dtype=torch.float64, device=device)
                dist.all_reduce(tokens)
                now = time.monotonic()
                tokens_per_second = float(tokens[0]) / max(now - window_start, 1e-9)
                window_tokens, window_start = 0, now
                tracker.log_step(state["step"], {"tokens_per_second": tokens_per_second})
                if reporter:
                    elapsed = now - started
                    done = state["step"] / max(total_steps, 1)
                    reporter.progress(Progress(
                        epoch=epoch, total_epochs=hp.epochs, step=state["step"], total_steps=total_steps,
                        train_loss=round(sum(losses[-20:]) / len(losses[-20:]), 4),
                        val_perplexity=history[-1].val_perplexity if history else None,
                        eta_seconds=int(elapsed / done - elapsed) if done > 0 else None,
                        learning_rate=learning_rate, grad_norm=norm,
                        tokens_per_second=round(tokens_per_second, 1)))
        train_loss = torch.tensor([sum(losses), len(losses)], dtype=torch.float64, device=device)
        dist.all_reduce(train_loss)
        val_loss = mean_loss(engine, val_batches(), device)
        metrics = EpochMetrics(epoch=epoch, train_loss=float(train_loss[0] / train_loss[1].clamp(min=1)),
                               val_loss=val_loss, val_perplexity=math.exp(min(val_loss, 50.0)),
                               step=state["step"], seconds=time.monotonic() - epoch_start)
        tracker.log_epoch(epoch, state["step"], {"train/epoch_loss": metrics.train_loss, "val/loss": val_loss,
                                                 "val/perplexity": metrics.val_perplexity})

        # 5. Early stopping: every rank sees the same all-reduced perplexity, so all stop together.
        history.append(EpochResult(epoch=epoch, train_loss=metrics.train_loss, val_loss=val_loss,
                                   val_perplexity=metrics.val_perplexity))
        new_best = best is None or metrics.val_perplexity < best["val_perplexity"]
        if best is None or new_best:
            best = {"epoch": epoch, "val_perplexity": metrics.val_perplexity}
        stop = bool(early and ((early.target_perplexity is not None
                                and metrics.val_perplexity <= early.target_perplexity)
                               or (early.patience is not None and epoch - best["epoch"] >= early.patience)))
        state.update(epoch=epoch, best=best, history=[h.to_wire() for h in history], stopped=stop)

        # 6. The epoch's sharded checkpoint (Ray Train keeps the best `keepCheckpoints` and the latest),
        #    then, for a new best, its consolidated Hugging Face checkpoint in <output>/best.
        save_epoch_checkpoint(engine, cfg, state,
                              {**vars(metrics), "base_val_perplexity": state["base_val_perplexity"]}, epoch, rank)
        if new_best:
            publish_best(engine, tokenizer, cfg, best, rank)
        if stop:
            break
    if isinstance(reporter, ConsoleReporter):
        reporter.close()
    finish_training(tracker, cfg, best, state["step"])  # the best checkpoint's URI, then the run is closed
