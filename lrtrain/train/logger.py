"""Where metrics go: a JSONL file per run (always) and wandb (offline by default), from rank 0.

Metric names: ``train/loss``, ``train/grad_norm``, ``val/loss``, ``val/ppl``, ``perf/tokens_per_s``,
``memory/peak_gib``, ``memory/optimizer_state_gib``, ``memory/params_gib``, ``memory/buffers_gib``,
``memory/grads_gib``, ``lr`` (and ``train/skipped_steps`` once a step was skipped). Each JSONL line is
``{"step": N, <metric>: value, ...}``; ``run.json`` beside it holds the run's name, configuration and
final summary (null until the run finishes), which ``scripts/compare.py`` reads.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from ..files import atomic_write_text, write_errors_named

METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"


def read_metrics(path: str | os.PathLike) -> tuple[list[dict[str, Any]], bool]:
    """The records of a ``metrics.jsonl`` file and whether its last line was torn (a process killed
    while writing it leaves a partial line, which is left out). Any other unreadable line is an
    error that names the file and the line."""
    path = Path(path)
    if not path.exists():
        return [], False
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    complete, tail = lines[:-1], lines[-1]  # a whole file ends with a newline: its tail is empty
    records = []
    for number, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            record["step"]
        except (ValueError, KeyError, TypeError) as error:
            if number == len(complete) and not tail:  # written whole but cut short: still the last line
                return records, True
            raise ValueError(f"{path}, line {number}: not a metrics record ({error}); "
                             "repair or remove that line") from None
        records.append(record)
    return records, bool(tail.strip())


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """A run's summary from its metric records: the last logged value of every metric, the step
    reached, the largest measured peak and the median throughput over the logged steps."""
    summary: dict[str, Any] = {}
    for record in records:
        summary.update(record)
    peaks = [r["memory/peak_gib"] for r in records if "memory/peak_gib" in r]
    speeds = sorted(r["perf/tokens_per_s"] for r in records if "perf/tokens_per_s" in r)
    if peaks:
        summary["memory/peak_gib"] = max(peaks)
    if speeds:
        summary["perf/tokens_per_s"] = speeds[len(speeds) // 2]
    return summary


class RunLogger:
    """Logs metrics of one run. ``enabled=False`` (ranks other than 0) makes every call a no-op.

    ``wandb``: ``None`` for JSONL only, or ``{"project", "mode", "entity", "group", "tags"}``; the
    ``WANDB_MODE`` environment variable, when set, overrides ``mode`` (tests set it to disabled).
    Files and the wandb run are opened at the first ``log``; ``run.json`` is written by ``start``
    and completed by ``finish``, so only finished runs have a summary. Every rewrite is atomic
    (:func:`lrtrain.files.atomic_write`); appends are flushed line by line, and a line torn by a kill
    is repaired by :meth:`rewind`.
    """

    def __init__(self, run_dir: str | os.PathLike, name: str, config: dict[str, Any], *, enabled: bool = True,
                 wandb: dict[str, Any] | None = None):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.name, self.config, self._wandb_options = name, config, wandb
        self._metrics = None
        self._wandb_run = None

    @staticmethod
    def finished_summary(run_dir: str | os.PathLike) -> dict[str, Any] | None:
        """The summary a finished run left in ``run_dir``, or None."""
        path = Path(run_dir) / RUN_FILE
        return json.loads(path.read_text()).get("summary") if path.exists() else None

    def rewind(self, step: int) -> None:
        """A resumed run continues from ``step``: drop the JSONL lines the interrupted run wrote
        after it (and a last line torn by the interruption), so the file reads as one uninterrupted
        run. The file is replaced atomically. Call before the first ``log``."""
        path = self.run_dir / METRICS_FILE
        if not self.enabled or not path.exists():
            return
        records, torn = read_metrics(path)
        if torn:
            warnings.warn(f"{path}: its last line was cut off by an interruption; dropped it", stacklevel=2)
        kept = [r for r in records if r["step"] <= step]
        if torn or len(kept) != len(records):
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

    def summary(self) -> dict[str, Any]:
        """The run's summary (:func:`summarize`) from everything it logged, across resumptions."""
        return summarize(read_metrics(self.run_dir / METRICS_FILE)[0]) if self.enabled else {}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        path = self.run_dir / METRICS_FILE
        with write_errors_named(path):
            if self._metrics is None:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                self._metrics = open(path, "a", encoding="utf-8")
                if self._wandb_options is not None:
                    self._wandb_run = _start_wandb(self.run_dir, self.name, self.config, self._wandb_options)
            self._metrics.write(json.dumps({"step": step, **metrics}) + "\n")
            self._metrics.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(metrics, step=step)

    def finish(self, summary: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        self._write_run_file(summary)
        if self._wandb_run is not None:
            self._wandb_run.summary.update(summary)
            self._wandb_run.finish()
            self._wandb_run = None

    def start(self) -> None:
        """Record the run's name and configuration in ``run.json`` (summary null until ``finish``),
        unless the run has finished already."""
        if self.enabled and self.finished_summary(self.run_dir) is None:
            self._write_run_file(None)

    def close(self) -> None:
        """Close the metrics file (and the wandb run) without writing a summary: an interrupted run."""
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def _write_run_file(self, summary: dict[str, Any] | None) -> None:
        record = {"name": self.name, "config": self.config, "summary": summary}
        atomic_write_text(self.run_dir / RUN_FILE, json.dumps(record, indent=2))


def _start_wandb(run_dir: Path, name: str, config: dict[str, Any], options: dict[str, Any]):
    import wandb

    mode = os.environ.get("WANDB_MODE") or options.get("mode", "offline")
    run = wandb.init(
        project=options.get("project", "lrtrain"), entity=options.get("entity"), group=options.get("group"),
        tags=list(options.get("tags") or []), name=name, config=config, dir=str(run_dir), mode=mode,
        id=_stable_id(run_dir), resume="allow",
    )
    run.define_metric("val/loss", summary="min")
    run.define_metric("val/ppl", summary="min")
    run.define_metric("memory/*", summary="max")
    return run


def _stable_id(run_dir: Path) -> str:
    """One wandb id per run directory, so a resumed run continues the same wandb run."""
    import hashlib

    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
