"""Low-rank subspaces of a gradient matrix: the side, the basis, and the maps into and out of it.

For a weight W and its gradient G of shape (m, n) and a rank r:

=============  ==========================  ===================  =========================
side           basis                       down: R = ...        up: back(N) = ...
=============  ==========================  ===================  =========================
``right``      Q (r, n), orthonormal rows  G Qᵀ        (m, r)   N Q                 (m, n)
``left``       P (m, r), orthonormal cols  Pᵀ G        (r, n)   P N                 (m, n)
coordinates    idx (r,) int64 columns      G[:, idx]   (m, r)   N scattered to idx  (m, n)
(right/left)   or rows                     G[idx, :]   (r, n)
=============  ==========================  ===================  =========================

A coordinate basis is an index vector (a selection of rows of the identity), so it is stored as
int64 and applied by gather/scatter instead of a matmul. Every basis here but APOLLO's Gaussian
one (``gaussian``: N(0, 1/r) entries, as apollo-torch draws them) is orthonormal, which the Fira
and FRUGAL rules rely on (``‖G - α·back(R)‖²`` row by row from ``‖G‖²`` and ``‖R‖²``); APOLLO's
rule never projects back.

Everything is a pure function of tensors and plain values: the optimizer keeps only the basis
tensor (and a seed) in its state, so ``state_dict`` holds tensors only.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor


def identity(tensor: Tensor) -> Tensor:
    """The no-op reduction (one process) and view."""
    return tensor


PROJ_TYPES = ("std", "reverse_std", "left", "right")
PROJ_METHODS = ("svd", "randomized", "random", "gaussian", "coordinates")


def projection_side(shape: tuple[int, ...], proj_type: str) -> str:
    """The side GaLore projects on: ``std`` is right for tall/square (m >= n), left for wide."""
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in ("left", "right"):
        return proj_type
    raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")


def subspace_rank(shape: tuple[int, ...], side: str, rank: int | None, density: float | None) -> int:
    """Rank of the subspace: ``rank``, or ``round(density * d)`` with d the projected side's size
    (FRUGAL's rule); at least 1 and at most ``min(m, n)``."""
    m, n = shape
    if rank is None:
        rank = max(1, round(density * (n if side == "right" else m)))
    return min(rank, m, n)


#: At most this many elements, and an eighth of the rows, of a half-precision matrix a CPU product takes at
#: a time in float32. CPUs without bf16 matrix units multiply bf16 10-100x slower than float32 (a 1376 × 512
#: bf16 ``addmm_`` with β: 139 ms against 1.2 ms), so there the half-precision products run in row blocks of
#: float32 copies. The result is the one a GPU's bf16 GEMM gives: exact products of the half values, float32
#: sums, one rounding.
CPU_HALF_BLOCK = 2**18


def _cpu_half(tensor: Tensor) -> bool:
    return tensor.device.type == "cpu" and tensor.dtype in (torch.bfloat16, torch.float16)


def _row_blocks(rows: int, cols: int) -> range:
    return range(0, rows, max(1, min(-(-rows // 8), CPU_HALF_BLOCK // max(cols, 1))))


def project(grad: Tensor, basis: Tensor, side: str) -> Tensor:
    """R = G Qᵀ (right), Pᵀ G (left), or the selected columns/rows (coordinates), in G's dtype."""
    if not basis.is_floating_point():
        return grad.index_select(1 if side == "right" else 0, basis)
    if not _cpu_half(grad):
        return grad @ basis.T if side == "right" else basis.T @ grad
    blocks = _row_blocks(*grad.shape)
    if side == "right":  # rows of R are rows of G
        q = basis.float().T
        return torch.cat([grad[i:i + blocks.step].float() @ q for i in blocks]).to(grad.dtype)
    low = torch.zeros(basis.shape[1], grad.shape[1], dtype=torch.float32)
    for i in blocks:  # Pᵀ G = Σ over row blocks of P[b]ᵀ G[b]
        low.addmm_(basis[i:i + blocks.step].float().T, grad[i:i + blocks.step].float())
    return low.to(grad.dtype)


def project_back(low_rank: Tensor, basis: Tensor, side: str, shape: tuple[int, ...]) -> Tensor:
    """back(N) as a new (m, n) tensor: N Q, P N, or N scattered into zeros."""
    full = low_rank.new_zeros(shape)
    add_project_back_(full, low_rank, basis, side, alpha=1.0)
    return full


def add_project_back_(out: Tensor, low_rank: Tensor, basis: Tensor, side: str, alpha: float,
                      beta: float = 1.0) -> Tensor:
    """out ← beta·out + alpha·back(N), written into ``out`` without a full-size temporary (one rounding
    of a half-precision ``out`` for a float basis). N is cast to ``out``'s dtype: a half-precision
    ``out`` and basis multiply in that type, accumulating in float32."""
    low_rank = low_rank.to(out.dtype)
    if not basis.is_floating_point():
        if beta != 1.0:
            out.mul_(beta)
        return out.index_add_(1 if side == "right" else 0, basis, low_rank, alpha=alpha)
    if _cpu_half(out):  # row blocks in float32 (see CPU_HALF_BLOCK): rows of W are rows of N (right), of P (left)
        low, full_basis, blocks = low_rank.float(), basis.float(), _row_blocks(*out.shape)
        for i in blocks:
            rows = slice(i, i + blocks.step)
            left, right = (low[rows], full_basis) if side == "right" else (full_basis[rows], low)
            out[rows].copy_(torch.addmm(out[rows].float(), left, right, beta=beta, alpha=alpha))
        return out
    if side == "right":
        return out.addmm_(low_rank, basis, beta=beta, alpha=alpha)
    return out.addmm_(basis, low_rank, beta=beta, alpha=alpha)


def low_rank_shape(shape: tuple[int, ...], side: str, rank: int) -> tuple[int, int]:
    m, n = shape
    return (m, rank) if side == "right" else (rank, n)


# --------------------------------------------------------------------------- bases


def svd_basis(grad: Tensor, rank: int, side: str) -> Tensor:
    """Top-``rank`` singular vectors of G (exact ``torch.linalg.svd``, as GaLore computes them):
    rows of Vh (right, (r, n)) or columns of U (left, (m, r)). ``grad`` is used in its own dtype
    (the caller passes float32 or float64)."""
    u, _, vh = torch.linalg.svd(grad, full_matrices=False)
    return vh[:rank].contiguous() if side == "right" else u[:, :rank].contiguous()


def canonical_signs_(basis: Tensor, side: str) -> Tensor:
    """Flip each basis vector so that its largest-magnitude entry is positive, in place.

    An SVD fixes singular vectors only up to sign, and LAPACK's choice is not continuous in the
    input: gradients that differ in their last bits (another thread count, reduction order or
    process layout) can get opposite signs. Where moments are kept across refreshes (GaLore,
    Fira), those signs change the trajectory; with this convention they no longer do."""
    vectors = basis if side == "right" else basis.T  # one vector per row
    largest = vectors.abs().argmax(dim=1, keepdim=True)
    vectors.mul_(torch.where(vectors.gather(1, largest) < 0, -1.0, 1.0).to(vectors.dtype))
    return basis


def robust_svd_basis(grad: Tensor, rank: int, side: str, previous: Tensor | None, name: str) -> Tensor:
    """``svd_basis`` with fallbacks when the SVD fails to converge: float64 on the CPU, then the
    previous basis (or, on the first refresh, a random orthonormal one). Each fallback warns."""
    try:
        return svd_basis(grad, rank, side)
    except RuntimeError as err:  # torch.linalg.LinAlgError is a RuntimeError
        first_error = err
    try:
        basis = svd_basis(grad.detach().to("cpu", torch.float64), rank, side)
        warnings.warn(
            f"SVD of the gradient of {name} failed ({first_error}); used a float64 CPU SVD instead.",
            RuntimeWarning,
            stacklevel=4,
        )
        return basis.to(device=grad.device, dtype=grad.dtype)
    except RuntimeError:
        pass
    if previous is not None:
        warnings.warn(
            f"SVD of the gradient of {name} failed ({first_error}), also in float64; kept its previous basis.",
            RuntimeWarning,
            stacklevel=4,
        )
        return previous
    warnings.warn(
        f"SVD of the gradient of {name} failed ({first_error}), also in float64; started from a random basis.",
        RuntimeWarning,
        stacklevel=4,
    )
    return random_basis(0, tuple(grad.shape), rank, side, dtype=grad.dtype, device=grad.device)


def randomized_basis(
    grad: Tensor, rank: int, *, previous: Tensor | None, seed: int, oversample: int, power_iters: int,
    reduce_: Callable[[Tensor], Tensor] = identity,
) -> Tensor:
    """The right basis Q (r, n) of G's top singular subspace by subspace iteration: a few matmuls
    and a thin QR instead of a full SVD (Halko, Martinsson & Tropp, 2011). A left basis of G is the
    transpose of the right basis of Gᵀ.

    ``grad`` holds rows of G (m, n): all of them, or this rank's when ``reduce_`` sums over the
    ranks holding the others (the only collectives are then (n, k) and (k, k) sketches):

        Ω (n, k), k = rank + oversample: the previous basis (warm start), completed by Gaussian columns
                                       (only those are drawn; Ω is orthonormalised first only without
                                       power iterations, whose QR orthonormalises it anyway)
        Ω ← orth(Gᵀ (G Ω))            ``power_iters`` times
        B = G Ω;  Bᵀ B = E Λ Eᵀ       Rayleigh-Ritz on the sketch
        Q = (Ω E_r)ᵀ                   E_r: the eigenvectors of the r largest eigenvalues

    ``previous`` is the current right basis (r, n); ``seed`` draws Ω's Gaussian columns, the same
    on every rank. A zero gradient gives an orthonormal (if arbitrary) basis, never NaN.
    """
    n = grad.shape[1]
    k = min(rank + oversample, n)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    kept = 0 if previous is None else previous.shape[0]  # a warm start draws only the oversampled columns
    gaussian = torch.randn(n, k - kept, generator=generator, dtype=torch.float64).to(grad)
    omega = gaussian if previous is None else torch.cat([previous.T.to(grad), gaussian], dim=1)
    if power_iters == 0:  # the Rayleigh-Ritz step needs orthonormal columns; a power iteration's QR gives them
        omega = torch.linalg.qr(omega).Q
    for _ in range(power_iters):
        omega = torch.linalg.qr(reduce_(grad.T @ (grad @ omega))).Q
    sketch = grad @ omega  # (m or m_local, k)
    _, vectors = torch.linalg.eigh(reduce_(sketch.T @ sketch))  # ascending eigenvalues of Bᵀ B
    return (omega @ vectors[:, -rank:].flip(-1)).T.contiguous()  # largest first


def gaussian_basis(
    seed: int, shape: tuple[int, ...], rank: int, side: str, *, dtype: torch.dtype, device: torch.device | str
) -> Tensor:
    """APOLLO's projection: i.i.d. N(0, 1/r) entries, not orthonormalised, (r, n) on the right or
    (m, r) on the left; a pure function of ``seed`` (drawn on the CPU in float32)."""
    size = (rank, shape[1]) if side == "right" else (shape[0], rank)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    basis = torch.randn(size, generator=generator, dtype=torch.float32) / math.sqrt(rank)
    return basis.to(device=device, dtype=dtype)


def random_basis(
    seed: int, shape: tuple[int, ...], rank: int, side: str, *, dtype: torch.dtype, device: torch.device | str
) -> Tensor:
    """A Haar-random orthonormal basis, a pure function of ``seed`` (drawn on the CPU, so every
    device and every rank regenerates the same basis): QR of a Gaussian (d, r) matrix with the
    signs of R's diagonal folded into Q."""
    dim = shape[1] if side == "right" else shape[0]
    generator = torch.Generator(device="cpu").manual_seed(seed)
    gaussian = torch.randn(dim, rank, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)
    basis = q.T if side == "right" else q
    return basis.to(device=device, dtype=dtype).contiguous()


def coordinate_basis(seed: int, shape: tuple[int, ...], rank: int, side: str, *, device: torch.device | str) -> Tensor:
    """``rank`` distinct columns (right) or rows (left), uniformly at random from ``seed``, sorted."""
    dim = shape[1] if side == "right" else shape[0]
    generator = torch.Generator(device="cpu").manual_seed(seed)
    chosen = torch.randperm(dim, generator=generator)[:rank]
    return chosen.sort().values.to(device)


def basis_transition(previous: Tensor, new: Tensor, side: str, shape: tuple[int, ...]) -> Tensor:
    """T mapping low-rank coordinates from the ``previous`` basis to ``new`` (same side):
    right, bases (r, n): T = Q_prev·Q_newᵀ, (r, r), so down(back(X)) = X·T; left, bases (m, r):
    T = P_newᵀ·P_prev, so it is T·X. Coordinate bases (indices) count as one-hot vectors."""
    previous, new = dense_basis(previous, side, shape), dense_basis(new, side, shape)
    return previous @ new.T if side == "right" else new.T @ previous


def aligned_basis(previous: Tensor, new: Tensor, side: str) -> Tensor:
    """``new`` turned within its own span to the basis nearest ``previous`` (orthogonal Procrustes), so that
    moments kept across the refresh keep the directions their coordinates stand for.

    With T = basis_transition(previous, new) = U Σ Vᵀ (r, r), O = U Vᵀ minimises ‖O·Q_new - Q_prev‖ (right,
    returns O·Q_new) or ‖P_new·O - P_prev‖ (left, returns P_new·O); the transition to the result is then
    U Σ Uᵀ, symmetric and as near the identity as the two subspaces allow. A ``new`` that spans the
    subspace of ``previous`` gives ``previous`` back. Float bases of one side and dtype."""
    transition = basis_transition(previous, new, side, ())
    u, _, vh = torch.linalg.svd(transition)
    rotation = u @ vh
    return (rotation @ new if side == "right" else new @ rotation).contiguous()


def sign_aligned_basis(previous: Tensor, new: Tensor, side: str) -> Tensor:
    """``new`` with each vector flipped to point along the previous basis' vector of the same position:
    the signs s_i of T_ii, T = basis_transition(previous, new), a zero counting as +. The vectors and their
    order (by singular value) stay, so R's coordinates stay uncorrelated, as an SVD basis makes them."""
    signs = torch.where(torch.diagonal(basis_transition(previous, new, side, ())) < 0, -1.0, 1.0).to(new.dtype)
    return (signs[:, None] * new if side == "right" else new * signs).contiguous()


def dense_basis(basis: Tensor, side: str, shape: tuple[int, ...]) -> Tensor:
    """A float basis as it is; coordinate indices as one-hot rows (right, (r, n)) or columns (left, (m, r))."""
    if basis.is_floating_point():
        return basis
    size = shape[1] if side == "right" else shape[0]
    one_hot = torch.nn.functional.one_hot(basis, size).to(torch.float32)
    return one_hot if side == "right" else one_hot.T


# --------------------------------------------------------------------------- seeds

_SEED_MASK = (1 << 63) - 1


def initial_seed(group_seed: int, param_index: int) -> int:
    """The first basis seed of the ``param_index``-th parameter: the same on every rank."""
    return next_seed((group_seed * 1_000_003 + param_index) & _SEED_MASK)


def next_seed(seed: int) -> int:
    """The seed of the next refresh (a 63-bit LCG step, then a xorshift to mix the low bits)."""
    seed = (seed * 6364136223846793005 + 1442695040888963407) & _SEED_MASK
    return seed ^ (seed >> 29)
