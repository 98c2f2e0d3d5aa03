"""Fused Triton kernels for one subspace-Adam step of a weight matrix W (m, n) with gradient G.

Two kernels, each a GEMM with an elementwise epilogue, so that the step reads G once to project
it, and reads and writes W once to apply the update (plus one more read of G where the residual
rule needs it):

``project_adam``  R = down(G): G·Qᵀ (right, Q (r, n)) or Pᵀ·G (left, P (m, r)); then, on each
    tile of R, M ← β1·M + (1-β1)·R, V ← β2·V + (1-β2)·R² in place and N = M / (√V·c + ε) with
    c = 1 (``adam_style="hf"``) or 1/√(1-β2ᵗ) ("torch"). Emits N, and R when asked.
``project_back_update_``  W ← keep·W - α·back(D) - γ·T, back(D) = D·Q (right) or P·D (left), with
    T by ``residual``: 0; Fira's c⊙G (c per row on the right, per column on the left); FRUGAL's
    sign(G - back(R)) or G - back(R) (back(R) from a second accumulator over the same basis tiles,
    always in float32: its round-off decides sign-SGD's signs).

The products' ``precision`` (:data:`PRECISIONS`): ``"bf16"`` / ``"fp16"`` multiply operands rounded to
that type on tensor cores with float32 accumulation (as cuBLAS runs galore-torch's bf16 step; the
default for such weights); ``"tf32"``, ``"tf32x3"`` (three tf32 products, about float32's accuracy)
and ``"ieee"`` (float32 FMA) multiply float32 operands; float32 weights default to what
``torch.get_float32_matmul_precision()`` allows (:func:`default_precision`). The epilogues are float32
whatever the precision. Every scalar (β1, β2, ε, c, keep, α, γ) is a runtime argument: a changing lr
or step never recompiles. Offsets are 64-bit. On a GPU the tiles are autotuned per shape (the in-place
outputs restored between trials); Triton's interpreter (CPU tests) runs one small tile.

``project_adam_grouped`` / ``project_back_update_grouped_`` step a group of matrices of one layout in one
launch: program_id(2) picks the matrix, whose pointers are the first matrix's moved by element offsets from
a small table. On a GPU the first matrix runs through the autotuner alone (its restore covers only the
tensors it names) and the others follow in one launch with the tile it chose.

The engine's torch path (``lrtrain.optim.subspace``) is the reference these kernels are tested against;
it also serves every case they do not cover (CPU tensors, 8-bit moments, coordinate bases, sharded
matrices).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

#: ``residual`` codes of :func:`project_back_update_`.
RESIDUAL_CODES = {"none": 0, "fira": 1, "sign_sgd": 2, "sgd": 3}
#: The products' precisions: operands rounded to bf16 / fp16 (tensor cores), or float32 ones as tf32,
#: three tf32 products, or FMA.
PRECISIONS = ("bf16", "fp16", "tf32", "tf32x3", "ieee")
_HALF = {torch.bfloat16: "bf16", torch.float16: "fp16"}
#: Tiles the autotuner tries on a GPU; every one compiles for sm_90 without spilling registers
#: (``python scripts/gpu_check.py --compile-only``). The projection's epilogue (M, V, N and R) needs 8 warps
#: per 64-row tile; a float32 FMA product (``"ieee"``, or FRUGAL's second accumulator) smaller K steps.
ADAM_TILES = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3),
]
UPDATE_TILES = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
]
FMA_TILES = [  # (32 × 64 × 16 with 4 warps spilled 8 bytes in three grouped tf32 FRUGAL variants)
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16}, num_warps=8, num_stages=2),
]
INTERPRETER_TILE = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}


#: The unit round-off of an operand rounded for each precision's products (bf16 / fp16 / tf32 keep 8 / 11 / 11
#: mantissa bits, counted as a whole ulp since Triton's interpreter truncates; tf32x3 splits a float32 in two
#: tf32 parts and drops lo·lo: about 2^-21), and of a float32 sum.
OPERAND_ROUNDOFF = {"bf16": 2.0**-8, "fp16": 2.0**-11, "tf32": 2.0**-11, "tf32x3": 2.0**-21, "ieee": 0.0}
FLOAT32_ROUNDOFF = 2.0**-24


def product_error_bound(a_abs: Tensor, b_abs: Tensor, precision: str) -> Tensor:
    """A bound on |fl(A·B) - A·B| entry by entry for the kernels' products at ``precision``, from |A| (m, k)
    and |B| (k, n): both operands rounded (2u·|A|·|B|) and float32 accumulation over k terms (k·u32·|A|·|B|),
    first order, with a factor 2 margin for the second-order terms and the order of the sums."""
    inner = a_abs.shape[1]
    return 2 * (2 * OPERAND_ROUNDOFF[precision] + inner * FLOAT32_ROUNDOFF) * (a_abs @ b_abs)


def default_precision(dtype: torch.dtype) -> str:
    """The products' precision for weights of ``dtype``: their own half type, or for float32 weights
    "ieee" under torch's "highest" float32 matmul precision and "tf32" under "high" or "medium"."""
    if dtype in _HALF:
        return _HALF[dtype]
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def tiles(kernel: str, precision: str, residual: str = "none") -> list[triton.Config]:
    """The autotuner's tiles for ``kernel`` ("project_adam" or "project_back_update") at ``precision``
    under the ``residual`` rule."""
    if precision == "ieee" or residual in ("sign_sgd", "sgd"):
        return FMA_TILES
    return ADAM_TILES if kernel == "project_adam" else UPDATE_TILES


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """acc + a·b with the operands rounded to PRECISION's type, float32 accumulation. Triton's interpreter
    multiplies half operands wrongly, so there they are rounded, widened again and multiplied in float32
    (the same products: a product of two bf16 or fp16 values is exact in float32)."""
    if PRECISION == "bf16" or PRECISION == "fp16":
        half = tl.bfloat16 if PRECISION == "bf16" else tl.float16
        if INTERPRETED:
            return tl.dot(a.to(half).to(tl.float32), b.to(half).to(tl.float32), acc, input_precision="ieee")
        return tl.dot(a.to(half), b.to(half), acc)
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)


