"""Adam's math, pure functions on tensors and a group's scalars (:class:`AdamSettings`): the moment update and its
denominator, the bias-corrected step size in both AdamW orders, decoupled weight decay, and the
whole-tensor AdamW step of the plain groups.

One tensor at a time, in place: on a CPU, batching the elementwise work of all matrices with
foreach ops keeps every temporary alive at once (~2x the low-rank state per step), and the fresh
pages cost more than the per-call overhead they save (measured with scripts/bench_optim.py)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ...distributed import local
from ..quantized import init_8bit_moments, moment_chunks


class AdamSettings(NamedTuple):
    """The scalars of a group that Adam's math reads (read anew every step: schedulers may change β)."""

    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    adam_style: str  # "hf" (galore-torch, Fira) | "torch" (torch.optim.AdamW, FRUGAL)
    correct_bias: bool

    @classmethod
    def of(cls, group: dict) -> AdamSettings:
        beta1, beta2 = group["betas"]
        return cls(beta1, beta2, group["eps"], group["weight_decay"], group["adam_style"], group["correct_bias"])


def second_moment_divisor(step: float, *, adam: AdamSettings) -> float:
    """√(1-β2ᵗ), which divides √V in torch.optim.AdamW's formula (``adam_style="torch"``); 1 in HF's
    (where the correction is in the step size) and without bias correction."""
    if adam.adam_style == "torch" and adam.correct_bias:
        return math.sqrt(1.0 - adam.beta2**step)
    return 1.0


def adam_denominator_(
    exp_avg: Tensor, exp_avg_sq: Tensor, grad: Tensor, step: float, *, adam: AdamSettings, out: Tensor | None = None
) -> Tensor:
    """Update the moments in place, M ← β1·M + (1-β1)·g, V ← β2·V + (1-β2)·g² (torch.optim.AdamW's
    ops in its order), and return √V/d + ε with d = :func:`second_moment_divisor`, written into ``out``
    (which may be ``grad``) or a new tensor."""
    exp_avg.lerp_(grad, 1.0 - adam.beta1)
    exp_avg_sq.mul_(adam.beta2).addcmul_(grad, grad, value=1.0 - adam.beta2)
    denom = torch.sqrt(exp_avg_sq, out=out)
    divisor = second_moment_divisor(step, adam=adam)
    if divisor != 1.0:
        denom.div_(divisor)
    return denom.add_(adam.eps)


def adam_step_size(lr: float, step: float, *, adam: AdamSettings) -> float:
    """lr·√(1-β2ᵗ)/(1-β1ᵗ) ("hf") or lr/(1-β1ᵗ) ("torch"); lr without bias correction."""
    if not adam.correct_bias:
        return lr
    if adam.adam_style == "hf":
        return lr * math.sqrt(1.0 - adam.beta2**step) / (1.0 - adam.beta1**step)
    return lr / (1.0 - adam.beta1**step)


def decoupled_decay(lr: float, *, adam: AdamSettings) -> tuple[float, float]:
    """Decoupled weight decay as the factors (before, after) of an update: W ← after·(before·W - update).
    1 - lr·wd comes before in torch.optim.AdamW's order (``adam_style="torch"``), after in HF's and
    galore-torch's (``"hf"``, where it also scales the update); the other factor is 1."""
    keep = 1.0 - lr * adam.weight_decay
    return (keep, 1.0) if adam.adam_style == "torch" else (1.0, keep)


def adamw_(param: Tensor, grad: Tensor, state: dict, *, lr: float, adam: AdamSettings, lr_scale: float = 1.0) -> None:
    """One AdamW step on a whole tensor; with adam_style="torch" these are torch.optim.AdamW's ops
    (its single-tensor path), so the numbers are identical. Adam uses lr·lr_scale, the decoupled
    decay lr (FRUGAL's rule for its scaled groups). 8-bit moments are updated chunk by chunk
    (:func:`lrtrain.optim.quantized.moment_chunks`)."""
    before, after = decoupled_decay(lr, adam=adam)
    param, grad = local(param), local(grad)  # elementwise: shards suffice
    if before != 1.0:
        param.mul_(before)
    step = float(state["step"].add_(1.0))
    step_size = adam_step_size(lr * lr_scale, step, adam=adam)
    for exp_avg, exp_avg_sq, elements in moment_chunks(state):
        p, g = (param, grad) if elements is None else (param.view(-1)[elements], grad.reshape(-1)[elements])
        exp_avg, exp_avg_sq = local(exp_avg), local(exp_avg_sq)
        g = g.to(exp_avg.dtype)  # dequantized 8-bit moments are float32, also for bf16 parameters
        p.addcdiv_(exp_avg, adam_denominator_(exp_avg, exp_avg_sq, g, step, adam=adam), value=-step_size)
    if after != 1.0:
        param.mul_(after)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, else the dtype itself (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def init_adamw_state(state: dict, p: Tensor, bits: int, dtype: torch.dtype) -> None:
    """Zero AdamW moments for ``p`` in ``dtype`` (8-bit codes with ``bits=8``, float32 below their least
    size, as bitsandbytes) and, when missing, a step count."""
    state.setdefault("step", torch.tensor(0.0))
    if bits == 8:
        init_8bit_moments(state, tuple(p.shape), compute_dtype(p.dtype), p.device)
        return
    state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
    state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
