"""The torch.optim contract, checked the way torch's own suite checks its optimizers: one
``OptimizerInfo`` per class (torch.testing._internal.common_optimizers), whose inputs cover plain and
subspace groups, every test run for float32 and float64 parameters through ``@optims`` and
``instantiate_device_type_tests``.

An ``OptimizerInput`` here gives the constructor's keyword arguments and, as ``params``, the group
layout without tensors: ``[plain keys, matrix keys]`` — the biases go into the first group, the
weight matrices into the second (a subspace group where it has ``rank`` or ``density``).
"""

import copy
import io
import pickle
import warnings

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.testing._internal.common_device_type import instantiate_device_type_tests
from torch.testing._internal.common_optimizers import OptimizerInfo, OptimizerInput, optims
from torch.testing._internal.common_utils import TestCase

from lrtrain.optim import (
    ApolloAdamW,
    ApolloMiniAdamW,
    FiraAdamW,
    FrugalAdamW,
    GaLoreAdafactor,
    GaLoreAdamW,
    SubspaceAdamW,
)
from tests.tolerance import SEED

STEPS = 5  # with update_proj_gap=2 the subspace refreshes at steps 0, 2 and 4


def _inputs(layouts: tuple[dict, ...], **kwargs):
    """Inputs of one class: every group plain; the matrices in subspaces of each layout; the first
    layout with weight decay and maximize."""
    def optim_inputs_func(device=None, dtype=None):
        subspaces = [{"update_proj_gap": 2, **layout} for layout in layouts]
        return [
            OptimizerInput(params=[{}, {}], kwargs=kwargs, desc="plain"),
            *(OptimizerInput(params=[{}, subspace], kwargs=kwargs, desc=f"subspace {subspace}")
              for subspace in subspaces),
            OptimizerInput(params=[{"weight_decay": 0.0}, subspaces[0]],
                           kwargs={**kwargs, "weight_decay": 0.1, "maximize": True}, desc="decay, maximize"),
        ]
    return optim_inputs_func


def _info(cls, *layouts, **kwargs) -> OptimizerInfo:
    return OptimizerInfo(cls, optim_inputs_func=_inputs(layouts, lr=1e-2, **kwargs), supported_impls=(),
                         supports_complex=False)


LRTRAIN_OPTIMIZERS = [
    _info(GaLoreAdamW, {"rank": 2}),
    _info(FiraAdamW, {"rank": 2}),
    _info(FrugalAdamW, {"rank": 2}, {"rank": None, "density": 0.5, "proj_method": "coordinates"}),
    _info(ApolloAdamW, {"rank": 2}),
    _info(ApolloMiniAdamW, {"rank": 1}),
    _info(GaLoreAdafactor, {"rank": 2}, relative_step=False),
    _info(SubspaceAdamW, {"rank": 2, "residual": "sign_sgd", "proj_method": "randomized"}),
]


class _MLP(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 5, dtype=dtype), nn.Linear(5, 3, dtype=dtype)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _build(optim_info, optim_input, model, named=False, leave_out=()):
    """The optimizer of ``optim_input`` over ``model`` (but the modules ``leave_out`` names): biases in
    the first group, matrices in the second."""
    bias_keys, matrix_keys = optim_input.params
    pick = lambda matrices: [(n, p) if named else p for n, p in model.named_parameters()  # noqa: E731
                             if (p.dim() == 2) == matrices and n.split(".")[0] not in leave_out]
    groups = [{"params": pick(False), **bias_keys}, {"params": pick(True), **matrix_keys}]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*has no param group with .rank.")  # the plain inputs
        return optim_info.optim_cls(groups, **optim_input.kwargs)


def _data(dtype, steps=STEPS, seed=SEED):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 6, generator=generator).to(dtype), torch.randn(4, 3, generator=generator).to(dtype))
            for _ in range(steps)]


def _train(model, optimizer, data, step=None):
    """Full-batch steps; ``step(optimizer, model)`` replaces ``optimizer.step()``."""
    for x, y in data:
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step() if step is None else step(optimizer, model)


def _model(dtype):
    torch.manual_seed(SEED)
    return _MLP(dtype)


