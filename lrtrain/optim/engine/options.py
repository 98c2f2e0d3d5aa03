"""The engine's options: their names, defaults and choices, and every check of a group's settings
(what each option accepts, which combinations are valid, near-certain typos of its keys)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Literal, NamedTuple, get_args, get_origin, get_type_hints

from torch.distributed.tensor import DTensor

from ...checks import is_int, is_number
from ..projector import PROJ_METHODS, PROJ_TYPES
from .blocks import active_block_count
from .rules import RESIDUAL_RULES
from .storage import SEEDED_BASES

GROUP_METHODS = (*PROJ_METHODS, "blocks")
#: The refreshes whose new basis ``basis_alignment`` may turn towards the previous one.
ALIGNED_METHODS = ("svd", "randomized")


def aligns_basis(group: dict) -> bool:
    """Whether a refresh of this group aligns its new basis with the previous one (``basis_alignment``)."""
    return group["proj_method"] in ALIGNED_METHODS and group["basis_alignment"] != "none"


def _option(default: Any, doc: str, *, low: float | None = None, choices: Callable[[], tuple] | None = None) -> Any:
    """A field of :class:`GroupOptions`: its default, what it means, the least value it takes (numbers)
    and, where the type cannot list them, a function giving its choices at check time."""
    return field(default=default, metadata={"doc": doc, "low": low, "choices": choices})


@dataclass(frozen=True)
class GroupOptions:
    """The options every param group carries, with their defaults: the schema from which the defaults
    (:data:`ENGINE_OPTIONS`), the checks of each value (:func:`check_option`) and the README's key table
    (:func:`options_table`) are derived. Constructor keywords set them for every group; a group may
    override any of them. The presets (GaLoreAdamW, FiraAdamW, ...) change defaults only."""

    update_proj_gap: int = _option(200, "steps between two refreshes of a matrix's subspace (GaLore's T)", low=1)
    scale: float = _option(0.25, "α, the factor of the projected-back update (Fira's `alpha` is accepted)", low=0)
    proj_type: Literal[PROJ_TYPES] = _option("std", "which side is projected: std (the smaller), reverse_std, "
                                                    "left, right")
    proj_method: Literal[GROUP_METHODS] = _option(
        "svd", "how a refresh finds the basis: exact SVD, randomized range finder, random orthonormal, Gaussian "
               "(APOLLO), coordinates (FRUGAL), or FRUGAL's whole-tensor blocks")
    refresh_moments: Literal["keep", "reset", "project"] = _option(
        "keep", "the moments at a refresh: kept as they are, zeroed with the step count, or carried into the new "
                "basis")
    residual: str = _option("none", "the rule for the gradient outside the subspace (FRUGAL's `state_free` is "
                                    "accepted): one of the rule table's", choices=lambda: tuple(RESIDUAL_RULES))
    state_free_lr_scale: float = _option(1.0, "factor of the state-free rules' step lr·scale", low=0)
    limiter_gamma: float | None = _option(1.01, "γ of Fira's and APOLLO's norm-growth limiter (Fira uses 1.01); "
                                                "None turns it off", low=1)
    adam_style: Literal["hf", "torch"] = _option(
        "hf", "AdamW's formula: hf (galore-torch, Fira: ε outside the bias correction, decay after) or torch "
              "(torch.optim.AdamW, FRUGAL: decay first)")
    block_order: Literal["random", "ascending", "descending", "mirror"] = _option(
        "random", "the order in which proj_method='blocks' activates tensors")
    seed: int = _option(0, "random bases, coordinates and blocks are a function of it, the same on every rank")
    on_nonfinite: Literal["skip", "raise"] = _option("skip", "what a NaN/Inf gradient at a refresh does")
    oversample: int = _option(8, "extra columns of the randomized refresh's sketch", low=0)
    power_iters: int = _option(2, "power iterations of the randomized refresh", low=0)
    basis_signs: Literal["lapack", "canonical"] = _option(
        "lapack", "the SVD's signs as LAPACK returns them (as galore-torch), or each vector's largest entry "
                  "positive (runs agree across thread counts and process layouts)")
    basis_alignment: Literal["none", "signs", "procrustes"] = _option(
        "none", "a refreshed basis as found (its vectors by singular value), each vector flipped to point along "
                "the previous one at its position, or turned within its subspace to the nearest of the previous "
                "basis (orthogonal Procrustes; measured worse with Adam: see the README's refresh quality)")
    state_bits: Literal[32, 8] = _option(32, "8: moments as bitsandbytes' blockwise 8-bit codes (plain groups "
                                             "too)")
    moment_dtype: Literal["param", "float32", "bfloat16"] = _option(
        "param", "storage of Adam's moments (unless 8-bit): the parameter's dtype, as galore-torch and torch.optim "
                 "store them, or float32 / bfloat16; computed in float32 either way")
    basis_dtype: Literal["param", "float32", "bfloat16", "int8", "int4", "seed"] = _option(
        "param", "storage of the subspace basis: the parameter's dtype as galore-torch, "
                 "float32, bfloat16, int8 / int4 codes with a scale per 256 entries of each basis vector "
                 "(Q-GaLore's), dequantized where used, or only the seed of a random / gaussian basis, drawn "
                 "again at each use (as the APOLLO paper counts it)")
    fused: Literal[None, True, False] = _option(
        None, "the Triton kernels: None where a GPU benchmark measured them faster (none yet: the torch path), "
              "True wherever they apply, False never")
    stagger_refresh: bool = _option(False, "spread the group's refreshes over the gap instead of all at once")
    scale_type: Literal["channel", "tensor"] = _option("channel", "APOLLO's φ: per row/column, or one for the "
                                                                  "matrix")
    inner: Literal["adam", "adafactor"] = _option("adam", "the optimizer inside the subspace (adafactor: "
                                                          "GaLoreAdafactor)")
    clip_threshold: float = _option(1.0, "Adafactor's update clipping")
    decay_rate: float = _option(-0.8, "Adafactor's β̂2 = 1 - t^decay_rate")
    relative_step: bool = _option(False, "Adafactor's relative step min(1e-2, 1/√t) instead of lr")
    scale_parameter: bool = _option(False, "Adafactor's step times max(eps_scale, RMS(W))")
    warmup_init: bool = _option(False, "Adafactor's relative step warm-up 1e-6·t")
    eps_scale: float = _option(1e-3, "Adafactor's floor of the parameter scale (its ε2)")
    maximize: bool = _option(False, "maximize the objective (torch.optim's `maximize`)")


_OPTION_FIELDS = {f.name: f for f in fields(GroupOptions)}


#: Options every group carries (constructor keywords become the defaults of every group).
ENGINE_OPTIONS: dict[str, Any] = {name: f.default for name, f in _OPTION_FIELDS.items()}


@functools.cache
def _option_types() -> dict[str, Any]:
    return get_type_hints(GroupOptions)


def option_choices(name: str) -> tuple | None:
    """The values option ``name`` takes, where it is a choice (a Literal, or the rule table's)."""
    listed = _OPTION_FIELDS[name].metadata["choices"]
    if listed is not None:
        return listed()
    kind = _option_types()[name]
    return get_args(kind) if get_origin(kind) is Literal else None


def check_option(name: str, value: Any) -> None:
    """``value`` is one that option ``name`` takes (one of its choices, or of its type and at least its
    least value); raise naming the option."""
    choices, kind, low = option_choices(name), _option_types()[name], _OPTION_FIELDS[name].metadata["low"]
    if choices is not None:
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
        return
    nullable = type(None) in get_args(kind)
    if nullable and value is None:
        return
    base = next(t for t in get_args(kind) if t is not type(None)) if nullable else kind
    if base is bool and not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False; got {value!r}")
    if base is int and (not is_int(value) or (low is not None and value < low)):
        raise ValueError(f"{name} must be an integer{'' if low is None else f' >= {low}'}; got {value!r}")
    if base is float and (not is_number(value) or (low is not None and not value >= low)):
        bound = "a number" if low is None else f">= {low}"
        raise ValueError(f"{name} must be {bound}{' or None' if nullable else ''}; got {value!r}")


def _cell(value: Any) -> str:
    return f"`{value}`" if isinstance(value, str) else f"`{value!r}`"


def options_table() -> str:
    """The README's table of group keys (Markdown), from :class:`GroupOptions`: key, default, the values
    it takes, what it means."""
    rows = ["| key | default | values | meaning |", "|---|---|---|---|"]
    kinds = {bool: "True, False", int: "integer", float: "number"}
    for name, option in _OPTION_FIELDS.items():
        choices, kind, low = option_choices(name), _option_types()[name], option.metadata["low"]
        if choices is not None:
            values = ", ".join(_cell(choice) for choice in choices)
        else:
            nullable = type(None) in get_args(kind)
            base = next(t for t in get_args(kind) if t is not type(None)) if nullable else kind
            values = kinds[base] + ("" if low is None else f" ≥ {low}") + (", `None`" if nullable else "")
        rows.append(f"| `{name}` | {_cell(option.default)} | {values} | {option.metadata['doc']} |")
    return "\n".join(rows)


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
    for key in ("eps", "weight_decay"):
        if not group[key] >= 0.0:
            raise ValueError(f"{key} must be >= 0; got {group[key]}")
    for name in ENGINE_OPTIONS:
        check_option(name, group[name])
    check_combinations(group, subspace=False)
    if group["state_bits"] == 8:
        try:
            import bitsandbytes.functional  # noqa: F401
        except ImportError as err:
            raise ValueError("state_bits=8 stores moments with bitsandbytes: pip install bitsandbytes "
                             "(or lrtrain[bnb])") from err


class Combination(NamedTuple):
    """An option combination the engine refuses: ``refused(group)`` says whether a group has it (its
    options, and for some its tensors: sharded, how many), ``message(group)`` why and what to use instead;
    ``subspace`` ones apply to subspace groups only."""

    refused: Callable[[dict], bool]
    message: Callable[[dict], str]
    subspace: bool = False


def _adafactor_runs_with(key: str, allowed: Any) -> Combination:
    def value(group: dict) -> Any:
        return bool(group[key]) if isinstance(allowed, bool) else group[key]

    return Combination(lambda g: g["inner"] == "adafactor" and value(g) != allowed,
                       lambda g: f"inner='adafactor' (GaLoreAdafactor) runs with {key}={allowed!r}; got {value(g)!r}")


def _sharded(group: dict) -> bool:
    """Whether the group holds FSDP2-sharded parameters (DTensors); the defaults hold none."""
    return any(isinstance(p, DTensor) for p in group.get("params", ()))


#: Every option combination the engine refuses, in one table, checked in this order.
COMBINATIONS: tuple[Combination, ...] = (
    Combination(lambda g: g["inner"] == "adafactor" and not (g["clip_threshold"] > 0.0 and g["eps_scale"] >= 0.0),
                lambda g: f"clip_threshold must be > 0 and eps_scale >= 0; got {g['clip_threshold']}, "
                          f"{g['eps_scale']}"),
    Combination(lambda g: g["inner"] == "adafactor" and g["warmup_init"] and not g["relative_step"],
                lambda g: "warmup_init=True requires relative_step=True"),
    _adafactor_runs_with("state_bits", 32),
    _adafactor_runs_with("refresh_moments", "keep"),
    _adafactor_runs_with("residual", "none"),
    _adafactor_runs_with("fused", False),
    Combination(lambda g: g["inner"] == "adafactor" and g["proj_method"] == "blocks",
                lambda g: "inner='adafactor' needs a subspace: proj_method='blocks' is FRUGAL's Adam mode"),
    Combination(lambda g: g["proj_method"] == "gaussian" and RESIDUAL_RULES[g["residual"]].orthonormal,
                lambda g: f"residual={g['residual']!r} needs an orthonormal basis; proj_method='gaussian' "
                          "(APOLLO's) is not one: use svd, randomized or random"),
    Combination(lambda g: g["basis_dtype"] == "seed" and g["proj_method"] not in SEEDED_BASES,
                lambda g: f"basis_dtype='seed' draws the basis again from its seed: it needs proj_method='gaussian' "
                          f"or 'random', not {g['proj_method']!r}", subspace=True),
    Combination(lambda g: g["basis_alignment"] != "none" and g["proj_method"] not in ALIGNED_METHODS,
                lambda g: f"basis_alignment={g['basis_alignment']!r} aligns bases found from the gradient (proj_method "
                          f"'svd' or 'randomized'); {g['proj_method']!r} bases are drawn from seeds: use "
                          "basis_alignment='none'"),
    Combination(lambda g: bool(g["fused"]) and not kernels_available(),
                lambda g: "fused=True runs lrtrain's Triton kernels: pip install triton (or lrtrain[kernels]), "
                          "or leave fused=None (kernels where they apply) or False"),
    Combination(lambda g: bool(g["fused"]) and not kernels_cover(g),
                lambda g: f"fused=True covers 32-bit moments, float bases and the GaLore, Fira and FRUGAL rules; "
                          f"this group has state_bits={g['state_bits']}, proj_method={g['proj_method']!r}, "
                          f"residual={g['residual']!r}, inner={g['inner']!r}: use fused=None or False"),
    Combination(lambda g: _sharded(g) and g["state_bits"] == 8,
                lambda g: "state_bits=8 with sharded (FSDP2) parameters: the block scales would depend on how the "
                          "tensor is split, so checkpoints could not reshard; use state_bits=32 with FSDP2, or DDP"),
    Combination(lambda g: _sharded(g) and g["inner"] == "adafactor",
                lambda g: "inner='adafactor' (GaLoreAdafactor) with sharded (FSDP2) parameters: its row and column "
                          "statistics span the whole matrix; use DDP, or GaLoreAdamW with FSDP2"),
    Combination(lambda g: g["proj_method"] == "blocks" and g["residual"] == "fira",
                lambda g: "residual='fira' needs a subspace; with proj_method='blocks' use 'sign_sgd', 'sgd' or "
                          "'none'", subspace=True),
    Combination(lambda g: g["proj_method"] == "blocks" and g["block_order"] == "mirror"
                and active_block_count(g) % 2 == 1,
                lambda g: "block_order='mirror' activates tensors in symmetric pairs: choose a density that makes "
                          f"round(density * {len(g['params'])}) even", subspace=True),
)


def check_combinations(group: dict, *, subspace: bool) -> None:
    """Raise the first of :data:`COMBINATIONS` (those for subspace groups with ``subspace``) the group has."""
    for combination in COMBINATIONS:
        if combination.subspace == subspace and combination.refused(group):
            raise ValueError(combination.message(group))


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
    check_combinations(group, subspace=True)


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
