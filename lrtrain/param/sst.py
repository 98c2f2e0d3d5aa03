"""SST: Sparse Spectral Training (Zhao et al., ICML 2025) — a linear layer trained in its SVD basis.

    W = U diag(s) Vᵀ,   U (out, k), s (k,), V (in, k),   k = min(in, out)

All k singular values train every step; only r sampled singular-vector pairs ("active") train at a
time, and the sample changes every *iteration* (``sample_every`` optimizer steps); every *round*
(``iterations_per_round`` iterations) the weight is re-decomposed. The official code is not
available; this follows the paper's description, and these are the choices made where it left room:

* Layout. U and V are frozen buffers holding all k vectors (no grad, no optimizer state); the r
  active pairs are the Parameters ``U_active`` (out, r), ``V_active`` (in, r), standing for the
  columns ``active_index`` of U/V (whose buffer copies are stale while active). ``s`` (k,) is one
  Parameter. Effective weight: W = U diag(s ⊙ (1 − m)) Vᵀ + U_active diag(s[active]) V_activeᵀ.
* Gradients ("enhanced", Σ-free): from the dense dW = dyᵀ x, ∇U_active = dW V_active and
  ∇V_active = dWᵀ U_active — the true gradients carry an extra factor s_i that SST drops so that a
  vector's learning rate does not depend on its singular value. ∇s_i = u_iᵀ dW v_i is the true
  gradient. W and dW are rebuilt/computed in backward, never kept between the passes.
* After every optimizer step (:meth:`SSTController.step`): s ← max(s, 0) and every active column is
  renormalised to unit norm. s is *not* multiplied by the lost norms (the paper's update
  u ← (u − η∇)/‖u − η∇‖ keeps the magnitude in s only), so the function moves slightly.
* Sampling: r distinct indices with p_i = ½ (1/k + s_i / Σ s) (half uniform, half proportional to
  the singular values; uniform if Σ s = 0), without replacement. Generators are seeded from
  (controller seed, the layer's position among the model's SSTLinear modules, iteration), so every
  rank and every resume draws the same; a new layer's first sample uses the layer's ``seed``.
* Lengths: ``sample_every`` = 200 steps per iteration (the GaLore-family refresh gap) and
  ``iterations_per_round`` = ceil(k / r) per layer (a round lets about every vector be sampled once).
* Optimizer state: at every iteration the states of U_active and V_active are dropped (the Parameters
  now hold other vectors; their stale ``.grad`` is dropped too); at a round (re-SVD) that of s as
  well, since its entries then stand for a new spectrum. The bias keeps its state.
* Re-SVD: W → SVD in float64 → U, s, V (descending s), stored in the layer dtype; the function is
  unchanged up to rounding, and a new active sample is drawn.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_positive_int
from .dense import dense_linear

__all__ = ["SSTController", "SSTLinear", "sst_linear"]


def _factors(U: Tensor, V: Tensor, U_active: Tensor, V_active: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """U and V with the active columns in place: (out, k), (in, k)."""
    return U.index_copy(1, index, U_active), V.index_copy(1, index, V_active)


class _SSTFunction(torch.autograd.Function):
    """y = x Wᵀ + b, W = U_eff diag(s) V_effᵀ, with SST's Σ-free gradients for the active vectors."""

    @staticmethod
    def forward(ctx, x: Tensor, U: Tensor, V: Tensor, s: Tensor, U_active: Tensor, V_active: Tensor,
                index: Tensor, bias: Tensor | None) -> Tensor:
        with torch.autocast(s.device.type, enabled=False):  # build W in the parameters' dtype
            U_eff, V_eff = _factors(U, V, U_active, V_active, index)
            W = torch.mm(U_eff * s, V_eff.t())
        ctx.save_for_backward(x, U, V, s, U_active, V_active, index)
        ctx.has_bias = bias is not None
        return F.linear(x, W, bias)  # under autocast this runs in the autocast dtype, as nn.Linear does

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, U, V, s, U_active, V_active, index = ctx.saved_tensors
        need_x, _, _, need_s, need_Ua, need_Va, _, need_bias = ctx.needs_input_grad
        dy2 = dy.reshape(-1, dy.shape[-1])  # (tokens, out), in the forward output's dtype
        dx = ds = dUa = dVa = dbias = None
        with torch.autocast(dy.device.type, enabled=False):  # explicit dtypes below
            U_eff, V_eff = _factors(U, V, U_active, V_active, index)
            if need_x:
                W = torch.mm(U_eff * s, V_eff.t()).to(dy.dtype)
                dx = torch.mm(dy2, W).view(x.shape).to(x.dtype)
                del W
            if need_s or need_Ua or need_Va:
                dW = torch.mm(dy2.t(), x.reshape(-1, x.shape[-1]).to(dy.dtype)).to(s.dtype)  # (out, in)
                if need_s or need_Ua:
                    G = torch.mm(dW, V_eff)  # (out, k): column i is dW v_i
                    ds = (G * U_eff).sum(0) if need_s else None  # u_iᵀ dW v_i
                    dUa = G.index_select(1, index) if need_Ua else None  # dW V_active (no factor s_i)
                if need_Va:
                    dVa = torch.mm(dW.t(), U_active)  # dWᵀ U_active (no factor s_i)
            if ctx.has_bias and need_bias:
                dbias = dy2.sum(0).to(s.dtype)
        return dx, None, None, ds, dUa, dVa, None, dbias


