"""Writing files atomically: a temporary file beside the final name, fsync, rename."""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any, TypeVar

from .disk_sync import group_sync_descriptor, syncfs
from .errors import OutputError

if TYPE_CHECKING:
    import torch


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> int:
    """Write through ``write`` into a temporary file beside ``path``, fsync, then rename; the bytes written.

    Nothing half-written is ever left under ``path``, and no temporary file is left behind.
    Safe to call from several threads at once (the umask is never touched).
    """
    temporary, size = _write_temporary(path, write)
    _rename(temporary, path)
    return size


def names_a_file_inside(output: str) -> bool:
    """Whether a dump's ``output`` (a manifest's, a shard's) names a file under its folder, normalised as the command writes them."""
    path = PurePosixPath(output)
    return bool(output) and not path.is_absolute() and ".." not in path.parts and path.as_posix() == output


def open_lines_for_appending(path: Path) -> IO[bytes]:
    """``path`` opened to append lines, unbuffered (``OSError`` when it cannot be); where its last line has
    no end (another tool's file, an edit), it is ended first: the next line is never glued to it."""
    handle = open(path, "ab", buffering=0)  # noqa: SIM115 - the caller closes it
    try:
        size = os.fstat(handle.fileno()).st_size
        if size and _last_byte(path, size) not in (b"\n", None):
            handle.write(b"\n")
    except OSError:
        handle.close()
        raise
    return handle


def _last_byte(path: Path, size: int) -> bytes | None:
    """The byte at ``size - 1``, or ``None`` where the file cannot be read (write-only: appending still works)."""
    with contextlib.suppress(OSError), open(path, "rb") as reader:
        return os.pread(reader.fileno(), 1, size - 1)
    return None


def stage_files(writes: Sequence[tuple[Path, Callable[[IO[bytes]], None]]]) -> StagedFiles:
    """Each file written as ``atomic_write`` writes it, with one sync for them all where that is as
    safe, in two steps: here each file is written under a temporary name beside its own, not yet
    synced; its ``commit`` (which must follow) syncs their filesystem once and renames them. Every
    file's data is on the disk before its name is, as with a fsync each, for a fraction of the
    cost, and a caller can write the next group while this one's sync waits on the disk.

    In a group, ``write`` gets a file object with ``write`` (each one whole), ``flush``, ``fileno`` and
    ``tell`` only, and each folder is made and looked at once for the group.

    Where ``syncfs`` is not known to flush and report errors as fsync does (only Linux 5.8 on, on
    ext4, XFS or Btrfs, qualifies: not FUSE or network mounts), each file is written whole here,
    with its own fsync, and the commit has nothing left to do.
    """
    descriptor = group_sync_descriptor(writes[0][0].parent) if len(writes) > 1 else None
    if descriptor is None:
        return StagedFiles([], [], None, finished=[_os_error_or(atomic_write, path, write) for path, write in writes])
    written: list[tuple[Path, int] | OSError] = []
    try:
        device, folders = os.fstat(descriptor).st_dev, _made_folders({path.parent for path, _ in writes})
        for path, write in writes:
            written.append(_os_error_or(_write_temporary, path, write, grouped=folders.get(path.parent) == device))
    except BaseException:
        _remove_temporaries(written)
        os.close(descriptor)
        raise
    return StagedFiles([path for path, _ in writes], written, descriptor)


class StagedFiles:
    """Files written under temporary names (``stage_files``), waiting for their one sync and renames."""

    def __init__(self, paths: list[Path], written: list[tuple[Path, int] | OSError], descriptor: int | None,
                 *, finished: list[int | OSError] | None = None) -> None:
        self._paths = paths  # the final names, in order
        self._written = written  # each one's temporary file and size, or why it could not be written
        self._descriptor = descriptor
        self._finished = finished
        """Each file's bytes or error, where every file was written whole already (a fsync each)."""

    def commit(self) -> list[int | OSError]:
        """Sync and rename (once); in order, each file's bytes or the ``OSError`` that kept it out."""
        if self._finished is not None:
            return self._finished
        descriptor, self._descriptor = self._descriptor, None
        try:
            sync_failure = _os_error_or(syncfs, descriptor)
        except BaseException:
            _remove_temporaries(self._written)
            raise
        finally:
            os.close(descriptor)
        if isinstance(sync_failure, OSError):
            _remove_temporaries(self._written)
            return [sync_failure if isinstance(temporary, tuple) else temporary for temporary in self._written]
        return _renamed_all(self._written, self._paths)


def _renamed_all(written: Sequence[tuple[Path, int] | OSError], paths: Sequence[Path]) -> list[int | OSError]:
    renamed: list[int | OSError] = []
    try:
        for temporary, path in zip(written, paths):
            renamed.append(temporary if isinstance(temporary, OSError) else _os_error_or(_renamed, *temporary, path))
    except BaseException:  # e.g. Ctrl-C in a caller's main thread: the files not yet renamed go
        _remove_temporaries(written[len(renamed) :])
        raise
    return renamed


def _made_folders(folders: set[Path]) -> dict[Path, int]:
    """The folders of a group of files, made where missing, with the device each is on (a file in a
    folder on another filesystem gets a fsync of its own): made and looked at once for the group,
    not once a file (every system call lets another thread take the interpreter's lock, and this
    one waits to get it back). One that cannot be made is left out, to each file's own error."""
    devices = {}
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.mkdir(parents=True, exist_ok=True)
            devices[folder] = os.stat(folder).st_dev
    return devices


