"""GaLoreAdamW: the engine preset that reproduces ``galore_torch.GaLoreAdamW``."""

from .subspace import SubspaceAdamW


class GaLoreAdamW(SubspaceAdamW):
    """GaLore (Zhao et al., 2024): Adam moments of the projected gradient R (rank r), the Adam
    direction N projected back and scaled, the rest of the gradient dropped::

        W ← W - lr·√(1-β2ᵗ)/(1-β1ᵗ) · scale · back(M / (√V + ε))   then   W ← W·(1 - lr·wd)

    Defaults are galore-torch's (transformers-style AdamW: ``eps=1e-6``, ε outside the bias
    correction, decay after the update; exact fp32 SVD refreshed at steps 0, T, 2T, ...; moments
    kept across refreshes; the moments and the basis stored in the parameter's dtype) with ``scale=0.25`` and
    ``update_proj_gap=200`` as in the paper.
    Group keys follow galore-torch and HF: ``rank``, ``update_proj_gap``, ``scale``, ``proj_type``;
    lrtrain's own keys (``proj_method``, ``refresh_moments``, ...) are listed in
    :class:`~lrtrain.optim.SubspaceAdamW`. Differences from galore-torch: the math runs in float32 for
    bf16 parameters (the state is stored in bf16, as galore-torch's), the state holds tensors only, and the
    back-projection is written straight into the weight (``addmm_``) without a full-size temporary.

    Example::

        opt = GaLoreAdamW(param_groups(model, target_modules=["attn", "mlp"], rank=128), lr=1e-2)
    """

    preset = {"residual": "none", "refresh_moments": "keep", "adam_style": "hf", "scale": 0.25}


class GaLoreAdafactor(SubspaceAdamW):
    """GaLore with Adafactor in the subspace (``galore_torch.GaLoreAdafactor``): Adafactor's
    factored second moment (row and column means of R²), relative step size, update clipping and
    optional first moment on R, then ``W ← W·(1 - lr_t·wd) - scale·back(U)``; plain groups run
    Adafactor itself. Arguments as HF/galore-torch's Adafactor: ``lr=None`` with
    ``relative_step=True`` (ρ_t = min(1e-2, 1/√t)), ``eps=(ε1, ε2)`` (added to G²; the floor of the
    parameter scale), ``beta1=None`` (no first moment). The statistics stay in float32 for bf16
    weights and are kept across refreshes; the state holds tensors only (no ``RMS`` entry: it is
    recomputed from W every step).
    """

    preset = {"inner": "adafactor", "residual": "none", "refresh_moments": "keep", "scale": 0.25}
    options_in_arguments = {"eps_scale": "eps=(ε1, ε2)"}

    def __init__(self, params, lr: float | None = None, eps: tuple[float, float] = (1e-30, 1e-3),
                 clip_threshold: float = 1.0, decay_rate: float = -0.8, beta1: float | None = None,
                 weight_decay: float = 0.0, scale_parameter: bool = True, relative_step: bool = True,
                 warmup_init: bool = False, **options):
        for option, argument in self.options_in_arguments.items():
            if option in options:
                raise TypeError(f"GaLoreAdafactor takes {option} as {argument}; pass that instead")
        if lr is not None and relative_step:
            raise ValueError("lr and relative_step=True do not combine: pass relative_step=False to use lr")
        super().__init__(params, lr=0.0 if lr is None else lr, betas=(beta1 or 0.0, 0.0), eps=eps[0],
                         weight_decay=weight_decay, eps_scale=eps[1], clip_threshold=clip_threshold,
                         decay_rate=decay_rate, scale_parameter=scale_parameter, relative_step=relative_step,
                         warmup_init=warmup_init, **options)
