"""SLTrainLinear: the dense formula and its gradients, what it keeps for backward, the support,
state dicts, conversion to/from nn.Linear, validation, and a tiny LLaMA that learns with it."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lrtrain.memory import TensorMemoryTracker
from lrtrain.models import build_model
from lrtrain.param.sltrain import SLTrainLinear, sltrain_linear


def dense_weight_autograd(layer: SLTrainLinear) -> torch.Tensor:
    """W = B A scale + S built from autograd ops (the naive implementation)."""
    S = torch.zeros(layer.out_features * layer.in_features, dtype=layer.A.dtype)
    S = S.index_add(0, layer.sparse_index, layer.sparse_value).view(layer.out_features, layer.in_features)
    return layer.B @ layer.A * layer.scale + S


def randomised(layer: SLTrainLinear) -> SLTrainLinear:
    """B = 0 at init would make the low-rank part (and dA) vanish: give it random values."""
    with torch.no_grad():
        layer.B.normal_()
    return layer


@pytest.mark.parametrize("in_f, out_f, rank, bias, lead", [
    (37, 29, 5, True, (5,)), (37, 29, 5, False, (3, 7)), (13, 41, 3, True, (2, 3, 4)), (50, 11, 10, False, ()),
])
def test_forward_and_gradients_equal_the_dense_formula(in_f, out_f, rank, bias, lead):
    layer = randomised(SLTrainLinear(in_f, out_f, rank, sparsity=0.1, alpha=7.0, bias=bias, seed=3,
                                     dtype=torch.float64))
    x = torch.randn(*lead, in_f, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(*lead, out_f, dtype=torch.float64)
    params = [x, *layer.parameters()]

    y = layer(x)
    grads = torch.autograd.grad(y, params, dy)
    y_ref = F.linear(x, dense_weight_autograd(layer), layer.bias)
    grads_ref = torch.autograd.grad(y_ref, params, dy)

    assert y.shape == (*lead, out_f)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-11)


def test_gradcheck_tiny():
    layer = randomised(SLTrainLinear(6, 5, 2, sparsity=0.3, bias=True, dtype=torch.float64))
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)

    def fn(x, A, B, values, bias):
        return sltrain_linear(x, A, B, values, layer.sparse_index, bias, layer.scale)

    assert torch.autograd.gradcheck(fn, (x, layer.A, layer.B, layer.sparse_value, layer.bias))


def bytes_held_between_passes(forward, x: torch.Tensor, module: nn.Module) -> int:
    """Bytes of tensors created by ``forward(x)`` that are still alive after it returned, apart from
    the output: what autograd keeps for the backward pass."""
    tracker = TensorMemoryTracker()
    tracker.track(x, *module.parameters(), *module.buffers())
    before = tracker.current
    with tracker:
        y = forward(x)
    held = tracker.current - before - y.untyped_storage().nbytes()
    y.sum().backward()  # the graph is complete
    return held


def test_keeps_no_dense_weight_between_forward_and_backward():
    in_f, out_f = 96, 80
    layer = randomised(SLTrainLinear(in_f, out_f, 8, sparsity=0.05))
    linear = nn.Linear(in_f, out_f, bias=False)
    x = torch.randn(4, 9, in_f, requires_grad=True)

    held_linear = bytes_held_between_passes(linear, x, linear)
    held_sltrain = bytes_held_between_passes(layer, x, layer)
    held_naive = bytes_held_between_passes(lambda x: F.linear(x, dense_weight_autograd(layer)), x, layer)

    dense_bytes = out_f * in_f * 4
    assert held_sltrain <= held_linear
    assert held_naive >= held_linear + dense_bytes  # the measurement sees a kept (out, in) W


def test_support_is_int32_distinct_seeded_and_of_the_right_density():
    in_f, out_f, sparsity = 53, 31, 0.07
    layer = SLTrainLinear(in_f, out_f, 4, sparsity=sparsity, seed=11)
    index = layer.sparse_index
    nnz = int(sparsity * in_f * out_f)
    assert index.dtype == torch.int32 and index.shape == (nnz,) == layer.sparse_value.shape
    assert torch.unique(index).numel() == nnz and bool((index[1:] > index[:-1]).all())
    assert 0 <= int(index.min()) and int(index.max()) < in_f * out_f
    expected = torch.randperm(in_f * out_f, generator=torch.Generator().manual_seed(11))[:nnz].sort().values
    assert torch.equal(index.long(), expected)
    assert torch.equal(SLTrainLinear(in_f, out_f, 4, sparsity=sparsity, seed=11).sparse_index, index)
    assert not torch.equal(SLTrainLinear(in_f, out_f, 4, sparsity=sparsity, seed=12).sparse_index, index)
    assert "sparse_index" in layer.state_dict()
    assert {name for name, _ in layer.named_parameters()} == {"A", "B", "sparse_value"}


def test_state_dict_round_trip_keeps_support_and_values():
    source = randomised(SLTrainLinear(23, 19, 3, sparsity=0.2, bias=True, seed=1))
    target = SLTrainLinear(23, 19, 3, sparsity=0.2, bias=True, seed=2)
    assert not torch.equal(source.sparse_index, target.sparse_index)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    target.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(6, 23)
    assert torch.equal(target.sparse_index, source.sparse_index) and target.sparse_index.dtype == torch.int32
    assert torch.equal(target(x), source(x))


def test_to_linear_keeps_the_function():
    layer = randomised(SLTrainLinear(45, 27, 6, bias=True))
    linear = layer.to_linear()
    assert isinstance(linear, nn.Linear) and linear.bias is not None and linear.weight.dtype == torch.float32
    x = torch.randn(3, 5, 45)
    assert (linear(x) - layer(x)).abs().max() <= 1e-5


@pytest.mark.parametrize("bias, dtype", [(True, torch.float64), (False, torch.float32)])
def test_from_linear_takes_sizes_bias_and_dtype_but_not_the_weights(bias, dtype):
    linear = nn.Linear(33, 21, bias=bias, dtype=dtype)
    layer = SLTrainLinear.from_linear(linear, rank=4, sparsity=0.1, alpha=8.0, seed=5)
    assert (layer.in_features, layer.out_features, layer.rank, layer.alpha) == (33, 21, 4, 8.0)
    assert (layer.bias is not None) == bias and layer.A.dtype == dtype and layer.sparse_value.dtype == dtype
    assert torch.equal(layer.B, torch.zeros(21, 4, dtype=dtype))  # own init: W = S
    W = layer.dense_weight()
    assert int((W != 0).sum()) <= layer.nnz and not torch.allclose(W, linear.weight)


@pytest.mark.parametrize("kwargs, match", [
    ({"rank": 0}, "rank"), ({"rank": 20}, "smaller rank or keep nn.Linear"), ({"rank": 25}, "rank"),
    ({"sparsity": 0.0}, "sparsity"), ({"sparsity": 1.0}, "sparsity"), ({"alpha": 0.0}, "alpha"),
    ({"in_features": 0}, "in_features"), ({"out_features": -3}, "out_features"),
])
def test_validation(kwargs, match):
    args = {"in_features": 30, "out_features": 20, "rank": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        SLTrainLinear(**args)


def test_autocast_bf16_runs_and_keeps_fp32_gradients(tolerance):
    layer = randomised(SLTrainLinear(40, 24, 4, bias=True))
    x = torch.randn(2, 5, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    reference = randomised(SLTrainLinear(40, 24, 4, bias=True))
    reference.load_state_dict(layer.state_dict())
    reference(x).square().sum().backward()
    for got, want in zip(layer.parameters(), reference.parameters(), strict=True):
        assert got.grad.dtype == torch.float32
        tolerance.close("bf16-autocast gradient", got.grad, want.grad, rtol=0.05, atol=0.05 * float(want.grad.abs().max()))


def replace_linears(model: nn.Module, make) -> int:
    """Replace the attention and MLP nn.Linear modules by ``make(linear, position)``; returns how many."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and (".self_attn." in n or ".mlp." in n)]
    for position, name in enumerate(names):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, make(model.get_submodule(name), position))
    return len(names)


def test_tiny_llama_learns_with_sltrain_layers():
    model = build_model("llama_tiny", vocab_size=64, max_position_embeddings=32)
    assert replace_linears(model, lambda lin, i: SLTrainLinear.from_linear(lin, rank=16, seed=i)) == 28
    assert not any(isinstance(m, nn.Linear) for n, m in model.named_modules() if ".layers." in n)
    tokens = torch.randint(64, (8, 25), generator=torch.Generator().manual_seed(7))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses
    layers = [m for m in model.modules() if isinstance(m, SLTrainLinear)]
    assert all(float(m.B.detach().norm()) > 0 for m in layers)  # the low-rank parts learned too
