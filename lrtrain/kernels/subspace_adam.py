"""Fused Triton kernels for one subspace-Adam step of a weight matrix W (m, n) with gradient G.

Two kernels, each a GEMM with an elementwise epilogue, so that the step reads G once to project
it, and reads and writes W once to apply the update (plus one more read of G where the residual
rule needs it):

``project_adam``  R = down(G): G·Qᵀ (right, Q (r, n)) or Pᵀ·G (left, P (m, r)); then, on each
    tile of R, M ← β1·M + (1-β1)·R, V ← β2·V + (1-β2)·R² in place and N = M / (√V·c + ε) with
    c = 1 (``adam_style="hf"``) or 1/√(1-β2ᵗ) ("torch"). Emits N, and R when asked.
``project_back_update_``  W ← keep·W - α·back(D) - γ·T, back(D) = D·Q (right) or P·D (left), with
    T by ``residual``: 0; Fira's c⊙G (c per row on the right, per column on the left); FRUGAL's
    sign(G - back(R)) or G - back(R) (back(R) from a second accumulator over the same basis tiles).

Every scalar (β1, β2, ε, c, keep, α, γ) is a runtime argument: a changing lr or step never
recompiles. Math is float32 (products with ``input_precision="ieee"``, as torch's default fp32
matmul); W and G may be float32, bfloat16 or float16 storage. The engine's torch path
(``lrtrain.optim.subspace``) is the reference these kernels are tested against; it also serves
every case they do not cover (CPU tensors, 8-bit moments, coordinate bases, sharded matrices).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

#: ``residual`` codes of :func:`project_back_update_`.
RESIDUAL_CODES = {"none": 0, "fira": 1, "sign_sgd": 2, "sgd": 3}


def _blocks(device: torch.device) -> dict[str, int]:
    """Tile sizes: 64 × 64 × 32 on a GPU; the smallest ``tl.dot`` allows under the interpreter."""
    if device.type == "cuda":
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}
    return {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}


@triton.jit
def _project_adam_kernel(
    a_ptr, b_ptr, exp_avg_ptr, exp_avg_sq_ptr, direction_ptr, low_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    beta1, beta2, eps, denom_scale,
    STORE_LOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    inner = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        ks = k + inner
        a = tl.load(a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0).to(tl.float32)
        b = tl.load(b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=(ks[:, None] < K) & (cols[None, :] < N), other=0.0).to(tl.float32)
        acc += tl.dot(a, b, input_precision="ieee")
    offsets = rows[:, None] * stride_cm + cols[None, :] * stride_cn
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    m = tl.load(exp_avg_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(exp_avg_sq_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    m = m + (1.0 - beta1) * (acc - m)  # torch's lerp_
    v = v * beta2 + (1.0 - beta2) * acc * acc
    tl.store(exp_avg_ptr + offsets, m.to(exp_avg_ptr.dtype.element_ty), mask=mask)
    tl.store(exp_avg_sq_ptr + offsets, v.to(exp_avg_sq_ptr.dtype.element_ty), mask=mask)
    tl.store(direction_ptr + offsets, m / (tl.sqrt(v) * denom_scale + eps), mask=mask)
    if STORE_LOW:
        tl.store(low_ptr + offsets, acc, mask=mask)


@triton.jit
def _project_back_update_kernel(
    w_ptr, a_ptr, b_ptr, a2_ptr, b2_ptr, g_ptr, coef_ptr,
    M, N, K,
    stride_wm, stride_wn, stride_am, stride_ak, stride_bk, stride_bn,
    stride_a2m, stride_a2k, stride_b2k, stride_b2n, stride_gm, stride_gn,
    keep, alpha, gamma,
    RESIDUAL: tl.constexpr, COEF_ON_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    inner = tl.arange(0, BLOCK_K)
    row_ok, col_ok = rows[:, None] < M, cols[None, :] < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    back_low = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        ks = k + inner
        a_mask, b_mask = row_ok & (ks[None, :] < K), (ks[:, None] < K) & col_ok
        a = tl.load(a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak, mask=a_mask, other=0.0)
        b = tl.load(b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn, mask=b_mask, other=0.0)
        acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        if RESIDUAL >= 2:
            a2 = tl.load(a2_ptr + rows[:, None] * stride_a2m + ks[None, :] * stride_a2k, mask=a_mask, other=0.0)
            b2 = tl.load(b2_ptr + ks[:, None] * stride_b2k + cols[None, :] * stride_b2n, mask=b_mask, other=0.0)
            back_low += tl.dot(a2.to(tl.float32), b2.to(tl.float32), input_precision="ieee")
    mask = row_ok & col_ok
    w_offsets = rows[:, None] * stride_wm + cols[None, :] * stride_wn
    w = tl.load(w_ptr + w_offsets, mask=mask, other=0.0)
    new = keep * w.to(tl.float32) - alpha * acc
    if RESIDUAL >= 1:
        g = tl.load(g_ptr + rows[:, None] * stride_gm + cols[None, :] * stride_gn, mask=mask, other=0.0).to(tl.float32)
        if RESIDUAL == 1:
            if COEF_ON_ROWS:
                coef = tl.load(coef_ptr + rows, mask=rows < M, other=0.0)[:, None]
            else:
                coef = tl.load(coef_ptr + cols, mask=cols < N, other=0.0)[None, :]
            new -= gamma * coef * g
        elif RESIDUAL == 2:  # sign-SGD; coef holds the round-off floor of each row (column)
            if COEF_ON_ROWS:
                floor = tl.load(coef_ptr + rows, mask=rows < M, other=0.0)[:, None]
            else:
                floor = tl.load(coef_ptr + cols, mask=cols < N, other=0.0)[None, :]
            residual = g - back_low
            residual = tl.where(tl.abs(residual) <= floor, 0.0, residual)
            new -= gamma * tl.where(residual > 0, 1.0, tl.where(residual < 0, -1.0, 0.0))
        else:
            new -= gamma * (g - back_low)
    tl.store(w_ptr + w_offsets, new.to(w.dtype), mask=mask)


def project_adam(grad: Tensor, basis: Tensor, side: str, exp_avg: Tensor, exp_avg_sq: Tensor, *,
                 beta1: float, beta2: float, eps: float, denom_scale: float = 1.0,
                 return_low: bool = False) -> tuple[Tensor, Tensor | None]:
    """Project ``grad`` (m, n) onto ``basis`` and take the Adam moment update in the same pass.

    ``exp_avg``/``exp_avg_sq`` (float32 or bfloat16 storage, contiguous, the low-rank shape) are updated in
    place, in float32. Returns N = M / (√V·denom_scale + ε), from the float32 moments before they are
    stored, and, with ``return_low``, R (float32, the low-rank shape).
    """
    a, b = (grad, basis.T) if side == "right" else (basis.T, grad)
    rows, cols = a.shape[0], b.shape[1]
    if exp_avg.shape != (rows, cols) or not (exp_avg.is_contiguous() and exp_avg_sq.is_contiguous()):
        raise ValueError(f"moments must be contiguous {(rows, cols)} tensors; got {tuple(exp_avg.shape)}")
    direction = torch.empty(exp_avg.shape, dtype=torch.float32, device=exp_avg.device)
    low = torch.empty_like(direction) if return_low else direction
    blocks = _blocks(grad.device)
    grid = (triton.cdiv(rows, blocks["BLOCK_M"]), triton.cdiv(cols, blocks["BLOCK_N"]))
    _project_adam_kernel[grid](
        a, b, exp_avg, exp_avg_sq, direction, low, rows, cols, a.shape[1],
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), exp_avg.stride(0), exp_avg.stride(1),
        beta1, beta2, eps, denom_scale, STORE_LOW=return_low, **blocks,
    )
    return direction, (low if return_low else None)


def project_back_update_(weight: Tensor, direction: Tensor, basis: Tensor, side: str, *, keep: float, alpha: float,
                         residual: str = "none", gamma: float = 0.0, grad: Tensor | None = None,
                         coef: Tensor | None = None, low: Tensor | None = None) -> Tensor:
    """W ← keep·W - alpha·back(D) - gamma·T in one pass over W (see the module docstring for T).

    ``direction`` is D (low-rank shape); ``grad`` is needed by every residual rule, ``coef`` (m,) on
    the right or (n,) on the left by "fira" (its coefficients) and "sign_sgd" (the round-off floor
    below which a residual entry counts as 0), ``low`` (R) by "sign_sgd" and "sgd"."""
    code = RESIDUAL_CODES[residual]
    needs = {0: (), 1: ("grad", "coef"), 2: ("grad", "coef", "low"), 3: ("grad", "low")}[code]
    given = {"grad": grad, "coef": coef, "low": low}
    if any(given[name] is None for name in needs):
        raise ValueError(f"residual={residual!r} needs {', '.join(needs)}")
    a, b = (direction, basis) if side == "right" else (basis, direction)
    a2, b2 = (a, b) if low is None else (low, basis) if side == "right" else (basis, low)
    g = grad if grad is not None else weight
    rows, cols = weight.shape
    blocks = _blocks(weight.device)
    grid = (triton.cdiv(rows, blocks["BLOCK_M"]), triton.cdiv(cols, blocks["BLOCK_N"]))
    _project_back_update_kernel[grid](
        weight, a, b, a2, b2, g, coef if coef is not None else weight, rows, cols, a.shape[1],
        weight.stride(0), weight.stride(1), a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        a2.stride(0), a2.stride(1), b2.stride(0), b2.stride(1), g.stride(0), g.stride(1),
        keep, alpha, gamma, RESIDUAL=code, COEF_ON_ROWS=side == "right", **blocks,
    )
    return weight
