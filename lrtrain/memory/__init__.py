"""Memory: what tensors and optimizer state hold (:mod:`.accounting`), what a region of a run
allocates at its peak (:mod:`.tracker`), and what a LLaMA training step needs (:mod:`.estimator`,
also ``python -m lrtrain.memory``)."""

from .accounting import STATE_CATEGORIES, format_bytes, module_bytes, state_bytes, state_entry_bytes, tensor_bytes
from .estimator import ACTIVATION_BYTES, METHODS, RECIPE_RANK, estimate, main
from .tracker import PeakMemory, TensorMemoryTracker

__all__ = ["ACTIVATION_BYTES", "METHODS", "RECIPE_RANK", "STATE_CATEGORIES", "PeakMemory", "TensorMemoryTracker",
           "estimate", "format_bytes", "main", "module_bytes", "state_bytes", "state_entry_bytes", "tensor_bytes"]
