"""Where metrics go: a JSONL file per run (always) and wandb (offline by default), from rank 0.

Metric names: ``train/loss``, ``train/grad_norm``, ``val/loss``, ``val/ppl``, ``perf/tokens_per_s``,
``memory/peak_gib``, ``memory/optimizer_state_gib``, ``memory/params_gib``, ``memory/buffers_gib``,
``memory/grads_gib``, ``lr``. Each JSONL line is ``{"step": N, <metric>: value, ...}``; ``run.json`` beside it holds
the run's name, configuration and final summary, which ``scripts/compare.py`` reads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"


class RunLogger:
    """Logs metrics of one run. ``enabled=False`` (ranks other than 0) makes every call a no-op.

    ``wandb``: ``None`` for JSONL only, or ``{"project", "mode", "entity", "group", "tags"}``; the
    ``WANDB_MODE`` environment variable, when set, overrides ``mode`` (tests set it to disabled).
    Files and the wandb run are opened at the first ``log``; ``run.json`` is written by ``finish``,
    so only finished runs have one.
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
        after it, so the file reads as one uninterrupted run. Call before the first ``log``."""
        path = self.run_dir / METRICS_FILE
        if self.enabled and path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self._metrics is None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._metrics = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")
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
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._write_run_file(summary)
        if self._wandb_run is not None:
            self._wandb_run.summary.update(summary)
            self._wandb_run.finish()

    def _write_run_file(self, summary: dict[str, Any]) -> None:
        path = self.run_dir / RUN_FILE
        temporary = path.with_name(f".{RUN_FILE}.tmp")
        temporary.write_text(json.dumps({"name": self.name, "config": self.config, "summary": summary}, indent=2))
        os.replace(temporary, path)


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
