"""The collectives lrtrain's optimizers issue, counted: ``COMM`` says how many bytes each kind of
collective moved on this rank, so benchmarks and tests can report the optimizer's communication.

Counted bytes are the payload of the call (an all-reduce of an (r, n) float32 tensor counts 4·r·n,
an all-gather counts the gathered result); what the backend sends on the wire for it depends on the
algorithm (a ring all-reduce sends about twice the payload).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class CommStats:
    bytes: Counter = field(default_factory=Counter)
    calls: Counter = field(default_factory=Counter)

    def add(self, kind: str, tensor: Tensor) -> None:
        self.bytes[kind] += tensor.numel() * tensor.element_size()
        self.calls[kind] += 1

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()

    def total(self) -> int:
        return sum(self.bytes.values())


#: What this process's lrtrain optimizers have communicated since the last ``reset()``.
COMM = CommStats()


def all_reduce_(tensor: Tensor, group, op=dist.ReduceOp.SUM) -> Tensor:
    """In-place all-reduce over ``group`` (a no-op without one)."""
    if group is not None:
        COMM.add("all_reduce", tensor)
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def broadcast_(tensor: Tensor, group, src_rank: int = 0) -> Tensor:
    """In-place broadcast from the group's ``src_rank`` (a no-op without a group)."""
    if group is not None:
        COMM.add("broadcast", tensor)
        dist.broadcast(tensor, src=dist.get_global_rank(group, src_rank), group=group)
    return tensor


def all_ranks_agree(flag: bool, group, device: torch.device) -> bool:
    """True only if ``flag`` is true on every rank (one all-reduce of a single integer)."""
    value = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    return bool(all_reduce_(value, group, op=dist.ReduceOp.MIN).item())
