"""The comparison report over several seeds per method: grouping, mean ± std, labels, plots."""

import math
from pathlib import Path

import pytest

from lrtrain.train.report import RunRecord, markdown_table, method_runs, plot


def _record(name, optimizer, seed, val_losses, lr=0.01):
    config = {"optimizer": {"name": optimizer, "lr": lr}, "param": {"kind": "dense"}, "train": {"layerwise": False},
              "model": {"size": "llama_tiny"}, "seed": seed, "run_name": name}
    metrics = [{"step": 10 * (k + 1), "val/loss": v, "train/loss": v + 0.1} for k, v in enumerate(val_losses)]
    summary = {"val/loss": val_losses[-1], "val/ppl": math.exp(val_losses[-1]), "memory/peak_gib": 0.5 + seed / 1024,
               "memory/optimizer_state_gib": 0.1,
               "perf/tokens_per_s": 1000.0, "step": 10 * len(val_losses)}
    return RunRecord(Path("/runs") / name, optimizer, config, summary, metrics)


def test_seeds_of_a_method_are_one_row_with_mean_and_spread(tmp_path):
    runs = [_record(f"galore-seed={s}", "galore", s, [5.0, loss]) for s, loss in enumerate((4.5, 4.7, 4.6))]
    runs += [_record(f"adamw-seed={s}", "adamw", s, [4.9, loss]) for s, loss in enumerate((4.40, 4.42))]
    methods = method_runs(runs)
    assert [(m.label, len(m.runs)) for m in methods] == [("galore", 3), ("adamw", 2)]
    mean, std = methods[0].stat("val/loss")
    assert mean == pytest.approx(4.6, abs=1e-12) and std == pytest.approx(0.1, abs=1e-12)
    steps, curve, spread = methods[0].curve("val/loss")
    assert steps == [10, 20] and curve == pytest.approx([5.0, 4.6]) and spread == pytest.approx([0.0, 0.1])
    table = markdown_table(runs).splitlines()
    assert table[2].startswith("| adamw | 2 | 4.410 ± 0.014 |") and table[3].startswith("| galore | 3 | 4.600 ± 0.100 |")
    paths = plot(runs, tmp_path)
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_one_seed_shows_no_spread_and_a_learning_rate_sweep_keeps_its_folder_names():
    runs = [_record("galore-optimizer.lr=0.01", "galore", 0, [4.6], lr=0.01),
            _record("galore-optimizer.lr=0.02-seed=1", "galore", 1, [4.5], lr=0.02),
            _record("galore-optimizer.lr=0.02-seed=2", "galore", 2, [4.7], lr=0.02)]
    methods = method_runs(runs)
    assert [(m.label, len(m.runs)) for m in methods] == [("galore-optimizer.lr=0.01", 1),
                                                          ("galore-optimizer.lr=0.02", 2)]
    assert math.isnan(methods[0].stat("val/loss")[1])
    assert "| galore-optimizer.lr=0.01 | 1 | 4.600 |" in markdown_table(runs)
