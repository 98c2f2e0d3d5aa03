"""Every update rule of the engine against a dense float64 textbook implementation written here
from the equations (ALGORITHMS.md §1.3, §2.2, §3.2), on both sides, every refresh method, both
Adam styles, keep/reset moments, and FRUGAL's block mode."""

import math

import pytest
import torch

from lrtrain.optim import FiraAdamW, FrugalAdamW, GaLoreAdamW, SubspaceAdamW
from lrtrain.optim.projector import projection_side
from tests.tolerance import SEED

F64 = torch.float64


def _dense_basis(basis, shape, side):
    """The basis as a dense matrix: Q (r, n) for the right side, P (m, r) for the left."""
    if basis.is_floating_point():
        return basis
    dim = shape[1] if side == "right" else shape[0]
    rows = torch.eye(dim, dtype=F64)[basis]  # (r, dim): a selection of rows of the identity
    return rows if side == "right" else rows.T


def reference_run(w0, grads, bases, *, rule, style, refresh, rank, gap, scale, lr, wd, c_free=1.0, gamma=1.01,
                  proj_type="std", betas=(0.9, 0.999), eps=1e-6):
    """Dense float64 implementation; ``bases[k]`` is the basis at refresh k, or None to take the SVD."""
    b1, b2 = betas
    side = projection_side(tuple(w0.shape), proj_type)
    w = w0.clone()
    m = v = q = prev_norm = None
    t = 0
    refreshes = 0
    for t0, g in enumerate(grads):
        if t0 % gap == 0:
            given = bases[refreshes] if bases is not None else None
            if given is None:
                u, _, vh = torch.linalg.svd(g, full_matrices=False)
                q = vh[:rank] if side == "right" else u[:, :rank]
            else:
                q = _dense_basis(given, tuple(w0.shape), side)
            if m is None or refresh == "reset":
                shape = (w0.shape[0], rank) if side == "right" else (rank, w0.shape[1])
                m, v, t = torch.zeros(shape, dtype=F64), torch.zeros(shape, dtype=F64), 0
            refreshes += 1

        def down(x, q=q):
            return x @ q.T if side == "right" else q.T @ x

        def back(x, q=q):
            return x @ q if side == "right" else q @ x

        r = down(g)
        t += 1
        m = b1 * m + (1 - b1) * r
        v = b2 * v + (1 - b2) * r * r
        if style == "hf":
            n = m / (v.sqrt() + eps)
            s = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        else:
            n = m / (v.sqrt() / math.sqrt(1 - b2**t) + eps)
            s = lr / (1 - b1**t)
        if style == "torch":
            w = w * (1 - lr * wd)
        update = s * scale * back(n)
        if rule == "fira":
            dim = 1 if side == "right" else 0
            phi = n.norm(dim=dim) / (r.norm(dim=dim) + 1e-8)
            phi = phi[:, None] if side == "right" else phi[None, :]
            res = (g - scale * back(r)) * phi
            norm = res.norm()
            if prev_norm is not None:
                lim = max(norm / (prev_norm + 1e-8), gamma) / gamma
                res, norm = res / lim, norm / lim
            prev_norm = norm
            update = update + s * res
        elif rule == "sign_sgd":
            update = update + lr * scale * c_free * torch.sign(g - back(r))
        elif rule == "sgd":
            update = update + lr * scale * c_free * (g - back(r))
        w = w - update
        if style == "hf":
            w = w - lr * wd * w
    return w


RULES = {  # name: (class, rule, adam_style, refresh_moments)
    "galore": (GaLoreAdamW, "none", "hf", "keep"),
    "fira": (FiraAdamW, "fira", "hf", "keep"),
    "frugal_sign": (FrugalAdamW, "sign_sgd", "torch", "reset"),
    "frugal_sgd": (FrugalAdamW, "sgd", "torch", "reset"),
    "frugal_none_keep": (FrugalAdamW, "none", "torch", "keep"),
}


