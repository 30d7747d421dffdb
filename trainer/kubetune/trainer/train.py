"""`train_func`: what every Ray Train worker runs, top to bottom, once per job.

load model + tokenizer -> add special tokens -> DeepSpeed engine -> for each epoch: train on this
worker's shard in length-grouped batches, validation perplexity over all shards, a consolidated
Hugging Face checkpoint reported to Ray Train (which keeps the best by `val_perplexity`) -> early stop.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import ray.train
import torch
import torch.distributed as dist

from kubetune.api.finetunejob import EpochResult, Progress
from kubetune.contract.progress import Bar, ConsoleReporter, Reporter, StatusReporter
from kubetune.contract.storage import resolve_uri
from kubetune.trainer.config import TrainConfig
from kubetune.trainer.data import Example, collate, length_grouped_batches
from kubetune.trainer.deepspeed_config import deepspeed_config
from kubetune.trainer.model import ModelSource, add_special_tokens, load_model, load_tokenizer
from kubetune.trainer.schedule import lr_lambda, warmup_steps_for
from kubetune.trainer.tracking import finish_training, start_training

STATE_FILE = "kubetune_state.json"  # inside every checkpoint: epoch, step, val perplexity
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


def model_source(cfg: TrainConfig) -> ModelSource:
    base = cfg.spec.base_model
    return ModelSource.resolve(name=base.name, revision=base.revision, uri=base.uri, cache_dir=cfg.cache_dir)


def special_tokens(cfg: TrainConfig) -> list[str]:
    """The template's special tokens and its stop token: added to the tokenizer by the driver and workers."""
    template = cfg.spec.dataset.template
    return template.special_tokens + ([template.stop] if template.stop else [])


def load_examples(split: str) -> list[Example]:
    """This worker's shard of a Ray Data dataset of tokenized examples."""
    rows = ray.train.get_dataset_shard(split).iter_rows()
    return [Example(input_ids=list(r["input_ids"]), labels=list(r["labels"]), truncated=bool(r["truncated"]))
            for r in rows]


@dataclass
class StepResult:
    """What one micro-step did."""

    loss: torch.Tensor  # detached; reading it (float()) waits for the step on a GPU
    applied: bool  # an optimizer step was taken (a gradient-accumulation boundary, no overflow)
    learning_rate: float | None  # of that optimizer step
    grad_norm: float | None  # of that optimizer step, before clipping (None: not known)


def grad_norm(engine: Any) -> float | None:
    """The global gradient norm of the coming optimizer step, from the (all-reduced) gradients: for ZeRO
    stage 0, where DeepSpeed computes it only to clip and does not keep it (get_global_grad_norm is None)."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) \
        if grads else None


def train_step(engine: Any, batch: dict[str, torch.Tensor], norm: bool = False) -> StepResult:
    """Forward, backward and DeepSpeed's step (an optimizer step at a gradient-accumulation boundary).

    `norm`: also return the gradient norm of an optimizer step taken here (DeepSpeed's, or computed for
    ZeRO stage 0, which costs one pass over the gradients: ask for it only when it is reported).
    """
    boundary = engine.is_gradient_accumulation_boundary()
    lr = float(engine.get_lr()[0]) if boundary else None  # the rate this step applies
    loss = engine(**batch).loss
    engine.backward(loss)
    own = grad_norm(engine) if norm and boundary and engine.zero_optimization_stage() == 0 else None
    engine.step()
    applied = bool(boundary and engine.was_step_applied())
    found = engine.get_global_grad_norm() if applied and norm else None
    return StepResult(loss=loss.detach(), applied=applied, learning_rate=lr if applied else None,
                      grad_norm=float(found) if found is not None else own if applied else None)


def mean_loss(engine: Any, examples: list[Example], batch_size: int, pad_id: int, device: torch.device) -> float:
    """Token-weighted mean loss over every worker's examples (exact, not a mean of means)."""
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of token losses, tokens]
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[start:start + batch_size], pad_id).items()}
            logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                ignore_index=-100, reduction="sum")
            total += torch.stack([losses.double(), (labels != -100).sum().double()])
    dist.all_reduce(total)
    engine.train()
    return float(total[0] / total[1].clamp(min=1))


