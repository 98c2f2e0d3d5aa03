"""SSTLinear and SSTController: the SVD parameterisation, SST's Σ-free gradients, frozen parts,
sampling / re-SVD / optimizer-state resets, exact resume, and a tiny LLaMA that learns with it."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lrtrain.models import build_model
from lrtrain.param.sst import SSTController, SSTLinear
from tests.conftest import TinyLM

F64 = torch.float64


def formula_weight(layer: SSTLinear) -> torch.Tensor:
    """U diag(s ⊙ (1 − m)) Vᵀ + U_active diag(s[active]) V_activeᵀ by autograd ops."""
    mask = torch.zeros_like(layer.s).index_fill(0, layer.active_index, 1.0)
    frozen = (layer.U * (layer.s * (1 - mask))) @ layer.V.t()
    return frozen + (layer.U_active * layer.s[layer.active_index]) @ layer.V_active.t()


def perturbed(layer: SSTLinear) -> SSTLinear:
    """Move the trainable parts off the SVD, so active columns differ from their stale buffer copies."""
    with torch.no_grad():
        for p in (layer.s, layer.U_active, layer.V_active):
            p.add_(0.3 * torch.randn_like(p))
    return layer


def replace_linears(model: nn.Module, make) -> int:
    """Replace the attention and MLP nn.Linear modules by ``make(linear, position)``; returns how many."""
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and {"self_attn", "attn", "mlp"} & set(n.split("."))]
    for position, name in enumerate(names):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, make(model.get_submodule(name), position))
    return len(names)


def sst_model(rank: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = TinyLM(vocab=32, dim=24, hidden=40, layers=2)
    replace_linears(model, lambda lin, i: SSTLinear.from_linear(lin, rank=rank, seed=i))
    return model


def train_steps(model, optimizer, controller: SSTController | None, steps: range) -> None:
    for step in steps:
        tokens = torch.randint(32, (4, 9), generator=torch.Generator().manual_seed(step))
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if controller is not None:
            controller.step()


def sst_layers(model: nn.Module) -> list[SSTLinear]:
    return [m for m in model.modules() if isinstance(m, SSTLinear)]


@pytest.mark.parametrize("in_f, out_f", [(37, 29), (19, 44)])
def test_function_equals_the_dense_weight_at_init_and_from_linear(in_f, out_f):
    torch.manual_seed(4)
    layer = SSTLinear(in_f, out_f, 5)
    torch.manual_seed(4)
    reference = nn.Linear(in_f, out_f, bias=False)  # the same kaiming_uniform(a=√5) draw
    assert (layer.dense_weight() - reference.weight).abs().max() <= 1e-5

    linear = nn.Linear(in_f, out_f, bias=True)
    layer = SSTLinear.from_linear(linear, rank=3, seed=1)
    x = torch.randn(3, 7, in_f)
    assert layer.bias is not None and layer.s.dtype == torch.float32
    assert (layer(x) - linear(x)).abs().max() <= 1e-5
    assert (layer.to_linear()(x) - linear(x)).abs().max() <= 1e-5


@pytest.mark.parametrize("in_f, out_f, rank, bias, lead", [
    (23, 17, 4, True, (3, 7)), (23, 17, 4, False, (5,)), (11, 30, 11, True, (2, 2, 3)),
])
def test_forward_formula_sigma_free_gradients_and_true_s_gradient(in_f, out_f, rank, bias, lead):
    layer = perturbed(SSTLinear(in_f, out_f, rank, bias=bias, seed=2, dtype=F64))
    x = torch.randn(*lead, in_f, dtype=F64, requires_grad=True)
    dy = torch.randn(*lead, out_f, dtype=F64)
    y = layer(x)
    y.backward(dy)

    W = formula_weight(layer)
    y_ref = F.linear(x, W, layer.bias)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    wanted = [x, W, layer.s, layer.U_active, layer.V_active] + ([layer.bias] if bias else [])
    dx, dW, ds, dUa_true, dVa_true, *dbias = torch.autograd.grad(y_ref, wanted, dy)

    torch.testing.assert_close(x.grad, dx, rtol=0, atol=1e-11)
    torch.testing.assert_close(layer.s.grad, ds, rtol=0, atol=1e-10)
    torch.testing.assert_close(layer.U_active.grad, dW @ layer.V_active.detach(), rtol=0, atol=1e-10)
    torch.testing.assert_close(layer.V_active.grad, dW.t() @ layer.U_active.detach(), rtol=0, atol=1e-10)
    if bias:
        torch.testing.assert_close(layer.bias.grad, dbias[0], rtol=0, atol=1e-11)
    # the true gradients carry the factor s_i that SST drops
    s_active = layer.s.detach()[layer.active_index]
    torch.testing.assert_close(layer.U_active.grad * s_active, dUa_true, rtol=0, atol=1e-10)
    assert not torch.allclose(layer.U_active.grad, dUa_true)


def test_frozen_parts_have_no_gradient_and_no_optimizer_state():
    model = sst_model()
    layer = sst_layers(model)[0]
    assert {n for n, _ in layer.named_parameters()} == {"s", "U_active", "V_active"}
    assert set(layer.state_dict()) == {"U", "V", "s", "U_active", "V_active", "active_index", "sst_steps",
                                       "sst_iterations"}
    params = {id(p) for p in model.parameters()}
    assert all(id(b) not in params and not b.requires_grad for b in layer.buffers())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_steps(model, optimizer, SSTController(model, optimizer), range(1))
    assert layer.U.grad is None and layer.V.grad is None
    assert all(id(p) in params for p in optimizer.state)


def test_step_clamps_s_and_normalises_the_active_columns():
    model = sst_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    controller = SSTController(model, optimizer, sample_every=100)
    layer = sst_layers(model)[1]
    with torch.no_grad():
        layer.s[:3] = -1.0
    train_steps(model, optimizer, controller, range(2))
    for layer in sst_layers(model):
        assert bool((layer.s >= 0).all())
        for P in (layer.U_active, layer.V_active):
            torch.testing.assert_close(P.norm(dim=0), torch.ones(layer.rank), rtol=0, atol=1e-6)


def test_iteration_resamples_writes_back_and_resets_the_vectors_optimizer_state():
    model = sst_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.9))
    controller = SSTController(model, optimizer, sample_every=3, iterations_per_round=100)
    layers = sst_layers(model)
    train_steps(model, optimizer, controller, range(2))
    assert all(m.U_active in optimizer.state for m in layers)
    train_steps(model, optimizer, None, range(2, 3))  # step 3 without the controller, then:
    before = [(m.active_index.clone(), F.normalize(m.U_active.detach(), dim=0),
               F.normalize(m.V_active.detach(), dim=0)) for m in layers]
    controller.step()  # an iteration boundary
    changed = 0
    for m, (index, U_active, V_active) in zip(layers, before, strict=True):
        assert int(m.sst_steps) == 3 and int(m.sst_iterations) == 1
        new = m.active_index
        assert new.unique().numel() == m.rank and 0 <= int(new.min()) and int(new.max()) < m.k
        changed += not torch.equal(new, index)
        # the trained, normalised columns went back into U/V; the new ones came out
        torch.testing.assert_close(m.U[:, index], U_active, rtol=0, atol=1e-7)
        torch.testing.assert_close(m.V[:, index], V_active, rtol=0, atol=1e-7)
        assert torch.equal(m.U_active.detach(), m.U[:, new]) and torch.equal(m.V_active.detach(), m.V[:, new])
        assert m.U_active not in optimizer.state and m.V_active not in optimizer.state
        assert m.U_active.grad is None
        assert int(optimizer.state[m.s]["step"]) == 3  # s keeps its state
    assert changed == len(layers)
    train_steps(model, optimizer, controller, range(3, 4))
    m = layers[0]
    assert int(optimizer.state[m.U_active]["step"]) == 1 and int(optimizer.state[m.s]["step"]) == 4
    torch.testing.assert_close(optimizer.state[m.U_active]["exp_avg"], 0.2 * m.U_active.grad)


def test_round_re_svd_is_orthonormal_keeps_the_function_and_resets_s_state():
    model = sst_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    controller = SSTController(model, optimizer, sample_every=2, iterations_per_round=2)
    train_steps(model, optimizer, controller, range(3))
    layers = sst_layers(model)
    layer = layers[2]
    U_eff = layer.U.index_copy(1, layer.active_index, layer.U_active.detach())
    assert not torch.allclose(U_eff.t() @ U_eff, torch.eye(layer.k), atol=1e-4)  # training broke orthogonality
    optimizer.zero_grad()
    loss = model(torch.randint(32, (2, 5))).square().mean()
    loss.backward()
    optimizer.step()
    for m in layers:
        m.normalize_()  # what step() does first, so that only the re-SVD remains to compare
    dense_before = [m.dense_weight() for m in layers]
    controller.step()  # step 4: iteration 2 = a round boundary
    for m, dense in zip(layers, dense_before, strict=True):
        assert int(m.sst_iterations) == 2
        assert (m.dense_weight() - dense).abs().max() <= 1e-5
        for Q in (m.U, m.V):
            torch.testing.assert_close(Q.t() @ Q, torch.eye(m.k), rtol=0, atol=1e-5)
        assert bool((m.s[:-1] >= m.s[1:]).all()) and bool((m.s >= 0).all())
        assert m.s not in optimizer.state and m.U_active not in optimizer.state
        assert torch.equal(m.U_active.detach(), m.U[:, m.active_index])


def test_sampling_is_deterministic_and_mixes_uniform_and_singular_value_weights():
    a, b = sst_model(seed=1), sst_model(seed=1)
    c = copy.deepcopy(a)
    runs = []
    for model, seed in ((a, 0), (b, 0), (c, 5)):
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
        train_steps(model, optimizer, SSTController(model, optimizer, sample_every=2, seed=seed), range(2))
        runs.append([m.active_index.clone() for m in sst_layers(model)])
    assert all(torch.equal(x, y) for x, y in zip(runs[0], runs[1], strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(runs[0], runs[2], strict=True))

    layer = SSTLinear(8, 8, 1)
    with torch.no_grad():
        layer.s.copy_(torch.tensor([100.0, 0, 0, 0, 0, 0, 0, 0]))
    generator = torch.Generator().manual_seed(0)
    draws = torch.cat([layer.sample_active(generator) for _ in range(4000)])
    share = float((draws == 0).float().mean())
    assert abs(share - 0.5 * (1 / 8 + 1)) < 0.03, share  # p_0 = ½ (1/k + s_0 / Σ s)


def test_resume_from_state_dicts_is_bit_exact_across_iteration_and_round():
    def fresh(seed):
        model = sst_model(seed=seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        return model, optimizer, SSTController(model, optimizer, sample_every=3, iterations_per_round=2, seed=9)

    model, optimizer, controller = fresh(0)
    train_steps(model, optimizer, controller, range(4))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    train_steps(model, optimizer, controller, range(4, 10))  # iterations at 6 (a round) and 9

    resumed, resumed_optimizer, resumed_controller = fresh(1)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed.load_state_dict(saved["model"])
    resumed_optimizer.load_state_dict(saved["optimizer"])
    train_steps(resumed, resumed_optimizer, resumed_controller, range(4, 10))

    assert int(sst_layers(model)[0].sst_iterations) == 3
    for (name, want), got in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(got, want), name


def test_validation():
    with pytest.raises(ValueError, match="rank"):
        SSTLinear(10, 6, 0)
    with pytest.raises(ValueError, match="rank"):
        SSTLinear(10, 6, 7)
    with pytest.raises(ValueError, match="weight must have shape"):
        SSTLinear(10, 6, 2, weight=torch.randn(10, 6))
    with pytest.raises(ValueError, match="in_features"):
        SSTLinear(0, 6, 2)
    model = sst_model()
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="sample_every"):
        SSTController(model, optimizer, sample_every=0)
    with pytest.raises(ValueError, match="iterations_per_round"):
        SSTController(model, optimizer, iterations_per_round=0)
    with pytest.raises(ValueError, match="no SSTLinear"):
        SSTController(TinyLM(), optimizer)
    with pytest.raises(ValueError, match="optimizer does not hold"):
        SSTController(model, torch.optim.AdamW(model.embed_tokens.parameters()))


def test_optimizer_with_param_groups_is_accepted():
    model = sst_model()
    vectors = [p for m in sst_layers(model) for p in (m.U_active, m.V_active)]
    others = [p for p in model.parameters() if all(p is not v for v in vectors)]
    optimizer = torch.optim.AdamW([{"params": others}, {"params": vectors, "lr": 1e-3}], lr=1e-2)
    controller = SSTController(model, optimizer, sample_every=2)
    train_steps(model, optimizer, controller, range(2))
    assert all(v not in optimizer.state for v in vectors) and model.embed_tokens.weight in optimizer.state


def test_tiny_llama_learns_with_sst_layers():
    torch.manual_seed(0)
    model = build_model("llama_tiny", vocab_size=64, max_position_embeddings=32)
    assert replace_linears(model, lambda lin, i: SSTLinear.from_linear(lin, rank=16, seed=i)) == 28
    tokens = torch.randint(64, (8, 25), generator=torch.Generator().manual_seed(7))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    controller = SSTController(model, optimizer, sample_every=5, iterations_per_round=3)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        controller.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses
    assert all(int(m.sst_iterations) == 6 for m in sst_layers(model))
