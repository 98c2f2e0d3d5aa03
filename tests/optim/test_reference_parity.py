"""GaLoreAdamW and FiraAdamW reproduce galore-torch and fira (installed test dependencies) to
float32 tolerance over many steps and several refreshes, on both sides, odd shapes, with decay."""

import warnings

import pytest
import torch

from lrtrain.optim import FiraAdamW, GaLoreAdamW
from tests.tolerance import SEED

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import fira
    import galore_torch

SHAPES = [(40, 23), (23, 40), (30, 30), (57, 9)]
PROJ_TYPES = ["std", "reverse_std", "left", "right"]


def _trajectories(ref_cls, scale_key, shape, proj_type, weight_decay, dtype=torch.float32, steps=24, gap=5, rank=4):
    """Final (weight, bias) from the reference optimizer and from lrtrain's, on the same gradients.

    Gradients are fresh Gaussians each step: full rank, so the top singular vectors are unique and
    both implementations get the same basis from the same SVD."""
    ours_cls = GaLoreAdamW if ref_cls is galore_torch.GaLoreAdamW else FiraAdamW
    w0, b0 = torch.randn(shape, dtype=dtype), torch.randn(shape[0], dtype=dtype)
    grads = [(torch.randn(shape, dtype=dtype), torch.randn(shape[0], dtype=dtype)) for _ in range(steps)]
    finals = []
    for cls, extra in ((ref_cls, {"no_deprecation_warning": True}), (ours_cls, {})):
        w, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
        groups = [
            {"params": [b]},
            {"params": [w], "rank": rank, "update_proj_gap": gap, scale_key: 0.25, "proj_type": proj_type},
        ]
        opt = cls(groups, lr=1e-2, weight_decay=weight_decay, **extra)
        for gw, gb in grads:
            w.grad, b.grad = gw.clone(), gb.clone()
            opt.step()
        finals.append((w.detach(), b.detach()))
    return finals


@pytest.mark.parametrize("ref_cls,scale_key", [(galore_torch.GaLoreAdamW, "scale"), (fira.FiraAdamW, "alpha")])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_matches_reference_float32(ref_cls, scale_key, shape, proj_type):
    (w_ref, b_ref), (w, b) = _trajectories(ref_cls, scale_key, shape, proj_type, weight_decay=0.1)
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b, b_ref, rtol=1e-5, atol=1e-5)


def test_changes_the_weights():
    """Guard against a vacuous comparison: the trajectory moves far beyond the tolerance."""
    torch.manual_seed(SEED + 1)
    (w_ref, _), (w, _) = _trajectories(galore_torch.GaLoreAdamW, "scale", (40, 23), "std", 0.0)
    torch.manual_seed(SEED + 1)
    w0 = torch.randn(40, 23)
    assert (w - w0).abs().max() > 1e-2


def test_model_training_matches_galore_torch(tiny_lm):
    """A real loss on a small model (gradients depend on the weights) for 12 steps, 3 refreshes."""
    from lrtrain.optim import param_groups

    models = [tiny_lm, type(tiny_lm)()]
    models[1].load_state_dict(models[0].state_dict())
    tokens = torch.randint(0, 32, (8, 12))
    opts = []
    for model, cls in zip(models, (galore_torch.GaLoreAdamW, GaLoreAdamW)):
        groups = [
            {"params": [p for _, p in g["params"]], **{k: v for k, v in g.items() if k != "params"}}
            for g in param_groups(model, rank=6, update_proj_gap=4)
        ]
        extra = {"no_deprecation_warning": True} if cls is galore_torch.GaLoreAdamW else {}
        opts.append(cls(groups, lr=3e-3, **extra))
    for _ in range(12):
        for model, opt in zip(models, opts):
            logits = model(tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 32), tokens[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
    for p_ref, p in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, p_ref, rtol=1e-4, atol=1e-5)
