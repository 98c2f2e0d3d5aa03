"""param_groups() selects 2-D nn.Linear weights; describe() tabulates what each parameter holds."""

import pytest
import torch
from torch import nn

from lrtrain.memory import format_bytes
from lrtrain.optim import FiraAdamW, FrugalAdamW, GaLoreAdamW, describe, param_groups


def _names(group):
    return [name for name, _ in group["params"]]


def test_default_targets_attn_and_mlp(tiny_lm):
    plain, projected = param_groups(tiny_lm, rank=4)
    assert sorted(_names(projected)) == sorted(
        f"layers.{i}.{m}.weight" for i in range(2) for m in ("attn.q_proj", "attn.o_proj", "mlp.up_proj", "mlp.down_proj")
    )
    assert "embed_tokens.weight" in _names(plain) and "lm_head.weight" in _names(plain)
    assert "layers.0.norm.weight" in _names(plain) and "layers.0.mlp.up_proj.bias" in _names(plain)
    assert projected["rank"] == 4 and projected["update_proj_gap"] == 200 and projected["scale"] == 0.25
    assert projected["proj_type"] == "std"
    total = sum(p.numel() for p in tiny_lm.parameters())
    assert sum(p.numel() for g in (plain, projected) for _, p in g["params"]) == total


def test_regex_and_all_linear(tiny_lm):
    _, projected = param_groups(tiny_lm, target_modules=[r"layers\.0\.mlp\..*"])
    assert _names(projected) == ["layers.0.mlp.up_proj.weight", "layers.0.mlp.down_proj.weight"]
    _, projected = param_groups(tiny_lm, target_modules="all-linear")
    assert len(projected["params"]) == 8 and "lm_head.weight" not in _names(projected)


def test_extra_group_keys_and_density(tiny_lm):
    _, projected = param_groups(tiny_lm, rank=None, density=0.25, proj_method="random", update_proj_gap=50)
    assert projected["rank"] is None and projected["density"] == 0.25 and projected["proj_method"] == "random"
    opt = FrugalAdamW(param_groups(tiny_lm, rank=None, density=0.25))
    assert "density" in opt.param_groups[1]


def test_nothing_matched_is_an_error(tiny_lm):
    with pytest.raises(ValueError, match="selects no nn.Linear module.*include"):
        param_groups(tiny_lm, target_modules=["attention"])
    with pytest.raises(ValueError, match="target_modules is empty"):
        param_groups(tiny_lm, target_modules=[])


def test_matched_non_linear_modules_warn_once():
    model = nn.ModuleDict({"attn_embed": nn.Embedding(5, 4), "attn": nn.Linear(4, 4)})
    with pytest.warns(UserWarning, match=r"not nn.Linear.*attn_embed \(Embedding\)"):
        _, projected = param_groups(model, target_modules=["attn"])
    assert _names(projected) == ["attn.weight"]


def test_frozen_and_tied_parameters(tiny_lm):
    tiny_lm.lm_head.weight = tiny_lm.embed_tokens.weight  # tied input and output embeddings
    tiny_lm.layers[1].attn["q_proj"].weight.requires_grad_(False)
    groups = param_groups(tiny_lm)
    params = [p for g in groups for _, p in g["params"]]
    assert len(params) == len({id(p) for p in params})
    assert all(p.requires_grad for p in params)
    assert len(groups[1]["params"]) == 7


def test_groups_feed_every_optimizer_and_galore_torch(tiny_lm):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import galore_torch
    for cls in (GaLoreAdamW, FiraAdamW, FrugalAdamW):
        cls(param_groups(tiny_lm, rank=4))
    galore_torch.GaLoreAdamW(param_groups(tiny_lm, rank=4), no_deprecation_warning=True)


def test_galore_torch_style_groups_work_unchanged(tiny_lm):
    """The galore-torch README layout: plain tensors, keys rank/update_proj_gap/scale/proj_type."""
    galore = [m.weight for n, m in tiny_lm.named_modules() if isinstance(m, nn.Linear) and ("attn" in n or "mlp" in n)]
    ids = {id(p) for p in galore}
    regular = [p for p in tiny_lm.parameters() if id(p) not in ids]
    opt = GaLoreAdamW([{"params": regular}, {"params": galore, "rank": 4, "update_proj_gap": 200, "scale": 0.25,
                                              "proj_type": "std"}], lr=0.01)
    tiny_lm(torch.randint(0, 32, (2, 5))).sum().backward()
    opt.step()
    assert opt.state[galore[0]]["exp_avg"].shape == (24, 4)


def test_describe_table(tiny_lm):
    opt = GaLoreAdamW(param_groups(tiny_lm, rank=4), lr=0.01)
    tiny_lm(torch.randint(0, 32, (2, 5))).sum().backward()
    opt.step()
    table = describe(opt)
    lines = table.splitlines()
    assert lines[0].split() == ["parameter", "shape", "update", "side", "rank", "state"]
    down = next(line for line in lines if line.startswith("layers.0.mlp.down_proj.weight"))
    # down_proj is (24, 40): wide, so GaLore 'std' projects on the left; state = 2*4*40 + 24*4 floats + step
    assert down.split()[1:6] == ["24x40", "svd", "+", "none", "left"]
    assert down.split()[6] == "4" and down.endswith(format_bytes((2 * 4 * 40 + 24 * 4) * 4 + 4))
    up = next(line for line in lines if line.startswith("layers.0.mlp.up_proj.weight"))
    assert up.split()[5] == "right"
    assert "adamw" in next(line for line in lines if line.startswith("embed_tokens.weight"))
    assert lines[-1].startswith("total")
