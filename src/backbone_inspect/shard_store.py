"""``--format shards``: the store that fills shards of many images and commits each whole (the files
themselves: ``shard_files``): which images a folder holds, filling shards from the writer threads,
committing them in the background, holding each image's manifest line until its shard is on disk."""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import secrets
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import OutputError, OutputStopped, UsageError
from .options import MAX_SHARD_IMAGES, SHARD_TARGET_BYTES
from .shard_files import (HEADER_BYTES_PER_IMAGE, HEADER_BYTES_PER_SHARD, SHARD_FOLDER, FillingShard, kept_rows,
                          readable_shards, shard_metadata, write_shard)
from .store import FolderStore, ResumeSplit, Stored, feature_bytes, settings_differences

if TYPE_CHECKING:
    from .config import FeatureConfig
    from .results import ImageResult
    from .inputs import FoundImage
    from .outcomes import Outcome
    from .shards import Shard

COMMITTERS = 2
"""Shards written at once: one is fsynced while the other is written (1.4x one committer, measured)."""
COMMITS_IN_FLIGHT = 2
"""Full shards being committed at most; writers wait for room before taking another image (memory stays bounded)."""


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
        self._failed_images = 0
        self._manifest_error: str | None = None  # lines a committer could not write: the run ends on it
        self._located: dict[str, tuple[str, int]] = {}  # each image a resume skips: its shard and row (manifest line)
        self._commits: collections.deque[Future[None]] = collections.deque()
        self._committing = threading.Lock()
        self._committer: ThreadPoolExecutor | None = None
        self._recording = threading.Condition(threading.RLock())  # writers wait on it for room
        self._alive = 0  # shards in memory (being filled, waiting or being written): at most COMMITS_IN_FLIGHT + 1

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        private = ("_numbers", "_filling", "_uncommitted", "_held", "_failed", "_commits", "_committing", "_committer",
                   "_located")
        return {key: value for key, value in state.items() if key not in private}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._reset()  # a copy in another process (a Ray actor) writes shards of its own

    def split_done(self, images: Sequence[FoundImage], *, overwrite: bool, found: Sequence[FoundImage] | None = None) -> ResumeSplit:
        """Done: the images of committed shards of these settings. Once the run opens, shards unreadable or of other
        settings are removed (another slice's once each of its images still among the inputs, ``found`` (every slice's;
        ``None``: all it holds), is this run's or done); so are images in a second shard (a copy), and with ``overwrite``
        the selected ones: a shard holding others is rewritten without them."""
        selected = {image.output for image in images}
        stale, trims, replaced, others_stale = [], [], set(), []
        self._located = {}
        for path, metadata in readable_shards(self.folder, OutputError):  # one unread is not proven bad: the run does not guess
            holds = set(metadata["outputs"]) if metadata is not None else set()
            if not path.name.startswith(f"{self.prefix}-"):  # another slice's: read, and changed only once stale
                if self._take_others(path, metadata, holds & selected if overwrite else set()):
                    others_stale.append((path, holds))
                continue
            dropped = (holds & selected if overwrite else set()) | (holds & self._located.keys())
            if metadata is None or settings_differences(metadata["settings"], self.settings) or (holds and holds <= dropped):
                stale.append(path)
                replaced |= holds - self._located.keys()
            elif dropped:
                trims.append((path, frozenset(dropped)))
            if metadata is not None and path not in stale:
                self._located.update((output, (f"{SHARD_FOLDER}/{path.name}", row)) for row, output in enumerate(
                    metadata["outputs"]) if output not in dropped)
        done = self._located.keys()  # another slicing's stale shard goes once none of its images waits on it
        covered = selected | done if others_stale else set()
        inputs = {image.output for image in found} | selected if others_stale and found is not None else None
        stale += [path for path, holds in others_stale if (holds if inputs is None else holds & inputs) <= covered]  # gone: waits on none
        self._stale, self._trims = tuple(stale), tuple(trims)
        todo = tuple(image for image in images if image.output not in done)
        skipped = tuple(image for image in images if image.output in done)
        redo = () if overwrite else tuple(image for image in todo if image.output in replaced)
        return ResumeSplit(todo, skipped, redo)

    def _take_others(self, path: Path, metadata: dict[str, Any] | None, chosen: set[str]) -> bool:
        """Another slice's shard (its run may be on now): its images done if of these settings; ``True``: stale."""
        if metadata is None or settings_differences(metadata["settings"], self.settings):
            return True
        if chosen:
            raise UsageError(
                f"--overwrite: {path} belongs to another slice of the inputs and holds {sorted(chosen)[0]}, one of this "
                "run's images; overwrite with the --shard slicing that wrote it, or into another --save folder"
            )
        for row, output in enumerate(metadata["outputs"]):
            self._located.setdefault(output, (f"{SHARD_FOLDER}/{path.name}", row))
        return False

    def open(self) -> None:
        super().open()
        folder = self.folder / SHARD_FOLDER
        for path, dropped in self._trims:
            self._trim(path, dropped)
        # Stale shards, and what a killed run of this slice left (this run holds the slice's lock).
        for path in [*self._stale, *folder.glob(f".{self.prefix}-*.tmp")]:
            try:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            except OSError as error:
                raise OutputError(f"cannot remove {path}: {error.strerror or error}") from error

    def _trim(self, path: Path, dropped: frozenset[str]) -> None:
        """A shard rewritten without the images this run recomputes, then removed: the others stay in one shard, lines naming it."""
        from .outcomes import Outcome

        metadata = shard_metadata(path, OutputError)
        if metadata is None:
            return
        kept = kept_rows(path, metadata, self.config.stages, dropped, self._start(0))
        self._commit(kept)
        for row, image in enumerate(kept.images):
            self._located[image.output] = (kept.name, row)
            self.record(Outcome(image.path, image.output, "ok", shard=kept.name, row=row))
        path.unlink()

    def write(self, image: FoundImage, result: ImageResult) -> Stored:
        from .precision import TORCH_DTYPES

        dtype = TORCH_DTYPES[self.config.save_dtype]
        features = {name: value.to(dtype) for name, value in result.features.items()}
        size = sum(value.nbytes for value in features.values())
        self._raise_if_a_commit_failed()
        with self._recording:
            # Bounded memory: no new shard is started while full ones wait for the disk.
            self._recording.wait_for(lambda: self._filling is not None or self._alive <= COMMITS_IN_FLIGHT)
            filling = self._filling or self._start(size)
            row = len(filling.images)
            full = filling.add(image, result.input_size, features)
            if full:  # taken out under the lock: exactly one writer commits it
                self._filling = None
            else:
                self._filling = filling
        if full:
            self._submit(filling)
        return Stored(size, shard=filling.name, row=row)

    def _start(self, image_bytes: int) -> FillingShard:
        if self._writer is None or self._writer[0] != os.getpid():
            self._writer, self._numbers = (os.getpid(), f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"), itertools.count()
        name = f"{SHARD_FOLDER}/{self.prefix}-{self._writer[1]}-{next(self._numbers):05d}.safetensors"
        self._uncommitted.add(name)
        self._alive += 1
        return FillingShard(name, self._capacity(image_bytes))

    def _capacity(self, image_bytes: int) -> int:
        """Images a shard holds: ``shard_size``, or as many as fill ``SHARD_TARGET_BYTES``."""
        return self.shard_size or max(1, min(MAX_SHARD_IMAGES, SHARD_TARGET_BYTES // max(1, image_bytes)))

    def _submit(self, filling: FillingShard) -> None:
        """Commit a full shard in the background, while the writers fill the next."""
        with self._committing:
            if self._committer is None:
                self._committer = ThreadPoolExecutor(max_workers=COMMITTERS, thread_name_prefix="shard-committer")
            self._commits.append(self._committer.submit(self._commit, filling))
            while self._commits and self._commits[0].done():
                self._commits.popleft()

    def _commit(self, filling: FillingShard) -> None:
        """Write the shard atomically, then the manifest lines of its images that wait on it."""
        try:
            write_shard(self.folder, filling, self.settings, str(self.meta["version"]))
        except BaseException as error:  # whatever it is, the shard's images are not saved
            self._fail(filling, str(error) if isinstance(error, OutputError) else f"cannot write {filling.name}: {error!r}")
            raise
        with self._recording:
            held = self._retire(filling)
            for index, outcome in enumerate(held):
                try:
                    super().record(outcome)
                except OutputError as error:  # the manifest cannot be written: the run ends on it
                    self._manifest_error = self._manifest_error or f"{error} ({len(held) - index} line(s) not written)"
                    return

    def _retire(self, filling: FillingShard) -> list[Outcome]:
        """A shard is out of memory (committed or failed): room for the writers; its held lines."""
        with self._recording:
            self._uncommitted.discard(filling.name)
            self._alive -= 1
            self._recording.notify_all()
            return self._held.pop(filling.name, [])

    def _raise_if_a_commit_failed(self) -> None:
        """Once a shard failed, no image is taken: the run ends, and the rest are left for a re-run."""
        with self._recording:
            failed, manifest_error = dict(self._failed), self._manifest_error
        if failed:
            reason = next(iter(failed.values()))
            count = f"{self._failed_images} image(s) in {len(failed)} shard(s)"
            raise OutputStopped(f"{reason} ({count} not saved: run again once it is fixed)")
        if manifest_error is not None:
            raise OutputStopped(manifest_error)

    def _fail(self, filling: FillingShard, reason: str) -> None:
        """A shard that cannot be committed: its images reported written become error lines, each counted unsaved."""
        with self._recording:
            self._failed[filling.name], self._failed_images = reason, self._failed_images + len(filling.images)
            held = self._retire(filling)
        for outcome in held:
            try:
                self.record(outcome)
            except OutputError as error:
                self._manifest_error = self._manifest_error or str(error)

    def settled(self, outcome: Outcome) -> Outcome:
        reason = self._failed.get(outcome.shard) if outcome.shard is not None else None
        if reason is None:
            return outcome
        return replace(outcome, status="error", error=reason, shard=None, row=None, shapes=None, bytes_written=0)

    def record(self, outcome: Outcome) -> None:
        """An ``ok`` line waits for its shard's commit; every other line is written at once."""
        with self._recording:
            if outcome.shard in self._uncommitted:
                self._held.setdefault(outcome.shard, []).append(outcome)
                return
            settled = self.settled(outcome)
            if settled is not outcome:
                self.unsaved, self.unsaved_bytes = self.unsaved + 1, self.unsaved_bytes + outcome.bytes_written
            if outcome.status == "skipped" and outcome.output in self._located:
                settled = replace(outcome, shard=self._located[outcome.output][0], row=self._located[outcome.output][1])
        super().record(settled)

    def flush(self) -> None:
        """Commit the shard being filled, wait for every commit; ``OutputError`` if one failed."""
        with self._recording:
            filling, self._filling = self._filling, None
        if filling is not None and filling.images:
            self._submit(filling)
        with self._committing:
            while self._commits:
                self._commits.popleft().exception()
        self._raise_if_a_commit_failed()

    def close(self) -> None:
        try:
            with contextlib.suppress(OutputError):  # already reported by flush(), or the run is ending on another error
                self.flush()
        finally:
            if self._committer is not None:
                self._committer.shutdown(wait=True)
                self._committer = None
            super().close()

    def commit_size(self, input_sizes: Sequence[tuple[int, int]]) -> int | None:
        if self.shard_size is not None or not input_sizes:
            return self.shard_size
        return self._capacity(feature_bytes(self.config, input_sizes[:1])[input_sizes[0]])

    def estimate_bytes(self, input_sizes: Sequence[tuple[int, int]]) -> int:
        per_size = feature_bytes(self.config, input_sizes)
        shards = -(-len(input_sizes) // (self.commit_size(input_sizes) or 1))
        return sum(per_size[size] + HEADER_BYTES_PER_IMAGE for size in input_sizes) + shards * HEADER_BYTES_PER_SHARD