@triton.jit
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's output tile: its first row and column (64-bit: every offset beyond 2^31 lives in a
    tile's base pointer, offsets inside a tile stay 32-bit), the tile's row, column and inner indices,
    and which rows and columns lie inside the (M, N) output."""
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    col0 = tl.program_id(1).to(tl.int64) * BLOCK_N
    rows, cols, inner = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_K)
    return row0, col0, rows, cols, inner, rows[:, None] < M - row0, cols[None, :] < N - col0


@triton.jit
def _operand_tiles(a_ptr, b_ptr, row0, col0, rows, cols, inner, stride_am, stride_ak, stride_bk, stride_bn):
    """Pointers to the first K-step of A's (BLOCK_M, BLOCK_K) and B's (BLOCK_K, BLOCK_N) tiles."""
    a_tile = a_ptr + row0 * stride_am + rows[:, None] * stride_am + inner[None, :] * stride_ak
    b_tile = b_ptr + col0 * stride_bn + inner[:, None] * stride_bk + cols[None, :] * stride_bn
    return a_tile, b_tile


@triton.jit
def _matrix(ptr, offsets_ptr, operand: tl.constexpr, count, GROUPED: tl.constexpr):
    """``ptr`` moved to this program's matrix of a group: by the element offset in row ``operand`` of the
    (operands, count) table, column program_id(2) (the first matrix is ``ptr`` itself)."""
    if GROUPED:
        return ptr + tl.load(offsets_ptr + operand * count + tl.program_id(2))
    return ptr


@triton.jit
def _project_adam_kernel(
    a_ptr, b_ptr, exp_avg_ptr, exp_avg_sq_ptr, direction_ptr, low_ptr, norms_ptr, offsets_ptr,
    M, N, K, count,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    beta1, beta2, eps, denom_scale,
    STORE_LOW: tl.constexpr, NORMS: tl.constexpr, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
    GROUPED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    a_ptr, b_ptr = _matrix(a_ptr, offsets_ptr, 0, count, GROUPED), _matrix(b_ptr, offsets_ptr, 1, count, GROUPED)
    exp_avg_ptr = _matrix(exp_avg_ptr, offsets_ptr, 2, count, GROUPED)
    exp_avg_sq_ptr = _matrix(exp_avg_sq_ptr, offsets_ptr, 3, count, GROUPED)
    direction_ptr = _matrix(direction_ptr, offsets_ptr, 4, count, GROUPED)
    low_ptr = _matrix(low_ptr, offsets_ptr, 5, count, GROUPED)
    norms_ptr = _matrix(norms_ptr, offsets_ptr, 6, count, GROUPED)
    row0, col0, rows, cols, inner, row_ok, col_ok = _tile(M, N, BLOCK_M, BLOCK_N, BLOCK_K)
    a_tile, b_tile = _operand_tiles(a_ptr, b_ptr, row0, col0, rows, cols, inner, stride_am, stride_ak, stride_bk,
                                    stride_bn)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    col_sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(a_tile, mask=row_ok & (inner[None, :] < K - k), other=0.0)
        b = tl.load(b_tile, mask=(inner[:, None] < K - k) & col_ok, other=0.0)
        acc = _dot(a, b, acc, PRECISION, INTERPRETED)
        if NORMS == 1:  # ‖G's rows‖² (right side: A = G), from the tiles the product reads anyway
            row_sq += tl.sum(a.to(tl.float32) * a.to(tl.float32), axis=1)
        elif NORMS == 2:  # ‖G's columns‖² (left side: B = G)
            col_sq += tl.sum(b.to(tl.float32) * b.to(tl.float32), axis=0)
        a_tile += BLOCK_K * stride_ak
        b_tile += BLOCK_K * stride_bk
    if NORMS == 1:  # one column of programs writes them
        if tl.program_id(1) == 0:
            tl.store(norms_ptr + row0 + rows, row_sq, mask=rows < M - row0)
    elif NORMS == 2:
        if tl.program_id(0) == 0:
            tl.store(norms_ptr + col0 + cols, col_sq, mask=cols < N - col0)
    offsets = rows[:, None] * stride_cm + cols[None, :] * stride_cn
    base = row0 * stride_cm + col0 * stride_cn
    mask = row_ok & col_ok
    m = tl.load(exp_avg_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(exp_avg_sq_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32)
    m = m + (1.0 - beta1) * (acc - m)  # torch's lerp_
    v = v * beta2 + (1.0 - beta2) * acc * acc
    tl.store(exp_avg_ptr + base + offsets, m.to(exp_avg_ptr.dtype.element_ty), mask=mask)
    tl.store(exp_avg_sq_ptr + base + offsets, v.to(exp_avg_sq_ptr.dtype.element_ty), mask=mask)
    tl.store(direction_ptr + base + offsets, m / (tl.sqrt(v) * denom_scale + eps), mask=mask)
    if STORE_LOW:
        tl.store(low_ptr + base + offsets, acc, mask=mask)


@triton.jit
def _project_back_update_kernel(
    w_ptr, a_ptr, b_ptr, a2_ptr, b2_ptr, g_ptr, coef_ptr, offsets_ptr,
    M, N, K, count,
    stride_wm, stride_wn, stride_am, stride_ak, stride_bk, stride_bn,
    stride_a2m, stride_a2k, stride_b2k, stride_b2n, stride_gm, stride_gn,
    keep, alpha, gamma,
    RESIDUAL: tl.constexpr, COEF_ON_ROWS: tl.constexpr, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
    GROUPED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    w_ptr, a_ptr = _matrix(w_ptr, offsets_ptr, 0, count, GROUPED), _matrix(a_ptr, offsets_ptr, 1, count, GROUPED)
    b_ptr, a2_ptr = _matrix(b_ptr, offsets_ptr, 2, count, GROUPED), _matrix(a2_ptr, offsets_ptr, 3, count, GROUPED)
    b2_ptr, g_ptr = _matrix(b2_ptr, offsets_ptr, 4, count, GROUPED), _matrix(g_ptr, offsets_ptr, 5, count, GROUPED)
    coef_ptr = _matrix(coef_ptr, offsets_ptr, 6, count, GROUPED)
    row0, col0, rows, cols, inner, row_ok, col_ok = _tile(M, N, BLOCK_M, BLOCK_N, BLOCK_K)
    a_tile, b_tile = _operand_tiles(a_ptr, b_ptr, row0, col0, rows, cols, inner, stride_am, stride_ak, stride_bk,
                                    stride_bn)
    a2_tile, b2_tile = _operand_tiles(a2_ptr, b2_ptr, row0, col0, rows, cols, inner, stride_a2m, stride_a2k,
                                      stride_b2k, stride_b2n)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    back_low = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a_mask, b_mask = row_ok & (inner[None, :] < K - k), (inner[:, None] < K - k) & col_ok
        acc = _dot(tl.load(a_tile, mask=a_mask, other=0.0), tl.load(b_tile, mask=b_mask, other=0.0), acc, PRECISION,
                   INTERPRETED)
        a_tile += BLOCK_K * stride_ak
        b_tile += BLOCK_K * stride_bk
        if RESIDUAL >= 2:  # back(R) in float32: its round-off decides sign-SGD's signs
            back_low = _dot(tl.load(a2_tile, mask=a_mask, other=0.0), tl.load(b2_tile, mask=b_mask, other=0.0),
                            back_low, "ieee", INTERPRETED)
            a2_tile += BLOCK_K * stride_a2k
            b2_tile += BLOCK_K * stride_b2k
    mask = row_ok & col_ok
    w_tile = w_ptr + row0 * stride_wm + col0 * stride_wn + rows[:, None] * stride_wm + cols[None, :] * stride_wn
    w = tl.load(w_tile, mask=mask, other=0.0)
    new = keep * w.to(tl.float32) - alpha * acc
    if RESIDUAL >= 1:
        g_tile = g_ptr + row0 * stride_gm + col0 * stride_gn + rows[:, None] * stride_gm + cols[None, :] * stride_gn
        g = tl.load(g_tile, mask=mask, other=0.0).to(tl.float32)
        if COEF_ON_ROWS:  # Fira's coefficients, or sign-SGD's round-off floor, per row (column)
            coef = tl.load(coef_ptr + row0 + rows, mask=rows < M - row0, other=0.0)[:, None]
        else:
            coef = tl.load(coef_ptr + col0 + cols, mask=cols < N - col0, other=0.0)[None, :]
        if RESIDUAL == 1:
            new -= gamma * coef * g
        elif RESIDUAL == 2:
            residual = g - back_low
            residual = tl.where(tl.abs(residual) <= coef, 0.0, residual)
            new -= gamma * tl.where(residual > 0, 1.0, tl.where(residual < 0, -1.0, 0.0))
        else:
            new -= gamma * (g - back_low)
    tl.store(w_tile, new.to(w.dtype), mask=mask)


_KEY = ["M", "N", "K", "stride_am", "stride_ak", "stride_bk", "stride_bn"]
_KERNELS = {"project_adam": (_project_adam_kernel, ["exp_avg_ptr", "exp_avg_sq_ptr"]),
            "project_back_update": (_project_back_update_kernel, ["w_ptr"])}
_TUNED = {
    (name, precision, residual): triton.autotune(configs=tiles(name, precision, residual), key=_KEY,
                                                 restore_value=restore)(kernel)
    for name, (kernel, restore) in _KERNELS.items() for precision in PRECISIONS
    for residual in (("none",) if name == "project_adam" else RESIDUAL_CODES)
}


def _element_offsets(operands: list[list[Tensor]], device: torch.device) -> Tensor:
    """The (operands, count) int64 table of each tensor's element offset from its operand's first tensor."""
    table = []
    for tensors in operands:
        base, size = tensors[0].data_ptr(), tensors[0].element_size()
        table.append([(t.data_ptr() - base) // size for t in tensors])
    return torch.tensor(table, dtype=torch.int64, device=device)


def _check_group(**operands: list[Tensor | None]) -> None:
    """A group's matrices share each operand's shape, strides and dtype (one compiled kernel serves them)."""
    for name, tensors in operands.items():
        first = tensors[0]
        if first is None:
            continue
        for t in tensors[1:]:
            if (t.shape, t.stride(), t.dtype, t.device) != (first.shape, first.stride(), first.dtype, first.device):
                raise ValueError(f"a group's {name} tensors must share shape, strides, dtype and device; got "
                                 f"{tuple(first.shape)} {first.dtype} and {tuple(t.shape)} {t.dtype}")


def _launch(name: str, precision: str, residual: str, operands: list[list[Tensor]], sizes: tuple[int, int, int],
            rest: tuple, **constexprs) -> None:
    """Launch kernel ``name`` over (m, n) outputs, one per matrix of a group: ``operands`` holds each pointer
    argument's tensors, one per matrix; ``sizes`` (M, N, K); ``rest`` the strides and scalars. On a GPU (under
    a device guard, so tensors on cuda:N launch there) the first matrix runs through the autotuner and the
    others in one more launch with the tile it chose; on a CPU the interpreter runs them all at once."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    kernel, count = _KERNELS[name][0], len(operands[0])
    device, (rows, cols, _) = operands[0][0].device, sizes
    firsts = [tensors[0] for tensors in operands]
    if device.type != "cuda":
        grid = (triton.cdiv(rows, INTERPRETER_TILE["BLOCK_M"]), triton.cdiv(cols, INTERPRETER_TILE["BLOCK_N"]), count)
        offsets = _element_offsets(operands, device) if count > 1 else firsts[0]
        kernel[grid](*firsts, offsets, *sizes, count, *rest, PRECISION=precision, INTERPRETED=True,
                     GROUPED=count > 1, **constexprs, **INTERPRETER_TILE)
        return
    with torch.cuda.device(device):
        tuned = _TUNED[name, precision, residual]
        tuned[lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(cols, meta["BLOCK_N"]), 1)](
            *firsts, firsts[0], *sizes, 1, *rest, PRECISION=precision, INTERPRETED=False, GROUPED=False,
            **constexprs)
        if count == 1:
            return
        tile = tuned.best_config
        others = [tensors[1:] for tensors in operands]
        grid = (triton.cdiv(rows, tile.kwargs["BLOCK_M"]), triton.cdiv(cols, tile.kwargs["BLOCK_N"]), count - 1)
        kernel[grid](*(tensors[0] for tensors in others), _element_offsets(others, device), *sizes, count - 1,
                     *rest, PRECISION=precision, INTERPRETED=False, GROUPED=True, **constexprs, **tile.all_kwargs())


