"""Swap a model's ``nn.Linear`` layers for cheap parameterizations and back."""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from typing import Any

from torch import nn

from ..targets import select_linear_modules
from ..text import format_table
from .sltrain import SLTrainLinear
from .sst import SSTLinear

LAYERS: dict[str, type[nn.Module]] = {"sltrain": SLTrainLinear, "sst": SSTLinear}


def _layer_seed(seed: int, name: str) -> int:
    """A per-layer seed from the run's seed and the module's name (stable across runs and ranks)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def convert(
    model: nn.Module, kind: str, target_modules: str | Iterable[str] = ("attn", "mlp"), rank: int = 128,
    *, seed: int = 0, **layer_options: Any,
) -> nn.Module:
    """Replace the ``nn.Linear`` modules that ``target_modules`` selects (names, full-match regexes
    or ``"all-linear"``) by :class:`SLTrainLinear` (``kind="sltrain"``; ``sparsity``, ``alpha``) or
    :class:`SSTLinear` (``"sst"``), in place; returns ``model``. ``conversion_summary(model)``
    reports what was replaced.

    SST starts from each layer's weights (an exact SVD), so converting a trained model keeps its
    function; SLTrain, like its reference, starts from its own initialisation (B = 0 and a random
    sparse S). A selected module that holds a matrix but is not an ``nn.Linear`` is an error.
    """
    if kind not in LAYERS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, LAYERS))}; got {kind!r}")
    for name, linear in select_linear_modules(model, target_modules, non_linear="error").items():
        layer = LAYERS[kind].from_linear(linear, rank=rank, seed=_layer_seed(seed, name), **layer_options)
        _replace(model, name, layer)
    return model


def to_dense(model: nn.Module) -> nn.Module:
    """Replace every SLTrain/SST layer by the ``nn.Linear`` that computes the same function, in
    place; returns ``model`` (a plain model again, e.g. for export or fine-tuning)."""
    converted = [(name, m) for name, m in model.named_modules() if isinstance(m, tuple(LAYERS.values()))]
    for name, module in converted:
        if not name:
            raise ValueError("to_dense needs a model that contains the layers, not a layer itself: "
                             "call layer.to_linear()")
        _replace(model, name, module.to_linear())
    return model


def conversion_summary(model: nn.Module) -> str:
    """A table of the converted layers: shape, rank, trainable and stored numbers against dense."""
    rows = [("module", "layer", "out x in", "rank", "trainable", "stored", "dense")]
    totals = [0, 0, 0]
    for name, module in model.named_modules():
        if not isinstance(module, tuple(LAYERS.values())):
            continue
        trainable = sum(p.numel() for p in module.parameters())
        stored = trainable + sum(b.numel() for b in module.buffers())
        dense = module.in_features * module.out_features + (module.bias.numel() if module.bias is not None else 0)
        totals = [totals[0] + trainable, totals[1] + stored, totals[2] + dense]
        rows.append((name, type(module).__name__, f"{module.out_features}x{module.in_features}", str(module.rank),
                     f"{trainable:,}", f"{stored:,}", f"{dense:,}"))
    if len(rows) == 1:
        return "no SLTrain or SST layers"
    rows.append(("total", "", "", "", *(f"{t:,}" for t in totals)))
    return format_table(rows)
