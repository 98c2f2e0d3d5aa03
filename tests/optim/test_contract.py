"""The torch.optim contract where users' loops lean on it: loading other optimizers' and other
dtypes' state, old state dicts, add_param_group, complex parameters, momentum-cycling schedulers."""

import io

import pytest
import torch

from lrtrain.optim import ApolloAdamW, FiraAdamW, FrugalAdamW, GaLoreAdafactor, GaLoreAdamW, param_groups
from tests.conftest import TinyLM, train_lm

CLASSES = [GaLoreAdamW, FiraAdamW, FrugalAdamW, ApolloAdamW, GaLoreAdafactor]


def _roundtrip(state_dict: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _batches(n=4):
    return [torch.randint(0, 32, (4, 9)) for _ in range(n)]


def test_bf16_adafactor_resumes():
    """Its factored statistics stay float32 across a load (torch would cast them to bf16)."""
    model = TinyLM().to(torch.bfloat16)
    opt = GaLoreAdafactor(param_groups(model, rank=4, update_proj_gap=2))
    train_lm(model, opt, _batches(3))
    twin = TinyLM().to(torch.bfloat16)
    twin.load_state_dict(model.state_dict())
    twin_opt = GaLoreAdafactor(param_groups(twin, rank=4, update_proj_gap=2))
    twin_opt.load_state_dict(_roundtrip(opt.state_dict()))
    for p in twin.parameters():
        assert all(v.dtype == torch.float32 for k, v in twin_opt.state[p].items() if k.startswith("exp_avg"))
    batches = _batches(3)
    train_lm(model, opt, batches)
    train_lm(twin, twin_opt, batches)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("cls", [FrugalAdamW, GaLoreAdamW, FiraAdamW])
def test_loads_a_torch_adamw_state_dict(cls):
    """A run that started with torch.optim.AdamW continues with lrtrain's (its moments carried over)."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 4))
    adamw = torch.optim.AdamW([w], lr=1e-3)
    for _ in range(3):
        w.grad = torch.randn_like(w)
        adamw.step()
    ours = cls([torch.nn.Parameter(w.detach().clone())], lr=1e-3)
    ours.load_state_dict(_roundtrip(adamw.state_dict()))
    (p,) = ours.param_groups[0]["params"]
    state = ours.state[p]
    assert torch.equal(state["exp_avg"], adamw.state[w]["exp_avg"]) and float(state["step"]) == 3.0
    assert ours.param_groups[0]["correct_bias"] is True  # this optimizer's value for a key AdamW lacks
    p.grad = torch.randn_like(p)
    ours.step()
    assert float(state["step"]) == 4.0


def test_a_float_step_in_an_old_state_dict():
    w = torch.nn.Parameter(torch.randn(8, 6))
    opt = GaLoreAdamW([{"params": [w], "rank": 2}])
    w.grad = torch.randn_like(w)
    opt.step()
    saved = _roundtrip(opt.state_dict())
    saved["state"][0]["step"] = 1.0  # optimizers of torch < 1.12 (and some trainers) store a number
    fresh = GaLoreAdamW([{"params": [w], "rank": 2}])
    fresh.load_state_dict(saved)
    w.grad = torch.randn_like(w)
    fresh.step()
    assert torch.is_tensor(fresh.state[w]["step"]) and float(fresh.state[w]["step"]) == 2.0


@pytest.mark.parametrize("source,target", [(torch.float32, torch.float64), (torch.float64, torch.float32),
                                           (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("cls", CLASSES)
def test_state_loads_across_dtypes(cls, source, target):
    """float32 state onto float64 weights and back is cast (as torch casts); onto bf16 weights the
    basis takes their dtype, as a fresh step stores it (basis_dtype="param", galore-torch's)."""
    model = TinyLM().to(source)
    opt = cls(param_groups(model, rank=4, update_proj_gap=2))
    train_lm(model, opt, _batches(3))
    other = TinyLM().to(target)
    other_opt = cls(param_groups(other, rank=4, update_proj_gap=2))
    other_opt.load_state_dict(_roundtrip(opt.state_dict()))
    train_lm(other, other_opt, _batches(2))  # steps without a dtype mismatch
    up = other.layers[0].mlp["up_proj"].weight
    assert other_opt.state[up]["basis"].dtype == target
    assert all(torch.isfinite(p).all() for p in other.parameters())


def test_complex_parameters_are_refused_clearly():
    z = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex64))
    for group in ({"params": [z]}, {"params": [z], "rank": 2}):
        with pytest.raises(TypeError, match=r"is torch.complex64: lrtrain's optimizers take real floating-point"):
            GaLoreAdamW([group])


