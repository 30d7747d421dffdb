"""Learning-rate schedules for `torch.optim.lr_scheduler.LambdaLR`: linear warmup, then cosine or linear
decay to 0, or constant. The same shapes as transformers' get_*_schedule_with_warmup."""

from __future__ import annotations

import math
from collections.abc import Callable

SCHEDULERS = ("cosine", "linear", "constant")


def warmup_steps_for(warmup_ratio: float, total_steps: int) -> int:
    """Warmup steps for a share of the optimizer steps (rounded up, as transformers does)."""
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
    return math.ceil(warmup_ratio * total_steps)


def lr_lambda(scheduler: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The multiplier of the peak learning rate at optimizer step `step` (0-based).

    Warmup: step / warmup_steps (0 at step 0, reaching 1 at `warmup_steps`). After it:
    cosine: 0.5 * (1 + cos(pi * progress)); linear: 1 - progress; constant: 1; where progress goes from 0 at
    the end of warmup to 1 at `total_steps` (the multiplier is 0 there and stays 0 beyond).
    """
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; expected one of {', '.join(SCHEDULERS)}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    warmup = min(warmup_steps, total_steps)
    decay = max(1, total_steps - warmup)

    def multiplier(step: int) -> float:
        if step < warmup:
            return step / warmup
        if scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / decay)
        if scheduler == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier
