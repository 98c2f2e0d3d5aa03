"""FiraAdamW: the engine preset that reproduces ``fira.FiraAdamW``."""

from .subspace import SubspaceAdamW


class FiraAdamW(SubspaceAdamW):
    """Fira (Chen et al., 2024): GaLore plus the residual G - scale·back(R), scaled per row (right
    side) or column (left side) by φ = ‖N‖/(‖R‖+1e-8) and passed through the norm-growth limiter::

        S = φ ⊙ (G - scale·back(R));   ℓ = max(‖S‖/‖S_prev‖, γ)/γ;   S ← S/ℓ
        W ← W - lr·√(1-β2ᵗ)/(1-β1ᵗ) · (scale·back(N) + S)   then   W ← W·(1 - lr·wd)

    As in the fira package (which differs from the paper): the residual keeps (1 - scale) of the
    in-subspace gradient, S is not multiplied by scale, φ uses the uncorrected N, γ = 1.01.
    Fira's group key ``alpha`` is accepted for ``scale``. Defaults: as :class:`GaLoreAdamW`
    (``eps=1e-6``, decay after the update, ``scale=0.25``); ``limiter_gamma=None`` turns the limiter
    off. The update is computed without a full-size temporary: with an orthonormal basis
    ‖S‖ follows from the row norms of G and R, and φ⊙back(R) = back(φ⊙R).
    """

    preset = {"residual": "fira", "refresh_moments": "keep", "adam_style": "hf", "scale": 0.25}
