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

from ..checks import is_int, is_number
from ..memory import PeakMemory, module_bytes, state_bytes
from .checkpoint import latest_complete_checkpoint, load_checkpoint, load_trainer_state, save_checkpoint
from .distributed import mean_across_ranks
from .logger import RunLogger

GIB = 2**30
PRECISIONS = ("fp32", "bf16-mixed", "bf16", "fp64")
ON_NONFINITE = ("raise", "skip")


class NonFiniteLoss(FloatingPointError):
    """A step's loss or gradient norm was NaN or infinite (``train.on_nonfinite=raise``)."""


class _NonFiniteStep(Exception):
    def __init__(self, what: str, value: float):
        super().__init__(what, value)
        self.what, self.value = what, value


@dataclass
class TrainSettings:
    """How to train. ``batch_size`` sequences of ``seq_len`` tokens per micro-batch and process;
    ``grad_accum`` micro-batches per optimizer step. ``precision``: ``fp32``; ``bf16-mixed``
    (fp32 weights and optimizer, bf16 autocast: FRUGAL's ``--dtype fp32 --amp``); ``bf16`` (the
    whole model in bf16: GaLore's ``--dtype bfloat16``); ``fp64`` (for numerical checks: runs that
    must agree across process layouts agree to rounding only in float64). ``on_nonfinite``: a NaN or
    infinite loss (or gradient norm) stops the run with :class:`NonFiniteLoss` (``raise``; nothing is
    checkpointed after it) or skips that step's update (``skip``: counted in ``train/skipped_steps``)."""

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
    on_nonfinite: str = "raise"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "log_every"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be an integer >= 1; got {getattr(self, name)!r}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "keep_checkpoints"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be an integer >= 0 (0 turns it off); got {getattr(self, name)!r}")
        for name in ("eval_batch_size", "cycle_length"):
            if getattr(self, name) is not None and (not is_int(getattr(self, name)) or getattr(self, name) < 1):
                raise ValueError(f"train.{name} must be null or an integer >= 1; got {getattr(self, name)!r}")
        for name in ("grad_clip", "min_lr_ratio"):
            if not is_number(getattr(self, name)):
                raise ValueError(f"train.{name} must be a number; got {getattr(self, name)!r}")
        for name in ("track_memory", "progress", "layerwise"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"train.{name} must be true or false; got {getattr(self, name)!r}")
        if self.on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"train.on_nonfinite must be one of {', '.join(ON_NONFINITE)}; got {self.on_nonfinite!r}")
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
    ``lock``: the :class:`lrtrain.files.FolderLock` of ``run_dir`` held for this trainer (released by
    :meth:`close`). A checkpoint also records ``data.fingerprint``: resuming on other data is refused.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, data, settings: TrainSettings,
                 run_dir: str | Path, logger: RunLogger, *, device: torch.device, fingerprint: str = "",
                 rank: int = 0, world_size: int = 1, after_step: Sequence[Callable[[], None]] = (),
                 layerwise=None, lock=None):
        self.model, self.optimizer, self.scheduler, self.data = model, optimizer, scheduler, data
        self.settings, self.logger, self.device = settings, logger, device
        self.run_dir, self.fingerprint = Path(run_dir), fingerprint
        self.rank, self.world_size = rank, world_size
        self.after_step = list(after_step)
        self.layerwise = layerwise
        self.module = getattr(model, "module", model)  # the model inside a DDP wrapper
        self.lock = lock
        self.step = 0
        self.skipped_steps = 0
        self.throughput: list[float] = []  # tokens/s of every step (logged steps also measure memory: slower)
        self.checkpoint_dir = self.run_dir / "checkpoints"

    def close(self) -> None:
        """Close the log and release the run folder (the run stays resumable from its checkpoints)."""
        self.logger.close()
        if self.lock is not None:
            self.lock.release()

    # ------------------------------------------------------------------ state

    def trainer_state(self) -> dict[str, Any]:
        """What a checkpoint holds besides the model and the optimizer."""
        return {
            "step": self.step,
            "scheduler": self.scheduler.state_dict(),
            "data": self.data.train.state_dict(),
            "rng": torch.get_rng_state(),
            "fingerprint": self.fingerprint,
            "data_fingerprint": self.data.fingerprint,
            "skipped_steps": self.skipped_steps,
            "throughput": list(self.throughput),
        }

    def resume_if_possible(self) -> int:
        """Load the run directory's newest complete checkpoint (``resume="auto"``; damaged ones are
        reported and moved aside); returns the step."""
        path = latest_complete_checkpoint(self.checkpoint_dir) if self.settings.resume == "auto" else None
        if path is not None:
            state = load_trainer_state(path)
            if state["fingerprint"] != self.fingerprint:
                raise ValueError(
                    f"the checkpoint in {self.checkpoint_dir} was written by a run with another configuration; "
                    "give this run another run_name, or set train.resume=never to start it over"
                )
            if state.get("data_fingerprint") != self.data.fingerprint:
                raise ValueError(
                    f"the checkpoint {path} was trained on other data (the token stream or its tokenizer "
                    "differ from this run's): put the original data back, or start over with train.resume=never "
                    "or another run_name"
                )
            load_checkpoint(path, self.model, self.optimizer)
            self.scheduler.load_state_dict(state["scheduler"])
            self.data.train.load_state_dict(state["data"])
            torch.set_rng_state(state["rng"])
            self.step = state["step"]
            self.skipped_steps = state.get("skipped_steps", 0)
            self.throughput = list(state.get("throughput", []))
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
        """One optimizer step over ``grad_accum`` micro-batches; returns its metrics. A non-finite
        loss (checked before each backward pass, on every rank alike) or gradient norm raises
        :class:`NonFiniteLoss` or, with ``on_nonfinite="skip"``, drops the step's gradients."""
        s = self.settings
        batches = [self.data.train.next_batch(s.batch_size * self.world_size) for _ in range(s.grad_accum)]
        existing = [*self.module.parameters(), *self.module.buffers(), *batches,
                    *(v for st in self.optimizer.state.values() for v in st.values() if torch.is_tensor(v))]
        peak = PeakMemory(self.device, existing) if measure_memory else contextlib.nullcontext()
        start = time.perf_counter()
        total_loss = 0.0
        try:
            with peak:
                for i, batch in enumerate(batches):
                    # DDP averages gradients on the last micro-batch only
                    sync = self.world_size == 1 or i == len(batches) - 1
                    with contextlib.nullcontext() if sync else self.model.no_sync():
                        with self._autocast():
                            loss = causal_lm_loss(self.model, self._local_rows(batch)) / s.grad_accum
                        value = mean_across_ranks(loss.item(), self.world_size, self.device)
                        if not math.isfinite(value):
                            raise _NonFiniteStep("loss", value * s.grad_accum)
                        # with layer-wise updates, the last backward pass also steps the optimizer
                        with self.layerwise.micro_batch(i) if self.layerwise else contextlib.nullcontext():
                            loss.backward()
                    total_loss += value
                    del loss
                lr = self.optimizer.param_groups[0]["lr"]
                if self.layerwise:
                    grad_norm = self.layerwise.last_grad_norm
                    if not math.isfinite(grad_norm):
                        raise NonFiniteLoss(self._nonfinite_message("gradient norm", grad_norm) + " (layer-wise "
                                            "updates apply each gradient inside the backward pass, so this step "
                                            "cannot be skipped)")
                else:
                    max_norm = s.grad_clip if s.grad_clip > 0 else math.inf
                    grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
                    grad_norm = float(grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm)
                    if not math.isfinite(grad_norm):
                        raise _NonFiniteStep("gradient norm", grad_norm)
                sizes = module_bytes(self.module)
                if not self.layerwise:
                    self.optimizer.step()
                for hook in self.after_step:
                    hook()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        except _NonFiniteStep as bad:
            return self._skip_step(bad)
        elapsed = time.perf_counter() - start
        self.step += 1
        tokens = s.batch_size * s.seq_len * s.grad_accum * self.world_size
        metrics = {
            "train/loss": total_loss,
            "train/grad_norm": grad_norm,
            "lr": float(lr),
            "perf/tokens_per_s": tokens / elapsed,
            "memory/params_gib": sizes["params"] / GIB,
            "memory/buffers_gib": sizes["buffers"] / GIB,
            "memory/grads_gib": sizes["grads"] / GIB,
            "memory/optimizer_state_gib": state_bytes(self.optimizer)["total"] / GIB,
        }
        if self.skipped_steps:
            metrics["train/skipped_steps"] = self.skipped_steps
        if measure_memory:
            metrics["memory/peak_gib"] = peak.bytes / GIB
        return metrics

    def _nonfinite_message(self, what: str, value: float) -> str:
        return (f"step {self.step + 1}: the {what} is {value}; the run stops here (nothing was checkpointed after "
                f"step {self.step}). Lower optimizer.lr, set train.grad_clip, or resume with "
                "train.on_nonfinite=skip to skip such steps")

    def _skip_step(self, bad: _NonFiniteStep) -> dict[str, float]:
        """The update of a step whose loss or gradient norm is ``bad.value`` is dropped (``skip``), or the run stops."""
        if self.settings.on_nonfinite == "raise":
            raise NonFiniteLoss(self._nonfinite_message(bad.what, bad.value))
        if self.layerwise:
            self.layerwise.discard()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()  # the schedule keeps its length: a skipped step is a step
        self.step += 1
        self.skipped_steps += 1
        if self.rank == 0:
            print(f"step {self.step}: the {bad.what} is {bad.value}; skipped its update (train.on_nonfinite=skip)")
        return {"train/loss": math.nan, "lr": float(self.optimizer.param_groups[0]["lr"]),
                "train/skipped_steps": self.skipped_steps}

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
        and time-limited jobs); returns the run's summary (:meth:`RunLogger.summary`: every step it
        logged, resumptions included, with the median throughput over all steps; empty on ranks
        other than 0)."""
        s = self.settings
        stop = min(s.steps, until_step or s.steps)
        self.model.train()
        progress = _progress_bar(self.step, s.steps, enabled=s.progress and self.rank == 0)
        while self.step < stop:
            log_now = (self.step + 1) % s.log_every == 0 or self.step == 0 or self.step + 1 == s.steps
            metrics = self.train_step(measure_memory=s.track_memory and log_now)
            if "perf/tokens_per_s" in metrics:
                self.throughput.append(metrics["perf/tokens_per_s"])
            if s.eval_every and self.step % s.eval_every == 0 or self.step == s.steps:
                metrics.update(self.evaluate())
            if log_now or "val/loss" in metrics or "perf/tokens_per_s" not in metrics:  # a skipped step is logged
                self.logger.log(self.step, metrics)
            if s.checkpoint_every and self.step % s.checkpoint_every == 0 or self.step == s.steps:
                self.save()
            if progress is not None:
                progress.update(1)
                postfix = {"loss": f"{metrics['train/loss']:.3f}"}
                if "perf/tokens_per_s" in metrics:
                    postfix["tok_s"] = f"{metrics['perf/tokens_per_s']:.0f}"
                if "memory/peak_gib" in metrics:
                    postfix["mem"] = f"{metrics['memory/peak_gib']:.3f}GiB"
                progress.set_postfix(**postfix)
        if progress is not None:
            progress.close()
        summary = self.logger.summary()
        if summary and self.throughput:  # the median over every step, not only the logged (memory-measured) ones
            summary["perf/tokens_per_s"] = sorted(self.throughput)[len(self.throughput) // 2]
        return summary


def _progress_bar(start: int, total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, dynamic_ncols=True, desc="train")
