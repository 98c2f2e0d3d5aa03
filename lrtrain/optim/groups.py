"""Which parameters get a subspace (``param_groups``) and what each one holds (``describe``)."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..memory import format_bytes, state_entry_bytes
from .subspace import is_projected, param_layout

#: Module names taken for the output head, which "all-linear" leaves out (as PEFT does).
HEAD_NAMES = ("lm_head", "output", "head")


def _matches(pattern: str, name: str) -> bool:
    """A target pattern matches a module name as a substring or as a full regex match."""
    if pattern in name:
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _output_head(model: nn.Module) -> nn.Module | None:
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is not None:
        return head
    return next((m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in HEAD_NAMES), None)


def select_linear_modules(model: nn.Module, target_modules: str | Iterable[str]) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules that ``target_modules`` selects, by name.

    ``target_modules`` is ``"all-linear"`` (every Linear but the output head) or patterns, each a
    substring of the module name or a regex that matches the whole name. A matched module that
    holds a matrix but is not an ``nn.Linear`` (an Embedding, say) is left out with one warning;
    matched norms and containers are left out quietly. Raises ``ValueError`` when nothing is selected.
    """
    if isinstance(target_modules, str) and target_modules.replace("_", "-") == "all-linear":
        head = _output_head(model)
        chosen = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}
    else:
        patterns = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        if not patterns:
            raise ValueError("target_modules is empty: give name patterns (e.g. ['attn', 'mlp']) or 'all-linear'")
        chosen, ignored = {}, []
        for name, module in model.named_modules():
            if not name or not any(_matches(p, name) for p in patterns):
                continue
            if isinstance(module, nn.Linear):
                chosen[name] = module
            elif any(p.dim() >= 2 for p in module.parameters(recurse=False)):
                ignored.append(f"{name} ({type(module).__name__})")
        if ignored:
            warnings.warn(
                f"target_modules matched modules that are not nn.Linear; they stay in the plain group: "
                f"{', '.join(ignored[:5])}{', ...' if len(ignored) > 5 else ''}",
                UserWarning,
                stacklevel=3,
            )
    if not chosen:
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(
            f"target_modules={target_modules!r} selects no nn.Linear module; Linear modules in this model "
            f"include {linear[:6] or 'none'}"
        )
    return chosen


def param_groups(
    model: nn.Module,
    target_modules: str | Iterable[str] = ("attn", "mlp"),
    rank: int | None = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    **more_group_keys: Any,
) -> list[dict]:
    """Param groups for the subspace optimizers (the galore-torch / HF layout).

    The 2-D weights of the ``nn.Linear`` modules that ``target_modules`` selects (see
    :func:`select_linear_modules`) form a group with ``rank``, ``update_proj_gap``, ``scale``,
    ``proj_type`` and ``more_group_keys`` (e.g. ``proj_method="random"``, or ``rank=None,
    density=0.25``); every other trainable parameter (embeddings, head, norms, biases) forms a plain
    group. Parameters are given as ``(name, tensor)`` pairs, so the optimizer knows their names.
    """
    targets = {id(m.weight): m.weight for m in select_linear_modules(model, target_modules).values()}
    projected, plain, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (projected if id(p) in targets and p.dim() == 2 else plain).append((name, p))
    keys = {"rank": rank, "update_proj_gap": update_proj_gap, "scale": scale, "proj_type": proj_type}
    groups = [{"params": plain}] if plain else []
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
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
