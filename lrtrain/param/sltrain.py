"""SLTrain: a linear layer whose weight is sparse plus low-rank (Han et al., NeurIPS 2024).

    W = B · A · (alpha / rank) + S        y = x Wᵀ + b

A (rank, in) and B (out, rank) are a LoRA-style factorisation (A ~ kaiming_uniform(a=√5), B = 0),
S (out, in) is sparse on a support of ``int(sparsity · out · in)`` entries chosen uniformly at random
once, from ``seed``, and never changed. Only A, B, the support's values and the bias train.

The support is a sorted int32 buffer of flat indices into W (int64 only when out · in ≥ 2³¹): half
the bytes of the reference's int64 index. The autograd function keeps neither W nor dW between
forward and backward: it saves the factors and rebuilds W (one (out, r)·(r, in) product and a
scatter) in the backward pass, as the reference's C++ extension does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_positive_int
from .dense import dense_linear

__all__ = ["SLTrainLinear", "sltrain_linear"]


def _dense(A: Tensor, B: Tensor, values: Tensor, index: Tensor, scale: float) -> Tensor:
    """W = scale · B A + S, S given by ``values`` at the flat ``index``: (out, in), a fresh tensor."""
    W = torch.mm(B, A).mul_(scale)
    W.view(-1).index_add_(0, index, values)
    return W


class _SLTrainFunction(torch.autograd.Function):
    """y = x Wᵀ + b with W rebuilt from (A, B, values, index) in both passes."""

    @staticmethod
    def forward(ctx, x: Tensor, A: Tensor, B: Tensor, values: Tensor, index: Tensor, bias: Tensor | None,
                scale: float) -> Tensor:
        with torch.autocast(A.device.type, enabled=False):  # build W in the parameters' dtype
            W = _dense(A, B, values, index, scale)
        ctx.save_for_backward(x, A, B, values, index)
        ctx.scale = scale
        ctx.has_bias = bias is not None
        return F.linear(x, W, bias)  # under autocast this runs in the autocast dtype, as nn.Linear does

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, A, B, values, index = ctx.saved_tensors
        need_x, need_A, need_B, need_values, _, need_bias, _ = ctx.needs_input_grad
        scale = ctx.scale
        dy2 = dy.reshape(-1, dy.shape[-1])  # (tokens, out), in the forward output's dtype
        dx = dA = dB = dvalues = dbias = None
        with torch.autocast(dy.device.type, enabled=False):  # explicit dtypes below
            if need_x:
                W = _dense(A, B, values, index, scale).to(dy.dtype)
                dx = torch.mm(dy2, W).view(x.shape).to(x.dtype)
                del W
            if need_A or need_B or need_values:
                dW = torch.mm(dy2.t(), x.reshape(-1, x.shape[-1]).to(dy.dtype)).to(A.dtype)  # (out, in)
                if need_A:
                    dA = torch.mm(B.t(), dW).mul_(scale)
                if need_B:
                    dB = torch.mm(dW, A.t()).mul_(scale)
                if need_values:
                    dvalues = dW.view(-1).index_select(0, index)
            if ctx.has_bias and need_bias:
                dbias = dy2.sum(0).to(A.dtype)
        return dx, dA, dB, dvalues, None, dbias, None


def sltrain_linear(x: Tensor, A: Tensor, B: Tensor, values: Tensor, index: Tensor, bias: Tensor | None = None,
                   scale: float = 1.0) -> Tensor:
    """Functional form: x (..., in) -> (..., out) with W = scale · B A + S(values at flat ``index``).
    Memory between forward and backward: x and the factors only, no dense (out, in) tensor."""
    return _SLTrainFunction.apply(x, A, B, values, index, bias, scale)


class SLTrainLinear(nn.Module):
    """Sparse plus low-rank linear layer: W = B A (alpha / rank) + S, y = x Wᵀ + b.

    Args:
        in_features, out_features: sizes of the dense layer it stands for (W is (out, in)).
        rank: r of A (r, in) and B (out, r); 1 ≤ r < min(in, out).
        sparsity: fraction δ of W's entries on S's support (nnz = int(δ · out · in)), in (0, 1).
        alpha: the low-rank part is scaled by alpha / rank (as in LoRA and the reference).
        bias: whether to learn a bias (out,).
        seed: chooses the support (``torch.randperm`` from a generator seeded with it); the
            trainable values use the global RNG, as ``nn.Linear`` does. Give each layer its own seed.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, sparsity: float = 0.03, alpha: float = 32.0,
                 bias: bool = False, seed: int = 0, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_positive_int("in_features", in_features)
        check_positive_int("out_features", out_features)
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank < min(in_features, out_features):
            raise ValueError(
                f"rank must be an int with 1 <= rank < min(in_features, out_features) = "
                f"{min(in_features, out_features)}; got {rank!r}. SLTrain is for rank < min(in, out): "
                f"use a smaller rank or keep nn.Linear")
        if not 0.0 < sparsity < 1.0:
            raise ValueError(f"sparsity must be in (0, 1) (the fraction of W's entries on the support, "
                             f"e.g. 0.03); got {sparsity!r}")
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0 (the low-rank part is scaled by alpha / rank); got {alpha!r}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.sparsity, self.alpha, self.scale = float(sparsity), float(alpha), alpha / rank
        numel = in_features * out_features
        nnz = int(sparsity * numel)
        generator = torch.Generator().manual_seed(seed)
        index = torch.randperm(numel, generator=generator)[:nnz].sort().values
        index_dtype = torch.int32 if numel < 2**31 else torch.int64
        self.register_buffer("sparse_index", index.to(device=device, dtype=index_dtype))
        factory = {"device": device, "dtype": dtype}
        self.A = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.B = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.sparse_value = nn.Parameter(torch.empty(nnz, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    @property
    def nnz(self) -> int:
        return self.sparse_index.numel()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A ~ kaiming_uniform(a=√5), B = 0, values ~ U(±1/√in), bias ~ U(±1/√out); support kept."""
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.zeros_(self.B)
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.sparse_value, -bound, bound)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.out_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in) -> (..., out)."""
        return sltrain_linear(x, self.A, self.B, self.sparse_value, self.sparse_index, self.bias, self.scale)

    @torch.no_grad()
    def dense_weight(self) -> Tensor:
        """W = B A (alpha / rank) + S, (out, in), detached."""
        return _dense(self.A, self.B, self.sparse_value, self.sparse_index, self.scale)

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` computing the same function, on the same device and in the same dtype."""
        return dense_linear(self.dense_weight(), self.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, sparsity: float = 0.03, alpha: float = 32.0,
                    seed: int = 0) -> "SLTrainLinear":
        """A layer with ``linear``'s sizes, bias presence, device and dtype.

        Like the reference (``SpLoRaModel``), the dense weights are NOT kept: the layer starts from its
        own initialisation (B = 0, so W = S), and the function changes. This is a pretraining
        parameterisation, not a compression of a trained layer.
        """
        return cls(linear.in_features, linear.out_features, rank, sparsity=sparsity, alpha=alpha,
                   bias=linear.bias is not None, seed=seed, device=linear.weight.device, dtype=linear.weight.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"sparsity={self.sparsity}, nnz={self.nnz}, alpha={self.alpha}, bias={self.bias is not None}")
