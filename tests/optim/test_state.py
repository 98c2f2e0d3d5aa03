"""State is tensors only: save -> torch.load(weights_only=True) -> load into a fresh optimizer,
mid-run and past a refresh, then continue == the run that never stopped, bit for bit."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F

from lrtrain.optim import FiraAdamW, FrugalAdamW, GaLoreAdamW, param_groups
from tests.conftest import TinyLM

CASES = [
    (GaLoreAdamW, {}),
    (GaLoreAdamW, {"proj_method": "random"}),
    (FiraAdamW, {}),
    (FiraAdamW, {"proj_method": "coordinates", "proj_type": "reverse_std"}),
    (FrugalAdamW, {}),
    (FrugalAdamW, {"proj_method": "coordinates"}),
    (FrugalAdamW, {"rank": None, "density": 0.5, "proj_method": "blocks", "block_order": "random"}),
]


def _loss(model, tokens):
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def _train(model, opt, batches):
    for tokens in batches:
        opt.zero_grad()
        _loss(model, tokens).backward()
        opt.step()


def _build(model, cls, keys):
    groups = param_groups(model, **{"rank": 5, "update_proj_gap": 3, **keys})
    return cls(groups, lr=1e-2, weight_decay=0.01)


def _roundtrip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("cls,keys", CASES, ids=lambda x: getattr(x, "__name__", None) or str(x))
def test_resume_is_bit_exact(cls, keys):
    batches = [torch.randint(0, 32, (4, 10)) for _ in range(11)]
    model = TinyLM()
    start = copy.deepcopy(model.state_dict())
    opt = _build(model, cls, keys)
    _train(model, opt, batches)

    interrupted = TinyLM()
    interrupted.load_state_dict(start)
    opt_a = _build(interrupted, cls, keys)
    _train(interrupted, opt_a, batches[:7])  # refreshes at steps 0, 3, 6: stop mid-gap after one
    saved = _roundtrip({"model": interrupted.state_dict(), "optim": opt_a.state_dict()})

    resumed = TinyLM()
    resumed.load_state_dict(saved["model"])
    opt_b = _build(resumed, cls, keys)
    opt_b.load_state_dict(saved["optim"])
    _train(resumed, opt_b, batches[7:])
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    # and the run really trained
    assert not torch.equal(model.lm_head.weight, start["lm_head.weight"])


def _flatten(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _flatten(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _flatten(v)
    else:
        yield value


@pytest.mark.parametrize("cls,keys", CASES, ids=lambda x: getattr(x, "__name__", None) or str(x))
def test_state_holds_tensors_only(cls, keys):
    model = TinyLM()
    opt = _build(model, cls, keys)
    _train(model, opt, [torch.randint(0, 32, (2, 6))])
    for leaf in _flatten(opt.state_dict()["state"]):
        assert isinstance(leaf, torch.Tensor), type(leaf)


@pytest.mark.parametrize("keys, stored", [
    ({}, torch.bfloat16),  # basis_dtype = moment_dtype = "param": galore-torch's bf16 state
    ({"moment_dtype": "float32", "basis_dtype": "float32"}, torch.float32),
])
def test_bf16_params_keep_their_state_dtypes_across_load(keys, stored):
    model = TinyLM().to(torch.bfloat16)
    opt = _build(model, GaLoreAdamW, keys)
    batches = [torch.randint(0, 32, (4, 8)) for _ in range(4)]
    before = model.layers[0].mlp["up_proj"].weight.detach().clone()
    _train(model, opt, batches)
    up = model.layers[0].mlp["up_proj"].weight
    assert not torch.equal(up, before) and torch.isfinite(up.float()).all()
    assert {opt.state[up][key].dtype for key in ("basis", "exp_avg", "exp_avg_sq")} == {stored}

    fresh = copy.deepcopy(model)
    opt2 = _build(fresh, GaLoreAdamW, keys)
    opt2.load_state_dict(_roundtrip(opt.state_dict()))
    up2 = fresh.layers[0].mlp["up_proj"].weight
    for key in ("basis", "exp_avg", "exp_avg_sq"):
        assert opt2.state[up2][key].dtype == stored
        assert torch.equal(opt2.state[up2][key], opt.state[up][key])
    emb2 = fresh.embed_tokens.weight
    assert opt2.state[emb2]["exp_avg"].dtype == torch.bfloat16  # plain groups follow torch.optim
    _train(model, opt, batches[:2])
    _train(fresh, opt2, batches[:2])
    assert torch.equal(up, up2)


def test_coordinate_indices_and_seed_survive_load():
    model = TinyLM()
    opt = _build(model, FrugalAdamW, {"proj_method": "coordinates"})
    _train(model, opt, [torch.randint(0, 32, (2, 6))])
    opt2 = _build(copy.deepcopy(model), FrugalAdamW, {"proj_method": "coordinates"})
    opt2.load_state_dict(_roundtrip(opt.state_dict()))
    for state in opt2.state.values():
        if "basis" in state:
            assert state["basis"].dtype == torch.int64
            assert state["seed"].dtype == torch.int64 and state["seed"].device.type == "cpu"
            assert state["step"].device.type == "cpu"
