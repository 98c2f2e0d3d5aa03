"""state_bytes() equals the analytic count on LLaMA-60M's linear shapes."""


import torch
from torch import nn

from lrtrain.memory import format_bytes, state_bytes
from lrtrain.optim import FiraAdamW, FrugalAdamW, GaLoreAdamW, param_groups

HIDDEN, FFN, LAYERS, RANK = 512, 1376, 8, 128  # llama_60m (ALGORITHMS.md §0.1), GaLore rank 128


def llama60m_linears() -> nn.Module:
    """The attention and MLP Linear layers of LLaMA-60M, named as in the reference models."""
    def layer():
        attn = nn.ModuleDict({k: nn.Linear(HIDDEN, HIDDEN, bias=False) for k in ("q_proj", "k_proj", "v_proj", "o_proj")})
        mlp = nn.ModuleDict({"gate_proj": nn.Linear(HIDDEN, FFN, bias=False), "up_proj": nn.Linear(HIDDEN, FFN, bias=False),
                             "down_proj": nn.Linear(FFN, HIDDEN, bias=False)})
        return nn.ModuleDict({"self_attn": attn, "mlp": mlp})

    return nn.ModuleDict({"layers": nn.ModuleList(layer() for _ in range(LAYERS))})


def _step_once(model, opt):
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()


def analytic_galore_bytes(shapes, rank, bytes_per=4):
    """GaLore std on m x n: moments 2·r·max(m, n), basis r·min(m, n)."""
    moments = sum(2 * rank * max(m, n) for m, n in shapes) * bytes_per
    basis = sum(rank * min(m, n) for m, n in shapes) * bytes_per
    return moments, basis


def test_galore_and_fira_state_bytes_on_llama_60m_shapes():
    model = llama60m_linears()
    shapes = [tuple(p.shape) for p in model.parameters()]
    moments, basis = analytic_galore_bytes(shapes, RANK)
    for cls in (GaLoreAdamW, FiraAdamW):
        opt = cls(param_groups(model, target_modules=["self_attn", "mlp"], rank=RANK, proj_method="random"))
        _step_once(model, opt)
        got = state_bytes(opt)
        assert got["moments"] == moments and got["basis"] == basis
        # other: a float32 step per matrix (+ an int64 seed for random bases, + Fira's limiter norm)
        per_matrix = 4 + 8 + (4 if cls is FiraAdamW else 0)
        assert got["other"] == per_matrix * len(shapes)
        assert got["total"] == moments + basis + got["other"]
    # per layer: q, k, v, o right (2·512·128 each), gate/up right (2·1376·128), down left (2·128·1376)
    assert moments == LAYERS * (4 * 2 * 512 * 128 + 2 * 2 * 1376 * 128 + 2 * 128 * 1376) * 4
    assert basis == LAYERS * 7 * 128 * 512 * 4
    assert (format_bytes(moments), format_bytes(basis)) == ("48.2 MiB", "14.0 MiB")
    adam = 2 * sum(m * n for m, n in shapes) * 4
    assert format_bytes(adam) == "193.0 MiB" and moments + basis < 0.33 * adam


def test_svd_refresh_on_llama_60m_shapes_counts_the_same():
    model = llama60m_linears()
    opt = GaLoreAdamW(param_groups(model, target_modules=["self_attn", "mlp"], rank=RANK))
    _step_once(model, opt)  # how long this takes is bench_optim.py's business, not a test's: no timing here
    moments, basis = analytic_galore_bytes([tuple(p.shape) for p in model.parameters()], RANK)
    got = state_bytes(opt)
    assert (got["moments"], got["basis"], got["other"]) == (moments, basis, 4 * 56)


def test_coordinates_store_indices_and_blocks_store_full_moments():
    model = llama60m_linears()
    shapes = [tuple(p.shape) for p in model.parameters()]
    opt = FrugalAdamW(param_groups(model, target_modules=["self_attn", "mlp"], rank=RANK, proj_method="coordinates"))
    _step_once(model, opt)
    got = state_bytes(opt)
    assert got["basis"] == 8 * RANK * len(shapes)  # int64 indices
    assert got["moments"] == analytic_galore_bytes(shapes, RANK)[0]
    opt = FrugalAdamW(param_groups(model, target_modules=["self_attn", "mlp"], rank=None, density=0.25,
                                   proj_method="blocks", block_order="ascending"))
    _step_once(model, opt)
    active = [tuple(p.shape) for p in model.parameters()][:14]  # ascending: the first 25% of the tensors
    assert state_bytes(opt)["moments"] == 2 * 4 * sum(m * n for m, n in active)


def test_state_bytes_of_torch_adamw():
    p = nn.Parameter(torch.randn(10, 3))
    opt = torch.optim.AdamW([p])
    p.grad = torch.randn_like(p)
    opt.step()
    assert state_bytes(opt) == {"moments": 240, "basis": 0, "other": 4, "total": 244}
