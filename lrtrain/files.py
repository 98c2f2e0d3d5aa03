"""Files that are never seen half-written: atomic replacement, durable renames, clear disk errors,
and a lock that keeps two processes out of one run folder.

``atomic_write(path, write)`` is the one way lrtrain rewrites a file: ``write`` fills a temporary
file beside ``path``, which is flushed to disk (fsync) and renamed over ``path``; the rename is made
durable by an fsync of the directory. A reader (or a process killed at any instant) sees the old
file or the new one, never a mixture or an empty file. A full disk or another write error raises
:class:`WriteError`, which names the path and says "no space left" when that is the cause.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path


class WriteError(OSError):
    """A file could not be written; the message names the path and the cause."""


def describe_write_error(path: str | os.PathLike, error: OSError) -> WriteError:
    """``error`` (raised while writing ``path``) as a :class:`WriteError` naming the path and cause."""
    if isinstance(error, WriteError):
        return error
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = "no space left on the device (free some space, or point output_root / the cache elsewhere)"
    else:
        reason = error.strerror or str(error)
    return WriteError(error.errno, f"could not write {os.fspath(path)}: {reason}")


@contextlib.contextmanager
def write_errors_named(path: str | os.PathLike) -> Iterator[None]:
    """Turn an ``OSError`` raised inside into a :class:`WriteError` that names ``path``."""
    try:
        yield
    except WriteError:
        raise
    except OSError as error:
        raise describe_write_error(path, error) from error
    except RuntimeError as error:  # torch.save reports a failed write as RuntimeError (e.g. "unexpected pos")
        if _disk_is_full(Path(path).parent):
            raise describe_write_error(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))) from error
        raise


def _disk_is_full(directory: Path) -> bool:
    try:
        stats = os.statvfs(directory)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < 1 << 20


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(directory: str | os.PathLike) -> None:
    """Make renames and new entries in ``directory`` durable (a no-op where that is not possible)."""
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


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(temporary_path)``, make the file durable, then rename it over ``path``."""
    path = Path(path)
    with write_errors_named(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            write(str(temporary))
            fsync_file(temporary)
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        fsync_directory(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))


class FolderInUse(RuntimeError):
    """Another live process holds the lock of a run folder."""


class FolderLock:
    """An exclusive lock on a folder, held by one process while it works there.

    The lock is ``flock`` on ``<folder>/.lock``: the kernel releases it when the holder exits, however
    it exits, so a lock left by a killed process is stale and taken over (with a note of who held
    it). The file records the holder (pid, host, start time) for the message the next process gets.
    """

    FILE = ".lock"

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / self.FILE
        self._fd: int | None = None
        self.previous_holder: dict | None = None  # who held it last, when that lock was stale

    def acquire(self) -> "FolderLock":
        with write_errors_named(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = _read_holder(fd)
            os.close(fd)
            if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise FolderInUse(
                f"{self.path.parent} is in use by {_describe(holder)}: wait for it to finish, stop it, "
                "or give this run another run_name / output_root"
            ) from None
        self.previous_holder = _read_holder(fd)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> dict | None:
    try:
        text = os.pread(fd, 4096, 0).decode()
        return json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None


def _describe(holder: dict | None) -> str:
    if not holder:
        return "another process"
    return f"process {holder.get('pid')} on {holder.get('host')} (since {holder.get('since')})"
