"""8-bit Adam moments: bitsandbytes' blockwise dynamic quantization, used chunk by chunk.

With ``state_bits=8`` a moment tensor of at least ``MIN_8BIT_SIZE`` elements is stored as uint8
codes (same shape) plus one float32 scale per block of ``BLOCK`` elements (``<key>_absmax``): the
first moment with bitsandbytes' signed dynamic map, the second with its unsigned one, as
bitsandbytes' 8-bit optimizers do. For an update the codes are dequantized ``CHUNK`` elements at a
time into float32, updated, and quantized back, so no full-size float32 copy of a moment ever
exists (about 4 MiB of temporaries per moment). Smaller tensors keep float32 moments.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

BLOCK = 256
MIN_8BIT_SIZE = 4096
CHUNK = BLOCK * 4096  # elements per dequantize -> update -> quantize round (a multiple of BLOCK)
MOMENTS = (("exp_avg", True), ("exp_avg_sq", False))  # (key, signed map)


@functools.lru_cache(maxsize=None)
def _dynamic_map(signed: bool, device: str) -> Tensor:
    import bitsandbytes.functional as bnbf

    return bnbf.create_dynamic_map(signed=signed).to(device)


@contextmanager
def _fenced_for_bitsandbytes(device: torch.device):
    """bitsandbytes' blockwise quantization takes no stream (0.50: ``cquantize_blockwise_*`` has no stream
    argument) and so runs on the device's default stream whatever stream is current, while DDP runs its
    communication-hook callbacks, and so layer-wise updates, on side streams. The default stream waits for
    the current one before the call, and the current one for the default stream after it."""
    if device.type != "cuda" or torch.cuda.current_stream(device) == torch.cuda.default_stream(device):
        yield
        return
    current, default = torch.cuda.current_stream(device), torch.cuda.default_stream(device)
    default.wait_stream(current)
    yield
    current.wait_stream(default)


def _quantize_into(values: Tensor, codes: Tensor, absmax: Tensor, signed: bool) -> None:
    import bitsandbytes.functional as bnbf

    with _fenced_for_bitsandbytes(values.device):
        bnbf.quantize_blockwise(values, code=_dynamic_map(signed, str(values.device)), absmax=absmax, out=codes,
                                blocksize=BLOCK)


def _dequantize(codes: Tensor, absmax: Tensor, signed: bool) -> Tensor:
    import bitsandbytes.functional as bnbf

    with _fenced_for_bitsandbytes(codes.device):
        return bnbf.dequantize_blockwise(codes, absmax=absmax, code=_dynamic_map(signed, str(codes.device)),
                                         blocksize=BLOCK)


def init_8bit_moments(state: dict, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    """Zero moments of ``shape``: 8-bit codes and block scales, or ``dtype`` tensors below MIN_8BIT_SIZE."""
    numel = math.prod(shape)
    if numel < MIN_8BIT_SIZE:
        state["exp_avg"] = torch.zeros(shape, dtype=dtype, device=device)
        state["exp_avg_sq"] = torch.zeros(shape, dtype=dtype, device=device)
        return
    for key, _ in MOMENTS:
        state[key] = torch.empty(shape, dtype=torch.uint8, device=device)
        state[f"{key}_absmax"] = torch.empty(-(-numel // BLOCK), dtype=torch.float32, device=device)
    zero_moments_(state)


def zero_moments_(state: dict) -> None:
    """Set both moments to zero, in whichever storage they have (8-bit ones a chunk at a time)."""
    if "exp_avg_absmax" not in state:
        state["exp_avg"].zero_()
        state["exp_avg_sq"].zero_()
        return
    codes = state["exp_avg"].view(-1)
    zeros = torch.zeros(min(CHUNK, codes.numel()), dtype=torch.float32, device=codes.device)
    for elements, blocks in _chunks(codes.numel()):
        for key, signed in MOMENTS:
            _quantize_into(zeros[: elements.stop - elements.start], state[key].view(-1)[elements],
                           state[f"{key}_absmax"][blocks], signed)


def _chunks(numel: int) -> Iterator[tuple[slice, slice]]:
    """``(elements, blocks)``: the slices of the flattened codes and of the block scales, CHUNK by CHUNK."""
    for start in range(0, numel, CHUNK):
        stop = min(start + CHUNK, numel)
        yield slice(start, stop), slice(start // BLOCK, -(-stop // BLOCK))


def moment_chunks(state: dict) -> Iterator[tuple[Tensor, Tensor, slice | None]]:
    """For an elementwise update: yields ``(exp_avg, exp_avg_sq, elements)`` chunk by chunk, as
    float tensors over ``elements`` of the flattened moments, and quantizes each chunk back when the
    loop moves on. Float32 storage is one chunk: the stored tensors, with ``elements`` None."""
    if "exp_avg_absmax" not in state:
        yield state["exp_avg"], state["exp_avg_sq"], None
        return
    codes = {key: state[key].view(-1) for key, _ in MOMENTS}
    numel = codes["exp_avg"].numel()
    for elements, blocks in _chunks(numel):
        m, v = (_dequantize(codes[key][elements], state[f"{key}_absmax"][blocks], signed) for key, signed in MOMENTS)
        yield m, v, elements
        for (key, signed), values in zip(MOMENTS, (m, v)):
            _quantize_into(values, codes[key][elements], state[f"{key}_absmax"][blocks], signed)


@contextmanager
def float_moments(state: dict, view: Callable[[Tensor], Tensor], dtype: torch.dtype) -> Iterator[tuple[Tensor, Tensor]]:
    """Both moments whole, as ``dtype`` tensors (seen through ``view``), for updates that need their
    shape (the low-rank moments of a subspace, which are small); 8-bit ones, and float ones stored in
    another dtype (bf16 moments of bf16 weights), are written back on exit."""
    if "exp_avg_absmax" not in state:
        stored = view(state["exp_avg"]), view(state["exp_avg_sq"])
        if stored[0].dtype == dtype:
            yield stored
            return
        working = tuple(moment.to(dtype) for moment in stored)
        yield working
        for moment, values in zip(stored, working):
            moment.copy_(values)
        return
    m, v = (_dequantize(state[key], state[f"{key}_absmax"], signed) for key, signed in MOMENTS)
    yield view(m), view(v)
    for (key, signed), values in zip(MOMENTS, (m, v)):
        _quantize_into(values, state[key], state[f"{key}_absmax"], signed)
