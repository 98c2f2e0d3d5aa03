"""Measured peaks: live CPU tensor storages op by op (:class:`TensorMemoryTracker`), or CUDA's
allocator peak (:class:`PeakMemory`)."""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


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
