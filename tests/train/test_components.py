"""Schedule, atomic checkpoints, the CPU memory tracker and the run logger."""

import json
import math
from pathlib import Path

import pytest
import torch

from lrtrain.memory import PeakMemory, TensorMemoryTracker, module_bytes
from lrtrain.train import (
    RunLogger,
    build_scheduler,
    latest_complete_checkpoint,
    load_checkpoint,
    save_checkpoint,
    warmup_cosine,
)
from lrtrain.train.checkpoint import checkpoints, load_trainer_state


def test_warmup_cosine_shape():
    kw = {"warmup_steps": 10, "cycle_length": 110, "min_lr_ratio": 0.1}
    assert warmup_cosine(0, **kw) == 0.0
    assert warmup_cosine(5, **kw) == pytest.approx(0.5)
    assert warmup_cosine(10, **kw) == pytest.approx(1.0)
    assert warmup_cosine(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert warmup_cosine(109, **kw) == pytest.approx(0.1, abs=1e-3)
    decay = [warmup_cosine(s, **kw) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    # a new cycle restarts the warmup, with the references' 1e-7 for its first two steps
    assert warmup_cosine(110, **kw) == 1e-7 and warmup_cosine(111, **kw) == 1e-7
    assert warmup_cosine(115, **kw) == pytest.approx(0.5)


def test_scheduler_drives_the_optimizer_lr():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.5)
    sched = build_scheduler(opt, total_steps=20, warmup_steps=4)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[4] == pytest.approx(0.5)
    assert lrs[-1] == pytest.approx(0.5 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 15 / 16))))  # p = (19-4)/16
    with pytest.raises(ValueError, match="warmup_steps"):
        build_scheduler(opt, total_steps=10, warmup_steps=10)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        build_scheduler(opt, total_steps=10, warmup_steps=1, min_lr_ratio=0.0)


def _model_and_optimizer(seed):
    from lrtrain.optim import GaLoreAdamW

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Linear(9, 4))
    groups = [{"params": [model[0].bias, model[1].bias]},
              {"params": [model[0].weight, model[1].weight], "rank": 2, "update_proj_gap": 2}]
    opt = GaLoreAdamW(groups, lr=1e-2)
    for _ in range(3):
        model(torch.randn(5, 6)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_checkpoints_roundtrip_and_keep(tmp_path):
    model, opt = _model_and_optimizer(0)
    for step in (3, 10, 7):
        save_checkpoint(tmp_path, step, model, opt, {"step": step, "meta": {"a": [1, 2]}}, keep=2)
    assert [p.name for p in checkpoints(tmp_path)] == ["step-00000007", "step-00000010"]
    fresh, fresh_opt = _model_and_optimizer(1)
    load_checkpoint(latest_complete_checkpoint(tmp_path), fresh, fresh_opt)
    assert load_trainer_state(latest_complete_checkpoint(tmp_path)) == {"step": 10, "meta": {"a": [1, 2]}}
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            assert torch.equal(fresh_opt.state[q][key], value), key
            assert fresh_opt.state[q][key].dtype == value.dtype


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    model, opt = _model_and_optimizer(0)
    save_checkpoint(tmp_path, 1, model, opt, {"step": 1})
    import torch.distributed.checkpoint as dcp

    def crash(state, checkpoint_id):
        (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(dcp, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, model, opt, {"step": 2})
    assert latest_complete_checkpoint(tmp_path).name == "step-00000001"  # the half-written one is never a checkpoint
    assert load_trainer_state(latest_complete_checkpoint(tmp_path)) == {"step": 1}


def test_tracker_counts_live_storages_exactly():
    tracker = TensorMemoryTracker()
    with tracker:
        a = torch.empty(1000)  # 4000 B
        b = a * 2  # 4000 B more
        view = b[:10]  # a view: nothing new
        b.add_(1)  # in place: nothing new
        assert tracker.current == 8000
        del a
        assert tracker.current == 4000
        c = torch.empty(500, dtype=torch.float64)  # 4000 B
    assert tracker.peak == 8000 and tracker.current == 8000
    del b
    assert tracker.current == 8000  # the view keeps b's storage alive
    del view, c
    assert tracker.current == 0


def test_tracker_sees_activations_saved_for_backward():
    lin = torch.nn.Linear(256, 512)
    x = torch.randn(64, 256)
    peak = PeakMemory("cpu", [*lin.parameters(), x])
    with peak:
        y = torch.tanh(lin(x))  # tanh keeps its (64, 512) output for backward; the linear output is freed after
        loss = y.sum()
        del y
        loss.backward()
    sizes = module_bytes(lin)
    assert sizes == {"params": (256 * 512 + 512) * 4, "buffers": 0, "grads": (256 * 512 + 512) * 4}
    # weights + input + the saved activation + grads: at least that much was live at the peak
    floor = sizes["params"] + 64 * 256 * 4 + 64 * 512 * 4 + sizes["grads"]
    assert floor <= peak.bytes <= floor + 3 * 64 * 512 * 4


def test_run_logger_jsonl_and_rewind(tmp_path):
    logger = RunLogger(tmp_path, "run-a", {"x": 1})
    for step in (1, 2, 3, 4):
        logger.log(step, {"train/loss": 1.0 / step})
    logger.finish({"step": 4})
    resumed = RunLogger(tmp_path, "run-a", {"x": 1})
    resumed.rewind(2)
    resumed.log(3, {"train/loss": 0.5})
    resumed.finish({"step": 3, "val/loss": 0.4})
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3] and lines[-1]["train/loss"] == 0.5
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["name"] == "run-a" and run["summary"]["val/loss"] == 0.4
    assert RunLogger.finished_summary(tmp_path) == {"step": 3, "val/loss": 0.4}
    assert RunLogger.finished_summary(tmp_path / "elsewhere") is None


def test_disabled_logger_writes_nothing(tmp_path):
    logger = RunLogger(tmp_path / "rank1", "r", {}, enabled=False)
    logger.log(1, {"a": 1.0})
    logger.finish({})
    assert not (tmp_path / "rank1").exists()


def test_optimizer_wide_config_keys_reach_the_plain_groups():
    """optimizer.adam_style (and maximize, state_bits) set the formula of every group: the embeddings and
    the head too, not only the low-rank group (they used to run the preset's formula silently)."""
    from lrtrain.train.run import build_optimizer
    from tests.conftest import TinyLM

    optimizer = build_optimizer({"name": "galore", "rank": 4, "adam_style": "torch", "maximize": True}, TinyLM())
    assert len(optimizer.param_groups) == 2
    assert all(group["adam_style"] == "torch" and group["maximize"] for group in optimizer.param_groups)
