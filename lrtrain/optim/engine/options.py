"""The engine's options: their names, defaults and choices, and every check of a group's settings
(what each option accepts, which combinations are valid, near-certain typos of its keys)."""

from __future__ import annotations

import functools
from typing import Any

from ..projector import PROJ_METHODS, PROJ_TYPES
from .rules import RESIDUAL_RULES

ADAM_STYLES = ("hf", "torch")


SCALE_TYPES = ("channel", "tensor")


INNER = ("adam", "adafactor")


REFRESH_MOMENTS = ("keep", "reset", "project")


BLOCK_ORDERS = ("random", "ascending", "descending", "mirror")


ON_NONFINITE = ("skip", "raise")


BASIS_SIGNS = ("lapack", "canonical")


GROUP_METHODS = (*PROJ_METHODS, "blocks")


#: Options every group carries (constructor keywords become the defaults of every group).
ENGINE_OPTIONS: dict[str, Any] = {
    "update_proj_gap": 200,
    "scale": 0.25,
    "proj_type": "std",
    "proj_method": "svd",
    "refresh_moments": "keep",
    "residual": "none",
    "state_free_lr_scale": 1.0,
    "limiter_gamma": 1.01,
    "adam_style": "hf",
    "block_order": "random",
    "seed": 0,
    "on_nonfinite": "skip",
    "oversample": 8,
    "power_iters": 2,
    "basis_signs": "lapack",
    "state_bits": 32,
    "fused": None,
    "stagger_refresh": False,
    "scale_type": "channel",
    "inner": "adam",
    "clip_threshold": 1.0,
    "decay_rate": -0.8,
    "relative_step": False,
    "scale_parameter": False,
    "warmup_init": False,
    "eps_scale": 1e-3,
    "maximize": False,
}


#: torch.optim.AdamW's arguments that lrtrain does not implement: accepted at their defaults only.
TORCH_ADAMW_DEFAULTS = {"amsgrad": False, "foreach": None, "capturable": False, "differentiable": False,
                        "decoupled_weight_decay": True}


#: Keys whose presence makes a group a subspace group (never defaults).
MARKER_KEYS = ("rank", "density")


#: Names from the reference packages, accepted and renamed.
ALIASES = {"alpha": "scale", "state_free": "residual"}


def is_projected(group: dict) -> bool:
    """A group is a subspace group when it has ``rank`` (galore-torch's marker) or ``density``."""
    return any(group.get(key) is not None for key in MARKER_KEYS)


def _check_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{key} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def validate_options(group: dict) -> None:
    """Check the hyperparameters and options of a group (or of the defaults); raise naming the key."""
    lr = float(group["lr"])
    if not lr >= 0.0:
        raise ValueError(f"lr must be >= 0; got {group['lr']}")
    betas = group["betas"]
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2); got {betas!r}")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1); got {beta}")
    if not isinstance(group["maximize"], bool):
        raise ValueError(f"maximize must be True or False; got {group['maximize']!r}")
    for key in ("eps", "weight_decay", "scale", "state_free_lr_scale"):
        if not group[key] >= 0.0:
            raise ValueError(f"{key} must be >= 0; got {group[key]}")
    gap = group["update_proj_gap"]
    if isinstance(gap, bool) or not isinstance(gap, int) or gap < 1:
        raise ValueError(f"update_proj_gap must be an integer >= 1; got {gap!r}")
    gamma = group["limiter_gamma"]
    if gamma is not None and not gamma >= 1.0:
        raise ValueError(f"limiter_gamma must be >= 1 (Fira uses 1.01) or None to turn the limiter off; got {gamma}")
    for key in ("seed", "oversample", "power_iters"):
        value = group[key]
        if isinstance(value, bool) or not isinstance(value, int) or (key != "seed" and value < 0):
            raise ValueError(f"{key} must be an integer{'' if key == 'seed' else ' >= 0'}; got {value!r}")
    _check_choice("adam_style", group["adam_style"], ADAM_STYLES)
    _check_choice("proj_type", group["proj_type"], PROJ_TYPES)
    _check_choice("proj_method", group["proj_method"], GROUP_METHODS)
    _check_choice("refresh_moments", group["refresh_moments"], REFRESH_MOMENTS)
    _check_choice("residual", group["residual"], tuple(RESIDUAL_RULES))
    _check_choice("block_order", group["block_order"], BLOCK_ORDERS)
    _check_choice("on_nonfinite", group["on_nonfinite"], ON_NONFINITE)
    _check_choice("basis_signs", group["basis_signs"], BASIS_SIGNS)
    _check_choice("scale_type", group["scale_type"], SCALE_TYPES)
    _check_choice("inner", group["inner"], INNER)
    if group["inner"] == "adafactor":
        _check_adafactor(group)
    if group["proj_method"] == "gaussian" and RESIDUAL_RULES[group["residual"]].orthonormal:
        raise ValueError(f"residual={group['residual']!r} needs an orthonormal basis; proj_method='gaussian' "
                         "(APOLLO's) is not one: use svd, randomized or random")
    _check_choice("state_bits", group["state_bits"], (32, 8))
    _check_choice("fused", group["fused"], (None, True, False))
    if group["fused"]:
        _check_fused(group)
    if group["state_bits"] == 8:
        try:
            import bitsandbytes.functional  # noqa: F401
        except ImportError as err:
            raise ValueError("state_bits=8 stores moments with bitsandbytes: pip install bitsandbytes "
                             "(or lrtrain[bnb])") from err


