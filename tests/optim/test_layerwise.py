"""Layer-wise updates follow the ordinary optimizer's trajectory, with and without gradient
accumulation, step only at accumulation boundaries, and free gradients during the backward pass."""

import pytest
import torch
import torch.nn.functional as F

from lrtrain.memory import PeakMemory
from lrtrain.optim import FiraAdamW, FrugalAdamW, GaLoreAdamW, LayerwiseUpdates, param_groups
from lrtrain.optim.layerwise import _squared_norm
from tests.conftest import TinyLM
from tests.tolerance import SEED

CLASSES = [GaLoreAdamW, FiraAdamW, FrugalAdamW]


def _loss(model, tokens):
    return F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())


def _pair(cls, dtype=torch.float32, **keys):
    torch.manual_seed(SEED + 0)
    a = TinyLM(dim=32, hidden=48).to(dtype)
    b = TinyLM(dim=32, hidden=48).to(dtype)
    b.load_state_dict(a.state_dict())
    make = lambda m: cls(param_groups(m, rank=6, update_proj_gap=3, **keys), lr=1e-2, weight_decay=0.01)  # noqa: E731
    return a, make(a), b, make(b)


def _train_ordinary(model, opt, batches, accum, max_norm=None, sched=None):
    for step_batches in batches:
        for tokens in step_batches:
            (_loss(model, tokens) / accum).backward()
        if max_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        opt.step()
        opt.zero_grad()
        if sched:
            sched.step()


def _train_layerwise(model, layerwise, batches, sched=None):
    for step_batches in batches:
        for i, tokens in enumerate(step_batches):
            with layerwise.micro_batch(i):
                (_loss(model, tokens) / len(step_batches)).backward()
        if sched:
            sched.step()


@pytest.mark.parametrize("cls", CLASSES)
def test_without_accumulation_bit_for_bit(cls):
    a, opt_a, b, opt_b = _pair(cls)
    batches = [[torch.randint(0, 32, (4, 9))] for _ in range(7)]  # refreshes at steps 0, 3, 6
    _train_ordinary(a, opt_a, batches, 1)
    _train_layerwise(b, LayerwiseUpdates(opt_b), batches)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("cls", CLASSES)
def test_bf16_state_without_accumulation_bit_for_bit(cls):
    """bf16 weights with bf16 state (the default), or float32 moments and an int4 basis."""
    for keys in ({}, {"moment_dtype": "float32", "basis_dtype": "int4"}):
        a, opt_a, b, opt_b = _pair(cls, dtype=torch.bfloat16, **keys)
        batches = [[torch.randint(0, 32, (4, 9))] for _ in range(5)]
        _train_ordinary(a, opt_a, batches, 1)
        _train_layerwise(b, LayerwiseUpdates(opt_b), batches)
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.equal(p, q)


@pytest.mark.parametrize("storage", [{}, {"basis_dtype": "int8"}], ids=["float", "int8"])
@pytest.mark.parametrize("cls", CLASSES)
def test_with_accumulation_matches_the_ordinary_optimizer(cls, storage):
    """GaLore folds non-refresh micro-batches into its subspace (a sum in another order: float64
    agreement to 1e-12, also through an int8 basis); Fira and FRUGAL read the full gradient, which
    accumulates whole (bitwise)."""
    a, opt_a, b, opt_b = _pair(cls, dtype=torch.float64, **storage)
    batches = [[torch.randint(0, 32, (2, 9)) for _ in range(4)] for _ in range(7)]
    _train_ordinary(a, opt_a, batches, 4)
    layerwise = LayerwiseUpdates(opt_b, grad_accum=4)
    _train_layerwise(b, layerwise, batches)
    for p, q in zip(a.parameters(), b.parameters()):
        if cls is GaLoreAdamW:
            torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-12)
        else:
            assert torch.equal(p, q)
    assert all(int(opt_b.state[p]["step"]) == int(opt_a.state[q]["step"]) for p, q in zip(b.parameters(), a.parameters()))


def test_galore_frees_full_gradients_between_micro_batches():
    _, _, model, opt = _pair(GaLoreAdamW)
    layerwise = LayerwiseUpdates(opt, grad_accum=3)
    up = model.layers[0].mlp["up_proj"].weight
    emb = model.embed_tokens.weight
    tokens = torch.randint(0, 32, (2, 9))
    for step in range(5):  # refresh at steps 0 and 3: there the full gradient accumulates
        for micro in range(2):
            with layerwise.micro_batch(micro):
                _loss(model, tokens).backward()
            refresh_next = step % 3 == 0
            assert (up.grad is None) != refresh_next
            assert ("low_rank_grad" in opt.state[up]) != refresh_next
            if not refresh_next:
                assert opt.state[up]["low_rank_grad"].shape == (48, 6)
            assert emb.grad is not None  # plain parameters accumulate their gradient
        with layerwise.micro_batch(2):
            _loss(model, tokens).backward()
        assert all(p.grad is None for p in model.parameters())
        assert "low_rank_grad" not in opt.state[up]
        assert int(opt.state[up]["step"]) == step + 1 and int(opt.state[emb]["step"]) == step + 1


