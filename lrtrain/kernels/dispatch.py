"""When ``fused=None`` runs lrtrain's Triton kernels instead of the torch path: only where a benchmark on that
GPU architecture measured them faster (:data:`KERNELS_WIN`), and only once a probe launch has worked on the
device (:func:`kernels_work`). Importable without Triton."""

from __future__ import annotations

import functools
import warnings

import torch

#: (compute capability, weight dtype) → the ranks (lowest, highest) at which ``scripts/gpu_check.py``
#: measured the fused step faster than the torch path on every LLaMA shape it times. Empty: no GPU has been
#: lent to this project yet, so ``fused=None`` keeps the torch path on every GPU and ``fused=True`` forces
#: the kernels. A row comes from a gpu_check run (its table prints the row to add).
KERNELS_WIN: dict[tuple[tuple[int, int], torch.dtype], tuple[int, int]] = {}


def kernels_win(device: torch.device, dtype: torch.dtype, rank: int) -> bool:
    """Whether :data:`KERNELS_WIN` has the fused step faster for ``dtype`` weights at ``rank`` on ``device``."""
    if device.type != "cuda":
        return False
    ranks = KERNELS_WIN.get((torch.cuda.get_device_capability(device), dtype))
    return ranks is not None and ranks[0] <= rank <= ranks[1]


@functools.cache
def kernels_work(device: torch.device) -> bool:
    """Whether the kernels compile and run correctly on ``device``: one small projection against torch's,
    once per device. On failure (no compiler, an unsupported GPU, a wrong result) it warns once and the
    caller keeps the torch path."""
    try:
        from .subspace_adam import project_adam

        generator = torch.Generator().manual_seed(0)
        grad = torch.randn(32, 48, generator=generator).to(device)
        basis = torch.linalg.qr(torch.randn(48, 16, generator=generator, dtype=torch.float64))[0].T.float().to(device)
        exp_avg, exp_avg_sq = torch.zeros(32, 16, device=device), torch.zeros(32, 16, device=device)
        _, low = project_adam(grad, basis, "right", exp_avg, exp_avg_sq, beta1=0.9, beta2=0.999, eps=1e-8,
                              return_low=True, precision="ieee")
        if not torch.allclose(low, grad @ basis.T, rtol=1e-4, atol=1e-4):
            raise RuntimeError("the probe projection differs from torch's")
    except Exception as error:  # any failure means: do not use the kernels here
        warnings.warn(f"lrtrain's Triton kernels do not run on {device} ({type(error).__name__}: {error}); "
                      "fused=None keeps the torch path there", RuntimeWarning, stacklevel=2)
        return False
    return True
