"""Bad input gets a clear error naming the parameter or key and the fix."""

import warnings

import pytest
import torch

from lrtrain.optim import FiraAdamW, FrugalAdamW, GaLoreAdamW


def _w(*shape, dtype=torch.float32):
    return torch.nn.Parameter(torch.randn(*shape, dtype=dtype))


def test_one_dimensional_param_in_rank_group_names_it():
    with pytest.raises(ValueError, match=r"'norm.weight' has shape \(8,\).*without 'rank'"):
        GaLoreAdamW([{"params": [("norm.weight", _w(8))], "rank": 4}])
    with pytest.raises(ValueError, match=r"parameter 1 of param group 0 has shape \(3, 4, 5\)"):
        GaLoreAdamW([{"params": [_w(6, 6), _w(3, 4, 5)], "rank": 2}])


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int64])
def test_non_floating_param_in_rank_group(dtype):
    p = torch.zeros(4, 4, dtype=dtype)
    if dtype.is_complex:
        p = torch.nn.Parameter(p)
    with pytest.raises(TypeError, match="real floating-point"):
        GaLoreAdamW([{"params": [p], "rank": 2}])


@pytest.mark.parametrize("rank", [0, -3, 2.5, True])
def test_bad_rank(rank):
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        GaLoreAdamW([{"params": [_w(4, 4)], "rank": rank}])


def test_rank_above_min_dim_is_clamped_with_one_warning():
    params = [("a", _w(10, 4)), ("b", _w(3, 12)), ("c", _w(20, 20))]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = GaLoreAdamW([{"params": params, "rank": 8}])
    clamp = [w for w in caught if "exceeds min(m, n)" in str(w.message)]
    assert len(clamp) == 1 and "2 parameter(s)" in str(clamp[0].message) and "'a' (10, 4)" in str(clamp[0].message)
    for _, p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[params[0][1]]["exp_avg"].shape == (10, 4)  # right side, rank 4
    assert opt.state[params[1][1]]["exp_avg"].shape == (3, 12)  # left side, rank 3


@pytest.mark.parametrize(
    "key,value,match",
    [("proj_type", "full", "proj_type must be one of"), ("proj_method", "qr", "proj_method must be one of"),
     ("residual", "adam", "residual must be one of"), ("refresh_moments", "rotate", "refresh_moments must be one of"),
     ("adam_style", "keras", "adam_style must be one of"), ("update_proj_gap", 0, "update_proj_gap must be"),
     ("update_proj_gap", 2.0, "update_proj_gap must be"), ("on_nonfinite", "ignore", "on_nonfinite must be one of"),
     ("limiter_gamma", 0.5, "limiter_gamma must be >= 1"), ("scale", -1.0, "scale must be >= 0"),
     ("block_order", "shuffle", "block_order must be one of")],
)
def test_bad_group_values(key, value, match):
    with pytest.raises(ValueError, match=match):
        GaLoreAdamW([{"params": [_w(6, 6)], "rank": 2, key: value}])
    with pytest.raises(ValueError, match=match):  # the same check on constructor defaults
        GaLoreAdamW([_w(6, 6)], **{key: value})


@pytest.mark.parametrize(
    "kwargs,match",
    [({"lr": -1e-3}, "lr must be >= 0"), ({"betas": (1.0, 0.999)}, r"betas\[0\] must be in \[0, 1\)"),
     ({"betas": (0.9, -0.1)}, r"betas\[1\]"), ({"eps": -1.0}, "eps must be >= 0"),
     ({"weight_decay": -0.1}, "weight_decay must be >= 0")],
)
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FiraAdamW([_w(3, 3)], **kwargs)
    with pytest.raises(ValueError, match=match):
        FiraAdamW([{"params": [_w(3, 3)], **kwargs}])


@pytest.mark.parametrize("key,suggestion", [("rnak", "rank"), ("update_proj_gaps", "update_proj_gap"),
                                            ("scael", "scale"), ("proj_tpye", "proj_type"),
                                            ("update_prj_gap", "update_proj_gap"), ("weight_decy", "weight_decay"),
                                            ("rnk", "rank"), ("beta", "betas")])
def test_misspelled_group_key_names_the_known_one(key, suggestion):
    with pytest.raises(ValueError, match=f"unknown param-group key '{key}': did you mean '{suggestion}'"):
        GaLoreAdamW([{"params": [_w(4, 4)], "rank": 2, key: 1}])


@pytest.mark.parametrize("key", ["lr_scale", "weight_decay_scale", "param_name", "ranks", "initial_lr", "layer_name",
                                 "is_proj_params", "scales", "update_gap"])
def test_other_extra_keys_are_kept(key):
    """Keys other code puts in groups (layer-wise lr decay, trainers' names, schedulers) are kept, as
    torch.optim keeps them; only near-certain typos of lrtrain's own keys are refused."""
    for group in ({"params": [_w(4, 4)], "rank": 2, key: 0.5}, {"params": [_w(4)], key: 0.5}):
        opt = GaLoreAdamW([group])
        assert opt.param_groups[0][key] == 0.5


def test_unknown_constructor_option():
    with pytest.raises(TypeError, match="unknown option 'rank_gap'"):
        GaLoreAdamW([_w(3, 3)], rank_gap=3)
    with pytest.raises(TypeError, match="did you mean 'update_proj_gap'"):
        GaLoreAdamW([_w(3, 3)], update_proj_gp=3)


def test_aliases():
    opt = FiraAdamW([{"params": [_w(5, 5)], "rank": 2, "alpha": 0.5}])
    assert opt.param_groups[0]["scale"] == 0.5 and "alpha" not in opt.param_groups[0]
    opt = FrugalAdamW([{"params": [_w(5, 5)], "rank": 2, "state_free": "sgd"}])
    assert opt.param_groups[0]["residual"] == "sgd"
    with pytest.raises(ValueError, match="not both"):
        FiraAdamW([{"params": [_w(5, 5)], "rank": 2, "alpha": 0.5, "scale": 0.3}])


def test_rank_and_density_rules():
    with pytest.raises(ValueError, match="'rank' or 'density', not both"):
        FrugalAdamW([{"params": [_w(5, 5)], "rank": 2, "density": 0.5}])
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        FrugalAdamW([{"params": [_w(5, 5)], "density": 0.0}])
    with pytest.raises(ValueError, match="give 'density'"):
        FrugalAdamW([{"params": [_w(5, 5)], "rank": 2, "proj_method": "blocks"}])
    with pytest.raises(ValueError, match="residual='fira' needs a subspace"):
        FrugalAdamW([{"params": [_w(5, 5)], "density": 0.5, "proj_method": "blocks", "residual": "fira"}])
    with pytest.raises(ValueError, match="mirror"):
        FrugalAdamW([{"params": [_w(2, 2) for _ in range(6)], "density": 0.5, "proj_method": "blocks",
                      "block_order": "mirror"}])
    FrugalAdamW([{"params": [_w(5)], "density": 0.0, "proj_method": "blocks"}])  # all state-free: allowed


def test_sparse_gradient_is_refused_by_name():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = GaLoreAdamW([{"params": [("embed.weight", emb.weight)]}])
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="'embed.weight' has a sparse gradient.*sparse=False"):
        opt.step()


def test_params_without_grad_are_skipped():
    a, b = _w(6, 4), _w(6, 4)
    opt = GaLoreAdamW([{"params": [a, b], "rank": 2}])
    a.grad = torch.randn_like(a)
    before = b.detach().clone()
    opt.step()
    assert b not in opt.state or not opt.state[b]
    assert torch.equal(b, before)