def _saved(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


class TestLowRankOptimizerContract(TestCase):
    def _assert_same_weights(self, a: nn.Module, b: nn.Module, what: str):
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            self.assertTrue(torch.equal(p, q), f"{what}: {name} differs")

    def _resumed(self, optim_info, optim_input, dtype, *, named=False, edit=lambda sd: sd):
        """Train 3 steps, save (weights_only), ``edit`` the state dict, load into a fresh twin, train
        both on; they must stay bit for bit equal."""
        data = _data(dtype)
        model = _model(dtype)
        optimizer = _build(optim_info, optim_input, model, named)
        _train(model, optimizer, data[:3])
        twin = copy.deepcopy(model)
        twin_optimizer = _build(optim_info, optim_input, twin, named)
        twin_optimizer.load_state_dict(edit(_saved(optimizer.state_dict())))
        _train(model, optimizer, data[3:])
        _train(twin, twin_optimizer, data[3:])
        self._assert_same_weights(model, twin, optim_input.desc)

    @optims(LRTRAIN_OPTIMIZERS, dtypes=[torch.float32, torch.float64])
    def test_state_dict_round_trip_continues_exactly(self, device, dtype, optim_info):
        for optim_input in optim_info.optim_inputs_func(device, dtype):
            for named in (False, True):
                self._resumed(optim_info, optim_input, dtype, named=named)

    @optims(LRTRAIN_OPTIMIZERS, dtypes=[torch.float32])
    def test_loads_an_older_state_dict(self, device, dtype, optim_info):
        """Saved before parameter names, ``maximize`` and tensor steps (as torch's own older dicts)."""
        def older(state_dict):
            for group in state_dict["param_groups"]:
                group.pop("param_names", None)
                group.pop("maximize", None)
            for state in state_dict["state"].values():
                if torch.is_tensor(state.get("step")):
                    state["step"] = float(state["step"])
            return state_dict

        for optim_input in optim_info.optim_inputs_func(device, dtype):
            if not optim_input.kwargs.get("maximize"):
                self._resumed(optim_info, optim_input, dtype, edit=older)

    @optims(LRTRAIN_OPTIMIZERS, dtypes=[torch.float32, torch.float64])
    def test_deepcopy_and_pickle_continue_exactly(self, device, dtype, optim_info):
        """A copy of (model, optimizer) trains as the original, through step() and step_param()."""
        def step_each_param(optimizer, model):
            for p in model.parameters():
                optimizer.step_param(p)

        for optim_input in optim_info.optim_inputs_func(device, dtype):
            data = _data(dtype)
            model = _model(dtype)
            optimizer = _build(optim_info, optim_input, model)
            _train(model, optimizer, data[:2])
            for copied in (copy.deepcopy((model, optimizer)), pickle.loads(pickle.dumps((model, optimizer)))):
                twin, twin_optimizer = copied
                original = copy.deepcopy((model, optimizer))
                for pair in (original, copied):
                    _train(*pair, data[2:], step=step_each_param)
                self._assert_same_weights(original[0], twin, optim_input.desc)

    @optims(LRTRAIN_OPTIMIZERS, dtypes=[torch.float32, torch.float64])
    def test_tensor_lr_equals_float_lr(self, device, dtype, optim_info):
        """A tensor lr trains exactly as the float it holds (torch.tensor(1e-2) holds float32's 1e-2)."""
        for optim_input in optim_info.optim_inputs_func(device, dtype):
            models = [_model(dtype), _model(dtype)]
            lr = torch.tensor(optim_input.kwargs["lr"])
            as_float = {**optim_input.kwargs, "lr": float(lr)}
            as_tensor = {**optim_input.kwargs, "lr": lr}
            optimizers = [_build(optim_info, OptimizerInput(optim_input.params, as_float), models[0]),
                          _build(optim_info, OptimizerInput(optim_input.params, as_tensor), models[1])]
            for model, optimizer in zip(models, optimizers):
                _train(model, optimizer, _data(dtype))
            self._assert_same_weights(*models, optim_input.desc)

    @optims(LRTRAIN_OPTIMIZERS, dtypes=[torch.float32])
    def test_step_is_noop_when_params_have_no_grad(self, device, dtype, optim_info):
        for optim_input in optim_info.optim_inputs_func(device, dtype):
            model = _model(dtype)
            optimizer = _build(optim_info, optim_input, model)
            before = copy.deepcopy(model)
            optimizer.step()
            self._assert_same_weights(model, before, optim_input.desc)
            self.assertEqual(len(optimizer.state), 0)
            _train(model, optimizer, _data(dtype, steps=1))
            state = copy.deepcopy(optimizer.state_dict())
            before = copy.deepcopy(model)
            optimizer.zero_grad()
            optimizer.step()
            self._assert_same_weights(model, before, optim_input.desc)
            self.assertEqual(optimizer.state_dict(), state)

    @optims(LRTRAIN_OPTIMIZERS, dtypes=[torch.float32])
    def test_step_is_noop_for_zero_grads(self, device, dtype, optim_info):
        """Zero gradients without weight decay move nothing (also at a refresh, whose basis is then arbitrary)."""
        for optim_input in optim_info.optim_inputs_func(device, dtype):
            without_decay = OptimizerInput(optim_input.params, {**optim_input.kwargs, "weight_decay": 0.0})
            model = _model(dtype)
            optimizer = _build(optim_info, without_decay, model)
            before = copy.deepcopy(model)
            for _ in range(3):
                for p in model.parameters():
                    p.grad = torch.zeros_like(p)
                optimizer.step()
            self._assert_same_weights(model, before, optim_input.desc)

    @optims(LRTRAIN_OPTIMIZERS, dtypes=[torch.float32])
    def test_hooks_are_called(self, device, dtype, optim_info):
        """Step, state_dict and load_state_dict hooks, per optimizer and global, as torch.optim calls them."""
        optim_input = optim_info.optim_inputs_func(device, dtype)[1]
        model = _model(dtype)
        optimizer = _build(optim_info, optim_input, model)
        calls = []
        handles = [
            optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append("pre")),
            optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append("post")),
            register_optimizer_step_pre_hook(lambda opt, args, kwargs: calls.append("global pre")),
            register_optimizer_step_post_hook(lambda opt, args, kwargs: calls.append("global post")),
            optimizer.register_state_dict_pre_hook(lambda opt: calls.append("sd pre")),
            optimizer.register_state_dict_post_hook(lambda opt, sd: {**sd, "extra": 1}),
            optimizer.register_load_state_dict_pre_hook(lambda opt, sd: calls.append("load pre")),
            optimizer.register_load_state_dict_post_hook(lambda opt: calls.append("load post")),
        ]
        try:
            _train(model, optimizer, _data(dtype, steps=1))
            self.assertEqual(calls, ["global pre", "pre", "post", "global post"])
            state_dict = optimizer.state_dict()
            self.assertEqual(state_dict["extra"], 1)
            optimizer.load_state_dict(state_dict)
            self.assertEqual(calls[4:], ["sd pre", "load pre", "load post"])
        finally:
            for handle in handles:
                handle.remove()

    @optims(LRTRAIN_OPTIMIZERS, dtypes=[torch.float32])
    def test_add_param_group_then_resume(self, device, dtype, optim_info):
        """A layer added mid-run (a plain and a subspace group) trains, and the grown optimizer resumes."""
        optim_input = optim_info.optim_inputs_func(device, dtype)[1]
        data = _data(dtype)
        model = _model(dtype)
        optimizer = _build(optim_info, optim_input, model)
        _train(model, optimizer, data[:2])
        model.fc3 = nn.Linear(3, 3, dtype=dtype)
        model.forward = lambda x: model.fc3(_MLP.forward(model, x))
        optimizer.add_param_group({"params": [model.fc3.bias], **optim_input.params[0]})
        optimizer.add_param_group({"params": [model.fc3.weight], **optim_input.params[1]})
        before = model.fc3.weight.detach().clone()
        _train(model, optimizer, data[2:3])
        self.assertFalse(torch.equal(before, model.fc3.weight))
        twin = copy.deepcopy(model)
        twin.forward = lambda x: twin.fc3(_MLP.forward(twin, x))
        twin_optimizer = _build(optim_info, optim_input, twin, leave_out=("fc3",))
        twin_optimizer.add_param_group({"params": [twin.fc3.bias], **optim_input.params[0]})
        twin_optimizer.add_param_group({"params": [twin.fc3.weight], **optim_input.params[1]})
        twin_optimizer.load_state_dict(_saved(optimizer.state_dict()))
        _train(model, optimizer, data[3:])
        _train(twin, twin_optimizer, data[3:])
        self._assert_same_weights(model, twin, "added groups")


instantiate_device_type_tests(TestLowRankOptimizerContract, globals(), only_for="cpu")
