"""The training loop: accumulation, clipping, schedule, mixed precision, evaluation, memory and
throughput metrics, atomic checkpoints and exact resume."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from ..memory import PeakMemory, module_bytes, state_bytes
from .checkpoint import latest_checkpoint, load_checkpoint, load_trainer_state, save_checkpoint
from .distributed import mean_across_ranks
from .logger import RunLogger

GIB = 2**30
PRECISIONS = ("fp32", "bf16-mixed", "bf16", "fp64")


@dataclass
class TrainSettings:
    """How to train. ``batch_size`` sequences of ``seq_len`` tokens per micro-batch and process;
    ``grad_accum`` micro-batches per optimizer step. ``precision``: ``fp32``; ``bf16-mixed``
    (fp32 weights and optimizer, bf16 autocast: FRUGAL's ``--dtype fp32 --amp``); ``bf16`` (the
    whole model in bf16: GaLore's ``--dtype bfloat16``); ``fp64`` (for numerical checks: runs that
    must agree across process layouts agree to rounding only in float64)."""

    steps: int
    batch_size: int
    seq_len: int
    grad_accum: int = 1
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    cycle_length: int | None = None
    grad_clip: float = 0.0
    precision: str = "fp32"
    eval_every: int = 0
    eval_batches: int = 8
    eval_batch_size: int | None = None
    log_every: int = 10
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    resume: str = "auto"
    track_memory: bool = True
    progress: bool = True
    layerwise: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be an integer >= 1; got {getattr(self, name)!r}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "keep_checkpoints"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be an integer >= 0 (0 turns it off); got {getattr(self, name)!r}")
        if self.warmup_steps >= (self.cycle_length or self.steps):
            raise ValueError(f"train.warmup_steps ({self.warmup_steps}) must be below train.steps ({self.steps})")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}")
        if self.resume not in ("auto", "never"):
            raise ValueError(f"train.resume must be 'auto' or 'never'; got {self.resume!r}")
        if self.grad_clip < 0:
            raise ValueError(f"train.grad_clip must be >= 0 (0 turns clipping off); got {self.grad_clip}")

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> "TrainSettings":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown train settings {unknown}; known: {sorted(known)}")
        return cls(**values)


def causal_lm_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a (batch, seq_len + 1) block; logits in float32 (or better)."""
    output = model(tokens[:, :-1])
    logits = output.logits if hasattr(output, "logits") else output
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


