"""One pretraining run from a configuration (the hydra entry point ``scripts/pretrain.py`` calls
:func:`run`): data, model, optimizer, schedule, logger and trainer, built in that order, so that
a bad value fails before any training."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import load_data
from ..files import FolderInUse, FolderLock, write_errors_named
from ..models import build_model
from ..optim import LayerwiseUpdates
from ..param import SSTController, conversion_summary, convert
from .distributed import apply_fsdp2, init_distributed, local_projection_placements, wrap_ddp
from .logger import METRICS_FILE, RUN_FILE, RunLogger
from .loop import Trainer, TrainSettings
from .optimizers import build_optimizer, register_optimizer_configs, without_defaults
from .schedule import build_scheduler
from .sweep_names import register_resolvers

register_resolvers()  # configs/train.yaml names runs and sweeps through them
register_optimizer_configs()  # configs/optimizer/*.yaml start from each optimizer's keys and defaults

#: Keys of the sst parameterization config that drive its controller rather than its layers.
SST_CONTROLLER_KEYS = ("sample_every", "iterations_per_round")
#: Settings that change how a run is watched, not what it computes: they may differ on resume.
_NOT_FINGERPRINTED = {"eval_every", "eval_batches", "eval_batch_size", "log_every", "checkpoint_every",
                      "keep_checkpoints", "resume", "track_memory", "progress", "on_nonfinite"}
#: What a run leaves in its folder; ``train.resume=never`` moves these aside before it starts.
RUN_ARTIFACTS = ("checkpoints", METRICS_FILE, RUN_FILE, "wandb")
REPLACED_DIR = ".replaced"


def fingerprint(config: Mapping[str, Any], world_size: int = 1) -> str:
    """A hash of what determines a run's numbers: everything but logging, cadence, resume and how
    the processes share the work (so a run may resume at another world size with the same global
    batch, and from DDP to FSDP2). Optimizer keys at their default count as left out, so writing a
    default out, or a new option arriving at its default, keeps the fingerprint."""
    ignored = ("logger", "run_name", "sweep_name", "output_root", "distributed")
    relevant = {k: v for k, v in config.items() if k not in ignored}
    relevant["train"] = {k: v for k, v in config["train"].items() if k not in _NOT_FINGERPRINTED}
    relevant["optimizer"] = without_defaults(config["optimizer"])
    relevant["train"]["batch_size"] = config["train"]["batch_size"] * world_size  # the global batch
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available here; use device=cpu or device=auto")
    return device


def build_components(config: Mapping[str, Any], vocab_size: int, settings: TrainSettings, device: torch.device,
                     rank: int = 0, world_size: int = 1) -> tuple[nn.Module, torch.optim.Optimizer, list, Any]:
    """The model (parameterized, cast, wrapped for DDP or FSDP2), its optimizer, the callables to
    run after each step (the SST controller) and the :class:`LayerwiseUpdates` driver (or None),
    from ``config``'s ``model``, ``param``, ``optimizer`` and ``distributed`` groups."""
    model_cfg = dict(config["model"])
    model_cfg.pop("recipe", None)  # the references' values for this size, read by other configs
    model = build_model(
        model_cfg.pop("size"), vocab_size=vocab_size,
        max_position_embeddings=max(settings.seq_len, model_cfg.pop("max_position_embeddings", 0) or 0),
        **model_cfg,
    )
    param_cfg = dict(config["param"])
    kind = param_cfg.pop("kind")
    controller_options = {key: param_cfg.pop(key) for key in SST_CONTROLLER_KEYS if key in param_cfg}
    if kind != "dense":
        convert(model, kind, seed=config["seed"], **param_cfg)
        if rank == 0:
            print(conversion_summary(model))
    dtype = {"bf16": torch.bfloat16, "fp64": torch.float64}.get(settings.precision, torch.float32)
    model.to(device=device, dtype=dtype)
    strategy = dict(config.get("distributed") or {"strategy": "ddp"})
    fsdp = world_size > 1 and strategy.pop("strategy") == "fsdp2"
    if fsdp:
        if kind == "sst":
            raise ValueError("param=sst does not run under FSDP2 (its controller moves whole singular vectors "
                             "between frozen and trained storage): use distributed=ddp")
        left_on_dim1 = strategy.pop("shard_left_on_dim1", True)
        placements = local_projection_placements(model, config["optimizer"], world_size) if left_on_dim1 else {}
        apply_fsdp2(model, world_size, device, placements=placements, **strategy)
    optimizer = build_optimizer(config["optimizer"], model)
    after_step = []
    if kind == "sst":
        after_step.append(SSTController(model, optimizer, seed=config["seed"], **controller_options).step)
    layerwise = None
    if settings.layerwise:
        if fsdp:
            raise ValueError("train.layerwise=true runs under DDP or in one process; not with distributed=fsdp2")
        layerwise = LayerwiseUpdates(optimizer, settings.grad_accum, settings.grad_clip or None, ddp=world_size > 1)
    if not fsdp:
        model = wrap_ddp(model, device, world_size)
        if layerwise is not None and world_size > 1:
            layerwise.attach_ddp(model)
    return model, optimizer, after_step, layerwise