def _write_temporary(path: Path, write: Callable[[IO[bytes]], None], *, grouped: bool = False) -> tuple[Path, int]:
    """A temporary file beside ``path`` holding what ``write`` writes, and its size, fsynced; or,
    ``grouped``, its folder made already and on the filesystem the caller syncs as a whole before
    renaming: written through the descriptor (``_WholeWrites``), not fsynced."""
    if not grouped:
        path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{_temporary_stem(path.name)}.{os.getpid()}-{threading.get_ident() % 10**6}-{next(_TEMPORARY_NUMBERS)}.tmp"
    # O_EXCL: never through a link or over another file; 0o666 is filtered by the umask, as open() is.
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        with _WholeWrites(descriptor) if grouped else os.fdopen(descriptor, "wb") as handle:
            write(handle)  # type: ignore[arg-type]
            handle.flush()
            if not grouped:
                os.fsync(handle.fileno())
            return temporary, handle.tell()
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


class _WholeWrites:
    """A file descriptor with what a group's writes use of a file object: ``write`` (each one whole),
    ``flush``, ``fileno``, ``tell``, closed on leaving. ``os.fdopen`` would add an fstat, an isatty
    ioctl and two seeks a file: each system call lets another writer thread take the interpreter's
    lock, and this one waits to get it back."""

    def __init__(self, descriptor: int) -> None:
        self._descriptor, self._size = descriptor, 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        size = view.nbytes
        while view:  # a write(2) may be cut short (a signal, a full disk just reached): the rest follows, or its error
            view = view[os.write(self._descriptor, view):]
        self._size += size
        return size

    def flush(self) -> None:
        pass

    def fileno(self) -> int:
        return self._descriptor

    def tell(self) -> int:
        return self._size

    def __enter__(self) -> _WholeWrites:
        return self

    def __exit__(self, *exception: object) -> None:
        os.close(self._descriptor)


def _rename(temporary: Path, path: Path) -> None:
    try:
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _renamed(temporary: Path, size: int, path: Path) -> int:
    _rename(temporary, path)
    return size


def _remove_temporaries(written: Sequence[tuple[Path, int] | OSError]) -> None:
    for temporary in written:
        if isinstance(temporary, tuple):
            with contextlib.suppress(OSError):
                os.unlink(temporary[0])


R = TypeVar("R")


def _os_error_or(function: Callable[..., R], *args: Any, **keywords: Any) -> R | OSError:
    try:
        return function(*args, **keywords)
    except OSError as error:
        return error


_TEMPORARY_NUMBERS = itertools.count()
"""Makes each temporary name of this process unique (``next`` on a count is atomic under the GIL)."""
_TEMPORARY_NAME = re.compile(r"\.(.+)\.\d+-\d+-\d+\.tmp", re.DOTALL)


def _temporary_stem(name: str) -> str:
    # The temporary name must fit where the final one fits (255 bytes): its stem is cut to 200, in the
    # filesystem's own bytes (os.fsencode: UTF-8 or not), and given back as the str os.open takes for them.
    return os.fsdecode(os.fsencode(name)[:200])


def remove_leftover_temporaries(paths: Iterable[Path]) -> int:
    """Remove the temporary files that a killed run left beside these final paths, and no other
    (another run may be writing its own files into the same folders); how many were removed."""
    stems: dict[Path, set[str]] = {}
    for path in paths:
        stems.setdefault(path.parent, set()).add(_temporary_stem(path.name))
    removed = 0
    for folder, owned in stems.items():
        with contextlib.suppress(OSError), os.scandir(folder) as entries:
            for entry in entries:
                match = _TEMPORARY_NAME.fullmatch(entry.name)
                if match and match.group(1) in owned and entry.is_file(follow_symlinks=False):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
                        removed += 1
    return removed


def stage_features(
    files: Sequence[tuple[Path, Mapping[str, torch.Tensor], Mapping[str, Any]]],
) -> Callable[[], list[int | OutputError]]:
    """Save ``{"features": ..., "meta": ...}`` into each path, in two steps (``stage_files``): the
    files written now, and the call that commits them (once, from any thread) and gives, in order,
    each one's bytes or its ``OutputError`` (``ends_run`` unless only that file's name or folder is wrong)."""
    staged = stage_files([(path, functools.partial(_write_features, features, meta)) for path, features, meta in files])

    def commit() -> list[int | OutputError]:
        return [saved if isinstance(saved, int) else output_error(path, saved)
                for saved, (path, _, _) in zip(staged.commit(), files)]

    return commit


def _write_features(features: Mapping[str, torch.Tensor], meta: Mapping[str, Any], handle: IO[bytes]) -> None:
    """Serialised in memory first, then written: a full disk is then the operating system's own
    error (``No space left on device``), not torch's writer failing on a short write."""
    import io

    import torch

    buffer = io.BytesIO()
    # A row of a batch is a view: saved alone, it would drag the whole batch's storage along.
    compact = {name: value if value.untyped_storage().nbytes() == value.nbytes else value.clone() for name, value in features.items()}
    torch.save({"features": compact, "meta": dict(meta)}, buffer)
    handle.write(buffer.getbuffer())


def output_error(path: Path, error: OSError) -> OutputError:
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
