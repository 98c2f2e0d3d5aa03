"""Refresh schedule and moments across a refresh: staggered refreshes, moments carried into the new
basis (refresh_moments="project")."""

import pytest
import torch

from lrtrain.optim import FrugalAdamW, GaLoreAdamW, LayerwiseUpdates, param_groups, subspace
from lrtrain.optim.projector import basis_transition, dense_basis, project, project_back
from lrtrain.optim.subspace import rotate_moments_
from tests.conftest import TinyLM, assert_resume_is_exact
from tests.tolerance import SEED

F64 = torch.float64


def _record_refreshes(monkeypatch):
    """The positions in their groups of the matrices whose subspace refreshes, call by call."""
    calls = []
    original = subspace.refresh_basis

    def spy(group, plan, *args, **kwargs):
        calls.append(plan.index)
        return original(group, plan, *args, **kwargs)

    monkeypatch.setattr(subspace, "refresh_basis", spy)
    return calls


def _refreshes_per_step(opt, params, calls, steps):
    """The (sorted) indices of the matrices that refreshed, step by step, on random gradients."""
    per_step = []
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        calls.clear()
        opt.step()
        per_step.append(sorted(calls))
    return per_step


def test_staggered_refreshes_spread_over_the_gap(monkeypatch):
    calls = _record_refreshes(monkeypatch)
    params = [torch.nn.Parameter(torch.randn(12, 10)) for _ in range(8)]
    opt = GaLoreAdamW([{"params": params, "rank": 3, "update_proj_gap": 4}], stagger_refresh=True)
    per_step = _refreshes_per_step(opt, params, calls, steps=13)
    assert per_step[0] == list(range(8))  # every matrix needs its first basis
    assert all(len(step) == 2 for step in per_step[1:]), per_step  # 8 matrices / gap 4: two per step
    for i in range(8):
        steps = [t for t, step in enumerate(per_step) if i in step]
        first = 4 - (i * 4) // 8
        assert steps[:3] == [0, first, first + 4]  # then every gap


def test_unstaggered_refreshes_come_together(monkeypatch):
    calls = _record_refreshes(monkeypatch)
    params = [torch.nn.Parameter(torch.randn(12, 10)) for _ in range(4)]
    opt = GaLoreAdamW([{"params": params, "rank": 3, "update_proj_gap": 3}])
    counts = [len(step) for step in _refreshes_per_step(opt, params, calls, steps=7)]
    assert counts == [4, 0, 0, 4, 0, 0, 4]


@pytest.mark.parametrize("refresh_moments", ["keep", "reset", "project"])
def test_staggered_state_resumes_exactly(refresh_moments):
    torch.manual_seed(SEED + 0)
    make = lambda m: FrugalAdamW(param_groups(m, rank=4, update_proj_gap=3), stagger_refresh=True,  # noqa: E731
                                 refresh_moments=refresh_moments)
    batches = [torch.randint(0, 32, (2, 9)) for _ in range(9)]
    _, loaded = assert_resume_is_exact(TinyLM(dim=24, hidden=40), make, batches, split=4)
    assert loaded["refresh_in"] == {torch.int64}


def test_staggered_layerwise_accumulation_matches_the_ordinary_step():
    torch.manual_seed(SEED + 0)
    a, b = TinyLM(dim=32, hidden=48).double(), TinyLM(dim=32, hidden=48).double()
    b.load_state_dict(a.state_dict())
    opts = [GaLoreAdamW(param_groups(m, rank=6, update_proj_gap=3), lr=1e-2, stagger_refresh=True) for m in (a, b)]
    layerwise = LayerwiseUpdates(opts[1], grad_accum=2)
    for _ in range(6):
        batches = [torch.randint(0, 32, (2, 9)) for _ in range(2)]
        for tokens in batches:
            loss = torch.nn.functional.cross_entropy(a(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
            (loss / 2).backward()
        opts[0].step()
        opts[0].zero_grad()
        for micro, tokens in enumerate(batches):
            with layerwise.micro_batch(micro):
                loss = torch.nn.functional.cross_entropy(b(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
                (loss / 2).backward()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("coordinates", [False, True])
def test_projected_first_moment_is_the_old_one_seen_in_the_new_basis(side, coordinates):
    shape, rank = (30, 22), 6
    if coordinates:
        size = shape[1] if side == "right" else shape[0]
        old, new = torch.randperm(size)[:rank].sort().values, torch.randperm(size)[:rank].sort().values
    else:
        dim = shape[1] if side == "right" else shape[0]
        old, new = (torch.linalg.qr(torch.randn(dim, rank, dtype=F64))[0] for _ in range(2))
        old, new = (q.T.contiguous() if side == "right" else q for q in (old, new))
    low_shape = (shape[0], rank) if side == "right" else (rank, shape[1])
    exp_avg, exp_avg_sq = torch.randn(low_shape, dtype=F64), torch.rand(low_shape, dtype=F64)
    want = project(project_back(exp_avg, dense_basis(old, side, shape).to(F64), side, shape),
                   dense_basis(new, side, shape).to(F64), side)
    moved_sq = exp_avg_sq.clone()
    rotate_moments_(exp_avg, moved_sq, basis_transition(old, new, side, shape).to(F64), side)
    torch.testing.assert_close(exp_avg, want)
    assert (moved_sq >= 0).all()
    if coordinates:  # kept coordinates keep their second moment, new ones start at 0
        dim = 1 if side == "right" else 0
        for k, index in enumerate(new.tolist()):
            expected = exp_avg_sq.select(dim, old.tolist().index(index)) if index in old.tolist() else 0.0
            torch.testing.assert_close(moved_sq.select(dim, k), expected * torch.ones_like(moved_sq.select(dim, k)))


def test_a_signed_permutation_of_the_basis_permutes_the_moments():
    old = torch.linalg.qr(torch.randn(20, 5, dtype=F64))[0].T.contiguous()  # right basis (5, 20)
    order, signs = torch.tensor([3, 0, 4, 1, 2]), torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0], dtype=F64)
    new = old[order] * signs[:, None]
    m, v = torch.randn(8, 5, dtype=F64), torch.rand(8, 5, dtype=F64)
    m_new, v_new = m.clone(), v.clone()
    rotate_moments_(m_new, v_new, basis_transition(old, new, "right", (8, 20)), "right")
    torch.testing.assert_close(m_new, m[:, order] * signs)
    torch.testing.assert_close(v_new, v[:, order])


def test_project_runs_in_the_optimizer_with_8_bit_moments():
    torch.manual_seed(SEED + 0)
    w = torch.nn.Parameter(torch.randn(300, 120))
    opt = GaLoreAdamW([{"params": [w], "rank": 40, "update_proj_gap": 2}], refresh_moments="project", state_bits=8)
    for _ in range(5):
        w.grad = torch.randn_like(w)
        opt.step()
    assert opt.state[w]["exp_avg"].dtype == torch.uint8 and torch.isfinite(w).all()