def test_a_group_that_fails_validation_is_not_added():
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = GaLoreAdamW([w])
    with pytest.raises(ValueError, match="projects 2-D weights only"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(5))], "rank": 2})
    assert len(opt.param_groups) == 1
    w.grad = torch.randn_like(w)
    opt.step()  # still steps


def test_unnamed_groups_join_named_ones_and_back():
    model = TinyLM()
    opt = GaLoreAdamW(param_groups(model, rank=4))  # (name, parameter) pairs: named groups
    extra = torch.nn.Parameter(torch.randn(3))
    opt.add_param_group({"params": [extra], "lr": 0.5})
    assert opt.param_groups[-1]["param_names"] == ["added.2.0"] and opt.param_groups[-1]["lr"] == 0.5
    plain = GaLoreAdamW([torch.nn.Parameter(torch.randn(3))])
    plain.add_param_group({"params": [("bias", torch.nn.Parameter(torch.randn(2)))]})
    assert "param_names" not in plain.param_groups[-1]


def test_momentum_cycling_does_not_switch_on_adafactors_first_moment():
    """OneCycleLR(cycle_momentum=True) writes betas[0]; GaLoreAdafactor built without beta1 refuses to
    grow a full first moment from it (galore-torch refuses the scheduler); built with one, it cycles."""
    model = TinyLM()
    opt = GaLoreAdafactor(param_groups(model, rank=4))
    torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=10, cycle_momentum=True)
    with pytest.raises(ValueError, match="without a first moment.*cycle_momentum=False"):
        train_lm(model, opt, _batches(1))
    opt = GaLoreAdafactor(param_groups(model, rank=4), beta1=0.9, relative_step=False, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=10, cycle_momentum=True)
    for _ in range(2):
        train_lm(model, opt, _batches(1))
        scheduler.step()
    assert "exp_avg" in opt.state[model.layers[0].mlp["up_proj"].weight]
    assert opt.param_groups[0]["betas"][0] != 0.9  # cycled


INIT_CASES = [
    (ApolloAdamW, {"rank": 4}), (FiraAdamW, {"rank": 4}),
    (GaLoreAdamW, {"rank": 4, "proj_method": "randomized", "stagger_refresh": True}),
    (FrugalAdamW, {"rank": None, "density": 0.5, "proj_method": "blocks"}),
    (GaLoreAdafactor, {"rank": 4}), (FrugalAdamW, {"rank": 4, "state_bits": 8}),
]


@pytest.mark.parametrize("cls, options", INIT_CASES, ids=lambda x: getattr(x, "__name__", str(x)))
def test_dcp_state_initialisation_is_not_a_step(cls, options):
    """get_optimizer_state_dict on an optimizer that has not stepped runs a zero-gradient, lr 0
    step (torch's _init_optim_state; torchtitan calls it at start-up). It allocates the state DCP
    needs and changes nothing else: training afterwards equals training a fresh optimizer."""
    import copy
    import warnings

    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = TinyLM(dim=64, hidden=96)
    twin = copy.deepcopy(model)
    lr = {} if cls is GaLoreAdafactor else {"lr": 1e-2}  # Adafactor: its relative step

    def make(m):
        return cls(param_groups(m, update_proj_gap=3, **options), **lr)

    fresh, initialised = make(model), make(twin)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        allocated = get_optimizer_state_dict(twin, initialised)
    assert allocated["state"] and all(p.grad is None for p in twin.parameters())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    batches = _batches(5)
    train_lm(model, fresh, batches)
    train_lm(twin, initialised, batches)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
        assert fresh.state[p].keys() == initialised.state[q].keys()
        for key, value in fresh.state[p].items():
            assert torch.equal(value, initialised.state[q][key]), key


