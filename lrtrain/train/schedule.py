"""Learning-rate schedule of the GaLore protocol: linear warmup, then cosine decay to a floor."""

from __future__ import annotations

import math

import torch


def warmup_cosine(step: int, *, warmup_steps: int, cycle_length: int, min_lr_ratio: float) -> float:
    """The lr multiplier at optimizer step ``step`` (0-based), as the reference scripts compute it.

    Within each cycle of ``cycle_length`` steps: ``c/warmup`` for the first ``warmup_steps``
    (0 at c = 0), then ``min_lr_ratio + (1 - min_lr_ratio)·½(1 + cos(π·p))`` with p going from 0 to
    1 over the rest of the cycle. After the first cycle the lr restarts (FRUGAL's long-run scripts
    use cycles; the others set ``cycle_length`` to the number of steps), and the first two steps of
    a restart use 1e-7, as the references do.
    """
    cycle_step = step % cycle_length
    if cycle_step < warmup_steps:
        if step != cycle_step and cycle_step < 2:
            return 1e-7
        return cycle_step / max(1, warmup_steps)
    progress = (cycle_step - warmup_steps) / max(1, cycle_length - warmup_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.1,
    cycle_length: int | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over :func:`warmup_cosine`; ``cycle_length`` defaults to ``total_steps``."""
    cycle = cycle_length or total_steps
    if not 0.0 < min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in (0, 1]; got {min_lr_ratio}")
    if not 0 <= warmup_steps < cycle:
        raise ValueError(f"warmup_steps must be in [0, cycle_length={cycle}); got {warmup_steps}")

    def multiplier(step: int) -> float:
        return warmup_cosine(step, warmup_steps=warmup_steps, cycle_length=cycle, min_lr_ratio=min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
