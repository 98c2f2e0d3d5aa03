"""Runs under ``torchrun``: the process group, and DDP or FSDP2 around the model."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard


def init_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world_size, device) of this process. Under torchrun (``WORLD_SIZE`` > 1) it joins the
    process group (NCCL on CUDA, gloo on the CPU) and, on CUDA, takes the GPU ``LOCAL_RANK``."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def wrap_ddp(model: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """DDP when there is more than one process: every rank gets the averaged gradients, so the
    subspace optimizers (deterministic SVD, seeded random bases) stay identical on every rank."""
    if world_size == 1:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def mean_across_ranks(value: float, world_size: int, device: torch.device) -> float:
    if world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.item() / world_size


def dtype_of(name: str | None) -> torch.dtype | None:
    return {None: None, "bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[name]


def local_projection_placements(model: nn.Module, optimizer_spec: dict, world_size: int) -> dict[int, Shard]:
    """``Shard(1)`` for each matrix a subspace optimizer projects on the left (when its columns
    split evenly, as FSDP2 requires for dim 1): its basis then spans the columns every rank holds
    whole, so the projection is local, as it is for right projections of dim-0 splits."""
    from ..optim.projector import projection_side
    from ..targets import select_linear_modules

    if optimizer_spec["name"] in ("adamw", "adamw8bit") or optimizer_spec.get("proj_method") == "blocks":
        return {}
    placements = {}
    for module in select_linear_modules(model, optimizer_spec.get("target_modules", ("attn", "mlp"))).values():
        shape = tuple(module.weight.shape)
        if projection_side(shape, optimizer_spec.get("proj_type", "std")) == "left" and shape[1] % world_size == 0:
            placements[id(module.weight)] = Shard(1)
    return placements


def apply_fsdp2(model: nn.Module, world_size: int, device: torch.device, *, placements: dict[int, Shard],
                param_dtype: str | None = None, reduce_dtype: str | None = None,
                reshard_after_forward: bool = True) -> nn.Module:
    """``fully_shard`` every decoder layer (the modules of a ``layers`` ModuleList), then the root,
    on a 1-D mesh over all processes; ``placements`` maps parameter ids to non-default splits."""
    mesh = init_device_mesh(device.type, (world_size,))
    options = {
        "mesh": mesh,
        "mp_policy": MixedPrecisionPolicy(param_dtype=dtype_of(param_dtype), reduce_dtype=dtype_of(reduce_dtype)),
        "reshard_after_forward": reshard_after_forward,
        "shard_placement_fn": lambda param: placements.get(id(param)),
    }
    layers = [m for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and name.endswith("layers")]
    for layer in (block for blocks in layers for block in blocks):
        fully_shard(layer, **options)
    fully_shard(model, **options)
    return model
