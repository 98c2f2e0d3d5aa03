"""How a subspace matrix's state is stored, apart from how it is computed with.

Compute is float32 (float64 for float64 weights). Storage follows two group options:

* ``moment_dtype``: Adam's moments M and V, unless they are 8-bit codes (``state_bits=8``);
* ``basis_dtype``: the basis, as a float tensor, or as integer codes with one float32 scale per group of
  :data:`BASIS_GROUP` entries of each basis vector (Q-GaLore's idea): ``int8`` codes in [-127, 127],
  ``int4`` codes in [-7, 7] packed two to a byte. ``state["basis_scale"]`` holds the scales. ``seed``
  stores no basis: a basis drawn from a seed (``random``, APOLLO's ``gaussian``) is drawn again from
  ``state["seed"]`` wherever it is used, as the APOLLO paper counts its memory.

"param" is the parameter's dtype, what galore-torch and torch.optim.AdamW store (bf16 for bf16 weights; for
float16 weights float32 moments are safer: g² of a 1e-4 gradient is below float16's smallest normal).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from ..projector import gaussian_basis, random_basis

#: Entries of a basis vector that share one scale in an int8/int4 basis (Q-GaLore's proj_group_size).
BASIS_GROUP = 256
_CODE_MAX = {"int8": 127, "int4": 7}
_FLOAT_CHOICES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: ``basis_dtype`` choices stored as integer codes with scales.
QUANTIZED_BASES = tuple(_CODE_MAX)
#: The bases that are a function of a seed (``proj_method`` → its draw), which ``basis_dtype="seed"`` redraws.
SEEDED_BASES = {"random": random_basis, "gaussian": gaussian_basis}


class Layout(Protocol):
    """What loading a basis needs to know of its matrix (a :class:`~lrtrain.optim.engine.refresh.MatrixPlan`)."""

    side: str
    rank: int


def storage_dtype(choice: str, param_dtype: torch.dtype) -> torch.dtype:
    """The float dtype that ``moment_dtype`` / ``basis_dtype`` = ``choice`` stores for a parameter of
    ``param_dtype``."""
    return param_dtype if choice == "param" else _FLOAT_CHOICES[choice]


def _vectors(basis: Tensor, side: str) -> Tensor:
    """The basis vectors as rows: Q (r, n) on the right, Pᵀ (r, m) on the left."""
    return basis if side == "right" else basis.T


def _grouped(vectors: Tensor) -> tuple[Tensor, int]:
    """``vectors`` (r, L) zero-padded to (r, groups, BASIS_GROUP), and L."""
    rank, length = vectors.shape
    groups = -(-length // BASIS_GROUP)
    padded = vectors.new_zeros(rank, groups * BASIS_GROUP)
    padded[:, :length] = vectors
    return padded.view(rank, groups, BASIS_GROUP), length


def quantize_basis(basis: Tensor, side: str, kind: str) -> tuple[Tensor, Tensor]:
    """Integer codes and float32 scales (r, groups) of ``basis`` (float, parameter layout): each group of
    BASIS_GROUP entries of a basis vector is c·s with s = max|x|/cmax and c = round(x/s). ``int8`` codes are
    (r, L) int8; ``int4`` codes (r, ⌈L/2⌉) uint8, two 4-bit codes (offset by 8) per byte."""
    code_max = _CODE_MAX[kind]
    grouped, length = _grouped(_vectors(basis, side).float())
    scale = grouped.abs().amax(dim=2).div_(code_max)
    codes = torch.round(grouped / scale.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(2))
    codes = codes.clamp_(-code_max, code_max).flatten(1)[:, :length]
    if kind == "int8":
        return codes.to(torch.int8), scale
    nibbles = (codes + 8).to(torch.uint8)
    if length % 2:
        nibbles = torch.cat([nibbles, nibbles.new_full((nibbles.shape[0], 1), 8)], dim=1)
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4), scale


def dequantize_basis(codes: Tensor, scale: Tensor, side: str, length: int, dtype: torch.dtype) -> Tensor:
    """The basis (parameter layout, ``dtype``) from :func:`quantize_basis`' codes; ``length``: the size
    of one basis vector (n on the right, m on the left)."""
    if codes.dtype == torch.uint8:  # int4: unpack two codes per byte
        codes = torch.stack([(codes & 15), (codes >> 4)], dim=2).flatten(1)[:, :length].to(torch.int8) - 8
    grouped, _ = _grouped(codes.to(dtype))
    vectors = grouped.mul_(scale.to(dtype).unsqueeze(2)).flatten(1)[:, :length]
    return vectors if side == "right" else vectors.T


def has_basis(state: dict) -> bool:
    """Whether the matrix has a basis: a stored one, or a seed to draw it from (``basis_dtype="seed"``)."""
    return "basis" in state or "basis_seed_only" in state


def store_basis_(state: dict, basis: Tensor, side: str, choice: str, param_dtype: torch.dtype) -> None:
    """Keep ``basis`` (compute dtype, parameter layout) in ``state["basis"]`` as ``basis_dtype`` =
    ``choice`` says (nothing but a flag for ``"seed"``: ``state["seed"]`` draws it); a coordinate basis
    (int64 indices) is kept as it is."""
    state.pop("basis_scale", None)
    if choice == "seed":
        state.pop("basis", None)
        state["basis_seed_only"] = torch.tensor(True)
    elif not basis.is_floating_point():
        state["basis"] = basis
    elif choice in QUANTIZED_BASES:
        state["basis"], state["basis_scale"] = quantize_basis(basis, side, choice)
    else:
        state["basis"] = basis.to(storage_dtype(choice, param_dtype))


def load_basis(state: dict, group: dict, layout: Layout, p: Tensor, dtype: torch.dtype) -> Tensor:
    """The basis of matrix ``p`` (its ``layout``: side and rank) in the compute ``dtype`` and the parameter
    layout, on ``p``'s device: cast, dequantized, or drawn again from its seed; indices of a coordinate basis
    as they are."""
    side, shape = layout.side, tuple(p.shape)
    if "basis_seed_only" in state:
        draw = SEEDED_BASES[group["proj_method"]]
        return draw(int(state["seed"]), shape, layout.rank, side, dtype=dtype, device=p.device)
    basis = state["basis"]
    if "basis_scale" in state:
        return dequantize_basis(basis, state["basis_scale"], side, shape[1] if side == "right" else shape[0], dtype)
    return basis.to(dtype) if basis.is_floating_point() else basis
