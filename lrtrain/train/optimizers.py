"""The optimizers a config can name, every key each one takes with the value used when a config leaves it
out (registered in hydra's ConfigStore, so the files under ``configs/optimizer`` keep only what differs),
and :func:`build_optimizer`, which routes a config's keys to the constructor or to the param groups."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..checks import check_number
from ..optim import (
    ApolloAdamW,
    ApolloMiniAdamW,
    FiraAdamW,
    FrugalAdamW,
    GaLoreAdafactor,
    GaLoreAdamW,
    param_groups,
)
from ..optim.engine.options import ENGINE_OPTIONS


def adamw8bit(params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
              weight_decay: float = 1e-2, **kwargs) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW8bit (imported when a config names it), with its defaults."""
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "adamw8bit": adamw8bit,
    "galore": GaLoreAdamW,
    "fira": FiraAdamW,
    "frugal": FrugalAdamW,
    "apollo": ApolloAdamW,
    "apollo_mini": ApolloMiniAdamW,
    "galore_adafactor": GaLoreAdafactor,
}
#: What a config may give torch's and bitsandbytes' AdamW.
CONSTRUCTOR_KEYS = ("lr", "betas", "eps", "weight_decay")
#: The keys :func:`lrtrain.optim.param_groups` takes itself (which layers, their rank and refresh settings).
PARAM_GROUP_KEYS = frozenset(inspect.signature(param_groups).parameters) - {"model", "more_group_keys"}
#: Where :func:`register_optimizer_configs` puts each optimizer's keys and defaults in hydra's ConfigStore.
SCHEMA_GROUP = "schema/optimizer"


def _keyword_defaults(fn: Callable, skip: frozenset = frozenset()) -> dict[str, Any]:
    """The named arguments of ``fn`` that have a default, with it (tuples as lists, as a config holds them)."""
    return {
        name: list(p.default) if isinstance(p.default, tuple) else p.default
        for name, p in inspect.signature(fn).parameters.items()
        if p.default is not inspect.Parameter.empty and name not in skip
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }


def optimizer_defaults(name: str) -> dict[str, Any]:
    """Every key :func:`build_optimizer` takes for optimizer ``name``, with the value it uses when a config
    leaves the key out, in the order: the constructor's arguments, :func:`~lrtrain.optim.param_groups`' keys,
    the engine's options at the preset's defaults. A key in two of them takes the first one's default, as the
    built optimizer does (so ``scale`` is param_groups' 0.25 for every preset). torch's AdamW: its
    :data:`CONSTRUCTOR_KEYS`."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name must be one of {', '.join(OPTIMIZERS)}; got {name!r}")
    factory = OPTIMIZERS[name]
    arguments = _keyword_defaults(factory)
    if name in ("adamw", "adamw8bit"):
        return {"name": name, **{key: arguments[key] for key in CONSTRUCTOR_KEYS}}
    group_keys = _keyword_defaults(param_groups)
    options = {key: value for key, value in {**ENGINE_OPTIONS, **factory.preset}.items()
               if key not in factory.options_in_arguments}
    keys = {"name": name, **arguments}
    for source in (group_keys, options):
        for key, value in source.items():
            keys.setdefault(key, value)
    return keys


def register_optimizer_configs() -> None:
    """Store :func:`optimizer_defaults` of every optimizer as ``schema/optimizer/<name>`` in hydra's
    ConfigStore; ``configs/optimizer/<name>.yaml`` starts from it and keeps only what differs."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name in OPTIMIZERS:
        store.store(group=SCHEMA_GROUP, name=name, node=optimizer_defaults(name))


def _check_constructor_values(kwargs: Mapping[str, Any]) -> None:
    """The constructor arguments a config gives, checked before any optimizer sees them."""
    for key in ("lr", "weight_decay"):
        if key in kwargs and not (key == "lr" and kwargs[key] is None):  # lr null: Adafactor's relative step
            check_number(f"optimizer.{key}", kwargs[key], low=0)
    eps = kwargs.get("eps", 0.0)  # one number, or Adafactor's pair
    for value in eps if isinstance(eps, Sequence) and not isinstance(eps, str) else [eps]:
        check_number("optimizer.eps", value, low=0)
    if "betas" in kwargs:
        betas = kwargs["betas"]
        if isinstance(betas, (str, bytes)) or not isinstance(betas, Sequence) or len(betas) != 2:
            raise ValueError(f"optimizer.betas must be a pair [beta1, beta2]; got {betas!r}")
        for beta in betas:
            check_number("optimizer.betas", beta, low=0)


def build_optimizer(spec: Mapping[str, Any], model: nn.Module) -> torch.optim.Optimizer:
    """An optimizer from a config such as ``configs/optimizer/galore.yaml``: ``name``, the
    constructor's ``lr``/``betas``/``eps``/``weight_decay``, and for the subspace optimizers
    ``target_modules`` and the param-group keys of :func:`lrtrain.optim.param_groups` (``rank``,
    ``update_proj_gap``, ``scale``, ...), and the engine's options (``state_bits``, ``adam_style``, ...),
    which apply to every group."""
    spec = dict(spec)
    name = spec.pop("name")
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name must be one of {', '.join(OPTIMIZERS)}; got {name!r}")
    kwargs = {key: spec.pop(key) for key in CONSTRUCTOR_KEYS if key in spec}
    _check_constructor_values(kwargs)
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    if name in ("adamw", "adamw8bit"):
        if spec:
            raise ValueError(f"optimizer keys {sorted(spec)} do not apply to {name}")
        return OPTIMIZERS[name](model.parameters(), **kwargs)
    # The optimizer's own arguments (GaLoreAdafactor's beta1, ...) and the engine's options go to its
    # constructor, so they hold for every group, the plain one (embeddings, head, norms) included;
    # param_groups' keys and any other key go to the subspace group (where a near-certain typo is refused).
    own = set(inspect.signature(OPTIMIZERS[name]).parameters) - {"params", "options"}
    wide = [key for key in spec if key in own or (key in ENGINE_OPTIONS and key not in PARAM_GROUP_KEYS)]
    kwargs.update({key: spec.pop(key) for key in wide})
    return OPTIMIZERS[name](param_groups(model, **spec), **kwargs)


def without_defaults(spec: Mapping[str, Any]) -> dict[str, Any]:
    """``spec`` less the keys that hold :func:`optimizer_defaults`' value: two configs that build the same
    optimizer give the same mapping, whether a default is written out or left to the schema."""
    defaults = optimizer_defaults(spec["name"])
    return {key: value for key, value in spec.items() if key == "name" or key not in defaults
            or value != defaults[key]}