class Trainer:
    """Trains ``model`` with ``optimizer`` / ``scheduler`` on ``data`` (a :class:`lrtrain.data.TextData`).

    Checkpoints go to ``run_dir/checkpoints``; metrics to ``logger``. ``fingerprint`` identifies
    the configuration: resuming from a checkpoint written under another one is refused.
    ``rank``/``world_size`` select this process's rows of every global batch; ``model`` may be
    wrapped in DDP (its ``module`` is what gets checkpointed); metrics are averaged over ranks.
    ``after_step`` callables run after every optimizer step (e.g. :class:`lrtrain.param.SSTController`).
    ``layerwise``: a :class:`lrtrain.optim.LayerwiseUpdates` that steps the parameters inside the
    backward pass of the last micro-batch (clipping with the previous step's norm).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, data, settings: TrainSettings,
                 run_dir: str | Path, logger: RunLogger, *, device: torch.device, fingerprint: str = "",
                 rank: int = 0, world_size: int = 1, after_step: Sequence[Callable[[], None]] = (),
                 layerwise=None):
        self.model, self.optimizer, self.scheduler, self.data = model, optimizer, scheduler, data
        self.settings, self.logger, self.device = settings, logger, device
        self.run_dir, self.fingerprint = Path(run_dir), fingerprint
        self.rank, self.world_size = rank, world_size
        self.after_step = list(after_step)
        self.layerwise = layerwise
        self.module = getattr(model, "module", model)  # the model inside a DDP wrapper
        self.step = 0
        self.checkpoint_dir = self.run_dir / "checkpoints"

    # ------------------------------------------------------------------ state

    def trainer_state(self) -> dict[str, Any]:
        """What a checkpoint holds besides the model and the optimizer."""
        return {
            "step": self.step,
            "scheduler": self.scheduler.state_dict(),
            "data": self.data.train.state_dict(),
            "rng": torch.get_rng_state(),
            "fingerprint": self.fingerprint,
        }

    def resume_if_possible(self) -> int:
        """Load the run directory's latest checkpoint (``resume="auto"``); returns the step."""
        path = latest_checkpoint(self.checkpoint_dir) if self.settings.resume == "auto" else None
        if path is not None:
            state = load_trainer_state(path)
            if state["fingerprint"] != self.fingerprint:
                raise ValueError(
                    f"the checkpoint in {self.checkpoint_dir} was written by a run with another configuration; "
                    "give this run another run_name, or set train.resume=never to start it over"
                )
            load_checkpoint(path, self.model, self.optimizer)
            self.scheduler.load_state_dict(state["scheduler"])
            self.data.train.load_state_dict(state["data"])
            torch.set_rng_state(state["rng"])
            self.step = state["step"]
        self.logger.rewind(self.step)
        return self.step

    def save(self) -> Path:
        """Checkpoint the run (every rank takes part: each writes its shards)."""
        return save_checkpoint(self.checkpoint_dir, self.step, self.model, self.optimizer, self.trainer_state(),
                               keep=self.settings.keep_checkpoints)

    # ------------------------------------------------------------------ steps

    def _autocast(self):
        if self.settings.precision == "bf16-mixed":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _local_rows(self, batch: torch.Tensor) -> torch.Tensor:
        return batch[self.rank :: self.world_size].to(self.device, non_blocking=True)

    def train_step(self, measure_memory: bool) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns its metrics."""
        s = self.settings
        batches = [self.data.train.next_batch(s.batch_size * self.world_size) for _ in range(s.grad_accum)]
        existing = [*self.module.parameters(), *self.module.buffers(), *batches,
                    *(v for st in self.optimizer.state.values() for v in st.values() if torch.is_tensor(v))]
        peak = PeakMemory(self.device, existing) if measure_memory else contextlib.nullcontext()
        start = time.perf_counter()
        total_loss = 0.0
        with peak:
            for i, batch in enumerate(batches):
                # DDP averages gradients on the last micro-batch only
                sync = self.world_size == 1 or i == len(batches) - 1
                with contextlib.nullcontext() if sync else self.model.no_sync():
                    with self.layerwise.micro_batch(i) if self.layerwise else contextlib.nullcontext():
                        with self._autocast():
                            loss = causal_lm_loss(self.model, self._local_rows(batch)) / s.grad_accum
                        loss.backward()  # with layer-wise updates, the last one also steps the optimizer
                total_loss += loss.item()
            lr = self.optimizer.param_groups[0]["lr"]
            if self.layerwise:
                grad_norm = self.layerwise.last_grad_norm
                sizes = module_bytes(self.module)
            else:
                max_norm = s.grad_clip if s.grad_clip > 0 else math.inf
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
                sizes = module_bytes(self.module)
                self.optimizer.step()
            for hook in self.after_step:
                hook()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        self.step += 1
        tokens = s.batch_size * s.seq_len * s.grad_accum * self.world_size
        metrics = {
            "train/loss": mean_across_ranks(total_loss, self.world_size, self.device),
            "train/grad_norm": float(grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm),
            "lr": float(lr),
            "perf/tokens_per_s": tokens / elapsed,
            "memory/params_gib": sizes["params"] / GIB,
            "memory/buffers_gib": sizes["buffers"] / GIB,
            "memory/grads_gib": sizes["grads"] / GIB,
            "memory/optimizer_state_gib": state_bytes(self.optimizer)["total"] / GIB,
        }
        if measure_memory:
            metrics["memory/peak_gib"] = peak.bytes / GIB
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over ``eval_batches`` validation batches (divided by N; the GaLore-lineage
        evaluators divide by N + 1, which reads ~1-3 % lower) and its perplexity."""
        s = self.settings
        if self.data.validation is None:
            return {}
        self.model.eval()
        losses = []
        for batch in self.data.validation.iter_batches((s.eval_batch_size or s.batch_size) * self.world_size,
                                                       s.eval_batches):
            with self._autocast():
                losses.append(causal_lm_loss(self.model, self._local_rows(batch)).item())
        self.model.train()
        loss = mean_across_ranks(sum(losses) / len(losses), self.world_size, self.device)
        return {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0))}

    def fit(self, until_step: int | None = None) -> dict[str, Any]:
        """Train to ``settings.steps`` (or stop after ``until_step``: an interruption, for tests
        and time-limited jobs); returns the summary of the last metrics."""
        s = self.settings
        stop = min(s.steps, until_step or s.steps)
        self.model.train()
        progress = _progress_bar(self.step, s.steps, enabled=s.progress and self.rank == 0)
        last: dict[str, float] = {}
        peak_gib = 0.0
        throughput: list[float] = []
        while self.step < stop:
            log_now = (self.step + 1) % s.log_every == 0 or self.step == 0 or self.step + 1 == s.steps
            metrics = self.train_step(measure_memory=s.track_memory and log_now)
            throughput.append(metrics["perf/tokens_per_s"])
            peak_gib = max(peak_gib, metrics.get("memory/peak_gib", 0.0))
            if s.eval_every and self.step % s.eval_every == 0 or self.step == s.steps:
                metrics.update(self.evaluate())
            if log_now or "val/loss" in metrics:
                self.logger.log(self.step, metrics)
            last.update(metrics)
            if s.checkpoint_every and self.step % s.checkpoint_every == 0 or self.step == s.steps:
                self.save()
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{metrics['train/loss']:.3f}", tok_s=f"{metrics['perf/tokens_per_s']:.0f}",
                                     mem=f"{metrics.get('memory/peak_gib', peak_gib):.3f}GiB")
        if progress is not None:
            progress.close()
        summary = {"step": self.step, **last, "memory/peak_gib": peak_gib}
        if throughput:
            summary["perf/tokens_per_s"] = sorted(throughput)[len(throughput) // 2]  # median over steps
        return summary


def _progress_bar(start: int, total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, dynamic_ncols=True, desc="train")
