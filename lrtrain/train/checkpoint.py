"""Checkpoints that are written atomically and resume a run exactly, at any number of processes.

A checkpoint is a directory ``<dir>/step-<N>/``: the model's and the optimizer's state through
``torch.distributed.checkpoint`` (every rank writes its shards; the files can be read back at
another world size, 2 → 1 or 1 → 2), and ``trainer.pt``, the trainer's own small state (step,
scheduler, data order, RNG, configuration fingerprint), which loads with ``weights_only=True``.
Everything is written into a temporary directory first; rank 0 renames it once every rank is done,
so a crash mid-write never leaves a half checkpoint under a checkpoint's name.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

_NAME = re.compile(r"step-(\d+)")
TRAINER_FILE = "trainer.pt"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def _single_process_is_intended():
    """DCP warns when it runs without a process group; in a single-process run that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def save_checkpoint(directory: str | os.PathLike, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``step-<step>/`` atomically (every rank calls this), then delete all but the newest ``keep``."""
    directory = Path(directory)
    final = directory / f"step-{step:08d}"
    temporary = directory / f".step-{step:08d}.tmp"
    if _rank() == 0:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    _barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    with _single_process_is_intended():
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(temporary))
    if _rank() == 0:
        with open(temporary / TRAINER_FILE, "wb") as handle:
            torch.save(trainer_state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
        _fsync_directory(directory)
        for old in checkpoints(directory)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    _barrier()
    return final


def checkpoints(directory: str | os.PathLike) -> list[Path]:
    """The complete checkpoints in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    found = checkpoints(directory)
    return found[-1] if found else None


def load_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    """The trainer's state of a checkpoint (read before the model, to check the configuration)."""
    return torch.load(Path(path) / TRAINER_FILE, map_location="cpu", weights_only=True)


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a checkpoint's model and optimizer state in place (every rank calls this), resharding
    it to this run's layout."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    _match_saved_entries(optimizer_state["state"], dcp.FileSystemReader(str(path)).read_metadata(),
                         dict(getattr(model, "module", model).named_parameters()))
    state = {"model": model_state, "optimizer": optimizer_state}
    with _single_process_is_intended():
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _match_saved_entries(state: dict[str, dict], metadata, params: dict[str, torch.Tensor]) -> None:
    """Give the optimizer state the entries the checkpoint has, and only those: DCP loads into an
    existing structure, and some optimizers' structure changes while they train (FRUGAL's block
    mode keeps moments only for the active tensors). A missing entry is created as zeros of the
    saved shape and dtype, split like its parameter when it has the parameter's shape."""
    saved = metadata.state_dict_metadata
    for fqn, entries in state.items():
        prefix = f"optimizer.state.{fqn}."
        keys = {name[len(prefix):] for name in saved if name.startswith(prefix)}
        for key in set(entries) - keys:
            del entries[key]
        for key in keys - set(entries):
            meta, param = saved[prefix + key], params[fqn]
            if tuple(meta.size) == tuple(param.shape):
                entries[key] = torch.zeros_like(param, dtype=meta.properties.dtype)
            else:
                entries[key] = torch.zeros(tuple(meta.size), dtype=meta.properties.dtype, device="cpu")


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