def sst_linear(x: Tensor, U: Tensor, V: Tensor, s: Tensor, U_active: Tensor, V_active: Tensor, index: Tensor,
               bias: Tensor | None = None) -> Tensor:
    """Functional form: x (..., in) -> (..., out) with W = U_eff diag(s) V_effᵀ, where U_eff/V_eff are
    U (out, k)/V (in, k) with columns ``index`` (r,) replaced by U_active (out, r)/V_active (in, r).
    The gradients of U_active and V_active are SST's Σ-free ones (see the module docstring)."""
    return _SSTFunction.apply(x, U, V, s, U_active, V_active, index, bias)


def _generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from integer keys (stable across processes, unlike ``hash``)."""
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


class SSTLinear(nn.Module):
    """Linear layer in its SVD basis: W = U diag(s) Vᵀ (k = min(in, out) triplets), y = x Wᵀ + b.

    Args:
        in_features, out_features: sizes of the dense layer (W is (out, in)).
        rank: r active singular-vector pairs, 1 ≤ r ≤ min(in, out).
        bias: whether to learn a bias (out,).
        seed: draws the first active sample.
        weight: (out, in) to decompose (the layer then computes x weightᵀ); default a fresh
            ``nn.Linear`` initialisation (kaiming_uniform(a=√5), global RNG).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False, seed: int = 0,
                 weight: Tensor | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_positive_int("in_features", in_features)
        check_positive_int("out_features", out_features)
        k = min(in_features, out_features)
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= k:
            raise ValueError(f"rank must be an int with 1 <= rank <= min(in_features, out_features) = {k}; "
                             f"got {rank!r}: use a rank in that range")
        factory = {"device": device, "dtype": dtype}
        if weight is None:
            weight = torch.empty(out_features, in_features, **factory)
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        elif tuple(weight.shape) != (out_features, in_features):
            raise ValueError(f"weight must have shape (out_features, in_features) = ({out_features}, {in_features}); "
                             f"got {tuple(weight.shape)}: pass the matching nn.Linear's weight or fix the sizes")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        dtype = dtype or (weight.dtype if weight.is_floating_point() else torch.get_default_dtype())
        factory = {"device": device if device is not None else weight.device, "dtype": dtype}
        U, s, Vh = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
        self.register_buffer("U", U.to(**factory))
        self.register_buffer("V", Vh.t().to(**factory))
        self.s = nn.Parameter(s.to(**factory))
        index = self.sample_active(_generator(seed)).to(factory["device"])
        self.register_buffer("active_index", index)
        self.U_active = nn.Parameter(self.U[:, index].clone())
        self.V_active = nn.Parameter(self.V[:, index].clone())
        self.register_buffer("sst_steps", torch.zeros((), dtype=torch.int64, device=factory["device"]))
        self.register_buffer("sst_iterations", torch.zeros((), dtype=torch.int64, device=factory["device"]))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        if self.bias is not None:
            bound = 1.0 / math.sqrt(in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def k(self) -> int:
        return self.s.numel()

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in) -> (..., out)."""
        return sst_linear(x, self.U, self.V, self.s, self.U_active, self.V_active, self.active_index, self.bias)

    @torch.no_grad()
    def dense_weight(self) -> Tensor:
        """W = U diag(s ⊙ (1 − m)) Vᵀ + U_active diag(s[active]) V_activeᵀ, (out, in), detached."""
        U_eff, V_eff = _factors(self.U, self.V, self.U_active, self.V_active, self.active_index)
        return torch.mm(U_eff * self.s, V_eff.t())

    @torch.no_grad()
    def sample_active(self, generator: torch.Generator) -> Tensor:
        """r distinct indices (int64, CPU), p_i = ½ (1/k + s_i / Σ s) (uniform when Σ s = 0)."""
        s = self.s.detach().to("cpu", torch.float64).clamp_min(0)
        p = torch.full_like(s, 1.0 / s.numel())
        if s.sum() > 0:
            p = 0.5 * (p + s / s.sum())
        return torch.multinomial(p, self.rank, replacement=False, generator=generator)

    @torch.no_grad()
    def normalize_(self) -> None:
        """s ← max(s, 0); every column of U_active and V_active ← unit norm (s not compensated)."""
        self.s.clamp_(min=0)
        for P in (self.U_active, self.V_active):
            P.div_(P.norm(dim=0, keepdim=True).clamp_min(torch.finfo(P.dtype).tiny))

    @torch.no_grad()
    def resample_(self, generator: torch.Generator) -> None:
        """Write the active columns back into U/V, then activate a new sample of r columns."""
        self.U.index_copy_(1, self.active_index, self.U_active)
        self.V.index_copy_(1, self.active_index, self.V_active)
        self.active_index.copy_(self.sample_active(generator))
        self.U_active.copy_(self.U[:, self.active_index])
        self.V_active.copy_(self.V[:, self.active_index])

    @torch.no_grad()
    def resvd_(self, generator: torch.Generator) -> None:
        """U, s, V ← SVD(W) in float64 (same function, orthonormal U/V), then a new active sample."""
        U_eff, V_eff = _factors(self.U, self.V, self.U_active, self.V_active, self.active_index)
        W = torch.mm(U_eff.double() * self.s.double(), V_eff.double().t())
        U, s, Vh = torch.linalg.svd(W, full_matrices=False)
        self.U.copy_(U)
        self.V.copy_(Vh.t())
        self.s.copy_(s)
        self.active_index.copy_(self.sample_active(generator))
        self.U_active.copy_(self.U[:, self.active_index])
        self.V_active.copy_(self.V[:, self.active_index])

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` computing the same function, on the same device and in the same dtype."""
        return dense_linear(self.dense_weight(), self.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, seed: int = 0) -> "SSTLinear":
        """The SVD of ``linear``'s weight (bias copied): the same function, device and dtype."""
        layer = cls(linear.in_features, linear.out_features, rank, bias=linear.bias is not None, seed=seed,
                    weight=linear.weight, device=linear.weight.device, dtype=linear.weight.dtype)
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        return layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"k={self.k}, bias={self.bias is not None}")