def test_dcp_load_into_the_initialised_state_resumes():
    """The flow torchtitan uses: initialise, load a checkpoint into the allocated tensors, continue."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    model = TinyLM()
    opt = FiraAdamW(param_groups(model, rank=4, update_proj_gap=2), lr=1e-2)
    train_lm(model, opt, _batches(3))
    twin = TinyLM()
    twin.load_state_dict(model.state_dict())
    twin_opt = FiraAdamW(param_groups(twin, rank=4, update_proj_gap=2), lr=1e-2)
    with warnings.catch_warnings(), __import__("tempfile").TemporaryDirectory() as folder:
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=folder)
        target = {"optim": get_optimizer_state_dict(twin, twin_opt)}
        dcp.load(target, checkpoint_id=folder)
        set_optimizer_state_dict(twin, twin_opt, target["optim"])
    batches = _batches(3)
    train_lm(model, opt, batches)
    train_lm(twin, twin_opt, batches)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_maximize_equals_minimising_the_negated_loss():
    import copy

    model = TinyLM()
    twin = copy.deepcopy(model)
    up, down = (FiraAdamW(param_groups(m, rank=4, update_proj_gap=2), lr=1e-2, maximize=flag)
                for m, flag in ((model, True), (twin, False)))
    for tokens in _batches(4):
        for m, opt, sign in ((model, up, 1.0), (twin, down, -1.0)):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(m(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
            (sign * loss).backward()
            opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_torch_adamw_arguments_name_what_is_supported():
    w = torch.nn.Parameter(torch.randn(4, 3))
    GaLoreAdamW([w], amsgrad=False, foreach=None, capturable=False, differentiable=False)  # their defaults
    with pytest.raises(TypeError, match=r"does not implement torch.optim.AdamW's amsgrad=False alternative; it takes "
                                        r"lr, betas, eps, weight_decay, correct_bias, maximize"):
        GaLoreAdamW([w], amsgrad=True)


def test_no_projected_group_warns_and_the_repr_is_short():
    model = TinyLM()
    with pytest.warns(UserWarning, match="no param group with 'rank' or 'density'.*plain AdamW"):
        GaLoreAdamW(model.parameters())  # what HF Trainer's optimizer_cls_and_kwargs would build
    opt = GaLoreAdamW(param_groups(model, rank=4, no_decay=("bias", "norm")), lr=1e-2, weight_decay=0.1)
    text = repr(opt)
    assert len(text.splitlines()) == 1 + len(opt.param_groups) <= 4, text
    assert "rank=4" in text and "weight_decay=0.0" in text


def test_param_groups_keeps_decay_off_biases_and_norms():
    model = TinyLM()
    groups = param_groups(model, rank=4, no_decay=("bias", "norm"))
    undecayed = next(g for g in groups if g.get("weight_decay") == 0.0)
    names = [name for name, _ in undecayed["params"]]
    assert names and all("bias" in n or "norm" in n for n in names)
    projected = next(g for g in groups if "rank" in g)
    assert all("bias" not in name for name, _ in projected["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_compiled_step_runs_eagerly_without_recompiling():
    """torch.compile(optimizer.step) used to specialise on every parameter until dynamo's recompile
    limit; the step now stays eager under compile: no recompiles, and the eager step's numbers."""
    import copy

    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = TinyLM()
    twin = copy.deepcopy(model)
    opt = GaLoreAdamW(param_groups(model, rank=4, update_proj_gap=2), lr=1e-2)
    twin_opt = GaLoreAdamW(param_groups(twin, rank=4, update_proj_gap=2), lr=1e-2)
    compiled = torch.compile(opt.step)
    for tokens in _batches(5):
        for m, step in ((model, compiled), (twin, twin_opt.step)):
            m.zero_grad()
            torch.nn.functional.cross_entropy(m(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
            step()
    assert not counters["recompiles"] and counters["stats"]["unique_graphs"] <= 2
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
