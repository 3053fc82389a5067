"""Batch dumps: many images to feature files, resumable, interrupt-safe and sharded.

``process_batch`` is the unit of work: decoded images in, feature files and outcomes out.
``run_dump`` drives it locally with a DataLoader; another executor can drive the same function.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

from .errors import OutputError, UsageError
from .images import FoundImage, ImageDataset, LoadedImage, collate_as_list
from .output import atomic_write, save_features
from .pipeline import Extractor, ImageResult

SAVE_DTYPES: dict[str, torch.dtype] = {  # the names are options.SAVE_DTYPE_NAMES
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
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
    save_dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "weights": self.weights,
            "seed": self.seed,
            "layers": list(self.layers),
            "preprocessing": self.preprocessing,
            "save_dtype": self.save_dtype,
        }


def settings_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    return [
        f"{key} {json.dumps(saved.get(key))} (now {json.dumps(current.get(key))})"
        for key in current
        if saved.get(key) != current[key]
    ]


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
        self.dtype = SAVE_DTYPES[save_dtype]
        self.run_meta = run_meta

    def write(self, output: str, result: ImageResult) -> int:
        features = {name: value.to(self.dtype) for name, value in result.features.items()}
        meta = {"image": result.image, **self.run_meta, "input_size": list(result.input_size)}
        return save_features(self.save_dir / output, features, meta)


def split_existing(
    images: Sequence[FoundImage], save_dir: Path | None, *, overwrite: bool
) -> tuple[list[FoundImage], list[FoundImage]]:
    """(to do, to skip): an image whose feature file exists is skipped unless ``overwrite``."""
    if save_dir is None or overwrite:
        return list(images), []
    todo, skipped = [], []
    for image in images:
        (skipped if (save_dir / image.output).is_file() else todo).append(image)
    return todo, skipped


def process_batch(
    extractor: Extractor,
    batch: Sequence[tuple[FoundImage, LoadedImage]],
    writer: FeatureWriter | None,
    should_stop: Callable[[], bool] = lambda: False,
) -> Iterator[tuple[Outcome, ImageResult | None]]:
    """Forward one batch of decoded images and write their files; one outcome per image.

    Stops between images once ``should_stop()`` is true: every file written is complete.
    """
    good = [(image, loaded) for image, loaded in batch if loaded.pixels is not None]
    for image, loaded in batch:
        if loaded.pixels is None:
            yield Outcome(image.path, image.output, "error", error=loaded.error), None
    if not good or should_stop():
        return
    results = extractor.extract([(image.path, loaded.pixels) for image, loaded in good])
    for (image, _), result in zip(good, results):
        if should_stop():
            return
        written = writer.write(image.output, result) if writer is not None else 0
        shapes = {stats.name: list(stats.shape) for stats in result.stats}
        yield Outcome(image.path, image.output, "ok", shapes=shapes, bytes_written=written), result


def _ignore_sigint(_: int) -> None:
    # Ctrl-C reaches the whole process group; the main process decides when to stop and
    # shuts the workers down itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def decoded_batches(
    images: Sequence[FoundImage], extractor: Extractor, *, batch_size: int, workers: int
) -> Iterator[list[tuple[FoundImage, LoadedImage]]]:
    """Decoded, preprocessed batches, in order; with ``workers`` > 0 decoding overlaps the forward."""
    dataset = ImageDataset([image.path for image in images], extractor.preprocessing)
    if workers == 0:
        for start in range(0, len(images), batch_size):
            indices = range(start, min(start + batch_size, len(images)))
            yield [(images[i], dataset[i]) for i in indices]
        return
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_as_list,
        worker_init_fn=_ignore_sigint,
    )
    for batch in loader:
        yield [(images[loaded.index], loaded) for loaded in batch]


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
            signal.signal(number, handler)


@dataclass
class RunSummary:
    processed: int = 0
    skipped: int = 0
    failed: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    stopped_by: int | None = None
    output_error: str | None = None
    started: float = field(default_factory=time.perf_counter)

    def add(self, outcome: Outcome) -> None:
        if outcome.status == "ok":
            self.processed += 1
        elif outcome.status == "skipped":
            self.skipped += 1
        else:
            self.failed += 1
        self.bytes_written += outcome.bytes_written

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
    """Run every image of ``todo``; ``on_outcome`` sees each as it finishes (manifest, output)."""
    summary = RunSummary()
    workers = workers if len(todo) > batch_size else 0
    batches = decoded_batches(todo, extractor, batch_size=batch_size, workers=workers)
    try:
        for batch in batches:
            for outcome, result in process_batch(extractor, batch, writer, stop):
                summary.add(outcome)
                on_outcome(outcome, result)
            if stop():
                break
    except OutputError as error:
        summary.output_error = str(error)
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()
    summary.seconds = time.perf_counter() - summary.started
    summary.stopped_by = stop.signal_number
    return summary


def estimate_bytes(
    extractor_arch: str, layers: Sequence[str], input_sizes: Sequence[tuple[int, int]], save_dtype: str
) -> int:
    """Bytes the feature files of images of these input sizes will take, from the stage shapes."""
    import torchvision

    from .backbone import Backbone

    with torch.device("meta"):
        backbone = Backbone(extractor_arch, layers, model=torchvision.models.get_model(extractor_arch))
    element = torch.empty((), dtype=SAVE_DTYPES[save_dtype]).element_size()
    per_size: dict[tuple[int, int], int] = {}
    total = 0
    for size in input_sizes:
        if size not in per_size:
            with torch.device("meta"):
                features = backbone(torch.empty(1, 3, *size))
            per_size[size] = sum(f[0].numel() for f in features.values()) * element + FILE_OVERHEAD_BYTES
        total += per_size[size]
    return total