def consolidated_state_dict(engine: Any, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """The full model state dict on rank 0 (gathered from the ZeRO-3 shards; every rank must call)."""
    if zero_stage == 3:
        state: dict[str, torch.Tensor] | None = engine._zero3_consolidated_16bit_state_dict()
        return state
    return engine.module.state_dict() if dist.get_rank() == 0 else None


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
    source = model_source(cfg)
    tokenizer = load_tokenizer(source, cfg.cache_dir)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(ds.precision, torch.float32)
    model = load_model(source, cfg.cache_dir, dtype if cfg.use_gpu else torch.float32)
    add_special_tokens(model, tokenizer, special_tokens(cfg))
    resumed = ray.train.get_checkpoint()  # Ray's own restore, else what the driver found in the output
    if resumed is None and cfg.resume_from:
        local = resolve_uri(cfg.resume_from, cfg.cache_dir)  # fetched once per node if remote
        resumed = ray.train.Checkpoint.from_directory(str(local))
    state: dict[str, Any] = {"epoch": 0, "step": 0, "best": None, "history": []}  # + base_val_perplexity
    if resumed is not None:  # a retry: continue from the newest checkpoint, weights and position
        with resumed.as_directory() as directory:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(directory, dtype=model.dtype)
            state = json.loads((Path(directory) / STATE_FILE).read_text())
    if ds.gradient_checkpointing:
        model.gradient_checkpointing_enable()  # type: ignore[no-untyped-call]
        model.config.use_cache = False
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # 2. This worker's data: Ray Data splits every dataset into equal shards (DataConfig's
    #    streaming_split(equal=True)), so every worker runs the same number of steps (DeepSpeed needs that).
    train, val = load_examples("train"), load_examples("validation")
    batches_per_epoch = math.ceil(len(train) / hp.per_device_batch_size)
    steps_per_epoch = max(1, batches_per_epoch // hp.gradient_accumulation_steps)
    total_steps = steps_per_epoch * hp.epochs

    # 3. DeepSpeed: ZeRO stage, offload and precision from the spec (or the user's raw config).
    raw = json.loads(cfg.deepspeed_config_file.read_text()) if cfg.deepspeed_config_file else None
    ds_config = deepspeed_config(ds, hp, world_size=world, on_gpu=cfg.use_gpu, raw=raw)
    schedule = lr_lambda(hp.scheduler, warmup_steps_for(hp.warmup_ratio, total_steps), total_steps)
    # DeepSpeed builds the scheduler on its (possibly ZeRO-wrapped) optimizer and steps it once per
    # optimizer step, i.e. at gradient-accumulation boundaries.
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=ds_config,
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule))
    for _ in range(state["step"]):  # a resumed run continues the schedule where it stopped
        scheduler.step()

    # Step progress from rank 0: into the FineTuneJob's status in a cluster, on the console locally.
    reporter: Reporter | None = (StatusReporter.from_environment() or ConsoleReporter(
        bar=ray_bar if cfg.progress_bar else None)) if rank == 0 else None
    tracker = start_training(cfg, rank, total_steps)  # spec.tracking, on rank 0 (a no-op elsewhere)
    if "base_val_perplexity" not in state:  # the baseline every epoch is compared with
        state["base_val_perplexity"] = math.exp(min(mean_loss(engine, val, hp.per_device_batch_size, pad_id,
                                                              device), 50.0))
    history = [EpochResult.from_wire(h) for h in state["history"]]
    best = state["best"]
    started = time.monotonic()

    # 4. Epochs.
    for epoch in range(state["epoch"] + 1, hp.epochs + 1):
        epoch_start = time.monotonic()
        engine.train()
        batches = length_grouped_batches([len(e.input_ids) for e in train], hp.per_device_batch_size,
                                         hp.seed + rank, epoch)
        losses: list[float] = []
        window_tokens, window_start = 0, time.monotonic()  # real tokens on this worker since the last report
        learning_rate: float | None = None
        norm: float | None = None
        for i, indexes in enumerate(batches):
            batch = {k: v.to(device) for k, v in collate([train[j] for j in indexes], pad_id).items()}
            last = i == len(batches) - 1
            result = train_step(engine, batch, norm=(state["step"] + 1) % REPORT_EVERY == 0 or last)
            losses.append(float(result.loss))
            window_tokens += sum(len(train[j].input_ids) for j in indexes)  # no padding, no device sync
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
        val_loss = mean_loss(engine, val, hp.per_device_batch_size, pad_id, device)
        metrics = EpochMetrics(epoch=epoch, train_loss=float(train_loss[0] / train_loss[1].clamp(min=1)),
                               val_loss=val_loss, val_perplexity=math.exp(min(val_loss, 50.0)),
                               step=state["step"], seconds=time.monotonic() - epoch_start)
        tracker.log_epoch(epoch, state["step"], {"train/epoch_loss": metrics.train_loss, "val/loss": val_loss,
                                                 "val/perplexity": metrics.val_perplexity})

        # 5. A consolidated Hugging Face checkpoint; Ray Train keeps the best `keepCheckpoints`.
        state_dict = consolidated_state_dict(engine, ds.zero_stage)
        history.append(EpochResult(epoch=epoch, train_loss=metrics.train_loss, val_loss=val_loss,
                                   val_perplexity=metrics.val_perplexity))
        if best is None or metrics.val_perplexity < best["val_perplexity"]:
            best = {"epoch": epoch, "val_perplexity": metrics.val_perplexity}
        state.update(epoch=epoch, best=best, history=[h.to_wire() for h in history])
        with tempfile.TemporaryDirectory() as directory:
            checkpoint = None
            if rank == 0:
                engine.module.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
                tokenizer.save_pretrained(directory)
                (Path(directory) / STATE_FILE).write_text(json.dumps(state))
                checkpoint = ray.train.Checkpoint.from_directory(directory)
            ray.train.report({**vars(metrics), "base_val_perplexity": state["base_val_perplexity"]},
                             checkpoint=checkpoint, checkpoint_dir_name=f"epoch-{epoch:04d}")

        # 6. Early stopping: every rank sees the same all-reduced perplexity, so all stop together.
        if early and early.target_perplexity is not None and metrics.val_perplexity <= early.target_perplexity:
            break
        if early and early.patience is not None and epoch - best["epoch"] >= early.patience:
            break
    if isinstance(reporter, ConsoleReporter):
        reporter.close()
    finish_training(tracker, cfg, best, state["step"])  # the best checkpoint's URI, then the run is closed
