"""scripts/bench_state.py and scripts/memory_vs_papers.py on small sizes: the state table's ratios, the
captured-energy measure and the papers' tables come out (the README's figures come from running them)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_state_table_against_galore_torch():
    bench = _script("bench_state")
    rows = {row["optimizer"]: row for row in bench.rows("llama_20m", 1)}
    reference = rows["galore-torch GaLoreAdamW"]["total"]
    low_rank = {name: row["moments"] + row["basis"] for name, row in rows.items()}  # "other": step counters
    assert low_rank["lrtrain GaLore (default: bf16 state)"] == reference
    assert low_rank["lrtrain GaLore, float32 state"] == 2 * reference
    assert rows["lrtrain GaLore, 8-bit moments, int8 basis"]["total"] < 0.6 * reference
    assert rows["lrtrain APOLLO, seed-only basis"]["basis"] == 0


def test_captured_energy_orders_the_storages():
    energy = _script("bench_state").captured_energy("llama_tiny")
    assert energy["float32"][2] < 1e-5 < energy["int8"][2] < energy["int4"][2]  # the norm errors
    assert energy["int4"][0] < energy["int8"][0] <= energy["float32"][0] + 1e-6 <= 1.0


def test_papers_tables_print(capsys):
    _script("memory_vs_papers").main()
    out = capsys.readouterr().out
    assert "**GaLore Table 11** (LLaMA-1B, rank 512" in out and "| 8-bit GaLore, layer-wise | 5.63 GB |" in out
    assert out.count("| AdamW |") == 4  # GaLore's Tables 2, 6 and 11, Fira's Table 3