def lock_run_folder(run_dir: Path, rank: int) -> FolderLock | None:
    """Rank 0 takes the run folder's lock; every rank learns whether it got it (and fails alike)."""
    lock, problem = None, None
    if rank == 0:
        try:
            lock = FolderLock(run_dir).acquire()
        except FolderInUse as error:
            problem = str(error)
        else:
            if lock.previous_holder:
                print(f"note: {run_dir} was locked by process {lock.previous_holder.get('pid')} on "
                      f"{lock.previous_holder.get('host')}, which has stopped; this run takes over its folder")
    if torch.distributed.is_initialized():
        shared = [problem]
        torch.distributed.broadcast_object_list(shared, src=0)
        problem = shared[0]
    if problem is not None:
        raise FolderInUse(problem)
    return lock


def move_previous_run_aside(run_dir: Path) -> Path | None:
    """``train.resume=never`` over a folder that holds a run: move that run's files into
    ``<run_dir>/.replaced/<time>/`` (kept, never mixed with the new run's) and say where."""
    present = [run_dir / name for name in RUN_ARTIFACTS if (run_dir / name).exists()]
    if not present:
        return None
    target = run_dir / REPLACED_DIR / time.strftime("%Y%m%d-%H%M%S")
    with write_errors_named(target):
        target.mkdir(parents=True, exist_ok=True)
        for path in present:
            os.replace(path, target / path.name)
    print(f"train.resume=never: moved the previous run in {run_dir} to {target}")
    return target


def build_trainer(config: Mapping[str, Any], run_dir: str | os.PathLike) -> Trainer:
    """Everything a run needs, from ``config`` (the resolved hydra config as plain containers),
    resumed from ``run_dir``'s newest complete checkpoint when there is one (``train.resume=auto``).
    The run folder is locked for the trainer's lifetime (:meth:`Trainer.close` releases it)."""
    run_dir = Path(run_dir)
    settings = TrainSettings.from_mapping(dict(config["train"]))
    if isinstance(config["seed"], bool) or not isinstance(config["seed"], int):
        raise ValueError(f"seed must be an integer; got {config['seed']!r}")
    torch.manual_seed(config["seed"])
    rank, world_size, device = init_distributed(select_device(config["device"]))
    lock = lock_run_folder(run_dir, rank)
    try:
        return _build_trainer(config, run_dir, settings, rank, world_size, device, lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _build_trainer(config, run_dir: Path, settings: TrainSettings, rank: int, world_size: int,
                   device: torch.device, lock: FolderLock | None) -> Trainer:
    data_cfg = dict(config["data"])
    data = load_data(
        data_cfg.pop("source"), seq_len=settings.seq_len, seed=config["seed"], cache_dir=data_cfg.pop("cache_dir"),
        **data_cfg,
    )
    model, optimizer, after_step, layerwise = build_components(config, data.vocab_size, settings, device,
                                                               rank=rank, world_size=world_size)
    scheduler = build_scheduler(optimizer, total_steps=settings.steps, warmup_steps=settings.warmup_steps,
                                min_lr_ratio=settings.min_lr_ratio, cycle_length=settings.cycle_length)
    if rank == 0 and settings.resume == "never":
        move_previous_run_aside(run_dir)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    logger_cfg = dict(config["logger"])
    wandb = None if logger_cfg.pop("kind") == "none" else logger_cfg
    logger = RunLogger(run_dir, config["run_name"], dict(config), wandb=wandb, enabled=rank == 0)
    trainer = Trainer(model, optimizer, scheduler, data, settings, run_dir, logger, device=device,
                      fingerprint=fingerprint(config, world_size), rank=rank, world_size=world_size,
                      after_step=after_step, layerwise=layerwise, lock=lock)
    start = trainer.resume_if_possible()
    logger.start()
    if start and rank == 0:
        print(f"resuming {config['run_name']} from step {start} ({trainer.checkpoint_dir})")
    return trainer


def run(config: Mapping[str, Any], run_dir: str | os.PathLike) -> dict[str, Any]:
    """Train the run described by ``config`` in ``run_dir``; returns its summary (final metrics).
    A run that has finished already is not trained again: its summary is returned (and written,
    if the process that finished it stopped before it could write ``run.json``)."""
    trainer = build_trainer(config, run_dir)
    try:
        if trainer.step >= trainer.settings.steps and (done := RunLogger.finished_summary(run_dir)) is not None:
            if trainer.rank == 0:
                print(f"{config['run_name']} finished already ({run_dir}); train.resume=never starts it over")
            return done
        summary = trainer.fit()
        summary["run_name"] = config["run_name"]
        trainer.logger.finish(summary)
        return summary
    finally:
        trainer.close()
