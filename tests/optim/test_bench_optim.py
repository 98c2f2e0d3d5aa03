"""scripts/bench_optim.py on a tiny configuration: every optimizer steps, the table, the ratios and
the chart come out (the timings themselves are checked by running the script, not here)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_optim", ROOT / "scripts" / "bench_optim.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_every_optimizer_runs_and_reports(monkeypatch, tmp_path):
    monkeypatch.setitem(bench.LLAMA_SIZES, "tiny", dict(hidden_size=24, intermediate_size=40, num_attention_heads=2,
                                                     num_hidden_layers=3))
    rows = bench.run("tiny", rank=4, gap=10, rounds=1, steady_steps=1, names=bench.DEFAULT_OPTIMIZERS, layers=2)
    assert [row["optimizer"] for row in rows] == bench.DEFAULT_OPTIMIZERS
    assert all(row["steady_ms"] > 0 and row["refresh_ms"] > 0 for row in rows)
    by = {row["optimizer"]: row for row in rows}
    assert by["galore-torch GaLoreAdamW"]["state"] is None and by["lrtrain GaLoreAdamW (randomized)"]["state"] > 0
    table = bench.markdown(rows)
    assert "| lrtrain ApolloAdamW |" in table and "(objects)" in table
    lines = bench.ratios(rows)
    assert any(line.startswith("refresh lrtrain GaLoreAdamW (randomized) / lrtrain GaLoreAdamW (svd)") for line in lines)
    chart = tmp_path / "chart.png"
    bench.plot({"tiny": rows}, str(chart), gap=10)
    assert chart.read_bytes()[:4] == b"\x89PNG"
