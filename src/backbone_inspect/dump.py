"""Batch dumps: many images to feature files, resumable, interrupt-safe and sharded.

``process_batch`` is the unit of work: decoded images in, feature files and outcomes out.
``run_dump`` drives it locally with a DataLoader; another executor can drive the same function.
"""

from __future__ import annotations

import collections
import contextlib
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

from .errors import OutputError, UsageError
from .images import DecodedBatch, FoundImage, ImageDataset, collate_batch
from .output import atomic_write, save_features
from .pipeline import TORCH_DTYPES, Extractor, ImageResult

SETTINGS_FILE = "backbone-inspect.json"
UNSHARDED_MANIFEST = "manifest.jsonl"
FILE_OVERHEAD_BYTES = 1536
"""About what torch.save adds to a feature file besides the tensor bytes (zip entries, meta)."""


@dataclass(frozen=True)
class Outcome:
    """One image's result: a line of the manifest."""

    image: str
    output: str | None
    status: str
    """``ok``, ``error`` or ``skipped``."""
    error: str | None = None
    shapes: dict[str, list[int]] | None = None
    bytes_written: int = 0

    def manifest_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"image": self.image, "output": self.output, "status": self.status}
        if self.error is not None:
            record["error"] = self.error
        if self.shapes is not None:
            record["shapes"] = self.shapes
        return record


@dataclass(frozen=True)
class DumpSettings:
    """What makes two dumps comparable: resuming into a folder needs the same settings."""

    arch: str
    weights: str
    seed: int | None
    """Only for random weights, where it decides the numbers."""
    layers: tuple[str, ...]
    preprocessing: dict[str, Any]
    dtype: str
    """The compute dtype."""
    save_dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "weights": self.weights,
            "seed": self.seed,
            "layers": list(self.layers),
            "preprocessing": self.preprocessing,
            "dtype": self.dtype,
            "save_dtype": self.save_dtype,
        }


def settings_differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """``key old (now new)`` for each setting that differs; nested settings by their own keys."""
    differences = []
    for key, value in current.items():
        old = saved.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            differences += settings_differences(old, value, f"{prefix}{key}.")
        elif old != value:
            differences.append(f"{prefix}{key} {json.dumps(old)} (now {json.dumps(value)})")
    return differences


def claim_output_dir(save_dir: Path, settings: DumpSettings, *, overwrite: bool, record: bool = True) -> None:
    """Make ``save_dir`` and record the settings; features of other settings there: exit 2.

    An unwritable folder is one ``OutputError`` here, before any image is processed.
    ``record=False`` (a dry run) only compares.
    """
    path = save_dir / SETTINGS_FILE
    current = settings.to_dict()
    try:
        if record:
            save_dir.mkdir(parents=True, exist_ok=True)
        if path.exists() and not overwrite:
            try:
                saved = json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError):
                saved = {}
            differences = settings_differences(saved, current)
            if differences:
                raise UsageError(
                    f"{save_dir} holds features made with other settings: {', '.join(differences)}; "
                    "use --overwrite to replace them, or another --save folder"
                )
            return
        if not record:
            return
        text = json.dumps(current, indent=2) + "\n"
        atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))
    except OSError as error:
        raise OutputError(f"cannot write to output folder {save_dir}: {error.strerror or error}") from error


class Manifest:
    """``manifest*.jsonl``: one line per finished image, appended and flushed as it happens."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._handle: IO[str] = open(path, "a", encoding="utf-8")  # noqa: SIM115
        except OSError as error:
            raise OutputError(f"cannot write manifest {path}: {error.strerror or error}") from error

    def record(self, outcome: Outcome) -> None:
        self._handle.write(json.dumps(outcome.manifest_record()) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


class FeatureWriter:
    """Writes one image's features as ``save_dir/<output>`` in the save dtype, atomically."""

    def __init__(self, save_dir: Path, save_dtype: str, run_meta: dict[str, Any]) -> None:
        self.save_dir = save_dir
        self.dtype = TORCH_DTYPES[save_dtype]
        self.run_meta = run_meta

    def write(self, output: str, result: ImageResult) -> int:
        features = {name: value.to(self.dtype) for name, value in result.features.items()}
        meta = {"image": result.image, **self.run_meta, "input_size": list(result.input_size)}
        return save_features(self.save_dir / output, features, meta)


