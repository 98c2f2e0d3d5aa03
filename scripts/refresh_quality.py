"""How much the refresh options change what GaLore learns: a grid of short training runs, several seeds per
cell, reported as mean ± standard deviation (a markdown table and a plot).

Grid: refresh gap × rank (a fraction of the width) × refresh (svd, randomized with 1 and 2 power
iterations, random) × moments (keep, reset, project) × staggered or not, on two tasks:

* ``shakespeare``: llama_tiny (the main job's model) on the embedded corpus, validation loss at the end;
* ``memorise``: the same model learning a fixed set of random token sequences by heart (loss on that set at
  the end), with its refreshes often: few steps, so that a refresh is a large part of what a run does.

Every cell runs once per seed (the seed sets the model's initialisation, the data order and the random
bases). Each finished run is one JSON line of ``<out>/runs.jsonl``; a rerun skips the runs already there, so
an interrupted grid resumes, and ``--workers`` processes (one thread each) share the grid.

    python scripts/refresh_quality.py --workers 2 --studies    # into docs/results/refresh_quality
    python scripts/refresh_quality.py --report-only

``--quick`` runs a two-cell, two-seed grid in a few seconds (the test of this script).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lrtrain.train.report import mean_and_std

#: What one run is: its task and seed, and the refresh options of its GaLore.
FIELDS = ("task", "gap", "rank_fraction", "method", "power_iters", "moments", "stagger", "alignment", "transport",
          "seed")
#: The value of a field that older records lack.
DEFAULTS = {"alignment": "none", "transport": "kept"}


@dataclass(frozen=True)
class Task:
    """A training task: ``steps`` of ``batch`` sequences of ``seq_len`` tokens at learning rate ``lr``."""

    name: str
    steps: int
    batch: int
    seq_len: int
    lr: float
    #: memorise only: how many distinct sequences, drawn from how many token values
    sequences: int = 0
    vocab: int = 0


TASKS = {
    "shakespeare": Task("shakespeare", steps=300, batch=4, seq_len=64, lr=0.01),
    "memorise": Task("memorise", steps=150, batch=8, seq_len=32, lr=0.01, sequences=128, vocab=256),
}
GAPS = (10, 50, 200)
RANK_FRACTIONS = (0.125, 0.25)
#: (proj_method, power_iters): the randomized refresh at 1 and 2 (its default) power iterations
METHODS = (("svd", 2), ("randomized", 1), ("randomized", 2), ("random", 2))
MOMENTS = ("keep", "reset", "project")
STAGGER = (False, True)
SEEDS = (0, 1, 2)
#: The basis_alignment study: each alignment against none, with kept moments (where alignment matters).
ALIGNMENTS = ("none", "signs", "procrustes")
#: The study of refresh_moments="project"'s second-moment map: lrtrain's (``kept``: V keeps its coordinates,
#: raised where the step's bound needs it) against three others. Records before this map (lrtrain's until
#: then, ``independent_bounded``) carry that name.
TRANSPORTS = ("kept", "independent_bounded", "independent", "triangle")


def _variance_map(kind: str):
    """``rotate_moments_`` with another map of V (M is carried exactly in all): ``independent`` V·(T⊙T), the
    variance if the old coordinates were independent; ``independent_bounded`` that, raised as lrtrain raises
    its kept V, to (M'/κ)² (lrtrain's map before the kept one); ``triangle`` (√V·|T|)², the triangle
    inequality's sure bound on |M'|."""
    from lrtrain.optim.engine.refresh import raised_to_bound, step_bound

    def rotate_moments_(exp_avg, exp_avg_sq, transition, side):
        def times(x, t):
            return x @ t if side == "right" else t @ x
        bound = step_bound(exp_avg, exp_avg_sq, side)
        variance = (times(exp_avg_sq.sqrt(), transition.abs()).square() if kind == "triangle"
                    else times(exp_avg_sq, transition.square()))
        exp_avg.copy_(times(exp_avg, transition))
        exp_avg_sq.copy_(raised_to_bound(variance, exp_avg, bound) if kind == "independent_bounded" else variance)
    return rotate_moments_


#: ``--quick``'s grid (its runs are also shortened): two cells, two seeds.
QUICK = dict(tasks=("memorise",), gaps=(5,), ranks=(0.25,), methods=(("svd", 2), ("randomized", 2)),
             moments=("keep",), stagger=(False,), seeds=(0, 1))


def study_grid(tasks=tuple(TASKS)) -> list:
    """The alignment study (kept moments, where alignment matters) and the transport study (projected ones)."""
    return (grid(tasks=tasks, gaps=(10, 50), ranks=(0.25,), methods=(("svd", 2), ("randomized", 2)),
                 moments=("keep",), stagger=(False,), alignments=ALIGNMENTS)
            + grid(tasks=tasks, gaps=(10, 50), ranks=(0.125,), methods=(("svd", 2),), moments=("project",),
                   stagger=(False,), transports=TRANSPORTS[1:]))


@dataclass(frozen=True)
class Cell:
    task: str
    gap: int
    rank_fraction: float
    method: str
    power_iters: int
    moments: str
    stagger: bool
    alignment: str
    transport: str
    seed: int

    def key(self) -> tuple:
        return tuple(getattr(self, name) for name in FIELDS)


def grid(tasks=tuple(TASKS), gaps=GAPS, ranks=RANK_FRACTIONS, methods=METHODS, moments=MOMENTS, stagger=STAGGER,
         alignments=("none",), transports=("kept",), seeds=SEEDS) -> list[Cell]:
    return [Cell(task, gap, rank, method, iters, moment, stag, alignment, transport, seed)
            for task, gap, rank, (method, iters), moment, stag, alignment, transport, seed
            in itertools.product(tasks, gaps, ranks, methods, moments, stagger, alignments, transports, seeds)]


def field(run: dict, name: str):
    return run.get(name, DEFAULTS.get(name))


def _batches(task: Task, seed: int):
    """(train batch function, evaluation batches) of ``task``: sequences of seq_len + 1 tokens."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    if task.name == "memorise":
        data = torch.randint(task.vocab, (task.sequences, task.seq_len + 1),
                             generator=torch.Generator().manual_seed(1000 + seed))

        def train_batch():
            return data[torch.randint(task.sequences, (task.batch,), generator=generator)]

        return train_batch, list(data.split(task.batch)), task.vocab
    from lrtrain.data import load_data

    text = load_data("shakespeare", seq_len=task.seq_len, seed=seed, vocab_size=4096,
                     cache_dir=os.environ.get("LRTRAIN_CACHE_DIR", Path.home() / ".cache" / "lrtrain"))
    train, validation = text.train, text.validation

    def train_batch():
        return train.blocks(torch.randint(train.num_blocks, (task.batch,), generator=generator))

    evaluation = [validation.blocks(torch.arange(i, min(i + task.batch, validation.num_blocks)))
                  for i in range(0, min(validation.num_blocks, 8 * task.batch), task.batch)]
    return train_batch, evaluation, text.vocab_size


