"""How a 2-D parameter is split over ranks, seen so that its rows are split.

FSDP2 shards a parameter on dim 0 (or, with ``shard_placement_fn``, on dim 1) of a 1-D device
mesh. The subspace optimizers work on a *view* in which rows are split: the local shard itself for
``Shard(0)``, its transpose for ``Shard(1)``. In that view a projection on the right (basis over
the columns, which every rank holds whole) is local to each rank, and a projection on the left
(basis over the rows) needs one all-reduce of the (r, n) projected gradient. A plain tensor is the
trivial case: one shard, no process group, nothing communicated.

Optimizer state keeps the parameter's layout: state that is sharded like the parameter is a DTensor
with the parameter's placements (so torch.distributed.checkpoint saves every shard and can
reshard), state that every rank holds whole (bases, low-rank moments of left projections) is a
plain tensor, identical on every rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard

from .comm import COMM, all_ranks_agree, all_reduce_, broadcast_


def local(tensor: Tensor) -> Tensor:
    """The local shard of a DTensor (sharing its storage), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _chunk_sizes(size: int, parts: int) -> list[int]:
    """Shard sizes of torch.chunk over ``parts`` (DTensor's and FSDP2's rule): ceil-sized, the rest short."""
    step = math.ceil(size / parts)
    return [max(0, min(step, size - i * step)) for i in range(parts)]


@dataclass(frozen=True)
class MatrixShards:
    """A 2-D parameter's split, as a row-split view (the transpose for a dim-1 split)."""

    transposed: bool
    rows: slice  # the view's rows on this rank
    shape: tuple[int, int]  # the view's global shape
    group: object = None  # the process group, or None (nothing to communicate)
    param: Tensor | None = None  # the DTensor parameter (mesh and placements for new state)

    @property
    def distributed(self) -> bool:
        return self.group is not None

    def view_side(self, side: str) -> str:
        """The parameter's projection side, seen in the view (a transpose swaps left and right)."""
        return {"left": "right", "right": "left"}[side] if self.transposed else side

    def view(self, tensor: Tensor) -> Tensor:
        """The local part of a tensor in the parameter's layout, seen in the view."""
        t = local(tensor)
        return t.T if self.transposed else t

    def basis_view(self, basis: Tensor, view_side: str, dtype: torch.dtype) -> Tensor:
        """A basis (parameter layout, whole on every rank) in the view; for a left projection of a
        split matrix, only this rank's rows (a coordinate basis becomes their one-hot columns)."""
        if not basis.is_floating_point():
            if view_side == "right" or not self.distributed:
                return basis
            from ..optim.projector import dense_basis  # imported here: lrtrain.optim imports this module

            return dense_basis(basis, "left", self.shape).to(dtype)[self.rows]
        b = basis.T if self.transposed else basis
        return b[self.rows] if view_side == "left" and self.distributed else b

    def full(self, tensor: Tensor) -> Tensor:
        """The whole tensor in the parameter's layout (an all-gather for a DTensor)."""
        if isinstance(tensor, DTensor):
            gathered = tensor.full_tensor()
            COMM.add("all_gather", gathered)
            return gathered
        return tensor

    def all_reduce_(self, tensor: Tensor) -> Tensor:
        return all_reduce_(tensor, self.group)

    def broadcast_(self, tensor: Tensor) -> Tensor:
        return broadcast_(tensor, self.group)

    def agree(self, flag: bool, device: torch.device) -> bool:
        return all_ranks_agree(flag, self.group, device) if self.distributed else flag

    def zeros(self, shape: tuple[int, int], *, split: bool, dtype: torch.dtype, device: torch.device) -> Tensor:
        """New state of ``shape`` (parameter layout): split like the parameter (a DTensor) or whole."""
        if not (split and self.distributed):
            return torch.zeros(shape, dtype=dtype, device=device)
        dim = 1 if self.transposed else 0
        local_shape = list(shape)
        local_shape[dim] = self.rows.stop - self.rows.start
        return DTensor.from_local(
            torch.zeros(local_shape, dtype=dtype, device=device), self.param.device_mesh, self.param.placements,
            run_check=False, shape=torch.Size(shape), stride=torch.empty(shape, device="meta").stride(),
        )


def matrix_shards(param: Tensor) -> MatrixShards:
    """The split of a 2-D parameter: plain tensors and replicated DTensors are not split; a DTensor
    on a 1-D mesh may be split on dim 0 or dim 1."""
    m, n = param.shape
    if not isinstance(param, DTensor):
        return MatrixShards(False, slice(0, m), (m, n))
    mesh, placements = param.device_mesh, param.placements
    if mesh.ndim != 1:
        raise ValueError(
            f"a parameter on a {mesh.ndim}-D device mesh ({placements}); lrtrain's subspace optimizers support "
            "1-D meshes (FSDP2 with fully_shard(mesh=1-D mesh), or DDP)"
        )
    placement = placements[0]
    if isinstance(placement, Replicate):
        return MatrixShards(False, slice(0, m), (m, n))
    if not isinstance(placement, Shard) or placement.dim not in (0, 1):
        raise ValueError(f"unsupported placement {placement} for a 2-D parameter; "
                         "use Shard(0), Shard(1) or Replicate()")
    transposed = placement.dim == 1
    shape = (n, m) if transposed else (m, n)
    sizes = _chunk_sizes(shape[0], mesh.size())
    start = sum(sizes[: mesh.get_local_rank()])
    rows = slice(start, start + sizes[mesh.get_local_rank()])
    shards = MatrixShards(transposed, rows, shape, mesh.get_group(), param)
    if shards.view(param).shape != (shards.rows.stop - shards.rows.start, shape[1]):
        raise AssertionError(f"unexpected local shard {tuple(local(param).shape)} of {tuple(param.shape)} {placement}")
    return shards
