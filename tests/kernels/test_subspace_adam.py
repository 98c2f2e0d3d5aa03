"""The fused Triton kernels (run by Triton's interpreter: TRITON_INTERPRET=1, set in conftest) against
float64 math, and the fused optimizer step against the engine's torch path: both sides, shapes that
are not multiples of the tiles, float32 and bfloat16 weights, GaLore's, Fira's and FRUGAL's rules."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from lrtrain.kernels.subspace_adam import (
    PRECISIONS,
    default_precision,
    product_error_bound,
    project_adam,
    project_back_update_,
)
from lrtrain.optim import FiraAdamW, FrugalAdamW, GaLoreAdamW, LayerwiseUpdates, param_groups, subspace
from lrtrain.optim.subspace import roundoff_floor
from tests.conftest import TinyLM
from tests.tolerance import SEED

SHAPES = [(37, 53, 5), (64, 48, 16), (45, 130, 33)]
#: Each precision at the shapes it runs in CI: bf16 (the default for bf16 weights) at all, the others at the
#: one shape that is not a multiple of any tile (ieee, the fp32 default, also runs in every fused-step test).
CASES_BY_PRECISION = [(precision, shape) for precision in PRECISIONS
                      for shape in (SHAPES if precision == "bf16" else SHAPES[:1])]
#: Rounding into the stored dtype: one ulp (the interpreter truncates on a downcast, so a whole ulp).
STORAGE_ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7}


def _basis(m, n, r, side):
    q = torch.linalg.qr(torch.randn(n if side == "right" else m, r, dtype=torch.float64))[0]
    return q.T.contiguous() if side == "right" else q.contiguous()


def _down(g, basis, side):
    return g @ basis.T if side == "right" else basis.T @ g


def _back(x, basis, side):
    return x @ basis if side == "right" else basis @ x


@pytest.mark.parametrize("precision, shape", CASES_BY_PRECISION)
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_project_adam_against_float64(precision, shape, side, dtype):
    m, n, r = shape
    grad = torch.randn(m, n).to(dtype)
    basis = _basis(m, n, r, side).float()
    low = _down(grad.double(), basis.double(), side)
    bound = product_error_bound(*((grad.double().abs(), basis.double().abs().T) if side == "right" else
                                  (basis.double().abs().T, grad.double().abs())), precision)
    exp_avg, exp_avg_sq = torch.randn(low.shape), torch.rand(low.shape)
    moments = exp_avg.clone(), exp_avg_sq.clone()
    grad_sq = torch.full((m if side == "right" else n,), float("nan"))
    direction, got_low = project_adam(grad, basis, side, *moments, beta1=0.9, beta2=0.99, eps=1e-6, denom_scale=1.25,
                                      return_low=True, precision=precision, grad_sq_out=grad_sq)
    assert ((got_low.double() - low).abs() <= bound + 1e-30).all(), ((got_low.double() - low).abs() / bound).max()
    # Fira's norms of G's rows (columns on the left), summed in float32 as the product reads G
    torch.testing.assert_close(grad_sq.double(), grad.double().square().sum(1 if side == "right" else 0),
                               rtol=1e-5, atol=0)
    # the float32 epilogue, from the kernel's own R
    r32 = got_low.double()
    m1 = exp_avg.double() + 0.1 * (r32 - exp_avg.double())
    v1 = 0.99 * exp_avg_sq.double() + 0.01 * r32 * r32
    for got, want in zip((*moments, direction), (m1, v1, m1 / (v1.sqrt() * 1.25 + 1e-6))):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    direction_only, none = project_adam(grad, basis, side, *moments, beta1=0.9, beta2=0.99, eps=1e-6,
                                        precision=precision)
    assert none is None and direction_only.shape == low.shape


@pytest.mark.parametrize("precision, shape", CASES_BY_PRECISION)
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual", ["none", "fira", "sign_sgd", "sgd"])
def test_project_back_update_against_float64(precision, shape, side, dtype, residual):
    m, n, r = shape
    weight, grad = torch.randn(m, n).to(dtype), torch.randn(m, n).to(dtype)
    basis = _basis(m, n, r, side)
    direction, low = _down(torch.randn(m, n, dtype=torch.float64), basis, side), _down(grad.double(), basis, side)
    direction, low, basis = direction.float().double(), low.float().double(), basis.float().double()
    coef = torch.rand(m if side == "right" else n, dtype=torch.float64)
    want = 0.99 * weight.double() - 0.1 * _back(direction, basis, side)
    bound = 0.1 * product_error_bound(*((direction.abs(), basis.abs()) if side == "right" else
                                        (basis.abs(), direction.abs())), precision)
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
        bound += 0.05 * product_error_bound(*((low.abs(), basis.abs()) if side == "right" else
                                              (basis.abs(), low.abs())), "ieee")
    project_back_update_(weight, direction.float(), basis.float(), side, keep=0.99, alpha=0.1, residual=residual,
                         gamma=0.05, grad=grad, coef=coef.float(), low=low.float(), precision=precision)
    assert weight.dtype == dtype
    # the product's bound, then float32 epilogue round-off and the rounding into the stored dtype
    allowed = bound + 1e-6 * (want.abs() + 1) + STORAGE_ULP[dtype] * (want.abs() + bound)
    error = (weight.double() - want).abs()
    assert (error <= allowed).all(), (error / allowed).max()


def test_default_precision_follows_the_weights_and_torch():
    assert default_precision(torch.bfloat16) == "bf16" and default_precision(torch.float16) == "fp16"
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert default_precision(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert default_precision(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(previous)
    with pytest.raises(ValueError, match="precision must be one of"):
        project_adam(torch.zeros(4, 16), torch.zeros(2, 16), "right", torch.zeros(4, 2), torch.zeros(4, 2),
                     beta1=0.9, beta2=0.99, eps=1e-8, precision="fp8")


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

    monkeypatch.setattr(subspace, "_fused_updates", refuse)
    w = torch.nn.Parameter(torch.randn(20, 12))
    opt = GaLoreAdamW([{"params": [w], "rank": 4}])  # fused=None: kernels only for CUDA tensors
    w.grad = torch.randn_like(w)
    opt.step()
    calls = []
    monkeypatch.setattr(subspace, "_fused_updates", lambda group, matrices: calls.extend(matrices))
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


def test_gpu_check_runs_its_smoke_mode():
    """scripts/gpu_check.py's GPU sections at toy sizes under the interpreter: every check passes, the table prints."""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "scripts/gpu_check.py", "--smoke", "--rounds", "2"], cwd=root,
                          capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| smoke | 48x40 × 2 | 8 |" in done.stdout and "checks: 0 kernel failures, 0 end-to-end failures" in done.stdout


