"""convert() / to_dense() on whole models, and the parameterizations inside the training harness."""

import pytest
import torch
from torch import nn

from lrtrain.models import build_model
from lrtrain.param import SLTrainLinear, SSTLinear, conversion_summary, convert, to_dense

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
    torch.manual_seed(1)
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