def project_adam(grad: Tensor, basis: Tensor, side: str, exp_avg: Tensor, exp_avg_sq: Tensor, *,
                 beta1: float, beta2: float, eps: float, denom_scale: float = 1.0,
                 return_low: bool = False, precision: str | None = None,
                 grad_sq_out: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Project ``grad`` (m, n) onto ``basis`` and take the Adam moment update in the same pass.

    ``exp_avg``/``exp_avg_sq`` (float32 or bfloat16 storage, contiguous, the low-rank shape) are updated in
    place, in float32. Returns N = M / (√V·denom_scale + ε), from the float32 moments before they are
    stored, and, with ``return_low``, R (float32, the low-rank shape). ``precision``: the products'
    (:data:`PRECISIONS`; default :func:`default_precision` of ``grad``'s dtype). ``grad_sq_out`` (float32,
    (m,) on the right, (n,) on the left) receives ‖G's rows‖² (columns on the left), summed in float32 from
    the tiles the product reads, for Fira's coefficients.
    """
    directions, lows = project_adam_grouped(
        [grad], [basis], side, [exp_avg], [exp_avg_sq], beta1=beta1, beta2=beta2, eps=eps, denom_scale=denom_scale,
        return_low=return_low, precision=precision, grad_sq_outs=None if grad_sq_out is None else [grad_sq_out])
    return directions[0], (lows[0] if return_low else None)


def project_adam_grouped(grads: list[Tensor], bases: list[Tensor], side: str, exp_avgs: list[Tensor],
                         exp_avg_sqs: list[Tensor], *, beta1: float, beta2: float, eps: float,
                         denom_scale: float = 1.0, return_low: bool = False, precision: str | None = None,
                         grad_sq_outs: list[Tensor] | None = None) -> tuple[list[Tensor], list[Tensor] | None]:
    """:func:`project_adam` for a group of matrices of one shape, side and dtypes with the same Adam scalars,
    in one launch (two on a GPU: the first matrix tunes the tile). Returns the lists of N (and R)."""
    _check_group(grad=grads, basis=bases, exp_avg=exp_avgs, exp_avg_sq=exp_avg_sqs,
                 grad_sq_out=grad_sq_outs or [None])
    grad, exp_avg = grads[0], exp_avgs[0]
    pairs = [(g, q.T) if side == "right" else (q.T, g) for g, q in zip(grads, bases)]
    a, b = pairs[0]
    rows, cols = a.shape[0], b.shape[1]
    if exp_avg.shape != (rows, cols) or not (exp_avg.is_contiguous() and exp_avg_sqs[0].is_contiguous()):
        raise ValueError(f"moments must be contiguous {(rows, cols)} tensors; got {tuple(exp_avg.shape)}")
    if grad_sq_outs is not None and grad_sq_outs[0].shape != (grad.shape[0 if side == "right" else 1],):
        raise ValueError(f"grad_sq_out must have G's {'rows' if side == 'right' else 'columns'}; "
                         f"got {tuple(grad_sq_outs[0].shape)}")
    count = len(grads)
    def outputs() -> list[Tensor]:  # one (count, rows, cols) buffer, a view per matrix
        return list(torch.empty((count, rows, cols), dtype=torch.float32, device=exp_avg.device).unbind(0))

    directions = outputs()
    lows = outputs() if return_low else directions
    norms = 0 if grad_sq_outs is None else 1 if side == "right" else 2
    _launch("project_adam", precision or default_precision(grad.dtype), "none",
            [[p[0] for p in pairs], [p[1] for p in pairs], exp_avgs, exp_avg_sqs, directions, lows,
             grad_sq_outs or directions], (rows, cols, a.shape[1]),
            (a.stride(0), a.stride(1), b.stride(0), b.stride(1), exp_avg.stride(0), exp_avg.stride(1),
             beta1, beta2, eps, denom_scale), STORE_LOW=return_low, NORMS=norms)
    return directions, (lows if return_low else None)


def project_back_update_(weight: Tensor, direction: Tensor, basis: Tensor, side: str, *, keep: float, alpha: float,
                         residual: str = "none", gamma: float = 0.0, grad: Tensor | None = None,
                         coef: Tensor | None = None, low: Tensor | None = None,
                         precision: str | None = None) -> Tensor:
    """W ← keep·W - alpha·back(D) - gamma·T in one pass over W (see the module docstring for T).

    ``direction`` is D (low-rank shape); ``grad`` is needed by every residual rule, ``coef`` (m,) on
    the right or (n,) on the left by "fira" (its coefficients) and "sign_sgd" (the round-off floor
    below which a residual entry counts as 0), ``low`` (R) by "sign_sgd" and "sgd". ``precision``: of
    back(D) (:data:`PRECISIONS`; default :func:`default_precision` of ``weight``'s dtype)."""
    project_back_update_grouped_([weight], [direction], [basis], side, keep=keep, alpha=alpha, residual=residual,
                                 gamma=gamma, grads=[grad], coefs=[coef], lows=[low], precision=precision)
    return weight


def project_back_update_grouped_(weights: list[Tensor], directions: list[Tensor], bases: list[Tensor], side: str, *,
                                 keep: float, alpha: float, residual: str = "none", gamma: float = 0.0,
                                 grads: list[Tensor | None] | None = None, coefs: list[Tensor | None] | None = None,
                                 lows: list[Tensor | None] | None = None, precision: str | None = None) -> None:
    """:func:`project_back_update_` for a group of matrices of one shape, side and dtypes with the same
    scalars, in one launch (two on a GPU: the first matrix tunes the tile)."""
    count = len(weights)
    grads, coefs, lows = (x if x is not None else [None] * count for x in (grads, coefs, lows))
    code = RESIDUAL_CODES[residual]
    needs = {0: (), 1: ("grad", "coef"), 2: ("grad", "coef", "low"), 3: ("grad", "low")}[code]
    given = {"grad": grads[0], "coef": coefs[0], "low": lows[0]}
    if any(given[name] is None for name in needs):
        raise ValueError(f"residual={residual!r} needs {', '.join(needs)}")
    _check_group(weight=weights, direction=directions, basis=bases, grad=grads, coef=coefs, low=lows)
    pairs = [(d, q) if side == "right" else (q, d) for d, q in zip(directions, bases)]
    second = [pair if r is None else (r, q) if side == "right" else (q, r) for pair, r, q in zip(pairs, lows, bases)]
    gs = [g if g is not None else w for g, w in zip(grads, weights)]
    cs = [c if c is not None else w for c, w in zip(coefs, weights)]
    weight, (a, b), (a2, b2), g = weights[0], pairs[0], second[0], gs[0]
    rows, cols = weight.shape
    _launch("project_back_update", precision or default_precision(weight.dtype), residual,
            [weights, [p[0] for p in pairs], [p[1] for p in pairs], [p[0] for p in second], [p[1] for p in second],
             gs, cs], (rows, cols, a.shape[1]),
            (weight.stride(0), weight.stride(1), a.stride(0), a.stride(1), b.stride(0), b.stride(1),
             a2.stride(0), a2.stride(1), b2.stride(0), b2.stride(1), g.stride(0), g.stride(1), keep, alpha, gamma),
            RESIDUAL=code, COEF_ON_ROWS=side == "right")
