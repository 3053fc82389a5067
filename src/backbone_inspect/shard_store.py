"""``--format shards``: features of many images per safetensors file, committed whole.

The folder holds ``backbone-inspect.json`` (the settings, ``"format": "shards"``),
``manifest*.jsonl`` (an ``ok`` line names its ``shard`` and ``row``, written only once that
shard is committed) and ``shards/<slice>-<writer>-<n>.safetensors``. In a shard, each stage is
one tensor ``[N, C, H, W]`` (``[N, C]`` pooled) when its images' shapes agree, else one tensor
``<stage>.<row>`` per image; its metadata (strings) says ``format``, ``version``, ``settings``
(JSON) and, in row order, ``images``, ``outputs`` and ``input_sizes`` (JSON lists).
``<slice>`` is ``all`` or ``KofN`` (``--shard``); ``<writer>`` is unique to each writing process
(a run, a Ray actor), so parallel writers never write the same file.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import OutputError
from .files import save_safetensors
from .options import MAX_SHARD_IMAGES, SHARD_TARGET_BYTES
from .store import FolderStore, ResumeSplit, Stored, feature_bytes, settings_differences

if TYPE_CHECKING:
    import torch

    from .config import FeatureConfig
    from .extractor import ImageResult
    from .inputs import FoundImage
    from .outcomes import Outcome
    from .shards import Shard

SHARD_FOLDER = "shards"
SHARD_FORMAT = "backbone-inspect.shards/1"
HEADER_BYTES_PER_IMAGE = 200
"""About what one image adds to a shard's header (its path, output and size in the metadata)."""
HEADER_BYTES_PER_SHARD = 1024
"""About what a shard's header holds besides its images: the settings, the tensors' entries."""


@dataclass
class FillingShard:
    """A shard being filled, in memory until it is committed."""

    name: str
    """Relative to the folder: ``shards/<file>``."""
    capacity: int
    images: list[FoundImage] = field(default_factory=list)
    input_sizes: list[tuple[int, int]] = field(default_factory=list)
    features: list[dict[str, torch.Tensor]] = field(default_factory=list)


def committed_shards(folder: Path) -> list[Path]:
    """The shard files of a folder, sorted by name (temporary files are hidden, so never among them)."""
    return sorted((folder / SHARD_FOLDER).glob("[!.]*.safetensors"))


def read_shard_metadata(path: Path) -> dict[str, Any] | None:
    """A committed shard's metadata, its JSON values decoded, and ``tensors`` (name → dtype, shape,
    offsets); ``None`` when the file is not a whole shard of this format."""
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if not 0 < size <= 100 * 2**20:
                return None
            header = json.loads(handle.read(size))
            tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
            end = max((entry["data_offsets"][1] for entry in tensors.values()), default=0)
            if os.fstat(handle.fileno()).st_size != 8 + size + end or header["__metadata__"]["format"] != SHARD_FORMAT:
                return None
        metadata = header["__metadata__"]
        decoded = {key: json.loads(metadata[key]) for key in ("settings", "images", "outputs", "input_sizes")}
        return {**decoded, "version": metadata.get("version"), "tensors": tensors}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


