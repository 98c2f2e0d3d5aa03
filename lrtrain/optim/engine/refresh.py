"""Refreshes: a new basis for a matrix's subspace, from its gradient (exact SVD, randomized range finder)
or from a seed (random, Gaussian, coordinates), and what happens to the moments (kept, reset,
carried into the new basis). :class:`MatrixPlan` says what a step knows of one matrix."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from ...distributed import MatrixShards
from ..projector import (
    aligned_basis,
    basis_transition,
    canonical_signs_,
    coordinate_basis,
    initial_seed,
    low_rank_shape,
    next_seed,
    randomized_basis,
    robust_svd_basis,
    sign_aligned_basis,
)
from ..quantized import float_moments, init_8bit_moments, zero_moments_
from .options import ALIGNED_METHODS, aligns_basis
from .storage import SEEDED_BASES, has_basis, load_basis, storage_dtype, store_basis_


@dataclass(frozen=True)
class MatrixPlan:
    """One subspace matrix as a step sees it, worked out once per step: its ``name`` (for messages), its
    position ``index`` in its group (staggered refreshes) and ``seed_index`` in the optimizer (seeds),
    the projected ``side`` and ``rank``, and ``shards``, this rank's rows of it."""

    name: str
    index: int
    seed_index: int
    side: str
    rank: int
    shards: MatrixShards


def refresh_basis(group: dict, plan: MatrixPlan, p: Tensor, grad: Tensor, state: dict) -> bool:
    """A new basis (in the parameter's layout, the same on every rank); False, with nothing
    changed, when the gradient is not finite on some rank."""
    side, rank, shards = plan.side, plan.rank, plan.shards
    # max |G| in one reduction: NaN propagates, ±Inf shows; isfinite(G) would take 7 bytes per element
    if not shards.agree(bool(torch.isfinite(torch.linalg.vector_norm(grad, ord=math.inf))), grad.device):
        message = f"non-finite gradient (NaN/Inf) at a subspace refresh of {plan.name}"
        if group["on_nonfinite"] == "raise":
            raise FloatingPointError(message + "; pass on_nonfinite='skip' to skip such steps instead")
        warnings.warn(
            message + ": skipped this step for that matrix (weights, basis and moments unchanged)",
            RuntimeWarning,
            stacklevel=4,
        )
        return False
    shape, method, view_side = tuple(p.shape), group["proj_method"], shards.view_side(side)
    fresh = not has_basis(state)
    previous = None if fresh else load_basis(state, group, plan, p, grad.dtype)
    if method == "svd":  # exact: on the whole gradient, as galore-torch computes it
        basis = shards.broadcast_(robust_svd_basis(_whole_gradient(group, shards, p, grad), rank, side,
                                                   previous, plan.name))
    else:
        seed = next_seed(int(state["seed"])) if "seed" in state else initial_seed(group["seed"], plan.seed_index)
        state["seed"] = torch.tensor(seed, dtype=torch.int64)
        if method == "randomized":
            basis = randomized_refresh(group, plan, p, grad, previous, seed)
        elif method in SEEDED_BASES:
            basis = SEEDED_BASES[method](seed, shape, rank, side, dtype=grad.dtype, device=grad.device)
        else:
            basis = coordinate_basis(seed, shape, rank, side, device=grad.device)
    if previous is not None and aligns_basis(group):
        align = aligned_basis if group["basis_alignment"] == "procrustes" else sign_aligned_basis
        basis = align(previous, basis, side)  # which also fixes the signs
    elif group["basis_signs"] == "canonical" and method in ALIGNED_METHODS:
        canonical_signs_(basis, side)
    store_basis_(state, basis, side, group["basis_dtype"], p.dtype)
    if group["stagger_refresh"]:  # matrix i of n: the first period is shortened by i/n of a gap
        gap = group["update_proj_gap"]
        first = gap - (plan.index * gap) // len(group["params"]) if fresh else gap
        state["refresh_in"] = torch.tensor(first, dtype=torch.int64)
    if fresh and group["inner"] == "adafactor":
        return True  # its factored statistics start with its first update
    if fresh:
        low_shape = low_rank_shape(shape, side, rank)
        if group["state_bits"] == 8:
            init_8bit_moments(state, low_shape, grad.dtype, grad.device)
        else:
            split = view_side == "right"  # moments split like the weight when its rows project locally
            dtype = storage_dtype(group["moment_dtype"], p.dtype)
            state["exp_avg"] = shards.zeros(low_shape, split=split, dtype=dtype, device=grad.device)
            state["exp_avg_sq"] = shards.zeros(low_shape, split=split, dtype=dtype, device=grad.device)
    elif group["refresh_moments"] == "reset":
        zero_moments_(state)
        state["step"].zero_()
    elif group["refresh_moments"] == "project":
        # T from the whole bases (the same on every rank), applied to this rank's view of the
        # moments: a transposed view (a dim-1 split) swaps the side and transposes T.
        transition = basis_transition(previous, load_basis(state, group, plan, p, grad.dtype), side, shape)
        transition = transition.T if shards.transposed else transition
        with float_moments(state, shards.view, grad.dtype) as (exp_avg, exp_avg_sq):
            rotate_moments_(exp_avg, exp_avg_sq, transition.to(exp_avg.dtype), view_side)
    return True