def _check_adafactor(group: dict) -> None:
    """inner="adafactor": GaLore's Adafactor; what it does not combine with is refused by name."""
    if not group["clip_threshold"] > 0.0 or not group["eps_scale"] >= 0.0:
        raise ValueError(f"clip_threshold must be > 0 and eps_scale >= 0; got {group['clip_threshold']}, "
                         f"{group['eps_scale']}")
    if group["warmup_init"] and not group["relative_step"]:
        raise ValueError("warmup_init=True requires relative_step=True")
    clashes = {"state_bits": (group["state_bits"], 32), "refresh_moments": (group["refresh_moments"], "keep"),
               "residual": (group["residual"], "none"), "fused": (bool(group["fused"]), False)}
    for key, (value, allowed) in clashes.items():
        if value != allowed:
            raise ValueError(f"inner='adafactor' (GaLoreAdafactor) runs with {key}={allowed!r}; got {value!r}")
    if group["proj_method"] == "blocks":
        raise ValueError("inner='adafactor' needs a subspace: proj_method='blocks' is FRUGAL's Adam mode")


def _check_fused(group: dict) -> None:
    """fused=True: Triton must be importable, and the group's step must be one the kernels cover."""
    if not kernels_available():
        raise ValueError("fused=True runs lrtrain's Triton kernels: pip install triton (or lrtrain[kernels]), "
                         "or leave fused=None (kernels where they apply) or False")
    if not kernels_cover(group):
        raise ValueError(f"fused=True covers 32-bit moments, float bases and the GaLore, Fira and FRUGAL rules; this "
                         f"group has state_bits={group['state_bits']}, proj_method={group['proj_method']!r}, "
                         f"residual={group['residual']!r}, inner={group['inner']!r}: use fused=None or False")


def kernels_cover(group: dict) -> bool:
    """Whether lrtrain.kernels implement this group's step: Adam with 32-bit moments on a float
    basis, under the GaLore, Fira or FRUGAL rule."""
    return (group["state_bits"] == 32 and group["proj_method"] not in ("coordinates", "blocks")
            and RESIDUAL_RULES[group["residual"]].kernel is not None and group["inner"] == "adam")


@functools.cache
def kernels_available() -> bool:
    """Whether Triton (and so lrtrain.kernels) can be imported."""
    try:
        import lrtrain.kernels.subspace_adam  # noqa: F401
    except ImportError:
        return False
    return True


def validate_marker(group: dict) -> None:
    rank, density = group.get("rank"), group.get("density")
    blocks = group["proj_method"] == "blocks"
    if rank is not None and density is not None:
        raise ValueError("a param group takes 'rank' or 'density', not both")
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be an integer >= 1; got {rank!r}")
        if blocks:
            raise ValueError(
                "proj_method='blocks' chooses a fraction of whole tensors: give 'density' (e.g. 0.25), not 'rank'"
            )
    if density is not None:
        low_ok = density >= 0.0 if blocks else density > 0.0
        if not (low_ok and density <= 1.0):
            interval = "[0, 1]" if blocks else "(0, 1]"
            raise ValueError(f"density must be in {interval}; got {density}")
    if blocks and group["residual"] == "fira":
        raise ValueError("residual='fira' needs a subspace; with proj_method='blocks' use 'sign_sgd', 'sgd' or 'none'")


def is_near_certain_typo(key: str, known: str) -> bool:
    """``key`` is one edit away from ``known``: a swapped pair, a wrong or a missing character
    (``rnak``, ``scael``, ``rnk``), or, for keys of 8 characters or more, one character too many
    (``update_proj_gaps``). A short key with one more character (``ranks``, ``scales``) and longer
    variants (``lr_scale``, ``weight_decay_scale``) are other code's keys (schedulers, trainers,
    layer-wise lr decay), kept as torch keeps them."""
    if key == known or len(known) < 4:
        return False
    if len(key) == len(known):
        diff = [i for i, (a, b) in enumerate(zip(key, known)) if a != b]
        swapped = len(diff) == 2 and diff[1] == diff[0] + 1 and key[diff[0]] == known[diff[1]] \
            and key[diff[1]] == known[diff[0]]
        return len(diff) == 1 or swapped
    shorter, longer = sorted((key, known), key=len)
    if len(longer) - len(shorter) != 1 or (len(key) > len(known) and len(known) < 8):
        return False
    return any(longer[:i] + longer[i + 1:] == shorter for i in range(len(longer)))


def check_misspelled(group: dict, known: set[str]) -> None:
    """Refuse a group key that is a near-certain typo of one of lrtrain's own keys; keep every other."""
    for key in group:
        if key in known:
            continue
        close = next((k for k in sorted(known) if is_near_certain_typo(key, k)), None)
        if close is not None:
            raise ValueError(
                f"unknown param-group key {key!r}: did you mean {close!r}? "
                "(other extra keys are kept, as torch.optim keeps them)"
            )


def resolve_aliases(group: dict) -> dict:
    for alias, key in ALIASES.items():
        if alias in group:
            if key in group:
                raise ValueError(f"give {key!r} or its alias {alias!r}, not both")
            group[key] = group.pop(alias)
    return group