def made_with(path: Path, settings: DumpSettings) -> bool:
    """Whether a feature file is complete and was made with these settings (its own meta says).

    Memory-mapped: only the small pickled part is read, about 0.2 ms a file.
    """
    try:
        meta = torch.load(path, map_location="cpu", mmap=True, weights_only=True)["meta"]
    except Exception:
        return False
    current = settings.to_dict()
    return {key: meta.get(key) for key in current} == current


def split_existing(
    images: Sequence[FoundImage], save_dir: Path | None, settings: DumpSettings, *, overwrite: bool
) -> tuple[list[FoundImage], list[FoundImage], list[FoundImage]]:
    """(to do, to skip, to redo): an image is skipped when its feature file exists and was made
    with the same settings, unless ``overwrite``; a file that is unreadable or was made
    otherwise (left by an earlier ``--overwrite`` over part of the folder) is redone."""
    if save_dir is None or overwrite:
        return list(images), [], []
    todo, skipped, redo = [], [], []
    for image in images:
        path = save_dir / image.output
        if not path.is_file():
            todo.append(image)
        elif made_with(path, settings):
            skipped.append(image)
        else:
            redo.append(image)
    return todo + redo, skipped, redo


def extract_batch(
    extractor: Extractor,
    images: Sequence[FoundImage],
    batch: DecodedBatch,
    should_stop: Callable[[], bool] = lambda: False,
) -> list[tuple[FoundImage, ImageResult | str]]:
    """Forward one decoded batch: per image, in order, its result or why it failed.

    Returns nothing more once ``should_stop()`` is true before a forward pass.
    """
    done: dict[int, ImageResult | str] = dict(batch.errors)
    for group in batch.groups:
        if should_stop():
            return []
        names = [images[position].path for position in group.positions]
        done.update(zip(group.positions, extractor.forward_group(names, group)))
    return [(images[position], done[position]) for position in range(len(images))]


FinishedImage = tuple[Outcome, ImageResult | None, str | None]
"""An image's manifest line, its result (when it has one) and the output error that should end the run."""


def finish_image(image: FoundImage, result: ImageResult | str, writer: FeatureWriter | None) -> FinishedImage:
    """Write one image's file (atomically) and describe it as a manifest line.

    A write that fails is this image's error, and is also returned as the output error: a
    folder that cannot be written ends the run.
    """
    if isinstance(result, str):
        return Outcome(image.path, image.output, "error", error=result), None, None
    try:
        written = writer.write(image.output, result) if writer is not None else 0
    except OutputError as error:
        return Outcome(image.path, image.output, "error", error=str(error)), None, str(error)
    shapes = {stats.name: list(stats.shape) for stats in result.stats}
    return Outcome(image.path, image.output, "ok", shapes=shapes, bytes_written=written), result, None


def process_batch(
    extractor: Extractor,
    images: Sequence[FoundImage],
    batch: DecodedBatch,
    writer: FeatureWriter | None,
) -> list[FinishedImage]:
    """The whole unit of work, synchronously: one decoded batch in, files and outcomes out."""
    return [finish_image(image, result, writer) for image, result in extract_batch(extractor, images, batch)]


def _ignore_sigint(_: int) -> None:
    # Ctrl-C reaches the whole process group; the main process decides when to stop and
    # shuts the workers down itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def decoded_batches(
    images: Sequence[FoundImage], extractor: Extractor, *, batch_size: int, workers: int
) -> Iterator[tuple[list[FoundImage], DecodedBatch]]:
    """Decoded, preprocessed batches, in order; with ``workers`` > 0 decoding overlaps the forward."""
    dataset = ImageDataset([image.path for image in images], extractor.preprocessing)
    if workers == 0:
        for start in range(0, len(images), batch_size):
            indices = range(start, min(start + batch_size, len(images)))
            yield [images[i] for i in indices], collate_batch([dataset[i] for i in indices])
        return
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_batch,
        worker_init_fn=_ignore_sigint,
        pin_memory=extractor.device.type == "cuda",
        prefetch_factor=2,
    )
    for batch in loader:
        yield [images[index] for index in batch.indices], batch


