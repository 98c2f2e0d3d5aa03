"""configs/optimizer: every optimizer's keys and defaults come from its signature and the engine's schema
(hydra's ConfigStore), and each file keeps only what differs from them."""

import copy
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lrtrain.optim import GaLoreAdafactor, param_groups
from lrtrain.train.optimizers import OPTIMIZERS, build_optimizer, optimizer_defaults, without_defaults
from lrtrain.train.run import fingerprint
from tests.conftest import TinyLM
from tests.train.test_harness import config

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "optimizer"


def _group_settings(optimizer: torch.optim.Optimizer) -> list[dict]:
    return [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_file_keeps_only_what_differs(name):
    raw = OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{name}.yaml"), resolve=False)
    assert raw.pop("defaults") == [f"/schema/optimizer/{name}@_here_", "_self_"]
    defaults = optimizer_defaults(name)
    restated = [key for key, value in raw.items() if key in defaults and value == defaults[key]]
    assert not restated, f"{name}.yaml restates the defaults of {restated}"
    composed = config(f"optimizer={name}")["optimizer"]
    assert set(defaults) <= set(composed) and composed["name"] == name


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_the_defaults_are_what_the_optimizer_uses(name):
    """Building from the written-out defaults gives the same groups as leaving every key out."""
    given = {} if name.startswith("adamw") else {"rank": 4}
    left_out = build_optimizer({"name": name, **given}, TinyLM())
    written_out = build_optimizer({**optimizer_defaults(name), **given}, TinyLM())
    assert _group_settings(written_out) == _group_settings(left_out)
    assert written_out.defaults == left_out.defaults


def test_every_option_is_overridden_without_plus():
    cfg = config("optimizer=galore", "optimizer.adam_style=torch", "optimizer.state_bits=8")["optimizer"]
    assert (cfg["adam_style"], cfg["state_bits"], cfg["proj_method"]) == ("torch", 8, "svd")


def test_defaults_written_out_keep_the_fingerprint():
    cfg = config("optimizer=frugal")
    short = copy.deepcopy(cfg)
    short["optimizer"] = without_defaults(cfg["optimizer"])
    assert set(short["optimizer"]) == {"name", "weight_decay", "rank", "density", "proj_method", "block_order",
                                      "scale"}
    assert fingerprint(short) == fingerprint(cfg)
    changed = copy.deepcopy(cfg)
    changed["optimizer"]["state_bits"] = 8
    assert fingerprint(changed) != fingerprint(cfg)


def test_adafactor_takes_its_floor_as_eps():
    with pytest.raises(TypeError, match=r"eps_scale as eps=\(ε1, ε2\)"):
        GaLoreAdafactor(param_groups(TinyLM(), rank=4), eps_scale=1e-2)


def test_the_report_estimates_each_method_at_scale():
    """The comparison report's 1B / 7B columns are the estimator's figures for the run's method and options."""
    from lrtrain.memory import estimate
    from lrtrain.train.report import estimated_at_scale

    galore = estimated_at_scale(config("method=galore"))
    assert galore["state at 1B"] == estimate("llama_1b", method="galore")["optimizer_state"] / 1e9
    eight = estimated_at_scale(config("method=galore8bit_layerwise", "optimizer.basis_dtype=int4"))
    assert eight["peak at 7B"] == estimate("llama_7b", method="galore", state_bits=8, layerwise=True,
                                           basis_dtype="int4")["peak"] / 1e9
    adamw, sltrain = estimated_at_scale(config("method=adamw")), estimated_at_scale(config("method=sltrain"))
    assert eight["peak at 7B"] < galore["peak at 7B"] < adamw["peak at 7B"]
    assert sltrain["state at 7B"] < adamw["state at 7B"]
