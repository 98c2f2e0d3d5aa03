"""ApolloAdamW and ApolloMiniAdamW: engine presets that reproduce ``apollo_torch.APOLLOAdamW``."""

from .subspace import SubspaceAdamW


class ApolloAdamW(SubspaceAdamW):
    """APOLLO (Zhu et al., MLSys 2025): Adam's moments in a random low-rank space only estimate how
    much to scale the raw gradient; nothing is projected back::

        R = down(G) with a Gaussian basis (N(0, 1/r), redrawn from its seed every update_proj_gap)
        N = M / (√V + ε)                      (GaLore's Adam on R, moments kept across refreshes)
        φ = ‖N‖/(‖R‖+1e-8) per row (right side) or column (left side)   [scale_type="tensor": one ratio]
        U = φ⊙G;   ℓ = max(‖U‖/‖U_prev‖, γ)/γ;   U ← U/ℓ
        W ← W - lr·√(1-β2ᵗ)/(1-β1ᵗ)·√scale·U   then   W ← W·(1 - lr·wd)

    Defaults as apollo-torch: ``eps=1e-6``, ``scale=1`` (its scripts' channel-wise setting),
    ``scale_type="channel"``, ``proj_method="gaussian"``, γ = 1.01. Where lrtrain differs: the seeds
    follow lrtrain's rule (:func:`lrtrain.optim.projector.initial_seed`, the same on every rank)
    rather than apollo-torch's torch-generator chain; the basis is kept in the state (regenerating
    r·n normals every step costs more than it saves: the moments are as large); ``scale_front``
    needs no option (the limiter compares norms that √scale multiplies alike); the scaling
    dimension follows the projection side, which is apollo-torch's for ``proj_type="std"`` (with
    "reverse_std" apollo-torch's shapes do not broadcast).
    ``proj_method="svd"`` gives "APOLLO w. SVD".
    """

    preset = {"residual": "apollo", "proj_method": "gaussian", "scale_type": "channel", "scale": 1.0,
              "refresh_moments": "keep", "adam_style": "hf"}


class ApolloMiniAdamW(ApolloAdamW):
    """APOLLO-Mini: rank 1 (give ``rank=1`` to the groups) with one tensor-wise scale and
    ``scale=128`` (the paper's α = √128 on the update): two numbers of state per column or row."""

    preset = {**ApolloAdamW.preset, "scale_type": "tensor", "scale": 128.0}
