"""Adam's math, pure functions on tensors and a group's settings: the moment update and its
denominator, the bias-corrected step size in both AdamW orders, decoupled weight decay, and the
whole-tensor AdamW step of the plain groups.

One tensor at a time, in place: on a CPU, batching the elementwise work of all matrices with
foreach ops keeps every temporary alive at once (~2x the low-rank state per step), and the fresh
pages cost more than the per-call overhead they save (measured with scripts/bench_optim.py)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ...distributed import local
from ..quantized import init_8bit_moments, moment_chunks


def adam_denominator_(
    exp_avg: Tensor, exp_avg_sq: Tensor, grad: Tensor, step: float, group: dict, out: Tensor | None = None
) -> Tensor:
    """Update the moments in place, M ← β1·M + (1-β1)·g, V ← β2·V + (1-β2)·g² (torch.optim.AdamW's
    ops in its order), and return √V + ε ("hf") or √V/√(1-β2ᵗ) + ε ("torch"), written into ``out``
    (which may be ``grad``) or a new tensor."""
    beta1, beta2 = group["betas"]
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    denom = torch.sqrt(exp_avg_sq, out=out)
    if group["adam_style"] == "torch" and group["correct_bias"]:
        denom.div_(math.sqrt(1.0 - beta2**step))
    return denom.add_(group["eps"])


def adam_step_size(lr: float, step: float, group: dict) -> float:
    """lr·√(1-β2ᵗ)/(1-β1ᵗ) ("hf") or lr/(1-β1ᵗ) ("torch"); lr without bias correction."""
    if not group["correct_bias"]:
        return lr
    beta1, beta2 = group["betas"]
    if group["adam_style"] == "hf":
        return lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
    return lr / (1.0 - beta1**step)


def decoupled_decay(lr: float, group: dict) -> tuple[float, float]:
    """Decoupled weight decay as the factors (before, after) of an update: W ← after·(before·W - update).
    1 - lr·wd comes before in torch.optim.AdamW's order (``adam_style="torch"``), after in HF's and
    galore-torch's (``"hf"``, where it also scales the update); the other factor is 1."""
    keep = 1.0 - lr * group["weight_decay"]
    return (keep, 1.0) if group["adam_style"] == "torch" else (1.0, keep)


def adamw_(param: Tensor, grad: Tensor, state: dict, group: dict, lr_scale: float = 1.0) -> None:
    """One AdamW step on a whole tensor; with adam_style="torch" these are torch.optim.AdamW's ops
    (its single-tensor path), so the numbers are identical. Adam uses lr·lr_scale, the decoupled
    decay the group's lr (FRUGAL's rule for its scaled groups). 8-bit moments are updated chunk by
    chunk (:func:`lrtrain.optim.quantized.moment_chunks`)."""
    lr = float(group["lr"])
    before, after = decoupled_decay(lr, group)
    param, grad = local(param), local(grad)  # elementwise: shards suffice
    if before != 1.0:
        param.mul_(before)
    step = float(state["step"].add_(1.0))
    step_size = adam_step_size(lr * lr_scale, step, group)
    for exp_avg, exp_avg_sq, elements in moment_chunks(state):
        p, g = (param, grad) if elements is None else (param.view(-1)[elements], grad.reshape(-1)[elements])
        exp_avg, exp_avg_sq = local(exp_avg), local(exp_avg_sq)
        g = g.to(exp_avg.dtype)  # dequantized 8-bit moments are float32, also for bf16 parameters
        p.addcdiv_(exp_avg, adam_denominator_(exp_avg, exp_avg_sq, g, step, group), value=-step_size)
    if after != 1.0:
        param.mul_(after)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, else the dtype itself (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def init_adamw_state(state: dict, p: Tensor, bits: int) -> None:
    """Zero AdamW moments for ``p`` (8-bit codes with ``bits=8``) and, when missing, a step count."""
    state.setdefault("step", torch.tensor(0.0))
    if bits == 8:
        init_8bit_moments(state, tuple(p.shape), compute_dtype(p.dtype), p.device)
        return
    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
