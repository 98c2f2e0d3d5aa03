"""GaLoreAdamW: the engine preset that reproduces ``galore_torch.GaLoreAdamW``."""

from .subspace import SubspaceAdamW


class GaLoreAdamW(SubspaceAdamW):
    """GaLore (Zhao et al., 2024): Adam moments of the projected gradient R (rank r), the Adam
    direction N projected back and scaled, the rest of the gradient dropped::

        W ← W - lr·√(1-β2ᵗ)/(1-β1ᵗ) · scale · back(M / (√V + ε))   then   W ← W·(1 - lr·wd)

    Defaults are galore-torch's (transformers-style AdamW: ``eps=1e-6``, ε outside the bias
    correction, decay after the update; exact fp32 SVD refreshed at steps 0, T, 2T, ...; moments
    kept across refreshes) with ``scale=0.25`` and ``update_proj_gap=200`` as in the paper.
    Group keys follow galore-torch and HF: ``rank``, ``update_proj_gap``, ``scale``, ``proj_type``;
    lrtrain's own keys (``proj_method``, ``refresh_moments``, ...) are listed in
    :class:`~lrtrain.optim.SubspaceAdamW`. Differences from galore-torch: the basis and the low-rank
    moments stay in float32 for bf16 parameters, the state holds tensors only, and the
    back-projection is written straight into the weight (``addmm_``) without a full-size temporary.

    Example::

        opt = GaLoreAdamW(param_groups(model, target_modules=["attn", "mlp"], rank=128), lr=1e-2)
    """

    preset = {"residual": "none", "refresh_moments": "keep", "adam_style": "hf", "scale": 0.25}
