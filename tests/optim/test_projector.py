"""The projector's pure functions against dense float64 math: sides, bases, down/up maps."""

import pytest
import torch

from lrtrain.optim.projector import (
    add_project_back_,
    canonical_signs_,
    coordinate_basis,
    initial_seed,
    next_seed,
    project,
    project_back,
    projection_side,
    random_basis,
    randomized_basis,
    subspace_rank,
    svd_basis,
)

F64 = torch.float64


@pytest.mark.parametrize(
    "shape,proj_type,side",
    [((8, 5), "std", "right"), ((5, 8), "std", "left"), ((6, 6), "std", "right"),
     ((8, 5), "reverse_std", "left"), ((5, 8), "reverse_std", "right"), ((6, 6), "reverse_std", "left"),
     ((8, 5), "left", "left"), ((5, 8), "right", "right")],
)
def test_projection_side_follows_galore(shape, proj_type, side):
    assert projection_side(shape, proj_type) == side


def test_unknown_proj_type():
    with pytest.raises(ValueError, match="proj_type"):
        projection_side((4, 4), "full")


def test_subspace_rank_clamps_and_density():
    assert subspace_rank((10, 4), "right", 8, None) == 4
    assert subspace_rank((10, 40), "left", 64, None) == 10
    assert subspace_rank((100, 40), "right", None, 0.25) == 10  # round(density * n) on the right
    assert subspace_rank((100, 40), "left", None, 0.25) == 25  # round(density * m) on the left
    assert subspace_rank((100, 40), "left", None, 0.001) == 1


def _orthonormal_error(basis, side):
    gram = basis @ basis.T if side == "right" else basis.T @ basis
    return (gram - torch.eye(gram.shape[0], dtype=gram.dtype)).abs().max().item()


@pytest.mark.parametrize("shape,side", [((31, 17), "right"), ((17, 31), "left"), ((20, 20), "left")])
def test_svd_basis_is_top_singular_subspace(shape, side):
    g = torch.randn(shape, dtype=F64)
    basis = svd_basis(g, 5, side)
    assert basis.shape == ((5, shape[1]) if side == "right" else (shape[0], 5))
    assert _orthonormal_error(basis, side) < 1e-12
    # Captured energy equals the sum of the top-5 squared singular values.
    s = torch.linalg.svdvals(g)
    energy = project(g, basis, side).square().sum()
    torch.testing.assert_close(energy, s[:5].square().sum())


@pytest.mark.parametrize("side", ["right", "left"])
def test_random_basis_orthonormal_and_regenerable(side):
    basis = random_basis(123, (40, 25), 7, side, dtype=F64, device="cpu")
    assert _orthonormal_error(basis, side) < 1e-12
    assert torch.equal(basis, random_basis(123, (40, 25), 7, side, dtype=F64, device="cpu"))
    assert not torch.equal(basis, random_basis(124, (40, 25), 7, side, dtype=F64, device="cpu"))


def test_random_basis_is_uniform_on_average():
    """Haar-uniform subspaces capture r/d of any fixed vector's energy on average."""
    d, r = 16, 4
    x = torch.zeros(d, dtype=F64)
    x[0] = 1.0
    captured = torch.stack([(random_basis(s, (d, d), r, "left", dtype=F64, device="cpu").T @ x).square().sum()
                            for s in range(400)])
    assert abs(captured.mean().item() - r / d) < 0.03


@pytest.mark.parametrize("side", ["right", "left"])
def test_coordinate_basis(side):
    idx = coordinate_basis(7, (30, 20), 6, side, device="cpu")
    dim = 20 if side == "right" else 30
    assert idx.dtype == torch.int64 and idx.shape == (6,)
    assert len(set(idx.tolist())) == 6 and idx.max() < dim and torch.equal(idx, idx.sort().values)
    assert torch.equal(idx, coordinate_basis(7, (30, 20), 6, side, device="cpu"))


def _dense(basis, shape, side):
    if basis.is_floating_point():
        return basis
    dim = shape[1] if side == "right" else shape[0]
    rows = torch.eye(dim, dtype=F64)[basis]
    return rows if side == "right" else rows.T


@pytest.mark.parametrize("method", ["svd", "random", "coordinates"])
@pytest.mark.parametrize("shape,side", [((13, 9), "right"), ((9, 13), "left"), ((13, 9), "left"), ((9, 13), "right")])
def test_down_and_up_match_dense_math(method, shape, side):
    g = torch.randn(shape, dtype=F64)
    r = 4
    if method == "svd":
        basis = svd_basis(g, r, side)
    elif method == "random":
        basis = random_basis(5, shape, r, side, dtype=F64, device="cpu")
    else:
        basis = coordinate_basis(5, shape, r, side, device="cpu")
    q = _dense(basis, shape, side)
    low = project(g, basis, side)
    expected_low = g @ q.T if side == "right" else q.T @ g
    torch.testing.assert_close(low, expected_low)
    n = torch.randn_like(low)
    expected_full = n @ q if side == "right" else q @ n
    torch.testing.assert_close(project_back(n, basis, side, shape), expected_full)
    w = torch.randn(shape, dtype=F64)
    expected_w = w - 0.3 * expected_full
    add_project_back_(w, n, basis, side, alpha=-0.3)
    torch.testing.assert_close(w, expected_w)


