"""FRUGAL's block mode (``proj_method="blocks"``): which whole tensors of a group get Adam state for
the next ``update_proj_gap`` steps; the others take the state-free rule."""

from __future__ import annotations

import torch

from ..projector import initial_seed
from .adam import init_adamw_state
from .storage import storage_dtype


def active_block_count(group: dict) -> int:
    """How many of the group's tensors are active at a time: ``density`` of them, rounded."""
    return round(len(group["params"]) * group["density"])


def select_blocks(group: dict, states: list[dict], first_index: int) -> None:
    """Deactivate every tensor of the group (``states``: theirs, in order), then activate the next
    ``density`` fraction in ``block_order`` (its cursor kept in ``group["block_cursor"]``); the active
    ones get fresh AdamW moments. ``first_index``: the group's first position in the optimizer (seeds)."""
    params, count = group["params"], active_block_count(group)
    order, cursor, n = group["block_order"], group.get("block_cursor"), len(params)
    if order == "random":
        cursor = cursor or 0
        generator = torch.Generator().manual_seed(initial_seed(initial_seed(group["seed"], first_index), cursor))
        chosen = torch.randperm(n, generator=generator)[:count].tolist()
        cursor += 1
    elif order == "ascending":
        start = cursor or 0
        chosen = [(start + j) % n for j in range(count)]
        cursor = (start + count) % n
    elif order == "descending":
        start = n - 1 if cursor is None else cursor
        chosen = [(start - j) % n for j in range(count)]
        cursor = (start - count) % n
    else:  # mirror: pairs (i, n-1-i) walking in from both ends
        half, start = n // 2, cursor or 0
        chosen = [k for j in range(count // 2) for k in ((start + j) % half, n - 1 - (start + j) % half)]
        cursor = (start + count // 2) % half
    group["block_cursor"] = cursor
    for state in states:
        state.clear()
        state["step"] = torch.tensor(0.0)
        state["active"] = torch.tensor(False)
    for k in chosen:
        state = states[k]
        init_adamw_state(state, params[k], group["state_bits"], storage_dtype(group["moment_dtype"], params[k].dtype))
        state["active"] = torch.tensor(True)
