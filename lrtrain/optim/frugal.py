"""FrugalAdamW: the engine preset that follows FRUGAL's official code (fzmushko/FRUGAL)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .subspace import SubspaceAdamW


class FrugalAdamW(SubspaceAdamW):
    """FRUGAL (Zmushko et al., 2025): a state-full subspace trained by Adam and a state-free
    remainder trained by signSGD (or SGD)::

        W ← W·(1 - lr·wd)
        W ← W - lr·scale·back(Adam(R)) - lr·scale·c·sign(G - back(R))

    with torch.optim.AdamW's formula (ε after the bias correction) and the exact orthogonal
    complement. On a refresh the moments are zeroed and the bias correction restarts
    (``refresh_moments="reset"``, FRUGAL's ``reset_statistics=True``). Groups without ``rank`` /
    ``density`` give exactly ``torch.optim.AdamW``'s numbers.

    Modes (``proj_method``): ``svd`` | ``random`` | ``coordinates`` (FRUGAL's GaloreAdamW with
    svd / random / randperm, and CoordAdamW with columns/rows), and ``blocks`` (FRUGAL's
    BlockAdamW, the one its pre-training scripts use: a fraction ``density`` of the group's tensors
    gets Adam, reselected every ``update_proj_gap`` steps in ``block_order``; the others signSGD).

    FRUGAL's names map to lrtrain's group keys: ``proj_params_lr_scale`` → ``scale``,
    ``inactive_lr_scale`` → ``state_free_lr_scale``, ``inactive_update_rule`` (no | sgd | sign_sgd)
    → ``state_free`` (none | sgd | sign_sgd, an alias of ``residual``), ``update_gap`` →
    ``update_proj_gap``, ``reset_statistics`` → ``refresh_moments``, ``proj_side`` →
    ``proj_type``, ``density`` → ``density`` (or give ``rank``). FRUGAL's pre-training recipe:
    ``proj_method="blocks", density=0.25, block_order="descending", lr=1e-3, weight_decay=0``.
    Random choices (bases, coordinates, blocks) are seeded (``seed``) instead of drawn from the
    global RNG, so every rank draws the same ones.
    """

    preset = {
        "residual": "sign_sgd",
        "refresh_moments": "reset",
        "adam_style": "torch",
        "scale": 1.0,
        "state_free_lr_scale": 1.0,
    }

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        correct_bias: bool = True,
        **options: Any,
    ):
        super().__init__(params, lr, betas, eps, weight_decay, correct_bias, **options)
