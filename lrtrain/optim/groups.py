"""Which parameters get a subspace (``param_groups``) and what each one holds (``describe``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..memory import format_bytes, state_entry_bytes
from ..targets import select_linear_modules
from ..text import format_table
from .subspace import is_projected, param_layout


def param_groups(
    model: nn.Module,
    target_modules: str | Iterable[str] = ("attn", "mlp"),
    rank: int | None = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    no_decay: Iterable[str] = (),
    **more_group_keys: Any,
) -> list[dict]:
    """Param groups for the subspace optimizers (the galore-torch / HF layout).

    The 2-D weights of the ``nn.Linear`` modules that ``target_modules`` selects (see
    :func:`lrtrain.targets.select_linear_modules`) form a group with ``rank``, ``update_proj_gap``, ``scale``,
    ``proj_type`` and ``more_group_keys`` (e.g. ``proj_method="random"``, or ``rank=None,
    density=0.25``); every other trainable parameter (embeddings, head, norms, biases) forms a plain
    group. ``no_decay``: name substrings of plain parameters that train without weight decay, in a
    group of their own with ``weight_decay=0.0`` (HF's convention: ``no_decay=("bias", "norm")``).
    Parameters are given as ``(name, tensor)`` pairs, so the optimizer knows their names.
    """
    no_decay = (no_decay,) if isinstance(no_decay, str) else tuple(no_decay)
    targets = {id(m.weight): m.weight for m in select_linear_modules(model, target_modules).values()}
    projected, plain, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (projected if id(p) in targets and p.dim() == 2 else plain).append((name, p))
    keys = {"rank": rank, "update_proj_gap": update_proj_gap, "scale": scale, "proj_type": proj_type}
    undecayed = [(name, p) for name, p in plain if any(part in name for part in no_decay)]
    plain = [(name, p) for name, p in plain if not any(part in name for part in no_decay)]
    groups = [{"params": plain}] if plain else []
    if undecayed:
        groups.append({"params": undecayed, "weight_decay": 0.0})
    groups.append({"params": projected, **keys, **more_group_keys})
    return groups


def describe(optimizer: torch.optim.Optimizer) -> str:
    """A table of every parameter: name, shape, how it is optimized (side, rank, method) and the
    bytes of its optimizer state."""
    rows = [("parameter", "shape", "update", "side", "rank", "state")]
    total = 0
    for g, group in enumerate(optimizer.param_groups):
        names = group.get("param_names") or [f"group{g}.{i}" for i in range(len(group["params"]))]
        for name, p in zip(names, group["params"]):
            state = optimizer.state.get(p, {})
            nbytes = sum(state_entry_bytes(state).values())
            total += nbytes
            side = rank = "-"
            if not is_projected(group):
                update = "adamw"
            elif group["proj_method"] == "blocks":
                update = "blocks: " + ("adam" if bool(state.get("active", False)) else "state-free")
            else:
                update = f"{group['proj_method']} + {group['residual']}"
                side, rank = param_layout(tuple(p.shape), group)
            rows.append((name, "x".join(map(str, p.shape)), update, side, str(rank), format_bytes(nbytes)))
    rows.append(("total", "", "", "", "", format_bytes(total)))
    return format_table(rows)
