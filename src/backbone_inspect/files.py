"""Writing files atomically: a temporary file beside the final name, fsync, rename."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from .errors import OutputError, UsageError

if TYPE_CHECKING:
    import torch


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write through ``write`` into a temporary file beside ``path``, fsync, then rename.

    Nothing half-written is ever left under ``path``, and no temporary file is left behind.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary name must fit where the final one fits (255 bytes): its stem is cut to 200.
    stem = path.name.encode("utf-8", "surrogateescape")[:200].decode("utf-8", "ignore")
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{stem}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); give it the permissions open() would have.
        os.fchmod(descriptor, 0o666 & ~_current_umask())
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_features(path: Path, features: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> int:
    """Save ``{"features": ..., "meta": ...}`` atomically; returns the bytes written.

    Serialised in memory first, then written: a full disk is then the operating system's own
    error (``No space left on device``), not torch's writer failing on a short write.
    """
    import io

    import torch

    buffer = io.BytesIO()
    torch.save({"features": dict(features), "meta": dict(meta)}, buffer)
    try:
        atomic_write(path, lambda handle: handle.write(buffer.getbuffer()))
        return path.stat().st_size
    except OSError as error:
        failure = OutputError(f"cannot write {path}: {_write_failure_reason(path, error)}")
        # A name too long, or a folder or file in the way, is this file's problem; a full or
        # read-only disk is every file's, and ends the run.
        failure.ends_run = error.errno not in (errno.ENAMETOOLONG, errno.EISDIR, errno.ENOTDIR, errno.EEXIST)
        raise failure from error


def _write_failure_reason(path: Path, error: OSError) -> str:
    if isinstance(error, (FileExistsError, NotADirectoryError)):
        blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            return f"{blocking} is a file, not a folder"
    return error.strerror or str(error)


class FolderLock:
    """An advisory lock on a file (``flock``): held while the process holds it open, released by
    the kernel when the process ends however it ends, so a killed run never blocks the next."""

    def __init__(self, path: Path, handle: IO[str]) -> None:
        self.path = path
        self._handle = handle

    @classmethod
    def take(cls, path: Path) -> FolderLock:
        """The lock, or ``UsageError`` naming the process that holds it."""
        import fcntl
        import socket
        import time

        try:  # never through a symbolic link: the lock must not write over whatever it points to
            handle = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644), "r+", encoding="utf-8")
        except OSError as error:
            raise OutputError(f"cannot lock {path}: {error.strerror or error}") from error
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise UsageError(
                f"{path.parent} is being written by another run ({holder}): wait for it to end, "
                "or give this run another --save folder or --shard"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        return cls(path, handle)

    def release(self) -> None:
        self._handle.close()  # closing the descriptor releases the flock