def train_cell(cell: Cell) -> dict:
    """Train one cell; its record: the cell, the final loss and the seconds it took."""
    import torch

    from lrtrain.models import build_model
    from lrtrain.optim import GaLoreAdamW, param_groups
    from lrtrain.train.loop import causal_lm_loss
    from lrtrain.train.schedule import build_scheduler

    task = TASKS[cell.task]
    start = time.perf_counter()
    torch.manual_seed(cell.seed)
    train_batch, evaluation, vocab = _batches(task, cell.seed)
    model = build_model("llama_tiny", vocab_size=vocab, max_position_embeddings=task.seq_len)
    width = model.config.hidden_size
    groups = param_groups(model, rank=round(cell.rank_fraction * width), update_proj_gap=cell.gap)
    optimizer = GaLoreAdamW(groups, lr=task.lr, weight_decay=0.0, proj_method=cell.method,
                            power_iters=cell.power_iters, refresh_moments=cell.moments,
                            stagger_refresh=cell.stagger, seed=cell.seed,
                            basis_alignment=cell.alignment if cell.method in ("svd", "randomized") else "none")
    schedule = build_scheduler(optimizer, total_steps=task.steps, warmup_steps=task.steps // 10)
    with _transport(cell.transport):
        for _ in range(task.steps):
            loss = causal_lm_loss(model, train_batch())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
    with torch.no_grad():
        final = sum(float(causal_lm_loss(model, batch)) * len(batch) for batch in evaluation)
    final /= sum(len(batch) for batch in evaluation)
    return {**asdict(cell), "loss": final, "seconds": round(time.perf_counter() - start, 2)}


@contextlib.contextmanager
def _transport(kind: str):
    """The refreshes inside use the study's map of V (:func:`_variance_map`) instead of lrtrain's own."""
    from lrtrain.optim.engine import refresh

    if kind == "kept":
        yield
        return
    original = refresh.rotate_moments_
    refresh.rotate_moments_ = _variance_map(kind)
    try:
        yield
    finally:
        refresh.rotate_moments_ = original


def read_runs(path: Path) -> list[dict]:
    if not path.exists():
        return []
    runs = []
    for line in path.read_text().splitlines():
        try:
            runs.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by an interrupted write
            continue
    return runs


def run_worker(cells: list[Cell], out: Path, worker: int, workers: int) -> None:
    """Train this worker's share of the cells not yet in ``runs.jsonl``, appending one line per run."""
    import torch

    torch.set_num_threads(1)
    done = {tuple(field(run, name) for name in FIELDS) for run in read_runs(out / "runs.jsonl")}
    todo = [cell for cell in dict.fromkeys(cells) if cell.key() not in done][worker::workers]  # the studies share cells
    for i, cell in enumerate(todo):
        record = train_cell(cell)
        with open(out / "runs.jsonl", "a") as file:  # one short line per write: appends stay whole
            file.write(json.dumps(record) + "\n")
        print(f"[worker {worker}] {i + 1}/{len(todo)} {record}", flush=True)


# --------------------------------------------------------------------------- report

def summarise(runs: list[dict]) -> dict[tuple, tuple[float, float, int]]:
    """(mean, sample standard deviation, seeds) of the final loss per cell (every field but the seed)."""
    by_cell: dict[tuple, list[float]] = {}
    for run in runs:
        by_cell.setdefault(tuple(field(run, name) for name in FIELDS[:-1]), []).append(run["loss"])
    return {key: (*mean_and_std(v), len(v)) for key, v in by_cell.items()}


def at(stats: dict, task: str, gap: int, rank: float, method: str, iters: int, moments: str, stagger: bool, *,
       alignment: str = "none", transport: str = "kept") -> tuple[float, float, int] | None:
    """A cell's (mean, std, seeds), or None if it has no runs; alignment and transport at their defaults."""
    return stats.get((task, gap, rank, method, iters, moments, stagger, alignment, transport))


def paired_changes(runs: list[dict], base: tuple, other: tuple) -> list[float]:
    """Seed by seed, 100·(other / base - 1) of the final loss, for the seeds both cells ran (the seed sets the
    initialisation and the data, so the pair differs by its refresh options only). Cells: FIELDS up to
    ``stagger``, with the default alignment and transport."""
    def losses(cell: tuple) -> dict[int, float]:
        key = (*cell, "none", "kept")
        return {run["seed"]: run["loss"] for run in runs if tuple(field(run, n) for n in FIELDS[:-1]) == key}
    a, b = losses(base), losses(other)
    return [100 * (b[seed] / a[seed] - 1) for seed in sorted(a.keys() & b.keys())]


def _shown(cell: tuple[float, float, int] | None) -> str:
    return "-" if cell is None else f"{cell[0]:.4f} ± {cell[1]:.4f}"


def method_name(method: str, power_iters: int) -> str:
    return f"randomized ({power_iters} p.i.)" if method == "randomized" else method


def summary(stats: dict, tasks: list[str]) -> list[str]:
    """One row per task, gap and rank: svd with kept moments, and each option's change of it in % of the final
    loss (means over seeds): the randomized refresh (2 power iterations) with each kind of moments against
    svd with the same, projected and reset moments against kept ones, staggered refreshes against not."""
    def change(a, b) -> str:
        return "-" if a is None or b is None else f"{100 * (b[0] / a[0] - 1):+.1f}"

    lines = ["## Summary (changes in % of the final loss, unstaggered unless staggered is the change)", "",
             "| task | gap | rank | svd, keep | randomized: keep / reset / project | svd: project / reset vs keep "
             "| staggered (svd: keep / reset / project) |", "|---|---:|---:|---:|---|---|---|"]
    for task in tasks:
        gaps, ranks = (sorted({key[k] for key in stats if key[0] == task}) for k in (1, 2))
        for gap, rank in itertools.product(gaps, ranks):
            def cell(method="svd", moments="keep", stagger=False, where=(task, gap, rank)):
                return at(stats, *where, method, 2, moments, stagger)
            if cell() is None:
                continue
            randomized = " / ".join(change(cell(moments=m), cell("randomized", m)) for m in MOMENTS)
            moments = " / ".join(change(cell(), cell(moments=m)) for m in ("project", "reset"))
            staggered = " / ".join(change(cell(moments=m), cell(moments=m, stagger=True)) for m in MOMENTS)
            lines.append(f"| {task} | {gap} | {rank:g} | {_shown(cell())} | {randomized} | {moments} | {staggered} |")
    return lines + [""]


def report(runs: list[dict], out: Path) -> str:
    """The markdown report (also written to ``<out>/report.md``) and ``<out>/refresh_quality.png``."""
    stats = summarise(runs)
    lines = ["# Refresh quality", "",
             "Final loss, mean ± standard deviation over seeds (n seeds in brackets where fewer than the most); "
             "GaLore on llama_tiny, rank = fraction × width 128. Δ: the randomized refresh (2 power iterations, "
             "the default) against svd with the same moments, mean over seeds, in % (within 1 %: not more than "
             "1 % above), and in brackets the standard deviation of the seed-by-seed change (each seed's "
             "initialisation and data are the same for both).", ""]
    tasks = sorted({key[0] for key in stats}, key=list(TASKS).index)
    methods = [m for m in METHODS if any((key[3], key[4]) == m for key in stats)]
    most = max(n for _, _, n in stats.values())
    checks = {"randomized within 1 % of svd": [0, 0], "project no worse than keep by 1 std": [0, 0]}
    lines += summary(stats, tasks)
    for task in tasks:
        lines += [f"## {task}", "", "| gap | rank | stagger | moments | "
                  + " | ".join(method_name(*m) for m in methods) + " | Δ randomized vs svd |",
                  "|---:|---:|---|---|" + "---:|" * (len(methods) + 1)]
        values = [sorted({key[k] for key in stats}) for k in (1, 2, 6)]  # gaps, ranks, stagger in the runs
        for gap, rank, stagger, moments in itertools.product(*values, MOMENTS):
            cells = [at(stats, task, gap, rank, m, i, moments, stagger) for m, i in methods]
            if not any(cells):
                continue
            shown = ["-" if c is None else f"{c[0]:.4f} ± {c[1]:.4f}" + (f" ({c[2]})" if c[2] < most else "")
                     for c in cells]
            svd, randomized = (at(stats, task, gap, rank, m, i, moments, stagger) for m, i in
                               (("svd", 2), ("randomized", 2)))
            delta = "-"
            if svd and randomized:
                change = 100 * (randomized[0] / svd[0] - 1)
                paired = paired_changes(runs, (task, gap, rank, "svd", 2, moments, stagger),
                                        (task, gap, rank, "randomized", 2, moments, stagger))
                spread = mean_and_std(paired)[1] if paired else math.nan
                delta = f"{change:+.2f} % (± {spread:.2f})"
                checks["randomized within 1 % of svd"][0] += change <= 1.0
                checks["randomized within 1 % of svd"][1] += 1
            lines.append(f"| {gap} | {rank:g} | {'yes' if stagger else 'no'} | {moments} | " + " | ".join(shown)
                         + f" | {delta} |")
            if moments == "project":
                for m, i in methods:
                    keep, project = (at(stats, task, gap, rank, m, i, name, stagger) for name in ("keep", "project"))
                    if keep and project:
                        checks["project no worse than keep by 1 std"][0] += project[0] <= keep[0] + keep[1]
                        checks["project no worse than keep by 1 std"][1] += 1
        lines.append("")
    lines += ["## Targets", ""] + [f"* {name}: {hit} of {total} cells" for name, (hit, total) in checks.items()]
    aligned = {key[:5] for key in stats if key[7] != "none"}
    if aligned:
        lines += ["", "## basis_alignment (kept moments, unstaggered)", "",
                  "| task | gap | rank | refresh | " + " | ".join(ALIGNMENTS) + " |",
                  "|---|---:|---:|---|---:|---:|---:|"]
        for task, gap, rank, method, iters in sorted(aligned):
            shown = [at(stats, task, gap, rank, method, iters, "keep", False, alignment=name) for name in ALIGNMENTS]
            lines.append(f"| {task} | {gap} | {rank:g} | {method_name(method, iters)} | "
                         + " | ".join(map(_shown, shown)) + " |")
    transported = {key[:5] for key in stats if key[8] != "kept"}
    if transported:
        lines += ["", "## refresh_moments='project': the map of V (unstaggered)", "",
                  "| task | gap | rank | refresh | keep | " + " | ".join(f"project, {t}" for t in TRANSPORTS) + " |",
                  "|---|---:|---:|---|---:|" + "---:|" * len(TRANSPORTS)]
        for task, gap, rank, method, iters in sorted(transported):
            shown = [at(stats, task, gap, rank, method, iters, "keep", False)]
            shown += [at(stats, task, gap, rank, method, iters, "project", False, transport=t) for t in TRANSPORTS]
            lines.append(f"| {task} | {gap} | {rank:g} | {method_name(method, iters)} | "
                         + " | ".join(map(_shown, shown)) + " |")
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text)
    plot(stats, tasks, methods, out / "refresh_quality.png")
    return text


