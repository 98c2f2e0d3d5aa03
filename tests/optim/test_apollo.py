"""ApolloAdamW and ApolloMiniAdamW reproduce apollo-torch's APOLLOAdamW (an installed test dependency)
where the random matrices agree: apollo-torch's projector is made to draw lrtrain's Gaussian bases
with lrtrain's seed rule; with the SVD projector ("APOLLO w. SVD") nothing is patched."""

import warnings

import pytest
import torch

from lrtrain.memory import state_bytes
from lrtrain.optim import ApolloAdamW, ApolloMiniAdamW, describe, param_groups
from lrtrain.optim.projector import gaussian_basis, initial_seed, next_seed
from tests.conftest import TinyLM, assert_resume_is_exact
from tests.tolerance import SEED

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import apollo_torch
    from apollo_torch import random_projector


@pytest.fixture
def lrtrain_seeds(monkeypatch):
    """apollo-torch's random projector, drawing lrtrain's bases: seed index = its 1-based index - 1."""
    def update_ortho_matrix(self, full_rank_grad, proj_type):
        self.lrtrain_seed = (next_seed(self.lrtrain_seed) if hasattr(self, "lrtrain_seed")
                             else initial_seed(0, self.seed - 1))
        self.ortho_matrix = gaussian_basis(self.lrtrain_seed, tuple(full_rank_grad.shape), self.rank, proj_type,
                                           dtype=full_rank_grad.dtype, device=full_rank_grad.device)

    monkeypatch.setattr(random_projector.GradientProjector, "update_ortho_matrix", update_ortho_matrix)


def _trajectories(shape, rank, scale_type, scale, proj, weight_decay, steps=20, gap=6):
    w0, b0 = torch.randn(shape), torch.randn(shape[0])
    grads = [(torch.randn(shape), torch.randn(shape[0])) for _ in range(steps)]
    finals = []
    ours_cls = ApolloMiniAdamW if scale_type == "tensor" else ApolloAdamW
    for cls in (apollo_torch.APOLLOAdamW, ours_cls):
        w, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
        group = {"params": [w], "rank": rank, "update_proj_gap": gap, "scale": scale, "proj_type": "std"}
        if cls is apollo_torch.APOLLOAdamW:
            group.update(proj=proj, scale_type=scale_type)
        else:
            group.update(proj_method="gaussian" if proj == "random" else "svd")
        opt = cls([group, {"params": [b]}], lr=1e-2, weight_decay=weight_decay)
        for gw, gb in grads:
            w.grad, b.grad = gw.clone(), gb.clone()
            opt.step()
        finals.append((w.detach(), b.detach()))
    torch.testing.assert_close(finals[1][0], finals[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(finals[1][1], finals[0][1], rtol=1e-5, atol=1e-5)
    assert (finals[1][0] - w0).abs().max() > 1e-2  # the weights moved far beyond the tolerance


@pytest.mark.parametrize("shape", [(40, 23), (23, 40), (57, 9)])
@pytest.mark.parametrize("scale_type, rank, scale", [("channel", 4, 1.0), ("channel", 6, 0.25), ("tensor", 1, 128.0)])
def test_matches_apollo_torch_random(lrtrain_seeds, shape, scale_type, rank, scale):
    _trajectories(shape, rank, scale_type, scale, "random", weight_decay=0.1)


@pytest.mark.parametrize("shape", [(40, 23), (23, 40)])
def test_matches_apollo_torch_with_svd(shape):
    _trajectories(shape, 4, "channel", 1.0, "svd", weight_decay=0.0)


def test_gaussian_basis_is_a_function_of_its_seed():
    a = gaussian_basis(7, (30, 20), 5, "right", dtype=torch.float32, device="cpu")
    assert a.shape == (5, 20) and torch.equal(a, gaussian_basis(7, (30, 20), 5, "right", dtype=torch.float32,
                                                                device="cpu"))
    assert gaussian_basis(7, (30, 20), 5, "left", dtype=torch.float32, device="cpu").shape == (30, 5)
    big = gaussian_basis(3, (4000, 300), 64, "left", dtype=torch.float64, device="cpu")
    assert big.var().item() == pytest.approx(1 / 64, rel=0.05)  # N(0, 1/r), not orthonormalised


def test_apollo_mini_state_is_linear_in_the_matrix_size():
    w = torch.nn.Parameter(torch.randn(300, 120))
    opt = ApolloMiniAdamW([{"params": [w], "rank": 1}])
    w.grad = torch.randn_like(w)
    opt.step()
    counted = state_bytes(opt)
    assert counted["moments"] == 2 * 4 * 300  # M, V: (300, 1) on the right side
    assert counted["basis"] == 4 * 120  # one Gaussian row (1, 120)
    assert "apollo" in describe(opt)


def test_resume_is_exact():
    torch.manual_seed(SEED + 0)
    batches = [torch.randint(0, 32, (2, 9)) for _ in range(8)]
    assert_resume_is_exact(TinyLM(dim=24, hidden=40), lambda m: ApolloAdamW(param_groups(m, rank=4, update_proj_gap=3),
                                                                            lr=1e-2), batches, split=4)


@pytest.mark.parametrize("options, match", [
    ({"residual": "fira", "proj_method": "gaussian"}, "needs an orthonormal basis"),
    ({"scale_type": "row"}, "scale_type must be one of"),
])
def test_refusals(options, match):
    with pytest.raises(ValueError, match=match):
        ApolloAdamW([{"params": [torch.nn.Parameter(torch.randn(8, 6))], "rank": 2}], **options)
