"""Memory accounting: exact bytes of parameters, gradients and optimizer state (by category),
and measured peaks.

Categories follow the state keys lrtrain's optimizers (and torch.optim's Adam family) use:
``exp_avg``/``exp_avg_sq`` (with their 8-bit block scales) and bitsandbytes' ``state1``/``state2``
are moments, ``basis`` is the projection basis (a float matrix, or the int64 indices of a
coordinate subspace), everything else (step counters, seeds, limiter norms, flags, quantization
maps) is "other". Sharded (DTensor) state counts the local shard: the bytes this rank holds.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

STATE_CATEGORIES = {"exp_avg": "moments", "exp_avg_sq": "moments", "basis": "basis",
                    "exp_avg_absmax": "moments", "exp_avg_sq_absmax": "moments",  # 8-bit block scales
                    "state1": "moments", "state2": "moments", "absmax1": "moments", "absmax2": "moments"}  # bitsandbytes


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


class TensorMemoryTracker(TorchDispatchMode):
    """Live bytes of CPU tensor storages, and their peak, measured op by op.

    Every storage that an op produces while the mode is active (and every tensor passed to
    :meth:`track`) is counted once, from its creation until the storage is freed — a weak
    reference to the ``UntypedStorage`` tells when, so activations that autograd keeps for the
    backward pass count as long as they live. Views and in-place results share their storage and
    add nothing. This measures what a CPU run holds in tensors, which process RSS cannot (the
    allocator keeps freed pages). CUDA tensors are left to the CUDA allocator's statistics.
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def track(self, *tensors: Tensor | None) -> None:
        """Count tensors that exist already (parameters, gradients, optimizer state, the batch)."""
        for tensor in tensors:
            if tensor is None or tensor.device.type != "cpu":
                continue
            if hasattr(tensor, "to_local"):
                tensor = tensor.to_local()
            storage = tensor.untyped_storage()
            key = id(storage)
            if key in self._live:
                continue
            self._live[key] = storage.nbytes()
            weakref.finalize(storage, self._release, key)
            self.current += self._live[key]
            self.peak = max(self.peak, self.current)

    def _release(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # let DTensor run its local ops, which come back here one by one
        out = func(*args, **(kwargs or {}))
        self.track(*(t for t in tree_leaves(out) if isinstance(t, Tensor)))
        return out


class PeakMemory:
    """Peak tensor memory of a region: ``with PeakMemory(device, existing) as peak: ...`` then
    ``peak.bytes``. On CUDA it reads the allocator's peak (``max_memory_allocated``); on the CPU it
    runs a :class:`TensorMemoryTracker` that starts from the ``existing`` tensors."""

    def __init__(self, device: torch.device | str, existing: Iterable[Tensor | None] = ()):
        self.device = torch.device(device)
        self.bytes = 0
        self._tracker = None if self.device.type == "cuda" else TensorMemoryTracker()
        if self._tracker is not None:
            self._tracker.track(*existing)

    def __enter__(self) -> "PeakMemory":
        if self._tracker is None:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._tracker.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._tracker is None:
            self.bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._tracker.__exit__(*exc)
            self.bytes = self._tracker.peak
