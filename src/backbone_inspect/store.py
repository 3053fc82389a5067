"""Output stores: where a run's features go, what is already there, and the record of each image.

``FeatureStore`` is the interface the engines and the run use. ``FolderStore`` is what every
folder format shares (settings file, lock, manifest); ``pt_store.PtFileStore`` writes one ``.pt`` per
image, ``shard_store.ShardStore`` safetensors shards. ``run.make_store`` picks one by ``--format``.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG
from typing import IO, TYPE_CHECKING, Any

from .errors import OutputError, UsageError
from .files import atomic_write, open_lines_for_appending
from .folder_lock import FolderLock, folder_held

if TYPE_CHECKING:
    from .config import FeatureConfig
    from .results import ImageResult
    from .inputs import FoundImage
    from .outcomes import Outcome
    from .shards import Shard

SETTINGS_FILE = "backbone-inspect.json"
UNSHARDED_MANIFEST = "manifest.jsonl"
SETTINGS_BEFORE_THEY_EXISTED = {"format": "pt", "pool": "none", "decode": "cpu"}
"""What a folder or file made before a setting existed was made with."""
SETTINGS_UNKNOWN_BEFORE_THEY_EXISTED = frozenset({"weights_sha256"})
"""Settings a folder or file made before them cannot be checked against: taken as the same (a
checkpoint dump's resume from an earlier version goes on, trusting the path as it did then)."""


def read_settings(path: Path) -> Any:
    """A settings file's JSON. ``ValueError`` where it is not JSON, or not a regular file under a MiB (a named pipe
    or a device would block or never end: never read); ``RecursionError`` for JSON nested too deep; ``OSError``."""
    found = path.stat()  # FileNotFoundError where there is none
    if not S_ISREG(found.st_mode) or found.st_size >= 2**20:
        raise ValueError("not a regular file under a MiB")
    return json.loads(path.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Stored:
    """Where a store put one image's features: in shard formats, the shard holding it (relative to the folder) and its row."""

    bytes_written: int
    shard: str | None = None
    row: int | None = None


@dataclass(frozen=True)
class ResumeSplit:
    """The selected images, by what a run must do with them: ``todo`` to compute (new ones first, then ``redo``),
    ``skipped`` (already stored with the same settings), ``redo`` (stored, but unreadable or made with other
    settings: computed again)."""

    todo: tuple[FoundImage, ...]
    skipped: tuple[FoundImage, ...]
    redo: tuple[FoundImage, ...]


class FeatureStore(ABC):
    """Where features go. The run claims it, asks what is done, opens it, records each image's
    outcome and closes it; engines call ``write`` for each image, in any thread or process
    (a store pickles without its open files, and with absolute paths)."""

    location: str  # where it is, for messages
    FORMAT = ""  # its format's name (pt, shards), recorded in the settings
    unsaved = 0
    """Images reported written that a later commit lost (a shard that failed): the run counts them failed."""
    unsaved_bytes = 0

    @abstractmethod
    def claim(self, *, overwrite: bool, record: bool = True) -> None:
        """Take the store for this run's settings: ``UsageError`` if it holds features made with
        other settings (unless ``overwrite``) or another run holds it, ``OutputError`` if it
        cannot be written. ``record=False`` (a dry run) only compares."""

    @abstractmethod
    def split_done(self, images: Sequence[FoundImage], *, overwrite: bool) -> ResumeSplit:
        """Which images are already stored with these settings (none, with ``overwrite``)."""

    @abstractmethod
    def open(self) -> None:
        """Record the settings and start recording outcomes (the model is loaded by then)."""

    @abstractmethod
    def write(self, image: FoundImage, result: ImageResult) -> Stored:
        """Store one image's features (from any thread); where. ``OutputError`` when it cannot."""

    def write_all(self, items: Sequence[tuple[FoundImage, ImageResult]]) -> list[Stored | OutputError]:
        """Store several images' features (from any thread); in order, where each went or the
        ``OutputError`` that kept it out. A store may commit them together."""
        stored: list[Stored | OutputError] = []
        for image, result in items:
            try:
                stored.append(self.write(image, result))
            except OutputError as error:
                stored.append(error)
        return stored

    def stage_all(self, items: Sequence[tuple[FoundImage, ImageResult]]) -> Callable[[], list[Stored | OutputError]]:
        """``write_all`` in two steps: what can be done now, and the call (to be made exactly once,
        from any thread) that commits it and gives ``write_all``'s answer. An engine commits one
        group while it stages the next; here, everything is done now."""
        stored = self.write_all(items)
        return lambda: stored

    def settled(self, outcome: Outcome) -> Outcome:
        """An outcome as it stands once commits are done (an ``ok`` image of a shard that failed is an error)."""
        return outcome

    def flush(self) -> None:
        """Commit whatever is written but not yet committed (a shard being filled)."""

    def commit_size(self, input_sizes: Sequence[tuple[int, int]]) -> int | None:
        """How many images one commit holds (a shard), for engines that hand a writer whole commits; ``None``: one each."""
        return None

    def discard(self, images: Sequence[FoundImage]) -> None:
        """Images whose input failed when computed: what an earlier run stored for them goes, if it stands alone."""

    def written_since(self, images: Sequence[FoundImage], started: float) -> Sequence[FoundImage]:
        """Of ``images``, those stored by writes since ``started`` (``time.time()``): what a stopped run of another process
        wrote whose results it never got. Here: every one stored (true of a store that removes what it rewrites on opening)."""
        return self.split_done(images, overwrite=False).skipped

    @abstractmethod
    def record(self, outcome: Outcome) -> None:
        """Record one image's outcome (written, skipped or failed)."""

    @abstractmethod
    def close(self) -> None:
        """Stop recording: everything recorded is on disk."""

    @abstractmethod
    def estimate_bytes(self, input_sizes: Sequence[tuple[int, int]]) -> int:
        """What storing images of these input sizes ([H, W] after preprocessing) will take."""


def settings_differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """``key old (now new)`` for each setting that differs; nested settings by their own keys."""
    differences = []
    for key, value in current.items():
        if not prefix and key not in saved and key in SETTINGS_UNKNOWN_BEFORE_THEY_EXISTED:
            continue
        old = saved.get(key, SETTINGS_BEFORE_THEY_EXISTED.get(key) if not prefix else None)
        if isinstance(value, dict) and isinstance(old, dict):
            differences += settings_differences(old, value, f"{prefix}{key}.")
        elif old != value and not (not prefix and _timm_default_then(key, old, value, current)):
            differences.append(f"{prefix}{key} {json.dumps(old)} (now {json.dumps(value)})")
    return differences


def _timm_default_then(key: str, old: Any, value: Any, current: dict[str, Any]) -> bool:
    """Whether a timm dump's ``"DEFAULT"`` weights (recorded so before their tag was) are this run's weights:
    timm still resolves ``DEFAULT`` to the tag recorded now."""
    if key != "weights" or old != "DEFAULT" or not str(current.get("arch", "")).startswith("timm:"):
        return False
    from .timm_models import pretrained_name, timm_name

    return value == pretrained_name(timm_name(current["arch"]))


class FolderStore(FeatureStore):
    """What every folder format shares: ``folder/backbone-inspect.json`` (the settings, the
    format among them), a lock per shard of the inputs, and ``folder/manifest*.jsonl`` (one line
    per image, one manifest per ``--shard``)."""

    def __init__(self, folder: str | Path, config: FeatureConfig, *, shard: Shard | None = None) -> None:
        from . import __version__

        self.folder = Path(folder)
        self.location = str(self.folder)
        self.config = config
        self.settings = {**config.settings(), "format": self.FORMAT}
        self.meta = {**self.settings, "version": __version__}
        """What every file says about how it was made."""
        self.manifest_path = self.folder / (shard.manifest_name if shard is not None else UNSHARDED_MANIFEST)
        self._manifest: IO[bytes] | None = None
        self._lock: FolderLock | None = None
        self._overwrite = False  # claim()'s, for open()'s second look at the settings
        self._recording = threading.RLock()

    def __getstate__(self) -> dict[str, Any]:
        # Another process (a Ray actor) gets no open manifest or lock, and a folder that does
        # not depend on its working directory.
        return {**self.__dict__, "folder": self.folder.resolve(), "_manifest": None, "_lock": None, "_recording": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _recording=threading.RLock())

    def claim(self, *, overwrite: bool, record: bool = True) -> None:
        path, self._overwrite = self.folder / SETTINGS_FILE, overwrite
        try:
            if record:
                self.folder.mkdir(parents=True, exist_ok=True)
                # One run per folder and shard at a time; held until close() or the process ends.
                self._lock = self._lock or FolderLock.take(self.folder / f".{self.manifest_path.name}.lock")
            if path.exists():
                self._check_settings(path, overwrite=overwrite)
        except UsageError:
            self.close()  # a refused run lets go of the folder at once
            raise
        except OSError as error:
            raise OutputError(f"cannot write to output folder {self.folder}: {error.strerror or error}") from error

    def _check_settings(self, path: Path, *, overwrite: bool) -> None:
        try:
            saved = read_settings(path)
        except (ValueError, RecursionError):
            saved = None
        old_format = saved.get("format", SETTINGS_BEFORE_THEY_EXISTED["format"]) if isinstance(saved, dict) else None
        if old_format is not None and old_format != self.FORMAT:
            # Even --overwrite would leave the other format's files beside the new ones: each image twice.
            raise UsageError(f"{self.folder} holds --format {old_format} features (now --format {self.FORMAT}), which even "
                             "--overwrite does not mix: give this format another --save folder, or empty this one first")
        if overwrite:
            return
        if not isinstance(saved, dict):
            raise UsageError(f"{path} is not a settings file of backbone-inspect (not a JSON object): "
                             "use --overwrite to replace it, or another --save folder")
        differences = settings_differences(saved, self.settings)
        if differences:
            raise UsageError(f"{self.folder} holds features made with other settings: {', '.join(differences)}; "
                             "use --overwrite to replace them, or another --save folder")

    def open(self) -> None:
        """Record the settings in the folder and open the manifest: the run has its model. The folder's
        settings are checked again first: another slice's run may have recorded its own since ``claim``."""
        text, path = json.dumps(self.settings, indent=2) + "\n", self.folder / SETTINGS_FILE
        try:
            with folder_held(self.folder):
                if path.exists():
                    self._check_settings(path, overwrite=self._overwrite)
                atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))
        except OSError as error:
            raise OutputError(f"cannot write to output folder {self.folder}: {error.strerror or error}") from error
        try:
            if self.manifest_path.exists() and not self.manifest_path.is_file():
                raise OSError(0, "not a regular file")
            # Unbuffered: a line a full disk cut short is taken back whole (record), none of it left
            # in a buffer to be written after the next line, or at close, once space comes back.
            self._manifest = open_lines_for_appending(self.manifest_path)
        except OSError as error:
            raise OutputError(f"cannot write manifest {self.manifest_path}: {error.strerror or error}") from error

    def record(self, outcome: Outcome) -> None:
        """One whole line, or none: a line cut short by a full disk is taken back."""
        line = memoryview((json.dumps(outcome.manifest_record()) + "\n").encode("utf-8"))
        with self._recording:
            assert self._manifest is not None, "open() the store first"
            size = None
            try:
                size = os.fstat(self._manifest.fileno()).st_size
                while line:  # an unbuffered write may be short (a disk filling up): the rest, or its error
                    line = line[self._manifest.write(line) :]
            except OSError as error:
                if size is not None:
                    with contextlib.suppress(OSError):
                        os.truncate(self.manifest_path, size)
                raise OutputError(f"cannot write manifest {self.manifest_path}: {error.strerror or error}") from error

    def close(self) -> None:
        try:
            with self._recording:
                manifest, self._manifest = self._manifest, None
                if manifest is not None:
                    manifest.close()
        except OSError as error:
            raise OutputError(f"cannot write manifest {self.manifest_path}: {error.strerror or error}") from error
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None


def feature_bytes(config: FeatureConfig, input_sizes: Sequence[tuple[int, int]]) -> dict[tuple[int, int], int]:
    """The bytes of one image's saved features (pooled or not, in ``save_dtype``), per input size.

    From the stage shapes of a model on the meta device: nothing is computed.
    """
    import torch

    from .anatomy import stage_shapes
    from .precision import TORCH_DTYPES

    element = torch.empty((), dtype=TORCH_DTYPES[config.save_dtype]).element_size()
    return {
        size: element * sum(c if config.pool != "none" else c * h * w for c, h, w in shapes.values())
        for size, shapes in stage_shapes(config.arch, config.stages, input_sizes).items()
    }
