"""The engine's tables: a residual rule is one entry of the rule table (validation, the torch path and
the fused-path coverage all read it); every option is one field of the option schema (its default,
its check and its README row all come from it)."""

import dataclasses
from pathlib import Path

import pytest
import torch

from lrtrain.optim import SubspaceAdamW, param_groups
from lrtrain.optim.engine import options
from lrtrain.optim.engine.options import ENGINE_OPTIONS, Combination, GroupOptions, option_choices, options_table
from lrtrain.optim.projector import add_project_back_
from lrtrain.optim.subspace import RESIDUAL_RULES, ResidualRule, state_free_lr
from tests.conftest import TinyLM, train_lm


def _half_sgd_update_(weight, step, group, state):
    """A toy rule: GaLore's update plus half of FRUGAL's SGD step on the residual G - back(R)."""
    add_project_back_(weight, step.direction, step.basis, step.side, alpha=-step.step_size * group["scale"])
    half = state_free_lr(step.lr, group) * 0.5
    weight.add_(step.grad, alpha=-half)
    add_project_back_(weight, step.low, step.basis, step.side, alpha=half)


@pytest.fixture
def half_sgd(monkeypatch):
    monkeypatch.setitem(RESIDUAL_RULES, "half_sgd", ResidualRule(_half_sgd_update_, kernel=None))


def _trained(**keys):
    torch.manual_seed(0)
    model = TinyLM()
    optimizer = SubspaceAdamW(param_groups(model, rank=4, update_proj_gap=2, **keys), lr=1e-2)
    batches = [torch.randint(0, 32, (4, 9), generator=torch.Generator().manual_seed(i)) for i in range(5)]
    train_lm(model, optimizer, batches)
    return model


def test_a_new_rule_is_one_table_entry(half_sgd):
    """Validated, run on the torch path, and equal to the built-in rule it spells out (sgd at half rate)."""
    toy, sgd = _trained(residual="half_sgd"), _trained(residual="sgd", state_free_lr_scale=0.5)
    for p, q in zip(toy.parameters(), sgd.parameters()):
        assert torch.equal(p, q)
    galore = _trained(residual="none")
    assert not all(torch.equal(p, q) for p, q in zip(toy.parameters(), galore.parameters()))


def test_the_table_drives_validation(half_sgd):
    model = TinyLM()
    with pytest.raises(ValueError, match="'half_sgd'"):  # the choices listed come from the table
        SubspaceAdamW(param_groups(model, rank=4, residual="half_sgdd"))
    with pytest.raises(ValueError, match="needs an orthonormal basis"):
        SubspaceAdamW(param_groups(model, rank=4, residual="half_sgd", proj_method="gaussian"))
    with pytest.raises(ValueError, match="fused=True covers"):  # no kernel form: torch path only
        SubspaceAdamW(param_groups(model, rank=4, residual="half_sgd", fused=True))


OPTIONS = dataclasses.fields(GroupOptions)


def _bad_value(option: dataclasses.Field):
    """A value the option refuses: outside its choices, a non-bool for a flag, below its least value."""
    if option_choices(option.name) is not None:
        return "no-such-value", "must be one of"
    if isinstance(option.default, bool):
        return 1, "must be True or False"
    low = option.metadata["low"]
    if low is not None:
        return low - 1, f"must be .*>= {low}"
    return "text", "must be an integer" if option.type == "int" else "must be a number"


@pytest.mark.parametrize("option", OPTIONS, ids=lambda f: f.name)
def test_every_option_is_checked_from_its_field(option):
    """Each option refuses what its field says it does not take, by name, in a group and as a default."""
    value, message = _bad_value(option)
    with pytest.raises(ValueError, match=f"{option.name} {message}"):
        SubspaceAdamW(param_groups(TinyLM(), rank=4, **{option.name: value}))
    with pytest.raises(ValueError, match=f"{option.name} {message}"):
        SubspaceAdamW(param_groups(TinyLM(), rank=4), **{option.name: value})


def test_defaults_and_readme_come_from_the_schema():
    assert ENGINE_OPTIONS == {f.name: f.default for f in OPTIONS}
    assert all(f.metadata["doc"] for f in OPTIONS)
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert options_table() in readme, "README's key table is stale: paste lrtrain.optim.engine.options.options_table()"


def test_a_refused_combination_is_one_table_entry(monkeypatch):
    """Which option combinations are valid is declared in one table: an entry added there is refused,
    with its message, for the defaults and for a group alike."""
    keys = {"residual": "sgd", "stagger_refresh": True}
    SubspaceAdamW(param_groups(TinyLM(), rank=4, **keys))  # valid as the engine ships
    toy = Combination(lambda g: g["residual"] == "sgd" and g["stagger_refresh"],
                      lambda g: "toy: residual='sgd' does not stagger")
    monkeypatch.setattr(options, "COMBINATIONS", (*options.COMBINATIONS, toy))
    with pytest.raises(ValueError, match="toy: residual='sgd' does not stagger"):
        SubspaceAdamW(param_groups(TinyLM(), rank=4, **keys))
    with pytest.raises(ValueError, match="toy: residual='sgd' does not stagger"):
        SubspaceAdamW(param_groups(TinyLM(), rank=4), **keys)
