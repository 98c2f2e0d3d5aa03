"""Memory accounting: exact bytes of parameters, gradients and optimizer state (by category),
and measured peaks.

Categories follow the state keys lrtrain's optimizers (and torch.optim's Adam family) use:
``exp_avg``/``exp_avg_sq`` (with their 8-bit block scales) and bitsandbytes' ``state1``/``state2``
are moments, ``basis`` is the projection basis (a float matrix, int8/int4 codes with their scales, or the
int64 indices of a coordinate subspace), everything else (step counters, seeds, limiter norms, flags, quantization
maps) is "other". Sharded (DTensor) state counts the local shard: the bytes this rank holds.
"""

from __future__ import annotations

import torch
from torch import Tensor

STATE_CATEGORIES = {"exp_avg": "moments", "exp_avg_sq": "moments", "basis": "basis", "basis_scale": "basis",
                    "exp_avg_absmax": "moments", "exp_avg_sq_absmax": "moments",  # 8-bit block scales
                    "exp_avg_sq_row": "moments", "exp_avg_sq_col": "moments",  # Adafactor's factored V
                    # bitsandbytes
                    "state1": "moments", "state2": "moments", "absmax1": "moments", "absmax2": "moments"}


def tensor_bytes(tensor: Tensor) -> int:
    """Bytes of a tensor's elements (of the local shard for a DTensor)."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def state_entry_bytes(state: dict) -> dict[str, int]:
    """Bytes of one parameter's optimizer state, by category."""
    out = {"moments": 0, "basis": 0, "other": 0}
    for key, value in state.items():
        if isinstance(value, Tensor):
            out[STATE_CATEGORIES.get(key, "other")] += tensor_bytes(value)
    return out


def state_bytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of an optimizer's state by category: ``moments``, ``basis``, ``other`` and ``total``."""
    out = {"moments": 0, "basis": 0, "other": 0}
    for state in optimizer.state.values():
        for key, value in state_entry_bytes(state).items():
            out[key] += value
    out["total"] = sum(out.values())
    return out


def format_bytes(num: int) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(num) < 1024 or unit == "GiB":
            return f"{num:.0f} {unit}" if unit == "B" else f"{num:.1f} {unit}"
        num /= 1024
    raise AssertionError("unreachable")


def module_bytes(module: torch.nn.Module) -> dict[str, int]:
    """Bytes of a module's parameters, buffers (e.g. SST's frozen singular vectors) and gradients
    (those that exist now)."""
    params = {id(p): p for p in module.parameters()}.values()
    return {
        "params": sum(tensor_bytes(p) for p in params),
        "buffers": sum(tensor_bytes(b) for b in module.buffers()),
        "grads": sum(tensor_bytes(p.grad) for p in params if p.grad is not None),
    }
