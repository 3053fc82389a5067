"""What to process: the images under the inputs, their output names, and this process's shard."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError
from .options import read_text_file
from .images import Preprocessing, size_after_resize
from .shards import Shard, parse_shard, shard_from_env

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".dib", ".tif", ".tiff", ".gif"}
)


@dataclass(frozen=True)
class FoundImage:
    """An input image and the path of its feature file relative to the output folder."""

    path: str
    """The path as given, or joined onto the directory argument it was found under."""
    output: str
    """``<stem>.pt`` for a file argument; the path below the directory argument, for a found file."""


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS


def read_path_list(list_file: Path) -> list[tuple[int, str]]:
    """Paths from ``--from-list``, each with its line number: one per line; blank lines and ``#`` comments ignored.

    A byte-order mark and Windows line endings are allowed; a NUL byte means it is no text file.
    """
    if not isinstance(list_file, (str, os.PathLike)):
        raise UsageError(f"--from-list {list_file!r}: expected the path of a text file")
    text = read_text_file("--from-list", list_file)
    if "\0" in text:
        raise UsageError(f"--from-list {list_file}: holds NUL bytes, so it is not a text file of paths, one per line")
    # Only the line endings go: a name may end in a space, and must stay the file it names.
    return [(number, line) for number, line in enumerate(text.splitlines(), start=1)
            if line.strip() and not line.strip().startswith("#")]


def _walk_images(directory: str, excluded: frozenset[str]) -> list[FoundImage]:
    """Images below ``directory``: regular files (or links to them) with an image extension,
    outside hidden folders and the ``excluded`` folders (real paths: the run's own outputs)."""
    found = []

    def unreadable(error: OSError) -> None:
        warnings.warn(f"cannot read folder {error.filename} ({error.strerror}): its images are left out", stacklevel=2)

    for root, folders, files in os.walk(directory, onerror=unreadable):
        folders[:] = [
            name for name in folders
            if not name.startswith(".") and os.path.realpath(os.path.join(root, name)) not in excluded
        ]
        for name in files:
            path = os.path.join(root, name)
            # A FIFO, socket or device with an image name would block or never end: not an input.
            if is_image_name(name) and os.path.isfile(path):
                found.append(FoundImage(path, Path(root, name).relative_to(directory).with_suffix(".pt").as_posix()))
    return found


class _SameFile:
    """One key for every path of a file through its folders: its folder's real path and its name.

    A folder reached twice (``photos`` and a link to it, ``photos photos/a``) gives its files once;
    a link to a file is a file of its own (a folder of links into a shared pool keeps every name).
    """

    def __init__(self) -> None:
        self._real_folders: dict[str, str] = {}

    def key(self, path: str) -> str:
        folder, name = os.path.split(os.path.normpath(path))
        if folder not in self._real_folders:
            self._real_folders[folder] = os.path.realpath(folder or os.curdir)
        return os.path.join(self._real_folders[folder], name)


def find_images(inputs: Sequence[str], exclude: Iterable[str | os.PathLike[str]] = ()) -> list[FoundImage]:
    """Every image under the inputs (files as given, directories searched recursively), sorted.

    Hidden files and folders, files without an image extension and anything that is not a
    regular file are skipped inside directories, and so are the ``exclude`` folders found
    below them (the run's own ``--save`` and ``--viz`` folders). A file named explicitly is
    always taken. A path that does not exist is a usage error, and so is finding no image at all.
    """
    excluded = frozenset(os.path.realpath(folder) for folder in exclude)
    found: dict[str, FoundImage] = {}
    same_file = _SameFile()
    for given in inputs:
        path = Path(given)
        try:
            kind = "folder" if path.is_dir() else "file" if path.exists() else None
        except OSError as error:  # a file below a folder this user may not search
            raise UsageError(f"{given}: cannot read it ({error.strerror or error})") from error
        if kind == "folder":
            images = _walk_images(given, excluded)
        elif kind == "file":
            images = [FoundImage(given, f"{path.stem}.pt")]
        else:
            raise UsageError(f"{given}: {'a symbolic link that leads nowhere (broken, or a loop)' if path.is_symlink() else 'no such file or directory'}")
        for image in images:
            found.setdefault(same_file.key(image.path), image)
    if not found:
        raise UsageError(f"no images found in {', '.join(inputs) or 'the inputs'}")
    return sorted(found.values(), key=lambda image: image.path)


def check_output_collisions(images: Iterable[FoundImage]) -> None:
    """Inputs that would write the same feature file are a usage error, before any work."""
    sources: dict[str, list[str]] = {}
    for image in images:
        sources.setdefault(image.output, []).append(image.path)
    clashes = [f"{', '.join(paths)} -> {output}" for output, paths in sources.items() if len(paths) > 1]
    if clashes:
        raise UsageError(f"inputs would overwrite each other's output: {'; '.join(clashes)}")


def planned_input_size(path: str, preprocessing: Preprocessing) -> tuple[int, int] | None:
    """The [H, W] an image will have after preprocessing, from its header alone; None if unreadable."""
    from PIL import Image

    if not os.path.isfile(path):  # opening a named pipe would wait for a writer
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                width, height = opened.size
                exif_orientation = opened.getexif().get(0x0112)
        if exif_orientation in (5, 6, 7, 8):  # EXIF orientations that swap axes
            width, height = height, width
    except Exception:
        return None
    if preprocessing.crop is not None:
        return (preprocessing.crop, preprocessing.crop)
    return size_after_resize(height, width, preprocessing.resize)


def _paths(inputs: object) -> list[str]:
    """The inputs as a list of path strings: one path, or any iterable of them."""
    if isinstance(inputs, (str, os.PathLike)):
        return [os.fspath(inputs)]
    if isinstance(inputs, Iterable) and not isinstance(inputs, bytes):
        items = list(inputs)
        if all(isinstance(item, (str, os.PathLike)) for item in items):
            return [os.fspath(item) for item in items]
    shown = repr(inputs)
    shown = shown if len(shown) <= 80 and "\n" not in shown else f"of type {type(inputs).__name__}"
    raise UsageError(f"inputs {shown}: expected a path, or a list of paths, of image files or folders")


@dataclass(frozen=True)
class InputPlan:
    """The images found under the inputs, and the ones this process takes."""

    found: tuple[FoundImage, ...]
    """Every image, sorted by path."""
    selected: tuple[FoundImage, ...]
    """This process's shard of them (all of them without a shard)."""
    shard: Shard | None
    named_files: bool
    """Whether the inputs were all image files named one by one (no folder, no list file)."""
    folders: tuple[str, ...] = ()
    """The folders among the inputs (searched for images), as given."""


def plan_inputs(
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    from_list: str | os.PathLike[str] | None = None,
    shard: Shard | str | None = None,
    shard_from_environment: bool = True,
    advise_srun: bool = True,
    check_collisions: bool = True,
    outputs: Iterable[str | os.PathLike[str] | None] = (),
) -> InputPlan:
    """Find the images (``UsageError`` for a missing path or no image) and take this process's shard.

    ``shard``: ``"K/N"`` or a ``Shard``; ``None`` takes it from torchrun or Slurm when started by
    them (unless ``shard_from_environment`` is false), warning in a Slurm job of several tasks not
    started by srun unless ``advise_srun`` is false (a Ray driver). ``check_collisions``: inputs that would
    write the same output are a ``UsageError``. ``outputs``: the run's own output folders, never
    searched for inputs (pictures drawn by an earlier run are not images to inspect).
    """
    chosen = parse_shard(shard) if isinstance(shard, str) else shard
    if chosen is not None and not isinstance(chosen, Shard):
        raise UsageError(f"invalid --shard {shard!r}: expected 'K/N' (e.g. '0/4') or a Shard")
    if chosen is None and shard_from_environment:
        chosen = shard_from_env(advise_srun=advise_srun)
    given = _paths(inputs)
    numbered = read_path_list(from_list) if from_list is not None else []
    if not given and not numbered:
        raise UsageError("no inputs: give image files or folders, or --from-list FILE")
    for number, path in numbered:
        if not os.path.lexists(path):
            raise UsageError(f"{path}: no such file or directory (line {number} of --from-list {from_list})")
    listed = [path for _, path in numbered]
    found = find_images(given + listed, exclude=[folder for folder in outputs if folder is not None])
    if check_collisions:
        check_output_collisions(found)
    folders = tuple(path for path in given + listed if os.path.isdir(path))
    named_files = from_list is None and not folders
    selected = chosen.take(found) if chosen is not None else found
    return InputPlan(tuple(found), tuple(selected), chosen, named_files, folders)
