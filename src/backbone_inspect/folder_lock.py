"""A run's hold on an output folder: an advisory lock file, released however the run ends."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from .errors import OutputError, UsageError


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


@contextlib.contextmanager
def folder_held(folder: Path) -> Iterator[None]:
    """The folder itself locked (``flock`` on its directory) while the block runs: runs of every slice
    of a folder check the settings they find and write their own in turn, so two started at once with
    other settings cannot both pass. Where the filesystem cannot lock a directory, the block runs unlocked."""
    import fcntl

    try:
        descriptor: int | None = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        descriptor = None
    try:
        if descriptor is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(descriptor, fcntl.LOCK_EX)  # released when the descriptor is closed
        yield
    finally:
        if descriptor is not None:
            os.close(descriptor)
