"""Writing files atomically: a temporary file beside the final name, fsync, rename."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from .errors import OutputError

if TYPE_CHECKING:
    import torch


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write through ``write`` into a temporary file beside ``path``, fsync, then rename.

    Nothing half-written is ever left under ``path``, and no temporary file is left behind.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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
    """Save ``{"features": ..., "meta": ...}`` atomically; returns the bytes written."""
    import torch

    payload = {"features": dict(features), "meta": dict(meta)}
    try:
        atomic_write(path, lambda handle: torch.save(payload, handle))
        return path.stat().st_size
    except OSError as error:
        raise OutputError(f"cannot write {path}: {_write_failure_reason(path, error)}") from error


def _write_failure_reason(path: Path, error: OSError) -> str:
    if isinstance(error, (FileExistsError, NotADirectoryError)):
        blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            return f"{blocking} is a file, not a folder"
    return error.strerror or str(error)
