"""Triton kernels (``subspace_adam``): imported only when Triton is installed."""
