"""Writing files atomically: a temporary file beside the final name, fsync, rename."""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from .errors import OutputError, UsageError

if TYPE_CHECKING:
    import torch


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write through ``write`` into a temporary file beside ``path``, fsync, then rename.

    Nothing half-written is ever left under ``path``, and no temporary file is left behind.
    Safe to call from several threads at once (the umask is never touched).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary name must fit where the final one fits (255 bytes): its stem is cut to 200.
    stem = path.name.encode("utf-8", "surrogateescape")[:200].decode("utf-8", "ignore")
    temporary = path.parent / f".{stem}.{os.getpid()}-{threading.get_ident() % 10**6}-{next(_TEMPORARY_NUMBERS)}.tmp"
    # O_EXCL: never through a link or over another file; 0o666 is filtered by the umask, as open() is.
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


_TEMPORARY_NUMBERS = itertools.count()
"""Makes each temporary name of this process unique (``next`` on a count is atomic under the GIL)."""


def save_features(path: Path, features: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> int:
    """Save ``{"features": ..., "meta": ...}`` atomically; returns the bytes written.

    Serialised in memory first, then written: a full disk is then the operating system's own
    error (``No space left on device``), not torch's writer failing on a short write.
    """
    import io

    import torch

    buffer = io.BytesIO()
    # A row of a batch is a view: saved alone, it would drag the whole batch's storage along.
    compact = {name: value if value.untyped_storage().nbytes() == value.nbytes else value.clone() for name, value in features.items()}
    torch.save({"features": compact, "meta": dict(meta)}, buffer)
    try:
        atomic_write(path, lambda handle: handle.write(buffer.getbuffer()))
        return buffer.getbuffer().nbytes
    except OSError as error:
        raise _output_error(path, error) from error


SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def save_safetensors(path: Path, tensors: Mapping[str, torch.Tensor | Sequence[torch.Tensor]], metadata: Mapping[str, str]) -> int:
    """Write a safetensors file atomically, straight from the tensors' memory; the bytes written.

    A list of equal-shape rows is stored as one tensor ``[len, *shape]`` without being stacked
    in memory first. ``OutputError`` (``ends_run`` as for ``save_features``) when it cannot.
    """
    import json

    import torch

    # Each entry as its rows and stored shape: a tensor is one row of its own shape.
    entries = {name: ([value], list(value.shape)) if isinstance(value, torch.Tensor) else (list(value), [len(value), *value[0].shape])
               for name, value in tensors.items()}
    layout, offset = {}, 0
    for name, (rows, shape) in entries.items():
        size = sum(row.nbytes for row in rows)
        dtype = SAFETENSORS_DTYPES[str(rows[0].dtype).removeprefix("torch.")]
        layout[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    header = json.dumps({"__metadata__": dict(metadata), **layout}).encode("utf-8")
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors writes it

    def write(handle: IO[bytes]) -> None:
        handle.write(len(header).to_bytes(8, "little") + header)
        for rows, _ in entries.values():
            for row in rows:
                handle.write(memoryview(row.contiguous().reshape(-1).view(torch.uint8).numpy()))

    try:
        atomic_write(path, write)
    except OSError as error:
        raise _output_error(path, error) from error
    return 8 + len(header) + offset


def _output_error(path: Path, error: OSError) -> OutputError:
    failure = OutputError(f"cannot write {path}: {_write_failure_reason(path, error)}")
    # A name too long, or a folder or file in the way, is this file's problem; a full or
    # read-only disk is every file's, and ends the run.
    failure.ends_run = error.errno not in (errno.ENAMETOOLONG, errno.EISDIR, errno.ENOTDIR, errno.EEXIST)
    return failure


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