def test_default_kernels_compile_for_sm90_on_tensor_cores_without_spills():
    """``gpu_check.py --compile-only`` (Triton's ahead-of-time compiler for sm_90, no GPU): the bf16 variants,
    one tile each (14), spill no register and multiply on tensor cores (HGMMA/HMMA in the SASS). The README's
    compile report covers every variant and tile."""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "scripts/gpu_check.py", "--compile-only", "--defaults-only",
                           "--first-tile"], cwd=root, capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0 and len(rows) == 14, done.stdout + done.stderr
    assert all(r["arch"] == "sm_90" and r["spill_bytes"] == 0 and r["tensor_core"] and r["default"] for r in rows)
    assert {r["kernel"] for r in rows} == {"project_adam", "project_back_update"}


def test_auto_dispatch_follows_the_measured_table(monkeypatch):
    """fused=None takes the kernels only where KERNELS_WIN (filled from gpu_check runs) has them faster."""
    from lrtrain.kernels import dispatch

    assert not dispatch.kernels_win(torch.device("cpu"), torch.bfloat16, 256)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    cuda = torch.device("cuda", 0)
    assert not dispatch.kernels_win(cuda, torch.bfloat16, 256)  # nothing measured: the torch path
    monkeypatch.setitem(dispatch.KERNELS_WIN, ((9, 0), torch.bfloat16), (128, 512))
    assert dispatch.kernels_win(cuda, torch.bfloat16, 256) and not dispatch.kernels_win(cuda, torch.bfloat16, 1024)
    assert not dispatch.kernels_win(cuda, torch.float32, 256)


def test_probe_falls_back_with_one_warning(monkeypatch):
    from lrtrain.kernels import dispatch, subspace_adam

    dispatch.kernels_work.cache_clear()
    assert dispatch.kernels_work(torch.device("cpu"))  # the interpreter runs the probe
    dispatch.kernels_work.cache_clear()
    monkeypatch.setattr(subspace_adam, "project_adam", lambda *args, **kwargs: (_ for _ in ()).throw(
        RuntimeError("no compiler")))
    with pytest.warns(RuntimeWarning, match="fused=None keeps the torch path"):
        assert not dispatch.kernels_work(torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not dispatch.kernels_work(torch.device("cpu"))  # cached: no second warning
    dispatch.kernels_work.cache_clear()


def test_equal_matrices_share_one_launch_per_kernel(monkeypatch):
    """A group's fused matrices of one shape and side step in one launch of each kernel (the interpreter runs
    the whole group at once; a GPU adds one launch to tune the first matrix), with the weights and moments of
    the torch path; a matrix of another shape gets its own launches."""
    from lrtrain.kernels import subspace_adam

    launches = []
    launch = subspace_adam._launch
    monkeypatch.setattr(subspace_adam, "_launch", lambda name, *args, **kw: (launches.append(
        (name, len(args[2][0]))), launch(name, *args, **kw))[1])
    torch.manual_seed(SEED + 3)
    shapes = [(37, 53), (37, 53), (61, 29)]
    weights = [torch.randn(*shape) for shape in shapes]
    for cls, options in CASES[:3]:
        params = [[torch.nn.Parameter(w.clone()) for w in weights] for _ in range(2)]
        opts = [cls([{"params": ps, "rank": 5, "update_proj_gap": 3}], lr=1e-2, weight_decay=0.1, fused=fused,
                    **options) for ps, fused in zip(params, (False, True))]
        launches.clear()
        for _ in range(4):  # refreshes at steps 1 and 4
            grads = [torch.randn(*shape) for shape in shapes]
            for ps, opt in zip(params, opts):
                for p, g in zip(ps, grads):
                    p.grad = g.clone()
                opt.step()
        assert launches == [("project_adam", 2), ("project_back_update", 2), ("project_adam", 1),
                            ("project_back_update", 1)] * 4, launches
        for p, q in zip(*params):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-5)