class ShardStore(FolderStore):
    """Safetensors shards of up to ``shard_size`` images (``None``: about ``SHARD_TARGET_BYTES`` each)."""

    FORMAT = "shards"

    def __init__(self, folder: str | Path, config: FeatureConfig, *, shard: Shard | None = None,
                 shard_size: int | None = None) -> None:
        super().__init__(folder, config, shard=shard)
        self.shard_size = shard_size
        self.prefix = f"{shard.index}of{shard.count}" if shard is not None else "all"
        self._reset()

    def _reset(self) -> None:
        self._writer: tuple[int, str] | None = None
        self._numbers = itertools.count()
        self._filling: FillingShard | None = None
        self._uncommitted: set[str] = set()
        self._held: dict[str, list[Outcome]] = {}
        self._stale: tuple[Path, ...] = ()
        self._trims: tuple[tuple[Path, frozenset[str]], ...] = ()
        self.unsaved = self.unsaved_bytes = 0
        self._failed: dict[str, str] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        return {key: value for key, value in state.items() if key not in ("_numbers", "_filling", "_uncommitted", "_held", "_failed")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._reset()  # a copy in another process (a Ray actor) writes shards of its own

    def split_done(self, images: Sequence[FoundImage], *, overwrite: bool) -> ResumeSplit:
        """Done: the images of committed shards of these settings. Once the run opens, shards that
        are unreadable or of other settings are removed; with ``overwrite``, shards holding a
        selected image are removed, or rewritten without it when they hold other images too."""
        selected = {image.output for image in images}
        done: set[str] = set()
        stale, trims, replaced = [], [], set()
        for path in committed_shards(self.folder):
            metadata = read_shard_metadata(path)
            holds = set(metadata["outputs"]) if metadata is not None else set()
            if metadata is None or settings_differences(metadata["settings"], self.settings):
                stale.append(path)
                replaced |= holds
            elif overwrite and holds & selected:
                (stale.append(path) if holds <= selected else trims.append((path, frozenset(holds & selected))))
            else:
                done |= holds
        self._stale, self._trims = tuple(stale), tuple(trims)
        todo = tuple(image for image in images if image.output not in done)
        skipped = tuple(image for image in images if image.output in done)
        redo = () if overwrite else tuple(image for image in todo if image.output in replaced)
        return ResumeSplit(todo, skipped, redo)

    def open(self) -> None:
        super().open()
        folder = self.folder / SHARD_FOLDER
        for path, dropped in self._trims:
            self._trim(path, dropped)
        try:
            # Stale shards, and what a killed run of this slice left (this run holds the slice's lock).
            for path in [*self._stale, *folder.glob(f".{self.prefix}-*.tmp")]:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        except OSError as error:
            raise OutputError(f"cannot remove old shards in {folder}: {error.strerror or error}") from error

    def _trim(self, path: Path, dropped: frozenset[str]) -> None:
        """Rewrite a shard without the images this run recomputes, then remove it: the others stay,
        each in exactly one shard, with a manifest line naming where it is now."""
        from safetensors import safe_open

        from .inputs import FoundImage
        from .outcomes import Outcome

        metadata = read_shard_metadata(path)
        if metadata is None:
            return
        kept = FillingShard(self._start(0).name, 0)
        with safe_open(str(path), framework="pt") as shard:
            for row, (image, output, size) in enumerate(zip(metadata["images"], metadata["outputs"], metadata["input_sizes"])):
                if output not in dropped:
                    kept.images.append(FoundImage(image, output))
                    kept.input_sizes.append((int(size[0]), int(size[1])))
                    kept.features.append({stage: shard_row(shard, stage, row) for stage in self.config.stages})
        self._commit(kept)
        for row, image in enumerate(kept.images):
            self.record(Outcome(image.path, image.output, "ok", shard=kept.name, row=row))
        path.unlink()

    def write(self, image: FoundImage, result: ImageResult) -> Stored:
        from .extractor import TORCH_DTYPES

        dtype = TORCH_DTYPES[self.config.save_dtype]
        features = {name: value.to(dtype) for name, value in result.features.items()}
        size = sum(value.nbytes for value in features.values())
        with self._recording:
            filling = self._filling or self._start(size)
            row = len(filling.images)
            filling.images.append(image)
            filling.input_sizes.append(result.input_size)
            filling.features.append(features)
            full = len(filling.images) >= filling.capacity
            if full:  # taken out under the lock: exactly one writer commits it
                self._filling = None
            else:
                self._filling = filling
        if full:
            self._commit(filling)
        return Stored(size, shard=filling.name, row=row)

    def _start(self, image_bytes: int) -> FillingShard:
        if self._writer is None or self._writer[0] != os.getpid():
            self._writer, self._numbers = (os.getpid(), f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"), itertools.count()
        name = f"{SHARD_FOLDER}/{self.prefix}-{self._writer[1]}-{next(self._numbers):05d}.safetensors"
        self._uncommitted.add(name)
        return FillingShard(name, self.shard_size or max(1, min(MAX_SHARD_IMAGES, SHARD_TARGET_BYTES // max(1, image_bytes))))

    def _commit(self, filling: FillingShard) -> None:
        """Write the shard atomically, then the manifest lines of its images that wait on it."""
        metadata = {
            "format": SHARD_FORMAT, "version": str(self.meta["version"]), "settings": json.dumps(self.settings),
            "images": json.dumps([image.path for image in filling.images]),
            "outputs": json.dumps([image.output for image in filling.images]),
            "input_sizes": json.dumps([list(size) for size in filling.input_sizes]),
        }
        try:
            save_safetensors(self.folder / filling.name, shard_tensors(filling.features), metadata)
        except OutputError as error:
            self._fail(filling, str(error))
            raise OutputError(f"{error} (the {len(filling.images)} image(s) of this shard are not saved)") from error
        with self._recording:
            self._uncommitted.discard(filling.name)
            for outcome in self._held.pop(filling.name, []):
                super().record(outcome)

    def _fail(self, filling: FillingShard, reason: str) -> None:
        """A shard that cannot be committed: each of its images already reported written becomes an error line."""
        with self._recording:
            self._uncommitted.discard(filling.name)
            self._failed[filling.name] = reason
            held = self._held.pop(filling.name, [])
        for outcome in held:
            self.record(outcome)

    def record(self, outcome: Outcome) -> None:
        """An ``ok`` line waits for its shard's commit; every other line is written at once."""
        from dataclasses import replace

        with self._recording:
            if outcome.shard in self._uncommitted:
                self._held.setdefault(outcome.shard, []).append(outcome)
                return
            if outcome.shard in self._failed:
                self.unsaved, self.unsaved_bytes = self.unsaved + 1, self.unsaved_bytes + outcome.bytes_written
                outcome = replace(outcome, status="error", error=self._failed[outcome.shard], shard=None, row=None,
                                  shapes=None, bytes_written=0)
        super().record(outcome)

    def flush(self) -> None:
        with self._recording:
            filling, self._filling = self._filling, None
        if filling is not None and filling.images:
            self._commit(filling)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            super().close()

    def commit_size(self, input_sizes: Sequence[tuple[int, int]]) -> int | None:
        if self.shard_size is not None or not input_sizes:
            return self.shard_size
        image_bytes = feature_bytes(self.config, input_sizes[:1])[input_sizes[0]]
        return max(1, min(MAX_SHARD_IMAGES, SHARD_TARGET_BYTES // max(1, image_bytes)))

    def estimate_bytes(self, input_sizes: Sequence[tuple[int, int]]) -> int:
        per_size = feature_bytes(self.config, input_sizes)
        shards = -(-len(input_sizes) // (self.commit_size(input_sizes) or 1))
        return sum(per_size[size] + HEADER_BYTES_PER_IMAGE for size in input_sizes) + shards * HEADER_BYTES_PER_SHARD


def shard_row(shard: Any, stage: str, row: int) -> torch.Tensor:
    """One image's features of ``stage`` from an open shard (``safe_open``): a row of the stacked
    tensor, or the image's own tensor where the shard's shapes differ."""
    if stage in shard.keys():
        return shard.get_slice(stage)[row]
    return shard.get_tensor(f"{stage}.{row}")


def shard_tensors(rows: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """Each stage as one stacked tensor where the rows' shapes agree, else ``<stage>.<row>`` per image."""
    tensors: dict[str, torch.Tensor | list[torch.Tensor]] = {}
    for stage in rows[0]:
        values = [row[stage] for row in rows]
        if len({tuple(value.shape) for value in values}) == 1:
            tensors[stage] = values
        else:
            tensors.update((f"{stage}.{index}", value) for index, value in enumerate(values))
    return tensors
