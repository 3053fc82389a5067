"""Syncing a whole filesystem at once (``syncfs``), where that is as safe as a fsync per file.

``files.stage_files`` writes a group of temporary files, syncs their filesystem once, then
renames them: the same guarantee as one fsync each (every file's data is on the disk before its
name is), at a fraction of the cost, since each fsync is a journal commit of its own.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

SYNCFS_FILESYSTEMS = {0xEF53: "ext2/3/4", 0x58465342: "xfs", 0x9123683E: "btrfs"}
"""Filesystems (``statfs`` magic) whose ``syncfs`` writes every file's data and reports its errors."""


def group_sync_descriptor(folder: Path) -> int | None:
    """An open descriptor of ``folder`` for ``syncfs``, or ``None`` where files must be fsynced one by one."""
    if _syncfs_function() is None:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None  # each file's own write names the problem
    if _filesystem_magic(descriptor) in SYNCFS_FILESYSTEMS:
        return descriptor
    os.close(descriptor)
    return None


@functools.cache
def _libc() -> Any:
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


@functools.cache
def _syncfs_function() -> Callable[[int], int] | None:
    """libc's ``syncfs``, on Linux from 5.8 (before, it did not report write errors)."""
    release = re.match(r"(\d+)\.(\d+)", os.uname().release) if sys.platform == "linux" else None
    if release is None or tuple(map(int, release.groups())) < (5, 8):
        return None
    import ctypes

    function = getattr(_libc(), "syncfs", None)
    if function is not None:
        function.argtypes, function.restype = [ctypes.c_int], ctypes.c_int
    return function


def _filesystem_magic(descriptor: int) -> int | None:
    import ctypes

    fstatfs = getattr(_libc(), "fstatfs", None)
    buffer = ctypes.create_string_buffer(512)  # struct statfs, whose first field is f_type (a C long)
    if fstatfs is None or fstatfs(descriptor, buffer) != 0:
        return None
    return ctypes.c_long.from_buffer(buffer).value & 0xFFFFFFFF


def syncfs(descriptor: int) -> None:
    """Sync the filesystem holding ``descriptor``: ``OSError`` for any write error there since it was opened."""
    import ctypes

    function = _syncfs_function()
    if function is None or function(descriptor) != 0:
        number = ctypes.get_errno() if function is not None else 0
        raise OSError(number, os.strerror(number) if number else "syncfs is not available")
    # The folder's own fsync flushes the disk's write cache, which ext2's syncfs (it shares ext4's
    # magic number) leaves unflushed; where syncfs flushed it already, it finds nothing to do.
    os.fsync(descriptor)
