"""Multi-process tests: ``torchrun --standalone --nproc_per_node=2`` with gloo on the CPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def torchrun(script: str, *args: str, nproc: int = 2) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           str(HERE / script), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise AssertionError(f"{script} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return done.stdout


@pytest.mark.slow
def test_sharded_optimizers_match_one_process():
    out = torchrun("optimizer_parity.py")
    for case in ("galore-svd", "galore-randomized", "fira-svd", "fira-random", "frugal-svd-sign",
                 "frugal-coordinates", "frugal-sgd-randomized", "frugal-blocks", "galore-int8-basis-float32-moments",
                 "fira-int4-basis-project", "steady steps",
                 "8-bit refuses split parameters", "Adafactor refuses split parameters"):
        assert f"ok {case}\n" in out