class SSTController:
    """Drives the SSTLinear modules of ``model``: call :meth:`step` right after every ``optimizer.step()``.

    Every step: s ≥ 0 and unit-norm active columns. Every ``sample_every`` steps (an iteration): a
    new active sample, optimizer state of U_active/V_active dropped. Every ``iterations_per_round``
    iterations (default ceil(k / r), per layer): re-SVD instead, optimizer state of s dropped too.
    Counters live in the modules' buffers, so model + optimizer state dicts resume it exactly.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, sample_every: int = 200,
                 iterations_per_round: int | None = None, seed: int = 0) -> None:
        check_positive_int("sample_every", sample_every)
        if iterations_per_round is not None:
            check_positive_int("iterations_per_round", iterations_per_round)
        named = [(name, m) for name, m in model.named_modules() if isinstance(m, SSTLinear)]
        if not named:
            raise ValueError("model has no SSTLinear modules: convert it first (lrtrain.param.convert(model, 'sst'))")
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for name, layer in named:
            if not {id(layer.s), id(layer.U_active), id(layer.V_active)} <= held:
                raise ValueError(f"the optimizer does not hold the parameters of SSTLinear {name!r}: build the "
                                 f"optimizer from the converted model's parameters")
        self.layers = [m for _, m in named]
        self.optimizer, self.sample_every, self.iterations_per_round, self.seed = (
            optimizer, sample_every, iterations_per_round, seed)

    def _reset_state(self, *params: nn.Parameter) -> None:
        for p in params:
            self.optimizer.state.pop(p, None)
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """Normalise; at an iteration boundary resample (or re-SVD at a round boundary)."""
        for position, layer in enumerate(self.layers):
            layer.normalize_()
            layer.sst_steps += 1
            if int(layer.sst_steps) % self.sample_every:
                continue
            layer.sst_iterations += 1
            iteration = int(layer.sst_iterations)
            generator = _generator(self.seed, position, iteration)
            if iteration % (self.iterations_per_round or math.ceil(layer.k / layer.rank)) == 0:
                layer.resvd_(generator)
                self._reset_state(layer.s, layer.U_active, layer.V_active)
            else:
                layer.resample_(generator)
                self._reset_state(layer.U_active, layer.V_active)