@dataclass
class StopRequest:
    """Set by SIGINT/SIGTERM: the run finishes the file it is writing and stops."""

    signal_number: int | None = None

    def __call__(self) -> bool:
        return self.signal_number is not None


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """The first SIGINT or SIGTERM asks for a clean stop; a second SIGINT interrupts at once."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handle(number: int, _frame: object) -> None:
        if request.signal_number is not None and number == signal.SIGINT:
            raise KeyboardInterrupt
        request.signal_number = number

    previous = {number: signal.signal(number, handle) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for number, handler in previous.items():
            # After a stop the process only reports and exits: more signals must not cut that short.
            signal.signal(number, signal.SIG_IGN if request.signal_number is not None else handler)


@dataclass
class RunSummary:
    processed: int = 0
    skipped: int = 0
    failed: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    stopped_by: int | None = None
    left: int = 0
    """Images not done when the run stopped."""
    output_error: str | None = None
    output_error_shown: bool = False
    """Whether the output error was already reported as an image's error."""
    started: float = field(default_factory=time.perf_counter)

    def add(self, outcome: Outcome, output_error: str | None = None) -> None:
        """Count one image; an output error (the first is kept) ends the run, already shown as its error."""
        if output_error is not None:
            self.output_error = self.output_error or output_error
            self.output_error_shown = True
        if outcome.status == "ok":
            self.processed += 1
        elif outcome.status == "skipped":
            self.skipped += 1
        else:
            self.failed += 1
        self.bytes_written += outcome.bytes_written

    def finish(self, stopped_by: int | None, total: int) -> None:
        """Close the account of a run over ``total`` images: its time, and what is left."""
        self.seconds = time.perf_counter() - self.started
        self.stopped_by = stopped_by
        self.left = total - self.processed - self.failed

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0


def run_dump(
    extractor: Extractor,
    todo: Sequence[FoundImage],
    *,
    writer: FeatureWriter | None,
    on_outcome: Callable[[Outcome, ImageResult | None], None],
    batch_size: int,
    workers: int,
    stop: StopRequest,
) -> RunSummary:
    """Run every image of ``todo``; ``on_outcome`` sees each, in order, once its file is written.

    Files are written by a background thread while the next batch computes; at most about
    two batches of features are held at once, so memory stays flat. A stop request, a
    second Ctrl-C or an output error ends the run, and every file written by then is reported.
    """
    summary = RunSummary()
    workers = workers if len(todo) > batch_size else 0
    batches = decoded_batches(todo, extractor, batch_size=batch_size, workers=workers)
    pending: collections.deque[Future[FinishedImage]] = collections.deque()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feature-writer")

    def report(future: Future[FinishedImage]) -> None:
        outcome, result, output_error = future.result()
        summary.add(outcome, output_error)
        try:
            on_outcome(outcome, result)
        except OutputError as error:  # e.g. a picture that cannot be written
            summary.output_error = summary.output_error or str(error)

    try:
        for images, batch in batches:
            for image, result in extract_batch(extractor, images, batch, stop):
                pending.append(executor.submit(finish_image, image, result, writer))
            while pending and (pending[0].done() or len(pending) > batch_size):
                report(pending.popleft())
            if stop() or summary.output_error is not None:
                break
    except KeyboardInterrupt:  # a second Ctrl-C: stop now, report what is written
        stop.signal_number = signal.SIGINT
        for future in pending:
            future.cancel()
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()
    while pending:
        future = pending.popleft()
        if not future.cancelled():
            report(future)
    executor.shutdown(wait=True)
    summary.finish(stop.signal_number, len(todo))
    return summary


def estimate_bytes(
    extractor_arch: str, layers: Sequence[str], input_sizes: Sequence[tuple[int, int]], save_dtype: str
) -> int:
    """Bytes the feature files of images of these input sizes will take, from the stage shapes."""
    import torchvision

    from .backbone import Backbone

    with torch.device("meta"):
        backbone = Backbone(extractor_arch, layers, model=torchvision.models.get_model(extractor_arch))
    element = torch.empty((), dtype=TORCH_DTYPES[save_dtype]).element_size()
    per_size: dict[tuple[int, int], int] = {}
    total = 0
    for size in input_sizes:
        if size not in per_size:
            with torch.device("meta"):
                features = backbone(torch.empty(1, 3, *size))
            per_size[size] = sum(f[0].numel() for f in features.values()) * element + FILE_OVERHEAD_BYTES
        total += per_size[size]
    return total
