"""GaLoreAdafactor reproduces galore-torch's GaLoreAdafactor (an installed test dependency) to float32
tolerance over many steps and refreshes, on both sides and odd shapes, with each Adafactor option;
its state is tensors only, counted by state_bytes, and resumes exactly."""

import warnings

import pytest
import torch

from lrtrain.memory import state_bytes
from lrtrain.optim import GaLoreAdafactor, LayerwiseUpdates, param_groups
from tests.conftest import TinyLM, assert_resume_is_exact
from tests.tolerance import SEED

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import galore_torch

OPTIONS = [{}, {"beta1": 0.9}, {"weight_decay": 0.1}, {"lr": 0.05, "relative_step": False},
           {"warmup_init": True}, {"scale_parameter": False, "clip_threshold": 0.5, "decay_rate": -0.5}]


@pytest.mark.parametrize("shape", [(40, 23), (23, 40), (57, 9)])
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("proj_type", ["std", "reverse_std"])
def test_matches_galore_torch(shape, options, proj_type):
    w0, b0 = torch.randn(shape), torch.randn(shape[0])
    grads = [(torch.randn(shape), torch.randn(shape[0])) for _ in range(20)]
    finals = []
    for cls in (galore_torch.GaLoreAdafactor, GaLoreAdafactor):
        w, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
        groups = [{"params": [b]}, {"params": [w], "rank": 4, "update_proj_gap": 5, "scale": 0.25,
                                    "proj_type": proj_type}]
        opt = cls(groups, **options)
        for gw, gb in grads:
            w.grad, b.grad = gw.clone(), gb.clone()
            opt.step()
        finals.append((w.detach(), b.detach()))
    (w_ref, b_ref), (w, b) = finals
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b, b_ref, rtol=1e-5, atol=1e-5)
    moved = (w - w0).abs().max()
    assert moved > (0 if options.get("warmup_init") else 2e-3)  # beyond the tolerance (warm-up: 1e-6·t steps)


def test_factored_state_and_its_bytes():
    w = torch.nn.Parameter(torch.randn(300, 120))
    opt = GaLoreAdafactor([{"params": [w], "rank": 16}], beta1=0.9)
    w.grad = torch.randn_like(w)
    opt.step()
    state = opt.state[w]
    assert state["exp_avg_sq_row"].shape == (300,) and state["exp_avg_sq_col"].shape == (16,)
    assert state_bytes(opt)["moments"] == 4 * (300 * 16 + 300 + 16)  # M (300, 16) plus the two factors
    assert all(torch.is_tensor(value) for value in state.values())


def test_bf16_weights_and_layerwise_updates():
    torch.manual_seed(SEED + 0)
    model = TinyLM(dim=32, hidden=48).to(torch.bfloat16)
    opt = GaLoreAdafactor(param_groups(model, rank=6, update_proj_gap=3))
    layerwise = LayerwiseUpdates(opt, grad_accum=2)
    start = [p.detach().clone() for p in model.parameters()]
    for _ in range(4):
        for micro in range(2):
            tokens = torch.randint(0, 32, (2, 9))
            with layerwise.micro_batch(micro):
                logits = model(tokens[:, :-1]).flatten(0, 1).float()
                torch.nn.functional.cross_entropy(logits, tokens[:, 1:].flatten()).backward()
    up = model.layers[0].mlp["up_proj"].weight
    assert opt.state[up]["exp_avg_sq_row"].dtype == torch.float32 and int(opt.state[up]["step"]) == 4
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), start))


def test_resume_is_exact():
    torch.manual_seed(SEED + 0)
    batches = [torch.randint(0, 32, (2, 9)) for _ in range(8)]
    make = lambda m: GaLoreAdafactor(param_groups(m, rank=4, update_proj_gap=3), beta1=0.9)  # noqa: E731
    assert_resume_is_exact(TinyLM(dim=24, hidden=40), make, batches, split=4)


@pytest.mark.parametrize("options, match", [
    ({"lr": 1e-3}, "lr and relative_step=True"),
    ({"relative_step": False, "lr": 1e-3, "warmup_init": True}, "warmup_init=True requires relative_step=True"),
    ({"state_bits": 8}, "runs with state_bits=32"),
    ({"refresh_moments": "reset"}, "runs with refresh_moments='keep'"),
    ({"clip_threshold": 0.0}, "clip_threshold must be > 0"),
])
def test_refusals(options, match):
    with pytest.raises(ValueError, match=match):
        GaLoreAdafactor([{"params": [torch.nn.Parameter(torch.randn(8, 6))], "rank": 2}], **options)


def test_staggered_refreshes(monkeypatch):
    from lrtrain.optim import subspace

    refreshed = []
    original = subspace.refresh_basis
    monkeypatch.setattr(subspace, "refresh_basis", lambda group, plan, *a: refreshed.append(plan.index) or
                        original(group, plan, *a))
    params = [torch.nn.Parameter(torch.randn(12, 10)) for _ in range(4)]
    opt = GaLoreAdafactor([{"params": params, "rank": 3, "update_proj_gap": 4}], stagger_refresh=True)
    for _ in range(9):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert sorted(refreshed) == sorted([0, 1, 2, 3] + [0, 0, 1, 1, 2, 2, 3, 3])  # each after 4-i, then 4 steps
