"""Checkpoints that are written atomically, verified before use, and resume a run exactly, at any
number of processes.

A checkpoint is a directory ``<dir>/step-<N>/``: the model's and the optimizer's state through
``torch.distributed.checkpoint`` (every rank writes its shards; the files can be read back at
another world size, 2 → 1 or 1 → 2), ``trainer.pt``, the trainer's own small state (step,
scheduler, data order, RNG, fingerprints), which loads with ``weights_only=True``, and
``manifest.json``, written last: every file's size and SHA-256. Everything is written into a
temporary directory first and renamed once the manifest is on disk, so a crash mid-write never
leaves a half checkpoint under a checkpoint's name, and a checkpoint counts as complete only when
its manifest verifies (:func:`verify_checkpoint`): a truncated, overwritten or bit-flipped file is
found before anything is loaded. :func:`latest_complete_checkpoint` moves damaged checkpoints aside
(``damaged-step-<N>``, with a warning that says why) and returns the newest complete one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ..files import atomic_write, atomic_write_text, fsync_directory, write_errors_named

_NAME = re.compile(r"step-(\d+)")
TRAINER_FILE = "trainer.pt"
MANIFEST_FILE = "manifest.json"
_HASH_CHUNK = 1 << 24


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


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
    """Write ``step-<step>/`` atomically with its manifest (every rank calls this), then delete all
    but the newest ``keep`` checkpoints. A failed write (a full disk: :class:`lrtrain.files.WriteError`)
    leaves the earlier checkpoints as they were."""
    directory = Path(directory)
    final = directory / f"step-{step:08d}"
    temporary = directory / f".step-{step:08d}.tmp"
    if _rank() == 0:
        with write_errors_named(temporary):
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir(parents=True)
    _barrier()
    try:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        with _single_process_is_intended(), write_errors_named(temporary):
            try:
                dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(temporary))
            except CheckpointException as error:  # DCP gathers each rank's failure; a write error is the cause
                cause = next((e for e, _ in error.failures.values() if isinstance(e, OSError)), None)
                if cause is None:
                    raise
                raise cause from error
        if _rank() == 0:
            atomic_write(temporary / TRAINER_FILE, lambda path: torch.save(trainer_state, path))
        _barrier()
        files = _checksums(temporary)  # every rank hashes its share of the files
        if _rank() == 0:
            atomic_write_text(temporary / MANIFEST_FILE, json.dumps({"step": step, "files": files}, indent=1))
            with write_errors_named(final):
                shutil.rmtree(final, ignore_errors=True)
                os.replace(temporary, final)
                fsync_directory(directory)
    except BaseException:
        if _rank() == 0:  # free what the failed write took (on a full disk, the space the next try needs)
            shutil.rmtree(temporary, ignore_errors=True)
        raise
    if _rank() == 0:
        for old in checkpoints(directory)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    _barrier()
    return final


def _file_digest(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _checksums(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file in ``folder``; the files are shared out over the ranks."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST_FILE)
    mine = {name: _file_digest(folder / name) for name in names[_rank()::_world_size()]}
    if _world_size() == 1:
        return mine
    everyone: list[dict] = [{} for _ in range(_world_size())]
    dist.all_gather_object(everyone, mine)
    return {name: entry for part in everyone for name, entry in sorted(part.items())}


def verify_checkpoint(path: str | os.PathLike) -> str | None:
    """Why the checkpoint at ``path`` cannot be used (no or unreadable manifest, a missing file, a
    size or checksum that differs from the manifest's), or None when it is complete and intact."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return f"it has no {MANIFEST_FILE} (its write did not finish, or an older lrtrain wrote it)"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"its {MANIFEST_FILE} is unreadable ({type(error).__name__}: {error})"
    if TRAINER_FILE not in files:
        return f"its manifest lists no {TRAINER_FILE}"
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != expected["bytes"]:
            return f"{name} has {size} bytes where the manifest says {expected['bytes']} (truncated or overwritten)"
        if _file_digest(file)["sha256"] != expected["sha256"]:
            return f"{name} does not match its checksum (its bytes changed after it was written)"
    return None


def latest_complete_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest checkpoint in ``directory`` whose manifest verifies (every rank calls this; rank 0
    checks). Newer ones that fail are renamed ``damaged-step-<N>`` beside them, with a warning that
    says why, so that they are neither loaded nor counted again."""
    chosen: list[str | None] = [None]
    if _rank() == 0:
        for candidate in reversed(checkpoints(directory)):
            problem = verify_checkpoint(candidate)
            if problem is None:
                chosen[0] = str(candidate)
                break
            aside = candidate.with_name(f"damaged-{candidate.name}-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(candidate, aside)
            warnings.warn(f"checkpoint {candidate} cannot be used: {problem}. Moved it to {aside}; "
                          "resuming from the previous complete checkpoint, if there is one.", stacklevel=2)
    if dist.is_initialized():
        dist.broadcast_object_list(chosen, src=0)
    return Path(chosen[0]) if chosen[0] is not None else None


def checkpoints(directory: str | os.PathLike) -> list[Path]:
    """The checkpoints in ``directory`` (directories named ``step-<N>``), oldest first; only
    :func:`verify_checkpoint` says whether one is intact."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


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
