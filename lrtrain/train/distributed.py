"""Process groups for runs under ``torchrun``: which rank this is, and DDP around the model."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


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
