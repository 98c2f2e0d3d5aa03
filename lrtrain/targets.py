"""Which ``nn.Linear`` modules of a model a method applies to (the optimizers' subspaces, the
parameterizations' conversions): names, full-match regexes, or ``"all-linear"``."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable

from torch import nn

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


def select_linear_modules(
    model: nn.Module, target_modules: str | Iterable[str], *, non_linear: str = "warn"
) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules that ``target_modules`` selects, by name.

    ``target_modules`` is ``"all-linear"`` (every Linear but the output head) or patterns, each a
    substring of the module name or a regex that matches the whole name. A matched module that
    holds a matrix but is not an ``nn.Linear`` (an Embedding, say) is left out with one warning
    (``non_linear="warn"``) or is an error (``"error"``); matched norms and containers are left out
    quietly. Raises ``ValueError`` when nothing is selected.
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
        if ignored and non_linear == "error":
            raise ValueError(
                f"target_modules={target_modules!r} matches modules that are not nn.Linear: {', '.join(ignored[:5])}; "
                "narrow the patterns (e.g. 'self_attn.q_proj' or a regex) so that they select Linear layers only"
            )
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
