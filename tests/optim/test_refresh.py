"""Refresh schedule and moments across a refresh: staggered refreshes, moments carried into the new
basis (refresh_moments="project")."""

import pytest
import torch

from lrtrain.optim import FrugalAdamW, GaLoreAdamW, LayerwiseUpdates, param_groups, subspace
from lrtrain.optim.engine import refresh
from lrtrain.optim.projector import (
    aligned_basis,
    basis_transition,
    dense_basis,
    project,
    project_back,
    sign_aligned_basis,
)
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
    assert (moved_sq >= exp_avg_sq).all()  # V keeps its coordinates, raised only where the bound needs it


def test_a_signed_permutation_of_the_basis_permutes_the_first_moment_and_bounds_the_second():
    old = torch.linalg.qr(torch.randn(20, 5, dtype=F64))[0].T.contiguous()  # right basis (5, 20)
    order, signs = torch.tensor([3, 0, 4, 1, 2]), torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0], dtype=F64)
    m, v = torch.randn(8, 5, dtype=F64), torch.rand(8, 5, dtype=F64)
    bound = (m.abs() / v.sqrt()).amax(dim=1, keepdim=True)
    m_new, v_new = m.clone(), v.clone()
    rotate_moments_(m_new, v_new, basis_transition(old, old[order] * signs[:, None], "right", (8, 20)), "right")
    torch.testing.assert_close(m_new, m[:, order] * signs)
    torch.testing.assert_close(v_new, torch.maximum(v, (m[:, order] / bound).square()))
    m_flipped, v_flipped = m.clone(), v.clone()  # flips alone move no |M|: V stays as it was
    rotate_moments_(m_flipped, v_flipped, basis_transition(old, old * signs[:, None], "right", (8, 20)), "right")
    torch.testing.assert_close(m_flipped, m * signs)
    torch.testing.assert_close(v_flipped, v, rtol=1e-12, atol=0)  # the row maximum itself, to round-off


def test_project_runs_in_the_optimizer_with_8_bit_moments():
    torch.manual_seed(SEED + 0)
    w = torch.nn.Parameter(torch.randn(300, 120))
    opt = GaLoreAdamW([{"params": [w], "rank": 40, "update_proj_gap": 2}], refresh_moments="project", state_bits=8)
    for _ in range(5):
        w.grad = torch.randn_like(w)
        opt.step()
    assert opt.state[w]["exp_avg"].dtype == torch.uint8 and torch.isfinite(w).all()


# --------------------------------------------------------------------------- basis alignment


def _orthonormal(dim, rank, side, generator):
    q = torch.linalg.qr(torch.randn(dim, rank, dtype=F64, generator=generator))[0]
    return q.T.contiguous() if side == "right" else q


@pytest.mark.parametrize("side", ["right", "left"])
def test_a_basis_turned_within_its_subspace_aligns_back_to_the_previous_one(side):
    generator = torch.Generator().manual_seed(SEED + 11)
    previous = _orthonormal(23, 7, side, generator)
    rotation = torch.linalg.qr(torch.randn(7, 7, dtype=F64, generator=generator))[0]
    turned = rotation @ previous if side == "right" else previous @ rotation
    torch.testing.assert_close(aligned_basis(previous, turned, side), previous, rtol=0, atol=1e-12)


@pytest.mark.parametrize("side", ["right", "left"])
def test_aligned_basis_spans_the_new_subspace_nearest_the_previous_basis(side):
    generator = torch.Generator().manual_seed(SEED + 12)
    previous, new = _orthonormal(31, 6, side, generator), _orthonormal(31, 6, side, generator)
    aligned = aligned_basis(previous, new, side)
    def projector(q):
        return q.T @ q if side == "right" else q @ q.T
    torch.testing.assert_close(projector(aligned), projector(new), rtol=0, atol=1e-12)  # the same subspace
    transition = basis_transition(previous, aligned, side, ())
    torch.testing.assert_close(transition, transition.T, rtol=0, atol=1e-12)  # U Σ Uᵀ: symmetric ...
    assert torch.linalg.eigvalsh(transition).min() > -1e-12  # ... and positive semi-definite
    for _ in range(20):  # no other orthonormal basis of the new subspace is nearer the previous one
        rotation = torch.linalg.qr(torch.randn(6, 6, dtype=F64, generator=generator))[0]
        other = rotation @ new if side == "right" else new @ rotation
        assert torch.dist(aligned, previous) <= torch.dist(other, previous) + 1e-12


def _fixed_subspace_run(alignment, gap, side):
    """Weights after 9 steps of GaLore with randomized refreshes every ``gap`` steps, on gradients that all
    lie in one rank-4 subspace (a fixed row space on the right, a fixed column space on the left)."""
    generator = torch.Generator().manual_seed(SEED + 13)
    shape, rank = (14, 40) if side == "right" else (40, 14), 4
    fixed = torch.randn(rank, 40, dtype=F64, generator=generator)
    w = torch.nn.Parameter(torch.randn(shape, dtype=F64, generator=generator))
    opt = GaLoreAdamW([{"params": [w], "rank": rank, "update_proj_gap": gap}], lr=0.01, proj_method="randomized", proj_type=side,
                      basis_alignment=alignment, power_iters=1, oversample=2)
    for _ in range(9):
        coefficients = torch.randn(14, rank, dtype=F64, generator=generator)
        w.grad = coefficients @ fixed if side == "right" else (coefficients @ fixed).T
        opt.step()
    return w.detach().clone()


