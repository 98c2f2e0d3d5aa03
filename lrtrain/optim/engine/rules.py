"""The residual rules (step 4 of :mod:`lrtrain.optim.subspace`'s equations): what each rule adds
to Adam's update in the subspace, as pure functions, and the rule table that holds each rule's
torch form beside its fused kernel's arguments."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..projector import add_project_back_, identity


def state_free_lr(lr: float, group: dict) -> float:
    """The step size of the state-free residual rules (sign_sgd, sgd): lr·scale·state_free_lr_scale."""
    return lr * group["scale"] * group["state_free_lr_scale"]


def per_row_or_column(coef: Tensor, side: str) -> Tensor:
    """A coefficient per row of G, (m,), as (m, 1) on the right side; per column, (n,), as (1, n) on
    the left; a 0-d one as it is."""
    return coef.unsqueeze(1 if side == "right" else 0) if coef.dim() else coef


def fira_update_(
    weight: Tensor, grad: Tensor, low: Tensor, direction: Tensor, basis: Tensor, *, side: str, step_size: float,
    scale: float, gamma: float | None, state: dict, reduce_: Callable[[Tensor], Tensor], keep: float = 1.0,
) -> None:
    """W ← keep·W - s·(scale·back(N) + ℓ⁻¹·φ⊙(G - scale·back(R))), without a full-size temporary.

    With an orthonormal basis, row i (right side; column i on the left) of the residual obeys
    ‖g_i - α·back(R)_i‖² = ‖g_i‖² - (2α - α²)·‖R_i‖², which gives ‖S‖ for the limiter; and
    φ⊙back(R) = back(φ⊙R), so the whole update is back(α(N - c⊙R)) + c⊙G with c = φ/ℓ.
    ``low`` is R, ``direction`` is N; c comes from :func:`fira_coefficients`.
    ``grad`` and ``weight`` may be this rank's rows of a row-split matrix: ``reduce_`` sums over
    the ranks (the squared norms of G's columns on the left; the squared norm of S on the right).
    """
    coef = fira_coefficients(grad, low, direction, side=side, scale=scale, gamma=gamma, state=state, reduce_=reduce_)
    coef = per_row_or_column(coef, side)
    add_project_back_(weight, (direction - coef * low).mul_(scale), basis, side, alpha=-step_size, beta=keep)
    weight.addcmul_(coef, grad, value=-step_size)


def fira_coefficients(
    grad: Tensor, low: Tensor, direction: Tensor, *, side: str, scale: float, gamma: float | None, state: dict,
    reduce_: Callable[[Tensor], Tensor], grad_sq: Tensor | None = None,
) -> Tensor:
    """Fira's c = φ/ℓ: per row of G (m,) on the right, per column (n,) on the left; updates the
    limiter state (``state["limiter_norm"]``, 0-d). ``grad`` may be stored in a half type: its
    norms accumulate in R's dtype. ``grad_sq``: those squared norms when the projection kernel
    summed them already (then G is not read here)."""
    dim = 1 if side == "right" else 0  # reduce over the rank dimension of R and N
    phi = torch.linalg.vector_norm(direction, dim=dim) / (torch.linalg.vector_norm(low, dim=dim) + 1e-8)
    residual_sq = (torch.linalg.vector_norm(grad, dim=dim, dtype=low.dtype).square_() if grad_sq is None
                   else grad_sq.to(low.dtype, copy=True))
    if side == "left":
        reduce_(residual_sq)
    residual_sq.sub_(low.square().sum(dim=dim), alpha=2.0 * scale - scale * scale).clamp_(min=0.0)
    residual_sq_total = (phi.square() * residual_sq).sum()
    residual_norm = (reduce_(residual_sq_total) if side == "right" else residual_sq_total).sqrt()
    return norm_growth_limit(phi, residual_norm, gamma=gamma, state=state)


def norm_growth_limit(phi: Tensor, norm: Tensor, *, gamma: float | None, state: dict) -> Tensor:
    """Fira's norm-growth limiter: φ/ℓ with ℓ = max(‖S‖/‖S_prev‖, γ)/γ, ``norm`` = ‖S‖ of the update
    φ scales; keeps ‖S‖/ℓ in ``state["limiter_norm"]`` (0-d) for the next step. No limit with γ None."""
    if gamma is not None and "limiter_norm" in state:
        limiter = torch.clamp(norm / (state["limiter_norm"] + 1e-8), min=gamma) / gamma
        phi, norm = phi / limiter, norm / limiter
    state["limiter_norm"] = norm
    return phi


def apollo_coefficients(
    grad: Tensor, low: Tensor, direction: Tensor, *, side: str, scale_type: str, gamma: float | None, state: dict,
    reduce_: Callable[[Tensor], Tensor],
) -> Tensor:
    """APOLLO's c = φ/ℓ: φ = ‖N‖/(‖R‖+1e-8) per row of G (m,) on the right, per column (n,) on the
    left (``"channel"``), or one 0-d ratio of Frobenius norms (``"tensor"``); ℓ the norm-growth limiter
    on ‖φ⊙G‖ (``state["limiter_norm"]``), computed from G's row/column norms without a temporary.
    ``reduce_`` sums over ranks for a row-split matrix, as in :func:`fira_coefficients`."""
    dim = 1 if side == "right" else 0  # reduce over the rank dimension of R and N
    grad_sq = torch.linalg.vector_norm(grad, dim=dim, dtype=low.dtype).square_()
    if side == "left":
        reduce_(grad_sq)  # column norms span the ranks' rows
    if scale_type == "channel":
        phi = torch.linalg.vector_norm(direction, dim=dim) / (torch.linalg.vector_norm(low, dim=dim) + 1e-8)
        update_sq = (phi.square() * grad_sq).sum()
    else:
        squares = torch.stack([direction.square().sum(), low.square().sum(), grad_sq.sum()])
        if side == "right":
            reduce_(squares)  # N, R and G rows are this rank's
        phi = squares[0].sqrt() / (squares[1].sqrt() + 1e-8)
        update_sq = phi.square() * squares[2]
    update_norm = (reduce_(update_sq) if side == "right" and scale_type == "channel" else update_sq).sqrt()
    return norm_growth_limit(phi, update_norm, gamma=gamma, state=state)


#: Residual entries within this many float ulps of the gradient's norm along the projected dimension
#: are round-off of the projection (measured worst for a gradient inside its subspace: 1.5 ulps).
ROUNDOFF_ULPS = 16


def roundoff_floor(grad: Tensor, side: str) -> Tensor:
    """ROUNDOFF_ULPS·ε·‖G‖ along the dimension the basis spans: (m, 1) rows on the right side,
    (1, n) columns on the left. An entry of G - back(R) at or below it is round-off, not gradient
    outside the subspace, so sign-SGD leaves it at 0 instead of a whole lr-sized step."""
    norms = torch.linalg.vector_norm(grad, dim=1 if side == "right" else 0, keepdim=True)
    return norms.mul_(ROUNDOFF_ULPS * torch.finfo(grad.dtype).eps)


def state_free_update_(
    weight: Tensor, grad: Tensor, low: Tensor | None, basis: Tensor | None, *, side: str, rule: str, lr: float
) -> None:
    """W ← W - lr·rule(G - back(R)) for ``rule`` in sign_sgd | sgd (G itself when ``basis`` is None);
    sign-SGD treats residual entries at round-off level (:func:`roundoff_floor`) as 0."""
    if rule == "sgd":
        weight.add_(grad, alpha=-lr)
        if basis is not None:
            add_project_back_(weight, low, basis, side, alpha=lr)
        return
    residual = grad.clone()
    if basis is not None:
        add_project_back_(residual, low, basis, side, alpha=-1.0)
        residual.masked_fill_(residual.abs() <= roundoff_floor(grad, side), 0.0)
    weight.add_(residual.sign_(), alpha=-lr)


@dataclass(frozen=True)
class SubspaceStep:
    """What step 4 of the module docstring reads for one matrix, once Adam has run in its subspace:
    ``grad`` G (this rank's rows, (m, n)), the ``basis`` P and the ``side`` it projects, ``low`` R = down(G)
    and ``direction`` N = M/(√V+ε) ((r, n) on the right, (m, r) on the left), Adam's step size
    ``step_size`` s = lr·√(1-β2ᵗ)/(1-β1ᵗ) (or its torch form), ``lr`` itself, ``reduce_``, which sums a
    tensor over the ranks that split G's rows (the identity in one process and in the fused path), and
    ``keep``, W's factor in the update W ← keep·W - (update): the decoupled decay, folded into the first
    product so that half-precision weights round once (1 when the caller applies the decay itself), and
    ``grad_sq``, ‖G's rows‖² ((m,), right) or columns' ((n,), left) when the fused projection summed them."""

    grad: Tensor
    basis: Tensor
    side: str
    low: Tensor
    direction: Tensor
    lr: float
    step_size: float
    reduce_: Callable[[Tensor], Tensor] = identity
    keep: float = 1.0
    grad_sq: Tensor | None = None


@dataclass(frozen=True)
class ResidualRule:
    """One ``residual`` rule: step 4 of the module docstring (the update beyond Adam's moments), in its
    torch form and as the fused kernel's arguments, side by side, so that the two cannot drift apart.

    ``update_(weight, step, group, state)`` writes W ← W - (update) in place (decay excluded) from a
    :class:`SubspaceStep`; ``kernel(step, group, state)`` gives
    :func:`lrtrain.kernels.subspace_adam.project_back_update_`'s ``direction``, ``alpha``, ``residual``,
    ``gamma`` (and ``coef``/``low``) for the same update, or the rule has ``kernel=None`` and runs on the
    torch path only. ``reads_low``: R is read after the moment update (otherwise N may take R's memory);
    ``reads_norms``: its kernel arguments need ‖G's rows‖² (columns' on the left), which the fused projection
    sums as it reads G;
    ``orthonormal``: G - back(R) needs an orthonormal basis (APOLLO's Gaussian one is not);
    ``half_operands``: for half-precision weights the torch form updates W in place from G and the basis in
    that type (products accumulate in float32), with no full-size float32 copy; otherwise (a residual
    G - back(R) whose round-off matters) W, G and the basis are float32 copies."""

    update_: Callable[[Tensor, SubspaceStep, dict, dict], None]
    kernel: Callable[[SubspaceStep, dict, dict], dict] | None
    reads_low: bool = True
    reads_norms: bool = False
    orthonormal: bool = True
    half_operands: bool = True


def _galore_update_(weight: Tensor, step: SubspaceStep, group: dict, state: dict) -> None:
    add_project_back_(weight, step.direction, step.basis, step.side, alpha=-step.step_size * group["scale"],
                      beta=step.keep)


def _fira_update_(weight: Tensor, step: SubspaceStep, group: dict, state: dict) -> None:
    fira_update_(weight, step.grad, step.low, step.direction, step.basis, side=step.side, step_size=step.step_size,
                 scale=group["scale"], gamma=group["limiter_gamma"], state=state, reduce_=step.reduce_, keep=step.keep)


def _apollo_update_(weight: Tensor, step: SubspaceStep, group: dict, state: dict) -> None:
    coef = apollo_coefficients(step.grad, step.low, step.direction, side=step.side, scale_type=group["scale_type"],
                               gamma=group["limiter_gamma"], state=state, reduce_=step.reduce_)
    if step.keep != 1.0:
        weight.mul_(step.keep)
    weight.addcmul_(per_row_or_column(coef, step.side), step.grad, value=-step.step_size * math.sqrt(group["scale"]))


def _state_free_update_(weight: Tensor, step: SubspaceStep, group: dict, state: dict) -> None:
    _galore_update_(weight, step, group, state)
    state_free_update_(weight, step.grad, step.low, step.basis, side=step.side, rule=group["residual"],
                       lr=state_free_lr(step.lr, group))


def _fira_kernel(step: SubspaceStep, group: dict, state: dict) -> dict:
    coef = fira_coefficients(step.grad, step.low, step.direction, side=step.side, scale=group["scale"],
                             gamma=group["limiter_gamma"], state=state, reduce_=identity, grad_sq=step.grad_sq)
    direction = (step.direction - per_row_or_column(coef, step.side) * step.low).mul_(group["scale"])
    return dict(direction=direction, alpha=step.step_size, residual="fira", gamma=step.step_size, coef=coef)


def _state_free_kernel(step: SubspaceStep, group: dict, state: dict) -> dict:
    rule = group["residual"]
    floor = roundoff_floor(step.grad.float(), step.side).flatten() if rule == "sign_sgd" else None
    return dict(direction=step.direction, alpha=step.step_size * group["scale"], residual=rule,
                gamma=state_free_lr(step.lr, group), low=step.low, coef=floor)


#: ``residual`` → its rule. A new rule is one entry here (and, to run fused, a kernel code).
RESIDUAL_RULES: dict[str, ResidualRule] = {
    "none": ResidualRule(_galore_update_, _state_free_kernel, reads_low=False),
    "fira": ResidualRule(_fira_update_, _fira_kernel, reads_norms=True),
    "apollo": ResidualRule(_apollo_update_, None, orthonormal=False),
    "sign_sgd": ResidualRule(_state_free_update_, _state_free_kernel, half_operands=False),
    "sgd": ResidualRule(_state_free_update_, _state_free_kernel, half_operands=False),
}