def test_seed_chain_is_deterministic_and_distinct():
    seeds = [initial_seed(0, i) for i in range(50)]
    assert len(set(seeds)) == 50
    chain = [initial_seed(3, 1)]
    for _ in range(50):
        chain.append(next_seed(chain[-1]))
    assert len(set(chain)) == 51 and all(0 <= s < 2**63 for s in chain)


def _decaying(m, n, decay=40.0, noise=1e-3):
    """A gradient-like matrix: singular values exp(-i/decay) plus a little noise."""
    u = torch.linalg.qr(torch.randn(m, min(m, n), dtype=F64))[0]
    v = torch.linalg.qr(torch.randn(n, min(m, n), dtype=F64))[0]
    s = torch.exp(-torch.arange(min(m, n), dtype=F64) / decay)
    return (u * s) @ v.T + noise * torch.randn(m, n, dtype=F64)


def _energy(g, basis, side):
    return (project(g, basis, side).square().sum() / g.square().sum()).item()


@pytest.mark.parametrize("shape", [(300, 140), (140, 300)])
@pytest.mark.parametrize("power_iters,fraction", [(1, 0.9), (2, 0.98)])  # a flat spectrum: sigma_24 / sigma_0 = 0.55
def test_randomized_basis_is_orthonormal_and_captures_the_energy(shape, power_iters, fraction):
    g = _decaying(*shape)
    rank = 24
    exact = _energy(g, svd_basis(g, rank, "right"), "right")
    q = randomized_basis(g, rank, previous=None, seed=3, oversample=8, power_iters=power_iters)
    assert q.shape == (rank, shape[1]) and _orthonormal_error(q, "right") < 1e-12
    assert _energy(g, q, "right") >= fraction * exact
    left = randomized_basis(g.T, rank, previous=None, seed=3, oversample=8, power_iters=power_iters).T
    assert _orthonormal_error(left, "left") < 1e-12
    assert _energy(g, left, "left") >= fraction * _energy(g, svd_basis(g, rank, "left"), "left")


def test_randomized_warm_start_tracks_a_drifting_subspace():
    """With the previous basis as start, one power iteration recovers a slowly moving subspace
    better than a cold Gaussian start does."""
    g0 = _decaying(200, 120, decay=8.0)
    g1 = g0 + 0.05 * torch.randn_like(g0)
    previous = svd_basis(g0, 10, "right")
    warm = randomized_basis(g1, 10, previous=previous, seed=5, oversample=2, power_iters=0)
    cold = randomized_basis(g1, 10, previous=None, seed=5, oversample=2, power_iters=0)
    assert _energy(g1, warm, "right") > _energy(g1, cold, "right") + 0.05


def test_randomized_basis_of_a_zero_gradient_is_orthonormal():
    q = randomized_basis(torch.zeros(30, 20, dtype=F64), 5, previous=None, seed=0, oversample=4, power_iters=2)
    assert torch.isfinite(q).all() and _orthonormal_error(q, "right") < 1e-12


@pytest.mark.parametrize("side", ["right", "left"])
def test_canonical_signs_make_the_basis_a_function_of_the_subspace(side):
    g = _decaying(40, 30, decay=5.0)
    basis = canonical_signs_(svd_basis(g, 6, side), side)
    vectors = basis if side == "right" else basis.T
    assert (vectors.gather(1, vectors.abs().argmax(1, keepdim=True)) > 0).all()
    flipped = basis.clone()
    (flipped if side == "right" else flipped.T)[[1, 4]] *= -1  # what another LAPACK pivot order returns
    assert torch.equal(canonical_signs_(flipped, side), basis)
    nearby = canonical_signs_(svd_basis(g + 1e-13 * torch.randn_like(g), 6, side), side)
    torch.testing.assert_close(nearby, basis, rtol=0, atol=1e-9)


def test_refresh_benchmark_runs_and_reports_the_energy():
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "scripts/bench_refresh.py", "--model", "llama_tiny", "--ranks", "16",
                           "--power-iters", "2", "--seq", "64", "--rounds", "1"],
                          cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, check=True)
    rows = [line.split("|") for line in done.stdout.splitlines() if line.startswith("| 352x128")]
    assert [row[3].strip() for row in rows] == ["svd", "randomized, cold, 2 power iter.", "randomized, warm, 2 power iter."]
    assert all(float(row[6]) >= 0.98 for row in rows)  # captured energy relative to the exact SVD's
