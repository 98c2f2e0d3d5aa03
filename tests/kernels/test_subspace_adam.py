"""The fused Triton kernels (run by Triton's interpreter: TRITON_INTERPRET=1, set in conftest) against
float64 math, and the fused optimizer step against the engine's torch path: both sides, shapes that
are not multiples of the tiles, float32 and bfloat16 weights, GaLore's, Fira's and FRUGAL's rules."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lrtrain.kernels.subspace_adam import project_adam, project_back_update_
from lrtrain.optim import FiraAdamW, FrugalAdamW, GaLoreAdamW, LayerwiseUpdates, param_groups, subspace
from lrtrain.optim.subspace import roundoff_floor
from tests.conftest import TinyLM
from tests.tolerance import SEED

SHAPES = [(37, 53, 5), (64, 48, 16), (45, 130, 33)]
# bf16: the kernels and the reference may round the last bit differently (the interpreter truncates on
# downcast), so results differ by up to one bf16 ulp (audited worst: 0.80 of 2**-7); the bound is two.
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2**-6, atol=2**-6)}


def _basis(m, n, r, side):
    q = torch.linalg.qr(torch.randn(n if side == "right" else m, r, dtype=torch.float64))[0]
    return q.T.contiguous() if side == "right" else q.contiguous()


def _down(g, basis, side):
    return g @ basis.T if side == "right" else basis.T @ g


def _back(x, basis, side):
    return x @ basis if side == "right" else basis @ x


@pytest.mark.parametrize("m, n, r", SHAPES)
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_project_adam_against_float64(m, n, r, side, dtype):
    grad = torch.randn(m, n).to(dtype)
    basis = _basis(m, n, r, side)
    low = _down(grad.double(), basis, side)
    exp_avg, exp_avg_sq = torch.randn_like(low), torch.rand_like(low)
    m1 = exp_avg + 0.1 * (low - exp_avg)
    v1 = 0.99 * exp_avg_sq + 0.01 * low * low
    moments = exp_avg.float(), exp_avg_sq.float()
    direction, got_low = project_adam(grad, basis.float(), side, *moments, beta1=0.9, beta2=0.99, eps=1e-6,
                                      denom_scale=1.25, return_low=True)
    for got, want in zip((got_low, *moments, direction), (low, m1, v1, m1 / (v1.sqrt() * 1.25 + 1e-6))):
        torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)
    direction_only, none = project_adam(grad, basis.float(), side, *moments, beta1=0.9, beta2=0.99, eps=1e-6)
    assert none is None and direction_only.shape == low.shape


@pytest.mark.parametrize("m, n, r", SHAPES)
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual", ["none", "fira", "sign_sgd", "sgd"])
def test_project_back_update_against_float64(m, n, r, side, dtype, residual):
    weight, grad = torch.randn(m, n).to(dtype), torch.randn(m, n).to(dtype)
    basis = _basis(m, n, r, side)
    direction, low = _down(torch.randn(m, n, dtype=torch.float64), basis, side), _down(grad.double(), basis, side)
    coef = torch.rand(m if side == "right" else n, dtype=torch.float64)
    want = 0.99 * weight.double() - 0.1 * _back(direction, basis, side)
    g = grad.double()
    if residual == "fira":
        want -= 0.05 * (coef[:, None] if side == "right" else coef[None, :]) * g
    elif residual == "sign_sgd":  # entries at round-off level count as 0
        floor = roundoff_floor(grad.float(), side).double()
        coef = floor.flatten()
        outside = g - _back(low, basis, side)
        want -= 0.05 * torch.sign(torch.where(outside.abs() <= floor, 0.0, outside))
    elif residual == "sgd":
        want -= 0.05 * (g - _back(low, basis, side))
    project_back_update_(weight, direction.float(), basis.float(), side, keep=0.99, alpha=0.1, residual=residual,
                         gamma=0.05, grad=grad, coef=coef.float(), low=low.float())
    assert weight.dtype == dtype
    torch.testing.assert_close(weight.double(), want.to(dtype).double(), **TOLERANCE[dtype])


def test_project_back_update_names_what_a_rule_needs():
    w = torch.zeros(20, 20)
    with pytest.raises(ValueError, match="needs grad, coef"):
        project_back_update_(w, torch.zeros(20, 4), torch.zeros(4, 20), "right", keep=1.0, alpha=1.0, residual="fira")


CASES = [
    (GaLoreAdamW, {}), (FiraAdamW, {}), (FrugalAdamW, {}), (FrugalAdamW, {"residual": "sgd"}),
    (GaLoreAdamW, {"proj_method": "random"}), (FiraAdamW, {"proj_method": "randomized", "limiter_gamma": None}),
    (GaLoreAdamW, {"adam_style": "torch", "scale": 1.0}),
]


def _twins(cls, options, shape, dtype):
    w = torch.randn(*shape).to(dtype)
    params = [torch.nn.Parameter(w.clone()) for _ in range(2)]
    opts = [cls([{"params": [p], "rank": 5, "update_proj_gap": 3}], lr=1e-2, weight_decay=0.1, fused=fused, **options)
            for p, fused in zip(params, (False, True))]
    return params, opts


@pytest.mark.parametrize("cls, options", CASES)
@pytest.mark.parametrize("shape", [(37, 53), (61, 29)])  # left and right projections under proj_type="std"
def test_fused_step_equals_the_torch_path_fp32(cls, options, shape):
    params, opts = _twins(cls, options, shape, torch.float32)
    for _ in range(7):  # refreshes at steps 1, 4 and 7
        grad = torch.randn(*shape)
        for p, opt in zip(params, opts):
            p.grad = grad.clone()
            opt.step()
    torch.testing.assert_close(params[1], params[0], rtol=1e-5, atol=1e-5)
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(opts[1].state[params[1]][key], opts[0].state[params[0]][key], rtol=1e-5, atol=1e-6)


BF16_CASES = [(cls, options, shape, {}) for cls, options in CASES[:4] for shape in ((37, 53), (61, 29))] + [
    (cls, options, (37, 53), storage) for cls, options in CASES[:2]
    for storage in ({"moment_dtype": "float32", "basis_dtype": "float32"}, {"basis_dtype": "int4"})]


@pytest.mark.parametrize("cls, options, shape, storage", BF16_CASES)
def test_fused_step_equals_the_torch_path_bf16(cls, options, shape, storage):
    """bf16 weights: each step from the same state lands within two bf16 roundings of the torch path
    (the audited worst is 0.96 of one: a different last bit), with bf16 (the default), float32 or
    float32-computed moments and an int4 basis."""
    params, opts = _twins(cls, {**options, **storage}, shape, torch.bfloat16)
    for _ in range(5):
        grad = torch.randn(*shape).to(torch.bfloat16)
        for p, opt in zip(params, opts):
            p.grad = grad.clone()
            opt.step()
        torch.testing.assert_close(params[1], params[0], rtol=2**-6, atol=2e-3)
        with torch.no_grad():
            params[1].copy_(params[0])  # the next step starts from the same weights


def test_fused_runs_inside_layerwise_updates_and_leaves_accumulation_to_torch():
    torch.manual_seed(SEED + 0)
    a, b = TinyLM(dim=32, hidden=48), TinyLM(dim=32, hidden=48)
    b.load_state_dict(a.state_dict())
    opts = [GaLoreAdamW(param_groups(m, rank=6, update_proj_gap=3), lr=1e-2, fused=f) for m, f in ((a, False), (b, True))]
    drivers = [LayerwiseUpdates(opt, grad_accum=2) for opt in opts]
    for _ in range(4):
        tokens = [torch.randint(0, 32, (2, 9)) for _ in range(2)]
        for model, driver in zip((a, b), drivers):
            for micro, batch in enumerate(tokens):
                with driver.micro_batch(micro):
                    logits = model(batch[:, :-1])
                    torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).backward()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-5)


def test_auto_dispatch_keeps_cpu_tensors_on_the_torch_path(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the fused path ran for a CPU tensor under fused=None")

    monkeypatch.setattr(subspace, "_fused_update", refuse)
    w = torch.nn.Parameter(torch.randn(20, 12))
    opt = GaLoreAdamW([{"params": [w], "rank": 4}])  # fused=None: kernels only for CUDA tensors
    w.grad = torch.randn_like(w)
    opt.step()
    calls = []
    monkeypatch.setattr(subspace, "_fused_update", lambda *args: calls.append(args))
    GaLoreAdamW([{"params": [w], "rank": 4}], fused=True).step()
    assert len(calls) == 1


@pytest.mark.parametrize("options, error, match", [
    ({"fused": "yes"}, ValueError, "fused must be one of"),
    ({"fused": True, "state_bits": 8}, ValueError, "fused=True covers 32-bit moments"),
    ({"fused": True, "residual": "apollo", "proj_method": "gaussian"}, ValueError, "residual=.apollo."),
    ({"fused": True, "proj_method": "coordinates"}, ValueError, "proj_method='coordinates'"),
])
def test_fused_refusals(options, error, match):
    w = torch.nn.Parameter(torch.randn(20, 12))
    with pytest.raises(error, match=match):
        GaLoreAdamW([{"params": [w], "rank": 4}], **options)


def test_fused_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    w = torch.nn.Parameter(torch.randn(20, 12))
    w.grad = torch.randn_like(w)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        GaLoreAdamW([{"params": [w], "rank": 4}], fused=True).step()


def test_benchmark_script_runs_its_smoke_check():
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "scripts/bench_kernels.py", "--smoke"], cwd=root, capture_output=True,
                          text=True, env={**os.environ, "TRITON_INTERPRET": "1"}, check=True)
    rows = [line for line in done.stdout.splitlines() if line.startswith("| smoke")]
    assert len(rows) == 3, done.stdout
