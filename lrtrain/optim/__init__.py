"""Drop-in torch.optim optimizers that keep Adam's state in low-rank subspaces of the gradient."""

from .apollo import ApolloAdamW, ApolloMiniAdamW
from .fira import FiraAdamW
from .frugal import FrugalAdamW
from .galore import GaLoreAdafactor, GaLoreAdamW
from .groups import describe, param_groups
from .layerwise import LayerwiseUpdates
from .subspace import SubspaceAdamW

__all__ = [
    "ApolloAdamW",
    "ApolloMiniAdamW",
    "FiraAdamW",
    "FrugalAdamW",
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "LayerwiseUpdates",
    "SubspaceAdamW",
    "describe",
    "param_groups",
]