def test_peak_memory_drops_by_the_gradients():
    torch.manual_seed(SEED + 0)
    models = [TinyLM(vocab=512, dim=256, hidden=512, layers=2) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    tokens = torch.randint(0, 512, (2, 16))
    peaks = []
    for model, layerwise in zip(models, (False, True)):
        opt = GaLoreAdamW(param_groups(model, rank=8), lr=1e-3)
        driver = LayerwiseUpdates(opt) if layerwise else None
        for _ in range(2):  # the second step is measured: the state exists
            existing = [*model.parameters(), tokens, *(v for s in opt.state.values() for v in s.values())]
            with PeakMemory("cpu", existing) as peak:
                if driver:
                    with driver.micro_batch(0):
                        _loss(model, tokens).backward()
                else:
                    _loss(model, tokens).backward()
                    opt.step()
                    opt.zero_grad()
        peaks.append(peak.bytes)
    grads = sum(p.numel() * 4 for p in models[0].parameters())
    assert peaks[1] <= peaks[0] - 0.6 * grads, (peaks, grads)


def test_clipping_uses_the_previous_steps_norm(tolerance):
    a, opt_a, b, opt_b = _pair(FiraAdamW)
    batches = [[torch.randint(0, 32, (4, 9))] for _ in range(5)]
    layerwise = LayerwiseUpdates(opt_b, max_grad_norm=0.05)
    previous = None
    for step_batches in batches:  # the reference: clip by hand with the last step's norm
        (tokens,) = step_batches
        _loss(a, tokens).backward()
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in a.parameters()])).item()
        if previous is not None:
            for p in a.parameters():
                p.grad.mul_(min(1.0, 0.05 / (previous + 1e-6)))
        previous = norm
        opt_a.step()
        opt_a.zero_grad()
        with layerwise.micro_batch(0):
            _loss(b, tokens).backward()
        tolerance.below("relative gap of the logged norm", abs(layerwise.last_grad_norm / norm - 1), 1e-5)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6)


def test_schedulers_drive_layerwise_updates():
    a, opt_a, b, opt_b = _pair(GaLoreAdamW)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)) for o in (opt_a, opt_b)]
    batches = [[torch.randint(0, 32, (4, 9))] for _ in range(4)]
    _train_ordinary(a, opt_a, batches, 1, sched=scheds[0])
    _train_layerwise(b, LayerwiseUpdates(opt_b), batches, sched=scheds[1])
    assert opt_b.param_groups[0]["lr"] == pytest.approx(1e-2 / 5)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_refusals():
    model = TinyLM()
    with pytest.raises(TypeError, match="lrtrain's optimizers"):
        LayerwiseUpdates(torch.optim.AdamW(model.parameters()))
    blocks = FrugalAdamW(param_groups(model, rank=None, density=0.5, proj_method="blocks"))
    with pytest.raises(ValueError, match="blocks"):
        LayerwiseUpdates(blocks)
    layerwise = LayerwiseUpdates(GaLoreAdamW(param_groups(model, rank=4)), grad_accum=2)
    with pytest.raises(ValueError, match="exactly one"):
        with layerwise.micro_batch(1, last=True):
            pass
    with pytest.raises(ValueError, match="exactly one"):
        with layerwise.micro_batch():
            pass


def test_a_loop_that_marks_the_last_micro_batch():
    """micro_batch(last=...) — a loop that knows which micro-batch ends a step, and steps the optimizer
    itself (HF Trainer) — trains as micro_batch(index) does, also with a short last accumulation."""
    a, opt_a, b, opt_b = _pair(GaLoreAdamW)
    batches = [[torch.randint(0, 32, (2, 9)) for _ in range(n)] for n in (3, 3, 2)]
    by_index = LayerwiseUpdates(opt_a, grad_accum=3)
    by_flag = LayerwiseUpdates(opt_b, grad_accum=3)
    for step_batches in batches:
        for i, tokens in enumerate(step_batches):
            with by_index.micro_batch(i if len(step_batches) == 3 else i + 1):
                (_loss(a, tokens) / len(step_batches)).backward()
            with by_flag.micro_batch(last=i == len(step_batches) - 1, step_optimizer=False):
                (_loss(b, tokens) / len(step_batches)).backward()
        opt_b.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_gradient_norm_needs_no_float32_copy(tolerance):
    grad = torch.randn(512, 1024, dtype=torch.bfloat16)
    with PeakMemory("cpu", [grad]) as peak:
        squared = _squared_norm(grad)
    exact = float(grad.double().square().sum())
    tolerance.below("float32-accumulated norm, relative error", abs(squared / exact - 1), 2e-4)
    assert peak.bytes - 2 * grad.numel() < 1024
