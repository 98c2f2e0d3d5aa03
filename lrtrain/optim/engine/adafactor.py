"""Adafactor's math (GaLoreAdafactor): its step size, factored statistics and clipped update, on a group's
scalars (:class:`AdafactorSettings`)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


def rms(tensor: Tensor) -> Tensor:
    """‖x‖₂ / √numel (0-d)."""
    return tensor.norm(2) / tensor.numel() ** 0.5


class AdafactorSettings(NamedTuple):
    """The scalars of a group that Adafactor's math reads (read anew every step)."""

    lr: float
    beta1: float  # 0: no first moment
    eps: float  # ε1, added to G²
    eps_scale: float  # ε2, the floor of the parameter scale
    decay_rate: float
    clip_threshold: float
    relative_step: bool
    warmup_init: bool
    scale_parameter: bool

    @classmethod
    def of(cls, group: dict) -> AdafactorSettings:
        return cls(float(group["lr"]), group["betas"][0], group["eps"], group["eps_scale"], group["decay_rate"],
                   group["clip_threshold"], group["relative_step"], group["warmup_init"], group["scale_parameter"])


def adafactor_lr(step: float, weight_rms: Tensor, *, adafactor: AdafactorSettings) -> float:
    """Adafactor's step size: ρ_t = min(1e-2 (or 1e-6·t with ``warmup_init``), 1/√t) with
    ``relative_step``, else lr; times max(eps_scale, RMS(W)) with ``scale_parameter``."""
    rate = adafactor.lr
    if adafactor.relative_step:
        rate = min(1e-6 * step if adafactor.warmup_init else 1e-2, 1.0 / math.sqrt(step))
    return rate * max(adafactor.eps_scale, float(weight_rms)) if adafactor.scale_parameter else rate


def init_adafactor_state(state: dict, grad: Tensor, use_first_moment: bool) -> None:
    """Zero statistics for ``grad``'s shape: factored row/column means of G² for matrices
    (``exp_avg_sq_row`` (m,), ``exp_avg_sq_col`` (n,)), a full ``exp_avg_sq`` for vectors, and
    ``exp_avg`` when β1 > 0."""
    if use_first_moment:
        state["exp_avg"] = torch.zeros_like(grad)
    if grad.dim() >= 2:
        state["exp_avg_sq_row"] = grad.new_zeros(grad.shape[:-1])
        state["exp_avg_sq_col"] = grad.new_zeros(grad.shape[:-2] + grad.shape[-1:])
    else:
        state["exp_avg_sq"] = torch.zeros_like(grad)


def adafactor_update(grad: Tensor, state: dict, step: float, lr: float, *, adafactor: AdafactorSettings) -> Tensor:
    """Adafactor's update U (the shape of ``grad``), updating its statistics (β̂2 = 1 - t^decay_rate)::

        V̂ = row·colᵀ / mean(row)   (factored)  or  V ← β̂2·V + (1-β̂2)·(G² + ε)
        U = G/√V̂;  U ← U / max(1, RMS(U)/clip_threshold);  U ← lr·U;  with β1: M ← β1·M + (1-β1)·U, U = M
    """
    beta2t = 1.0 - step**adafactor.decay_rate
    squared = grad.square().add_(adafactor.eps)
    if "exp_avg_sq_row" in state:
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        row.mul_(beta2t).add_(squared.mean(dim=-1), alpha=1.0 - beta2t)
        col.mul_(beta2t).add_(squared.mean(dim=-2), alpha=1.0 - beta2t)
        row_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
        update = torch.mul(row_factor, col.unsqueeze(-2).rsqrt()).mul_(grad)
    else:
        state["exp_avg_sq"].mul_(beta2t).add_(squared, alpha=1.0 - beta2t)
        update = state["exp_avg_sq"].rsqrt().mul_(grad)
    update.div_((rms(update) / adafactor.clip_threshold).clamp_(min=1.0)).mul_(lr)
    if "exp_avg" in state:
        beta1 = adafactor.beta1
        update = state["exp_avg"].mul_(beta1).add_(update, alpha=1.0 - beta1)
    return update