@pytest.mark.parametrize("side", ["right", "left"])
def test_aligned_refreshes_of_an_unchanged_subspace_leave_the_updates_unchanged(side):
    once = _fixed_subspace_run("procrustes", 1000, side)  # the first refresh only
    torch.testing.assert_close(_fixed_subspace_run("procrustes", 2, side), once, rtol=0, atol=1e-11)
    # unaligned, each refresh orders the same subspace by the newest gradient's spectrum: the kept moments
    # then stand for other directions
    assert (_fixed_subspace_run("none", 2, side) - once).abs().max() > 1e-3


@pytest.mark.parametrize("side", ["right", "left"])
def test_sign_alignment_flips_vectors_only(side):
    generator = torch.Generator().manual_seed(SEED + 15)
    previous, new = _orthonormal(19, 5, side, generator), _orthonormal(19, 5, side, generator)
    signs = torch.tensor([1.0, -1.0, -1.0, 1.0, -1.0], dtype=F64)
    flipped = signs[:, None] * previous if side == "right" else previous * signs
    torch.testing.assert_close(sign_aligned_basis(previous, flipped, side), previous, rtol=0, atol=0)
    aligned = sign_aligned_basis(previous, new, side)
    ratio = aligned / new  # each vector kept or negated, in its place
    assert set(ratio.round().unique().tolist()) <= {-1.0, 1.0}
    assert (torch.diagonal(basis_transition(previous, aligned, side, ())) >= 0).all()


def test_alignment_applies_where_asked_to_bases_from_the_gradient(monkeypatch):
    calls = []
    for name in ("aligned_basis", "sign_aligned_basis"):
        original = getattr(refresh, name)
        monkeypatch.setattr(refresh, name, lambda *args, original=original: calls.append(1) or original(*args))
    w = torch.nn.Parameter(torch.randn(12, 30))
    for method, alignment, aligns in (("randomized", "none", False), ("svd", "none", False),
                                      ("svd", "procrustes", True), ("randomized", "signs", True)):
        opt = GaLoreAdamW([{"params": [w], "rank": 3, "update_proj_gap": 1}], proj_method=method,
                          basis_alignment=alignment)
        calls.clear()
        for _ in range(3):
            w.grad = torch.randn_like(w)
            opt.step()
        assert len(calls) == (2 if aligns else 0), (method, alignment)  # not at the first refresh
    with pytest.raises(ValueError, match="basis_alignment='procrustes' aligns bases found from the gradient"):
        GaLoreAdamW([{"params": [w], "rank": 3}], proj_method="random", basis_alignment="procrustes")


# --------------------------------------------------------------------------- second-moment transport


def _adam_moments(steps, low_shape, generator, beta1=0.9, beta2=0.999):
    """Adam's moments after ``steps`` of random low-rank gradients of very different scales per coordinate."""
    m, v = torch.zeros(low_shape, dtype=F64), torch.zeros(low_shape, dtype=F64)
    scales = 10.0 ** torch.empty(low_shape, dtype=F64).uniform_(-3, 1, generator=generator)
    for _ in range(steps):
        r = scales * torch.randn(low_shape, dtype=F64, generator=generator)
        m.mul_(beta1).add_(r, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(r, r, value=1 - beta2)
    return m, v


def _row_bounds(m, v, side):
    """The largest |M|/√V of each row of the low-rank shape (each column on the left side)."""
    return (m.abs() / v.sqrt()).amax(dim=1 if side == "right" else 0)


@pytest.mark.parametrize("side", ["right", "left"])
def test_projected_second_moment_bounds_the_normalised_step_on_adversarial_rotations(side):
    generator = torch.Generator().manual_seed(SEED + 14)
    rank = 16
    low_shape = (9, rank) if side == "right" else (rank, 9)
    coordinates = 1 if side == "right" else 0
    hadamard = torch.tensor([[1.0]], dtype=F64)
    while hadamard.shape[0] < rank:
        hadamard = torch.cat([torch.cat([hadamard, hadamard], 1), torch.cat([hadamard, -hadamard], 1)])
    rotations = [torch.linalg.qr(torch.randn(rank, rank, dtype=F64, generator=generator))[0] for _ in range(10)]
    # (T, adversarial): Adam's moments as they come, or every |M| at its bound with signs that add up in the
    # first new coordinate, and for the Hadamard rotation (which spreads each old coordinate over all new
    # ones) also equal V across the coordinates: the variance map's worst case
    cases = [(t, None) for t in rotations] + [(t, "signs") for t in rotations] + [(hadamard / rank**0.5, "equal")]
    worst_kept = 0.0
    for transition, adversary in cases:
        m, v = _adam_moments(30, low_shape, generator)
        if adversary == "equal":
            v = v.mean(dim=coordinates, keepdim=True).expand_as(v).clone()
        if adversary is not None:
            signs = torch.sign(transition if side == "left" else transition.T)[0]
            m = v.sqrt() * (signs if side == "right" else signs[:, None])
        bounds = _row_bounds(m, v, side)
        m_new, v_new = m.clone(), v.clone()
        rotate_moments_(m_new, v_new, transition, side)
        assert (_row_bounds(m_new, v_new, side) <= bounds * (1 + 1e-12)).all()
        assert (v_new >= v).all()  # V keeps its coordinates, raised only where the bound needs it
        raised = v_new > v
        torch.testing.assert_close(v_new[raised].sqrt() * bounds.unsqueeze(coordinates).expand_as(v)[raised],
                                   m_new[raised].abs(), rtol=1e-12, atol=0)
        torch.testing.assert_close(v_new[~raised], v[~raised], rtol=0, atol=0)
        worst_kept = max(worst_kept, float((_row_bounds(m_new, v, side) / bounds).max()))
    # V kept unraised (and the independence map V·(T⊙T) too) lets the step grow by √r = 4 right after such a refresh
    assert worst_kept > 0.99 * rank**0.5