def plot(stats: dict, tasks: list[str], methods: list[tuple[str, int]], path: Path) -> None:
    """Final loss against the refresh gap per method and moments (unstaggered, the largest rank), with ±1 std
    bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gaps, rank = sorted({key[1] for key in stats}), max(key[2] for key in stats)
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for (method, iters), moments in itertools.product(methods, MOMENTS):
            points = [(gap, cell) for gap in gaps
                      if (cell := at(stats, task, gap, rank, method, iters, moments, False)) is not None]
            if not points:
                continue
            ax.errorbar([g for g, _ in points], [s[0] for _, s in points], yerr=[s[1] for _, s in points],
                        color=f"C{methods.index((method, iters))}", capsize=3, marker="o",
                        linestyle={"keep": "-", "reset": ":", "project": "--"}[moments],
                        label=f"{method_name(method, iters)}, {moments}")
        ax.set(xscale="log", xlabel="refresh gap (steps)", ylabel="final loss",
               title=f"{task}, rank {rank:g} of the width")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/results/refresh_quality"),
                        help="where the records, report and plot go (the committed ones by default)")
    parser.add_argument("--workers", type=int, default=1, help="processes, one thread each")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--report-only", action="store_true", help="only write the report of the runs so far")
    parser.add_argument("--studies", action="store_true", help="also run the alignment and transport studies")
    parser.add_argument("--quick", action="store_true", help="two cells, two seeds, few steps: a smoke test")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        for name, task in TASKS.items():
            TASKS[name] = Task(**{**asdict(task), "steps": 12, "batch": 4})
        cells = grid(**QUICK)
    else:
        cells = grid(tasks=tuple(args.tasks)) + (study_grid(tuple(args.tasks)) if args.studies else [])
    args.out.mkdir(parents=True, exist_ok=True)
    if args.worker is not None:
        run_worker(cells, args.out, args.worker, args.workers)
        return
    if not args.report_only:
        command = [sys.executable, __file__, "--out", str(args.out), "--workers", str(args.workers),
                   "--tasks", *args.tasks, *(["--quick"] if args.quick else []),
                   *(["--studies"] if args.studies else [])]
        environment = {**os.environ, "OMP_NUM_THREADS": "1"}
        workers = [subprocess.Popen([*command, "--worker", str(k)], env=environment) for k in range(args.workers)]
        if any(worker.wait() != 0 for worker in workers):
            sys.exit("a worker failed; its runs so far are kept, rerun to continue")
    print(report(read_runs(args.out / "runs.jsonl"), args.out))


if __name__ == "__main__":
    main()
