"""scripts/refresh_quality.py: the grid's runs, their resumption, and the report's statistics and targets."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("refresh_quality", ROOT / "scripts" / "refresh_quality.py")
quality = importlib.util.module_from_spec(_spec)
sys.modules["refresh_quality"] = quality  # its dataclasses look their module up
_spec.loader.exec_module(quality)


def test_quick_grid_runs_resumes_and_reports(tmp_path, capsys):
    command = [sys.executable, str(ROOT / "scripts" / "refresh_quality.py"), "--quick", "--out", str(tmp_path)]
    subprocess.run(command, check=True, capture_output=True, text=True)
    runs = quality.read_runs(tmp_path / "runs.jsonl")
    assert len(runs) == 4 and all(run["loss"] > 0 for run in runs)
    with open(tmp_path / "runs.jsonl", "a") as file:  # a line cut short by an interrupted worker is skipped
        file.write('{"task": "memor')
    threads = torch.get_num_threads()
    quality.run_worker(quality.grid(**quality.QUICK), tmp_path, worker=0, workers=1)  # in-process: no start-up
    torch.set_num_threads(threads)  # a worker runs on one thread
    assert "[worker 0]" not in capsys.readouterr().out  # every run was there: nothing trained again
    report = quality.report(quality.read_runs(tmp_path / "runs.jsonl"), tmp_path)
    assert "| 5 | 0.25 | no | keep |" in report and "randomized within 1 % of svd: 1 of 1 cells" in report
    assert (tmp_path / "refresh_quality.png").read_bytes()[:4] == b"\x89PNG"


def _run(seed, loss, **cell):
    fields = {"task": "memorise", "gap": 10, "rank_fraction": 0.25, "method": "svd", "power_iters": 2,
              "moments": "keep", "stagger": False, "alignment": "none", **cell}
    return {**fields, "seed": seed, "loss": loss}


def test_report_gives_mean_and_spread_and_counts_the_targets(tmp_path):
    runs = [_run(0, 1.0), _run(1, 1.2), _run(2, 1.1),  # svd, keep: 1.1 ± 0.1
            *(_run(s, v, method="randomized") for s, v in enumerate((1.10, 1.12, 1.11))),  # +0.91 %: within 1 %
            *(_run(s, v, moments="project") for s, v in enumerate((1.15, 1.17, 1.16))),  # 1.16 <= keep + 1 std
            *(_run(s, v, moments="project", method="randomized") for s, v in enumerate((1.3, 1.3, 1.3))),
            _run(0, 0.9, alignment="procrustes"), _run(1, 1.0, alignment="procrustes"),
            _run(0, 1.3, moments="project", transport="triangle"), _run(1, 1.5, moments="project", transport="triangle")]
    # records without a transport (or an alignment) field are lrtrain's default ones
    stats = quality.summarise(runs)
    mean, std, n = stats[("memorise", 10, 0.25, "svd", 2, "keep", False, "none", "kept")]
    assert abs(mean - 1.1) < 1e-12 and abs(std - 0.1) < 1e-12 and n == 3
    report = quality.report(runs, tmp_path)
    assert "| 10 | 0.25 | no | keep | 1.1000 ± 0.1000 | 1.1100 ± 0.0100 | +0.91 % (± 8.34) |" in report  # seed by seed +10, -6.7, +0.9 %
    # project: 1.16 <= 1.1 + 0.1 for svd, 1.3 > 1.11 + 0.01 for randomized; randomized vs svd with project +12 %
    assert "project no worse than keep by 1 std: 1 of 2 cells" in report
    assert "randomized within 1 % of svd: 1 of 2 cells" in report
    # the summary: randomized keep +0.9 %, project +12.1 % (1.3 / 1.16); svd's project +5.5 % over keep
    assert "| memorise | 10 | 0.25 | 1.1000 ± 0.1000 | +0.9 / - / +12.1 | +5.5 / - | - / - / - |" in report
    assert "| memorise | 10 | 0.25 | svd | 1.1000 ± 0.1000 | - | 0.9500 ± 0.0707 |" in report
    assert "| memorise | 10 | 0.25 | svd | 1.1000 ± 0.1000 | 1.1600 ± 0.0100 | - | - | 1.4000 ± 0.1414 |" in report
    assert json.loads(json.dumps(runs))  # records are plain JSON