@pytest.mark.parametrize("rule_name", list(RULES))
@pytest.mark.parametrize("method", ["svd", "randomized", "random", "coordinates"])
@pytest.mark.parametrize("shape,proj_type", [((26, 15), "std"), ((15, 26), "std"), ((26, 15), "left"), ((19, 19), "right")])
def test_rule_matches_float64_reference(rule_name, method, shape, proj_type):
    cls, rule, style, refresh = RULES[rule_name]
    steps, gap, rank, scale, lr, wd = 23, 6, 4, 0.3, 2e-2, 0.1
    w0 = torch.randn(shape, dtype=F64)
    grads = [torch.randn(shape, dtype=F64) for _ in range(steps)]
    w = torch.nn.Parameter(w0.clone())
    opt = cls([{"params": [w], "rank": rank, "scale": scale, "update_proj_gap": gap, "proj_type": proj_type,
                "proj_method": method, "residual": rule, "refresh_moments": refresh, "state_free_lr_scale": 0.7}],
              lr=lr, weight_decay=wd, eps=1e-6)
    bases = []
    for t0, g in enumerate(grads):
        w.grad = g.clone()
        opt.step()
        if t0 % gap == 0:
            bases.append(opt.state[w]["basis"].clone() if method != "svd" else None)
    expected = reference_run(w0, grads, bases, rule=rule, style=style, refresh=refresh, rank=rank, gap=gap,
                             scale=scale, lr=lr, wd=wd, c_free=0.7, proj_type=proj_type)
    torch.testing.assert_close(w.detach(), expected, rtol=1e-10, atol=1e-10)
    assert (expected - w0).abs().max() > 1e-2  # the trajectory moved: the comparison is not vacuous


def test_random_and_coordinate_bases_are_refreshed_and_seeded():
    """A refresh draws a new basis; two optimizers with the same seed draw the same ones."""
    for method in ("random", "coordinates"):
        runs = []
        for _ in range(2):
            w = torch.nn.Parameter(torch.randn(30, 20))
            opt = GaLoreAdamW([{"params": [w], "rank": 5, "update_proj_gap": 2, "proj_method": method}])
            seen = []
            for _ in range(4):
                w.grad = torch.randn(30, 20)
                opt.step()
                seen.append(opt.state[w]["basis"].clone())
            runs.append(seen)
        assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][2], runs[1][2])
        assert torch.equal(runs[0][0], runs[0][1])  # no refresh between steps 0 and 1
        assert not torch.equal(runs[0][0], runs[0][2])  # refreshed at step 2


def _torch_adamw_step(w, m, v, t, g, lr, wd, betas=(0.9, 0.999), eps=1e-8):
    b1, b2 = betas
    w = w * (1 - lr * wd)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    w = w - lr / (1 - b1**t) * m / (v.sqrt() / math.sqrt(1 - b2**t) + eps)
    return w, m, v


