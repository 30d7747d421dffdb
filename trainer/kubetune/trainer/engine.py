"""The training step's pieces, without Ray: what `train_func` runs on every Ray Train worker, and what
the GPU check (`make gpu-check`) runs on a GPU host that has no Ray.

    load_for_training (model + tokenizer + the template's special tokens, gradient checkpointing)
    -> initialize (DeepSpeed engine, the LR schedule stepped by DeepSpeed)
    -> per epoch: batches from kubetune.trainer.data (length-grouped, streamed) -> to_device
       -> engine(**batch).loss, engine.backward, engine.step -> mean_loss over the validation batches
    -> kubetune.trainer.checkpoint (sharded epoch checkpoints), kubetune.trainer.consolidate (best model)

A process group must exist before `initialize` (Ray Train's, or `deepspeed.init_distributed`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.trainer.config import TrainConfig
from kubetune.trainer.model import ModelSource, add_special_tokens, load_model, load_tokenizer

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def model_source(cfg: TrainConfig) -> ModelSource:
    base = cfg.spec.base_model
    return ModelSource.resolve(name=base.name, revision=base.revision, uri=base.uri, cache_dir=cfg.cache_dir)


def special_tokens(cfg: TrainConfig) -> list[str]:
    """The template's special tokens and its stop token: added to the tokenizer by the driver and workers."""
    template = cfg.spec.dataset.template
    return template.special_tokens + ([template.stop] if template.stop else [])


def training_dtype(precision: str, on_gpu: bool) -> torch.dtype:
    """The dtype the model is loaded in: the spec's 16-bit precision on GPUs, fp32 on CPU (DeepSpeed's
    CPU accelerator trains fp32; see deepspeed_config)."""
    import torch

    if not on_gpu:
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def load_for_training(source: ModelSource, cache_dir: Path, tokens: list[str], *, dtype: torch.dtype,
                      gradient_checkpointing: bool = False) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base model and its tokenizer, with `tokens` added as special tokens (same ids on every worker),
    the embeddings grown to match, and gradient checkpointing on if asked."""
    tokenizer = load_tokenizer(source, cache_dir)
    model = load_model(source, cache_dir, dtype)
    add_special_tokens(model, tokenizer, tokens)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model, tokenizer


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    model.gradient_checkpointing_enable()  # type: ignore[no-untyped-call]
    model.config.use_cache = False


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token")
    return int(pad)


def initialize(model: torch.nn.Module, ds_config: dict[str, Any],
               schedule: Callable[[int], float]) -> tuple[Any, Any]:
    """(DeepSpeed engine, LR scheduler). DeepSpeed builds the scheduler on its (possibly ZeRO-wrapped)
    optimizer and steps it once per optimizer step, i.e. at gradient-accumulation boundaries; the
    scheduler's state is part of every epoch checkpoint."""
    import deepspeed
    import torch

    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=ds_config,
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule))
    return engine, scheduler


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


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
    import torch

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


def mean_loss(engine: Any, batches: Iterable[dict[str, torch.Tensor]], device: torch.device) -> float:
    """Token-weighted mean loss over every worker's batches (exact, not a mean of means). Every rank must
    run the same number of batches (ZeRO-3 gathers parameters collectively in each forward)."""
    import torch
    import torch.distributed as dist

    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of token losses, tokens]
    with torch.no_grad():
        for cpu_batch in batches:
            batch = to_device(cpu_batch, device)
            logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                ignore_index=-100, reduction="sum")
            total += torch.stack([losses.double(), (labels != -100).sum().double()])
    dist.all_reduce(total)
    engine.train()
    return float(total[0] / total[1].clamp(min=1))
