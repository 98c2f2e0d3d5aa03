"""convert() / to_dense() on whole models, and the parameterizations inside the training harness."""

import pytest
import torch
from torch import nn

from lrtrain.models import build_model
from lrtrain.param import SLTrainLinear, SSTLinear, conversion_summary, convert, to_dense
from tests.tolerance import SEED

LAYERS = {"sltrain": SLTrainLinear, "sst": SSTLinear}


def _model():
    return build_model("llama_tiny", vocab_size=61, max_position_embeddings=24)


@pytest.mark.parametrize("kind", ["sltrain", "sst"])
def test_convert_replaces_the_selected_linears(kind):
    model = _model()
    assert convert(model, kind, target_modules=["attn", "mlp"], rank=16) is model
    converted = {n for n, m in model.named_modules() if isinstance(m, LAYERS[kind])}
    assert len(converted) == 7 * 4 and all(("self_attn" in n or "mlp" in n) for n in converted)
    assert isinstance(model.lm_head, nn.Linear)
    assert not any(isinstance(m, nn.Linear) for n, m in model.named_modules() if n in converted)
    table = conversion_summary(model)
    assert table.splitlines()[0].split()[:3] == ["module", "layer", "out", "x", "in"][:3]
    assert "model.layers.0.mlp.down_proj" in table and table.splitlines()[-1].startswith("total")
    assert len(table.splitlines()) == 2 + 28 + 1


def test_sst_conversion_keeps_the_function():
    torch.manual_seed(SEED + 1)
    model = _model()
    tokens = torch.randint(0, 61, (2, 24))
    before = model(tokens)
    convert(model, "sst", rank=8)
    torch.testing.assert_close(model(tokens), before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["sltrain", "sst"])
def test_to_dense_keeps_the_function(kind):
    model = convert(_model(), kind, rank=8)
    with torch.no_grad():  # move away from the initialisation, so the export is not trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    tokens = torch.randint(0, 61, (3, 17))
    before = model(tokens)
    dense = to_dense(model)
    assert not any(isinstance(m, tuple(LAYERS.values())) for m in dense.modules())
    assert sum(isinstance(m, nn.Linear) for m in dense.modules()) == 29
    torch.testing.assert_close(dense(tokens), before, rtol=1e-5, atol=1e-5)
    assert to_dense(dense) is dense  # nothing left to convert


def test_per_layer_seeds_differ_and_repeat():
    a = convert(_model(), "sltrain", rank=8, seed=3)
    b = convert(_model(), "sltrain", rank=8, seed=3)
    c = convert(_model(), "sltrain", rank=8, seed=4)
    q_a, k_a = a.model.layers[0].self_attn.q_proj, a.model.layers[0].self_attn.k_proj
    assert torch.equal(q_a.sparse_index, b.model.layers[0].self_attn.q_proj.sparse_index)
    assert not torch.equal(q_a.sparse_index, k_a.sparse_index)
    assert not torch.equal(q_a.sparse_index, c.model.layers[0].self_attn.q_proj.sparse_index)


def test_bad_input():
    with pytest.raises(ValueError, match="kind must be one of"):
        convert(_model(), "lora", rank=8)
    with pytest.raises(ValueError, match="selects no nn.Linear"):
        convert(_model(), "sst", target_modules=["attention"], rank=8)
    with pytest.raises(ValueError, match="not nn.Linear.*embed_tokens"):
        convert(_model(), "sltrain", target_modules=["embed", "mlp"], rank=8)
    with pytest.raises(ValueError, match="rank"):
        convert(_model(), "sltrain", rank=128)  # llama_tiny's hidden size
    with pytest.raises(ValueError, match="sparsity"):
        convert(_model(), "sltrain", rank=8, sparsity=1.5)


@pytest.mark.parametrize("kind,optimizer", [("sltrain", "galore"), ("sst", "fira"), ("sltrain", "frugal")])
def test_lrtrain_optimizers_train_converted_models(kind, optimizer):
    """The MLPs as SLTrain/SST layers, the attention projected by a subspace optimizer (or, for
    FRUGAL, its block mode over every tensor of the group)."""
    from lrtrain.optim import FiraAdamW, FrugalAdamW, GaLoreAdamW, param_groups
    from lrtrain.param import SSTController

    torch.manual_seed(SEED + 0)
    model = convert(_model(), kind, target_modules=["mlp"], rank=8)
    if optimizer == "frugal":
        opt = FrugalAdamW([{"params": list(model.parameters()), "density": 0.5, "proj_method": "blocks",
                            "update_proj_gap": 5}], lr=3e-3)
    else:
        groups = param_groups(model, target_modules=["self_attn"], rank=8, update_proj_gap=5)
        opt = {"galore": GaLoreAdamW, "fira": FiraAdamW}[optimizer](groups, lr=1e-2)
        assert len(groups[1]["params"]) == 4 * 4  # q, k, v, o of 4 layers are projected
    controller = SSTController(model, opt, sample_every=5) if kind == "sst" else None
    tokens = torch.randint(0, 61, (8, 25))
    losses = []
    for _ in range(25):
        loss = nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if controller is not None:
            controller.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses
