"""Compare the runs of a sweep: a markdown table and loss-vs-step / loss-vs-memory plots.

Reads what :class:`lrtrain.train.logger.RunLogger` writes (``run.json`` and ``metrics.jsonl`` in
every run directory below a root); optionally logs the table and plots to wandb. Runs whose configs
differ only in ``seed`` are the seeds of one method: the table gives their mean ± sample standard
deviation, the plots their mean with a ±1 std band.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..memory import estimate, format_bytes
from .logger import METRICS_FILE, RUN_FILE, read_metrics

GIB = 2**30


@dataclass
class RunRecord:
    directory: Path
    label: str
    config: dict[str, Any]
    summary: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        points = [(m["step"], m[key]) for m in self.metrics if key in m]
        return [s for s, _ in points], [v for _, v in points]


def run_label(config: dict[str, Any]) -> str:
    """The method a run stands for: the optimizer, with the parameterization when it is not dense."""
    optimizer, param = config["optimizer"]["name"], config["param"]["kind"]
    return optimizer if param == "dense" else f"{param} + {optimizer}"


def load_runs(root: str | os.PathLike) -> list[RunRecord]:
    """Every finished run below ``root`` (a run directory has ``run.json`` with a summary; folders
    whose name starts with a dot, such as the ``.replaced`` runs ``train.resume=never`` set aside,
    are left out), labelled by :func:`run_label`."""
    root = Path(root)
    runs = []
    for run_file in sorted(root.rglob(RUN_FILE)):
        if any(part.startswith(".") for part in run_file.relative_to(root).parts[:-1]):
            continue
        record = json.loads(run_file.read_text())
        if record.get("summary") is None:
            continue
        metrics = read_metrics(run_file.parent / METRICS_FILE)[0]
        runs.append(RunRecord(run_file.parent, run_label(record["config"]), record["config"], record["summary"],
                              metrics))
    if not runs:
        raise FileNotFoundError(f"no finished runs (run.json with a summary) below {root}")
    return runs


def mean_and_std(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation) of seeds' values; the deviation is NaN for one value."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


#: Config keys that name or place a run, or draw its randomness: runs that differ only there are one method.
_NOT_METHOD = ("seed", "run_name", "sweep_name", "output_root", "logger")


@dataclass
class MethodRuns:
    """The runs of one method, one per seed."""

    label: str
    runs: list[RunRecord]

    def stat(self, key: str) -> tuple[float, float]:
        """(mean, sample standard deviation; NaN for one run) of a summary value over the seeds."""
        values = [r.summary[key] for r in self.runs if key in r.summary]
        if not values:
            return math.nan, math.nan
        return mean_and_std(values)

    def curve(self, key: str) -> tuple[list[int], list[float], list[float]]:
        """(steps, mean, standard deviation) of a logged series at the steps every seed logged."""
        series = [dict(zip(*r.series(key))) for r in self.runs]
        steps = sorted(set.intersection(*(set(points) for points in series)))
        values = [[points[step] for points in series] for step in steps]
        return (steps, [statistics.fmean(v) for v in values],
                [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values])


def method_runs(runs: list[RunRecord]) -> list[MethodRuns]:
    """The runs grouped by method (configs equal but for :data:`_NOT_METHOD`), in the order first seen. Methods
    that share a label (a learning-rate sweep) are labelled with their folder names, the seed taken out."""
    groups: dict[str, list[RunRecord]] = {}
    for r in runs:
        key = json.dumps({k: v for k, v in r.config.items() if k not in _NOT_METHOD}, sort_keys=True, default=str)
        groups.setdefault(key, []).append(r)
    methods = [MethodRuns(group[0].label, group) for group in groups.values()]
    labels = [m.label for m in methods]
    for m in methods:
        if labels.count(m.label) > 1:
            m.label = re.sub(r"-seed=[^-]*", "", m.runs[0].directory.name)
    return methods


#: The sizes at which the report gives the estimator's figures for each run's method: (column, size, part).
AT_SCALE = (("state at 1B", "llama_1b", "optimizer_state"), ("peak at 1B", "llama_1b", "peak"),
            ("state at 7B", "llama_7b", "optimizer_state"), ("peak at 7B", "llama_7b", "peak"))


def estimated_at_scale(config: dict[str, Any]) -> dict[str, float]:
    """GB (10^9 bytes) of :data:`AT_SCALE` for the method and storage options of a run's config, estimated
    by :func:`lrtrain.memory.estimate` for bf16 weights, 256 tokens and one GPU: where the method's saving
    matters, which the tiny model's measured memory (dominated by activations) cannot show."""
    optimizer, param = config["optimizer"], config["param"]["kind"]
    method = param if param != "dense" else optimizer["name"]
    keys = {key: optimizer[key] for key in ("state_bits", "moment_dtype", "basis_dtype") if key in optimizer}
    if method == "frugal" and optimizer.get("density") is not None:
        keys["density"] = optimizer["density"]
    if method in ("sltrain", "sst"):
        keys = {"sparsity": config["param"]["sparsity"]} if method == "sltrain" else {}
    layerwise = bool(config["train"].get("layerwise")) and method not in ("sltrain", "sst")
    return {column: estimate(size, method=method, layerwise=layerwise, **keys)[part] / 1e9
            for column, size, part in AT_SCALE}


def markdown_table(runs: list[RunRecord]) -> str:
    """One row per method: validation loss as mean ± std over its seeds (when it has several), the rest as means."""
    scale = " | ".join(f"{column} (est.)" for column, _, _ in AT_SCALE)
    header = ("| method | seeds | val loss | val ppl | peak memory | optimizer state | weights | tokens/s | steps | "
              f"{scale} |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(AT_SCALE))
    rows = []
    for m in sorted(method_runs(runs), key=lambda m: m.stat("val/loss")[0] if m.runs else math.inf):
        first = m.runs[0]
        loss, spread = m.stat("val/loss")
        shown = f"{loss:.3f}" + ("" if math.isnan(spread) else f" ± {spread:.3f}")
        at_scale = " | ".join(f"{value:.2f} GB" for value in estimated_at_scale(first.config).values())
        rows.append(
            f"| {m.label} | {len(m.runs)} | {shown} | {m.stat('val/ppl')[0]:.1f} | "
            f"{_gib(m, 'memory/peak_gib')} | {_gib(m, 'memory/optimizer_state_gib')} | {_weights(first.summary)} | "
            f"{m.stat('perf/tokens_per_s')[0]:,.0f} | {first.summary.get('step', 0)} | {at_scale} |"
        )
    return "\n".join([header, *rows])


def _gib(method: MethodRuns, key: str) -> str:
    mean = method.stat(key)[0]
    return "-" if math.isnan(mean) else format_bytes(round(mean * GIB))


def _weights(summary: dict[str, Any]) -> str:
    """Parameters and buffers (SST keeps its frozen singular vectors in buffers)."""
    if "memory/params_gib" not in summary:
        return "-"
    return format_bytes(round((summary["memory/params_gib"] + summary.get("memory/buffers_gib", 0.0)) * GIB))


def plot(runs: list[RunRecord], out_dir: Path) -> list[Path]:
    """``loss_vs_step.png`` (train loss thin, validation loss with markers, a ±1 std band over seeds) and
    ``loss_vs_memory.png`` (final validation loss, ±1 std bars, against peak and optimizer-state memory)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = method_runs(runs)
    paths = [out_dir / "loss_vs_step.png", out_dir / "loss_vs_memory.png"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, m in enumerate(methods):
        color = f"C{i}"
        steps, loss, _ = m.curve("train/loss")
        ax.plot(steps, loss, color=color, alpha=0.35, linewidth=1)
        steps, val, spread = m.curve("val/loss")
        ax.plot(steps, val, color=color, marker="o", linewidth=2, label=m.label)
        if len(m.runs) > 1:
            ax.fill_between(steps, [v - s for v, s in zip(val, spread)], [v + s for v, s in zip(val, spread)],
                            color=color, alpha=0.2, linewidth=0)
    seeds = max(len(m.runs) for m in methods)
    ax.set(xlabel="step", ylabel="loss (thin: train, markers: validation)",
           title="Loss" + (f" (mean of up to {seeds} seeds, band: ±1 std)" if seeds > 1 else ""))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.2), sharey=True)
    for ax, key, title in zip(axes, ("memory/peak_gib", "memory/optimizer_state_gib"),
                              ("peak tensor memory", "optimizer state")):
        for i, m in enumerate(methods):
            (memory, _), (loss, spread) = m.stat(key), m.stat("val/loss")
            if not (math.isnan(memory) or math.isnan(loss)):
                ax.errorbar(memory * 1024, loss, yerr=None if math.isnan(spread) else spread, color=f"C{i}",
                            marker="o", markersize=7, capsize=3, label=m.label)
        ax.set(xlabel=f"{title} (MiB)", title=f"Final validation loss vs {title}")
        ax.margins(x=0.15, y=0.1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation loss")
    axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def write_report(root: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    """Write ``report.md`` and the plots into ``out_dir`` (default: ``root``); returns the report."""
    runs = load_runs(root)
    out = Path(out_dir or root)
    out.mkdir(parents=True, exist_ok=True)
    images = plot(runs, out)
    first = runs[0].config
    lines = [
        f"# Comparison: {Path(root).name}",
        "",
        f"{first['model']['size']} on {first['data']['source']}, {first['train']['steps']} steps of "
        f"{first['train']['batch_size'] * first['train']['grad_accum']} x {first['train']['seq_len']} tokens, "
        f"precision {first['train']['precision']}. Peak memory is measured per logged step (CUDA allocator, "
        "or live CPU tensors); validation loss is the mean over the validation batches (divided by N). The last "
        "four columns are lrtrain.memory.estimate's figures for the same method and state options at LLaMA-1B "
        "and 7B (bf16 weights, 256 tokens, one GPU; GB = 10^9 bytes). With several seeds per method the validation "
        "loss is their mean ± sample standard deviation and the other columns are means.",
        "",
        markdown_table(runs),
        "",
        *(f"![{p.stem}]({p.name})" for p in images),
        "",
    ]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def log_to_wandb(root: str | os.PathLike, project: str = "lrtrain", mode: str = "offline") -> None:
    """Log the comparison table and the plots of ``root`` as one wandb run (job_type report)."""
    import wandb

    methods = method_runs(load_runs(root))
    columns = ["method", "seeds", "val/loss", "val/loss_std", "val/ppl", "memory/peak_gib",
               "memory/optimizer_state_gib", "memory/params_gib", "perf/tokens_per_s"]
    scale = [f"estimate/{column.replace(' ', '_')}_gb" for column, _, _ in AT_SCALE]
    table = wandb.Table(columns=columns + scale,
                        data=[[m.label, len(m.runs), *m.stat("val/loss"), *(m.stat(c)[0] for c in columns[4:]),
                               *estimated_at_scale(m.runs[0].config).values()] for m in methods])
    run = wandb.init(project=project, job_type="report", name=f"compare-{Path(root).name}", dir=str(root),
                     mode=os.environ.get("WANDB_MODE") or mode)
    run.log({"comparison": table,
             "val_loss_vs_peak_memory": wandb.plot.scatter(table, "memory/peak_gib", "val/loss"),
             **{p.stem: wandb.Image(str(p)) for p in Path(root).glob("loss_vs_*.png")}})
    run.finish()