def _whole_gradient(group: dict, shards: MatrixShards, p: Tensor, grad: Tensor) -> Tensor:
    """The whole gradient of ``p`` in the parameter's layout, in ``grad``'s dtype and negated with
    ``maximize``: the step's ``grad`` itself when no rank splits ``p`` (no second copy), else gathered."""
    if not isinstance(p.grad, DTensor) and not shards.transposed:
        return grad
    full = shards.full(p.grad).to(grad.dtype)
    return torch.neg(full) if group["maximize"] else full


def randomized_refresh(group: dict, plan: MatrixPlan, p: Tensor, grad: Tensor, previous: Tensor | None,
                       seed: int) -> Tensor:
    """Subspace iteration on the basis' own side: a right basis of G, or of Gᵀ for a left one.

    When the basis spans the view's columns (a right basis of a dim-0 split, a left basis of a
    dim-1 split: the layouts the harness chooses) every rank iterates on its rows and only
    sketches are all-reduced; in the crossed layouts the gradient is gathered, as for svd."""
    side, rank, shards = plan.side, plan.rank, plan.shards
    options = {"seed": seed, "oversample": group["oversample"], "power_iters": group["power_iters"]}
    if shards.view_side(side) == "right":  # the basis spans the columns every rank holds
        view_previous = None if previous is None else (previous.T if side == "left" else previous)
        view_basis = randomized_basis(grad, rank, previous=view_previous, reduce_=shards.all_reduce_, **options)
        return view_basis.T.contiguous() if side == "left" else view_basis
    full = _whole_gradient(group, shards, p, grad)
    if side == "right":
        return shards.broadcast_(randomized_basis(full, rank, previous=previous, **options))
    left_previous = None if previous is None else previous.T
    return shards.broadcast_(randomized_basis(full.T, rank, previous=left_previous, **options).T.contiguous())


def rotate_moments_(exp_avg: Tensor, exp_avg_sq: Tensor, transition: Tensor, side: str) -> None:
    """Carry the moments into a new basis (``refresh_moments="project"``), in place.

    M is re-expressed exactly: M' = M·T on the right ((m, r)·(r, r')), T·M on the left. V, a second moment
    per coordinate, has no exact image (it would need the covariance of R). It keeps its coordinates, as
    galore-torch keeps both moments: svd and randomized bases are ordered by singular value, so coordinate i
    is the i-th strongest direction before and after, and a seeded basis' coordinates are exchangeable. V is raised
    only where the normalised step would exceed its bound before the refresh: with κ the largest |M|/√V of a
    row (of a column on the left), V' = max(V, (M'/κ)²), so |M'|/√V' <= κ, as in Adam. (The variance of each
    new coordinate were the old ones independent, V·(T⊙T), gives a direction new to the subspace V = 0: its
    next steps are Adam's first ones without bias correction, up to 6.6 times the usual size, exactly where
    the refresh found the gradient strong; it trains worse on text. See the README's refresh quality.) V' >= V >= 0."""
    bound = step_bound(exp_avg, exp_avg_sq, side)
    exp_avg.copy_(exp_avg @ transition if side == "right" else transition @ exp_avg)
    exp_avg_sq.copy_(raised_to_bound(exp_avg_sq, exp_avg, bound))


def step_bound(exp_avg: Tensor, exp_avg_sq: Tensor, side: str) -> Tensor:
    """κ: the largest normalised step |M|/√V of each row of the low-rank moments (of each column on the left),
    keeping its dimension; 0 where V is."""
    ratio = torch.where(exp_avg_sq > 0, exp_avg.abs() / exp_avg_sq.sqrt(), 0.0)
    return ratio.amax(dim=1 if side == "right" else 0, keepdim=True)


def raised_to_bound(variance: Tensor, exp_avg: Tensor, bound: Tensor) -> Tensor:
    """max(V, (M/κ)²): V raised just enough that |M|/√V <= κ (unraised where κ = 0)."""
    return torch.maximum(variance, torch.where(bound > 0, exp_avg / bound, 0.0).square_())
