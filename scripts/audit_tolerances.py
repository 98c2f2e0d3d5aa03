"""How much of each numerical test bound is used, over seeds and thread counts.

    python scripts/audit_tolerances.py --seeds 0 1 2 --threads 1 2 [--out docs/tolerances.md] [pytest selection]

Runs the selected tests (by default every test that compares numbers across implementations,
precisions, bit widths or training trajectories) once per (seed, thread count), with
``LRTRAIN_TEST_SEED`` added to every seed the tests set and ``OMP_NUM_THREADS`` fixing torch's
threads. Each check records the share of its bound an observation used (``tests/tolerance.py``:
every ``torch.testing.assert_close`` and every ``tolerance`` fixture call); the report lists, per
check, the largest share seen and the headroom (1 / that share). A bound needs a headroom of at
least 2; exact comparisons (rtol = atol = 0) are counted apart. Exit status 1 when a check has
less headroom than ``--min-headroom`` or a run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AUDITED = [
    "tests/optim/test_reference_parity.py", "tests/optim/test_adafactor.py", "tests/optim/test_apollo.py",
    "tests/optim/test_quantized.py", "tests/optim/test_layerwise.py", "tests/optim/test_update_rules.py",
    "tests/optim/test_refresh.py", "tests/kernels", "tests/models/test_llama.py", "tests/param",
    "tests/train/test_harness.py::test_loss_falls_on_the_corpus",
    "tests/train/test_harness.py::test_layerwise_updates_through_the_harness",
]


def run_once(selection: list[str], seed: int, threads: int, log: Path) -> int:
    env = {**os.environ, "LRTRAIN_TEST_SEED": str(seed), "OMP_NUM_THREADS": str(threads),
           "LRTRAIN_TOLERANCE_LOG": str(log), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "WANDB_MODE": "disabled", "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *selection],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    print(f"seed {seed}, {threads} thread(s): {done.stdout.strip().splitlines()[-1] if done.stdout.strip() else '?'}",
          flush=True)
    if done.returncode != 0:
        print(done.stdout[-4000:], file=sys.stderr)
    return done.returncode


def report(records: list[dict], runs: int, min_headroom: float) -> tuple[str, list[str]]:
    by_check: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        by_check[record["check"]].append(record)
    rows, tight, exact = [], [], 0
    for check, seen in sorted(by_check.items()):
        if all(r["bound"] == "rtol=0, atol=0" for r in seen):
            exact += 1
            continue
        worst = max(r["used"] for r in seen)
        headroom = float("inf") if worst == 0 else 1 / worst
        where = max(seen, key=lambda r: r["used"])
        rows.append((headroom, check, seen[0]["bound"], worst, len(seen), where["seed"], where["threads"]))
        if headroom < min_headroom:
            tight.append(check)
    rows.sort()
    lines = [f"{len(rows)} bounded checks over {runs} runs ({exact} exact comparisons not listed); "
             f"tightest first. used = largest |observed| / bound; headroom = 1 / used (needed: >= {min_headroom:g}).",
             "", "| check | bound | used (worst) | headroom | observations | worst at seed, threads |",
             "|---|---|---:|---:|---:|---|"]
    for headroom, check, bound, worst, count, seed, threads in rows:
        shown = "inf" if headroom == float("inf") else f"{headroom:.1f}"
        lines.append(f"| `{check}` | {bound} | {worst:.3g} | {shown} | {count} | {seed}, {threads} |")
    return "\n".join(lines), tight


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--min-headroom", type=float, default=2.0)
    parser.add_argument("--out", help="also write the report (markdown) here")
    parser.add_argument("selection", nargs="*", default=AUDITED, help="pytest selection (default: the audited tests)")
    args = parser.parse_args()
    failed = 0
    with tempfile.TemporaryDirectory() as scratch:
        log = Path(scratch) / "tolerances.jsonl"
        for seed in args.seeds:
            for threads in args.threads:
                failed += run_once(args.selection, seed, threads, log) != 0
        records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    text, tight = report(records, len(args.seeds) * len(args.threads), args.min_headroom)
    command = "python scripts/audit_tolerances.py " + " ".join(sys.argv[1:])
    document = f"# Test tolerances, audited\n\n`{command.strip()}`\n\n{text}\n"
    print(document)
    if args.out:
        Path(args.out).write_text(document)
    if tight:
        print(f"{len(tight)} check(s) with headroom below {args.min_headroom:g}:", *tight, sep="\n  ", file=sys.stderr)
    sys.exit(1 if tight or failed else 0)


if __name__ == "__main__":
    main()
