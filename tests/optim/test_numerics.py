"""A NaN/Inf gradient at a refresh never reaches the basis or the moments; a failing SVD falls back."""

import warnings

import pytest
import torch

from lrtrain.optim import FiraAdamW, GaLoreAdamW


def _opt(cls=GaLoreAdamW, **kw):
    w = torch.nn.Parameter(torch.randn(12, 8))
    return w, cls([{"params": [("w", w)], "rank": 3, "update_proj_gap": 2, **kw}], lr=1e-2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("cls", [GaLoreAdamW, FiraAdamW])
def test_nonfinite_gradient_at_refresh_skips_that_matrix(bad, cls):
    w, opt = _opt(cls)
    w.grad = torch.randn(12, 8)
    opt.step()
    w.grad = torch.randn(12, 8)
    opt.step()  # steps 0 and 1; step 2 refreshes
    before = {k: v.clone() for k, v in opt.state[w].items()}
    weight_before = w.detach().clone()
    g = torch.randn(12, 8)
    g[3, 4] = bad
    w.grad = g
    with pytest.warns(RuntimeWarning, match="non-finite gradient.*'w'.*skipped"):
        opt.step()
    assert torch.equal(w, weight_before)
    for key, value in before.items():
        assert torch.equal(opt.state[w][key], value), key
    w.grad = torch.randn(12, 8)
    opt.step()  # the refresh is retried on the next finite gradient
    assert torch.isfinite(opt.state[w]["basis"]).all() and torch.isfinite(w).all()
    assert not torch.equal(opt.state[w]["basis"], before["basis"])
    assert int(opt.state[w]["step"]) == 3


def test_nonfinite_first_refresh_leaves_no_state():
    w, opt = _opt()
    w.grad = torch.full((12, 8), float("nan"))
    with pytest.warns(RuntimeWarning):
        opt.step()
    assert "basis" not in opt.state[w] and "exp_avg" not in opt.state[w]


def test_nonfinite_raise_option():
    w, opt = _opt(on_nonfinite="raise")
    w.grad = torch.full((12, 8), float("nan"))
    with pytest.raises(FloatingPointError, match="on_nonfinite='skip'"):
        opt.step()


def test_failing_svd_falls_back_to_float64(monkeypatch):
    w, opt = _opt()
    real_svd = torch.linalg.svd

    def flaky_svd(a, *args, **kwargs):
        if a.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real_svd(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", flaky_svd)
    w.grad = torch.randn(12, 8)
    with pytest.warns(RuntimeWarning, match="float64 CPU SVD"):
        opt.step()
    basis = opt.state[w]["basis"]
    assert basis.dtype == torch.float32
    torch.testing.assert_close(basis @ basis.T, torch.eye(3), atol=1e-5, rtol=0)


def test_svd_failing_everywhere_keeps_previous_basis(monkeypatch):
    w, opt = _opt()
    w.grad = torch.randn(12, 8)
    opt.step()
    w.grad = torch.randn(12, 8)
    opt.step()
    previous = opt.state[w]["basis"].clone()

    def broken_svd(*args, **kwargs):
        raise torch.linalg.LinAlgError("failed to converge")

    monkeypatch.setattr(torch.linalg, "svd", broken_svd)
    w.grad = torch.randn(12, 8)
    with pytest.warns(RuntimeWarning, match="kept its previous basis"):
        opt.step()
    assert torch.equal(opt.state[w]["basis"], previous)

    fresh, opt2 = _opt()
    fresh.grad = torch.randn(12, 8)
    with pytest.warns(RuntimeWarning, match="random basis"):
        opt2.step()
    basis = opt2.state[fresh]["basis"]
    torch.testing.assert_close(basis @ basis.T, torch.eye(3), atol=1e-5, rtol=0)


def test_zero_gradient_gives_finite_state():
    """torch.distributed.checkpoint initializes optimizer state with one zero-grad, lr=0 step."""
    for cls in (GaLoreAdamW, FiraAdamW):
        w, opt = _opt(cls)
        w.grad = torch.zeros(12, 8)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt.step()
        for value in opt.state[w].values():
            assert torch.isfinite(value.float()).all()
        assert torch.isfinite(w).all()
