"""Checkpoints that are written atomically and resume a run exactly.

A checkpoint is one ``torch.save`` file, ``<dir>/step-<N>.pt``, holding plain tensors and
primitive values only (model, optimizer, scheduler and data-order state, RNG state, the step and
a fingerprint of the configuration), so it loads with ``weights_only=True``. It is written to a
temporary file in the same directory, flushed to disk, then renamed over: a crash mid-write
leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

_NAME = re.compile(r"step-(\d+)\.pt")


def save_checkpoint(directory: str | os.PathLike, step: int, payload: dict[str, Any], keep: int = 2) -> Path:
    """Write ``payload`` as ``step-<step>.pt`` atomically, then delete all but the newest ``keep``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step-{step:08d}.pt"
    temporary = directory / f".{path.name}.tmp"
    with open(temporary, "wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    _fsync_directory(directory)
    for old in checkpoints(directory)[:-keep] if keep > 0 else []:
        old.unlink()
    return path


def checkpoints(directory: str | os.PathLike) -> list[Path]:
    """The checkpoints in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    found = checkpoints(directory)
    return found[-1] if found else None


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


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