def _reference_blocks(order, n, count, k):
    """Indices FRUGAL's BlockOptimizer activates at its k-th selection (deterministic orders)."""
    if order == "ascending":
        return {(k * count + j) % n for j in range(count)}
    if order == "descending":
        return {(n - 1 - k * count - j) % n for j in range(count)}
    half = n // 2
    start = (k * (count // 2)) % half
    return {x for j in range(count // 2) for x in ((start + j) % half, n - 1 - (start + j) % half)}


@pytest.mark.parametrize("order", ["ascending", "descending", "mirror", "random"])
@pytest.mark.parametrize("rule", ["sign_sgd", "sgd", "none"])
def test_blocks_mode_matches_float64_reference(order, rule):
    shapes = [(7, 5), (5,), (6, 4), (3, 3), (9,), (4, 8)]
    density, gap, steps, lr, wd, scale, c_free = 1 / 3, 4, 14, 1e-2, 0.05, 0.8, 0.5
    count = round(len(shapes) * density)
    params = [torch.nn.Parameter(torch.randn(s, dtype=F64)) for s in shapes]
    init = [p.detach().clone() for p in params]
    grads = [[torch.randn(s, dtype=F64) for s in shapes] for _ in range(steps)]
    opt = FrugalAdamW([{"params": params, "density": density, "proj_method": "blocks", "block_order": order,
                        "update_proj_gap": gap, "scale": scale, "state_free_lr_scale": c_free, "residual": rule}],
                      lr=lr, weight_decay=wd)
    chosen_log = []
    for t0, gs in enumerate(grads):
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        if t0 % gap == 0:
            chosen_log.append({i for i, p in enumerate(params) if bool(opt.state[p]["active"])})
    # reference
    ws = [w.clone() for w in init]
    moments = {}
    active = set()
    for t0, gs in enumerate(grads):
        if t0 % gap == 0:
            k = t0 // gap
            active = chosen_log[k] if order == "random" else _reference_blocks(order, len(shapes), count, k)
            assert len(active) == count
            moments = {i: (torch.zeros_like(ws[i]), torch.zeros_like(ws[i]), 0) for i in active}
        for i, g in enumerate(gs):
            if i in active:
                m, v, t = moments[i]
                t += 1
                # Adam at lr*scale, decay at the group's lr (FRUGAL)
                ws[i] = ws[i] * (1 - lr * wd)
                stepped, m, v = _torch_adamw_step(ws[i], m, v, t, g, lr * scale, 0.0)
                ws[i], moments[i] = stepped, (m, v, t)
            else:
                ws[i] = ws[i] * (1 - lr * wd)
                if rule == "sign_sgd":
                    ws[i] = ws[i] - lr * scale * c_free * torch.sign(g)
                elif rule == "sgd":
                    ws[i] = ws[i] - lr * scale * c_free * g
    for p, w in zip(params, ws):
        torch.testing.assert_close(p.detach(), w, rtol=1e-11, atol=1e-11)
    # inactive tensors hold no moments
    for p in params:
        state = opt.state[p]
        assert ("exp_avg" in state) == bool(state["active"])


def test_frugal_plain_group_equals_torch_adamw_bitwise():
    torch.manual_seed(SEED + 3)
    shapes = [(17, 9), (9,), (4, 4, 3)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt_ours = FrugalAdamW(ours, lr=3e-2, weight_decay=0.1, betas=(0.8, 0.95))
    opt_theirs = torch.optim.AdamW(theirs, lr=3e-2, weight_decay=0.1, betas=(0.8, 0.95))
    for _ in range(15):
        for a, b in zip(ours, theirs):
            g = torch.randn_like(a)
            a.grad, b.grad = g.clone(), g.clone()
        opt_ours.step()
        opt_theirs.step()
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def test_full_coordinate_subspace_is_adamw():
    """Coordinates covering every column, torch-style Adam, no refresh reset: exactly AdamW."""
    torch.manual_seed(SEED + 4)
    w = torch.nn.Parameter(torch.randn(12, 7, dtype=F64))
    ref = torch.nn.Parameter(w.detach().clone())
    ours = SubspaceAdamW([{"params": [w], "rank": 7, "proj_method": "coordinates", "proj_type": "right",
                           "update_proj_gap": 5}], lr=1e-2, eps=1e-8, weight_decay=0.1, scale=1.0,
                         adam_style="torch", refresh_moments="keep")
    theirs = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1)
    for _ in range(12):
        g = torch.randn(12, 7, dtype=F64)
        w.grad, ref.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(w.detach(), ref.detach(), rtol=1e-12, atol=1e-12)


def test_fira_limiter_off_and_gamma():
    """limiter_gamma=None gives the unlimited residual; a large gamma never limits either."""
    torch.manual_seed(SEED + 5)
    w0 = torch.randn(20, 11, dtype=F64)
    grads = [torch.randn(20, 11, dtype=F64) * (1 + 3 * (i % 2)) for i in range(9)]  # jumpy norms
    finals = []
    for gamma in (None, 1e9, 1.01):
        w = torch.nn.Parameter(w0.clone())
        opt = FiraAdamW([{"params": [w], "rank": 3, "update_proj_gap": 4}], lr=1e-2, limiter_gamma=gamma)
        for g in grads:
            w.grad = g.clone()
            opt.step()
        finals.append(w.detach())
    torch.testing.assert_close(finals[0], finals[1], rtol=1e-12, atol=1e-12)
    assert (finals[0] - finals[2]).abs().max() > 1e-4
    expected = reference_run(w0, grads, None, rule="fira", style="hf", refresh="keep", rank=3, gap=4, scale=0.25,
                             lr=1e-2, wd=0.0, gamma=1.01)
    torch.testing.assert_close(finals[2], expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("case", ["full_rank", "low_rank_gradient", "density_one"])
def test_sign_sgd_ignores_round_off_of_a_gradient_inside_its_subspace(case, fused):
    """When G lies in the subspace (rank = min(m, n), density 1, or a gradient of low rank), G - back(R)
    is round-off; sign-SGD must not turn it into lr-sized steps: the run equals FRUGAL without its
    state-free part, and gradients that differ in the last bit give runs that stay together."""
    shape, steps = (24, 40), 6
    torch.manual_seed(SEED + 7)
    if case == "low_rank_gradient":  # every gradient in one 2-D column space (a left projection here)
        columns = torch.randn(shape[0], 2)
        grads = [columns @ torch.randn(2, shape[1]) for _ in range(steps)]
    else:
        grads = [torch.randn(*shape) for _ in range(steps)]
    marker = {"density": 1.0} if case == "density_one" else {"rank": 2 if case == "low_rank_gradient" else 24}
    w0 = torch.randn(*shape)

    def run(residual, nudge=0.0):
        w = torch.nn.Parameter(w0.clone())
        opt = FrugalAdamW([{"params": [w], "update_proj_gap": 3, "residual": residual, **marker}], lr=1e-2,
                          fused=fused)
        for g in grads:
            w.grad = g * (1 + nudge)
            opt.step()
        return w.detach()

    free_of_residual = run("none")
    torch.testing.assert_close(run("sign_sgd"), free_of_residual, rtol=1e-5, atol=1e-6)
    nudged = run("sign_sgd", nudge=2**-23)  # the last bit of float32
    assert (nudged - run("sign_sgd")).norm() / (free_of_residual - w0).norm() < 1e-3
