"""The unit of work both engines share: a decoded batch launched on the device, collected, written.

``launch_batch`` queues a batch's groups on the device and returns at once (on a GPU); its
``collect_batch`` waits for them and gives each image's result or error. ``finish_images``
stores the features and turns each image into its manifest line. ``process_batch`` is all of it
for one batch, which is what a Ray actor runs; the local engine interleaves the steps of
consecutive batches (see ``local_engine``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from .errors import ImageError, OutputError, OutputStopped
from .extractor import Extractor
from .images import DecodedBatch
from .inputs import FoundImage
from .outcomes import Outcome
from .results import ImageResult, InFlightGroup
from .store import FeatureStore, Stored

T = TypeVar("T")


def writer_threads() -> int:
    """Threads writing a batch's files at once, a slice of it each; each slice's files are committed
    together (one sync for all where the filesystem allows). One per 4 usable CPUs, 2 to 4. On 2
    vCPUs (see BENCHMARKS.md) two writers beside the local engine's committer write the most files
    a second while the main thread builds results (one falls behind it for the interpreter's lock);
    four spend their CPU time contending in the kernel and for that lock."""
    from .options import usable_cpus

    return max(2, min(4, usable_cpus() // 4))


FinishedImage = tuple[Outcome | None, ImageResult | None, str | None]
"""An image's manifest line, its result (when it has one) and the output error that should end the run."""
Slice = Future[list[FinishedImage]]
"""A slice of a batch being written: its images' outcomes, in order."""


@dataclass(frozen=True)
class LaunchedBatch:
    """A decoded batch whose groups are queued on the device."""

    images: Sequence[FoundImage]
    known: dict[int, str]
    """Positions already settled as errors: files that did not decode, sizes the arch refuses."""
    in_flight: tuple[tuple[tuple[int, ...], InFlightGroup], ...]
    """Each group's positions in the batch, and its work on the device."""


def launch_batch(
    extractor: Extractor,
    images: Sequence[FoundImage],
    batch: DecodedBatch,
    should_stop: Callable[[], bool] = lambda: False,
) -> LaunchedBatch | None:
    """Queue each group of one decoded batch on the device; ``None`` once ``should_stop()`` is
    true before a forward pass (nothing of the batch is then kept)."""
    known: dict[int, str] = dict(batch.errors)
    in_flight = []
    for group in batch.groups:
        if should_stop():
            return None
        names = [images[position].path for position in group.positions]
        try:
            in_flight.append((group.positions, extractor.launch_group(names, group)))
        except ImageError:  # a size the arch cannot take, before or by the forward pass: these images' error
            refused = extractor.refuses(group.input_size)
            known.update((position, f"{name}: {refused}") for position, name in zip(group.positions, names))
    return LaunchedBatch(images, known, tuple(in_flight))


def collect_batch(launched: LaunchedBatch | None) -> list[tuple[FoundImage, ImageResult | str]]:
    """Per image of a launched batch, in order, its result or why it failed (waits for the device)."""
    if launched is None:
        return []
    done: dict[int, ImageResult | str] = dict(launched.known)
    for positions, group in launched.in_flight:
        done.update(zip(positions, group.results()))
    return [(launched.images[position], done[position]) for position in range(len(launched.images))]


def extract_batch(
    extractor: Extractor,
    images: Sequence[FoundImage],
    batch: DecodedBatch,
    should_stop: Callable[[], bool] = lambda: False,
) -> list[tuple[FoundImage, ImageResult | str]]:
    """Forward one decoded batch: per image, in order, its result or why it failed.

    Returns nothing once ``should_stop()`` is true before a forward pass.
    """
    return collect_batch(launch_batch(extractor, images, batch, should_stop))


def finish_image(image: FoundImage, result: ImageResult | str, stored: Stored | OutputError) -> FinishedImage:
    """One image's manifest line, from its result and where the store put it (or why it could not).

    A write that failed is this image's error, and is also returned as the output error: an
    output that cannot be written ends the run. No outcome (``None``): the store stopped taking
    images after such an error; this one is left for a re-run, and the error still ends the run.
    """
    if isinstance(result, str):
        return Outcome(image.path, image.output, "error", error=result), None, None
    if isinstance(stored, OutputStopped):
        return None, None, str(stored)
    if isinstance(stored, OutputError):
        return Outcome(image.path, image.output, "error", error=str(stored)), None, str(stored) if stored.ends_run else None
    shapes = {stats.name: list(stats.shape) for stats in result.stats}
    outcome = Outcome(image.path, image.output, "ok", shapes=shapes, bytes_written=stored.bytes_written,
                      shard=stored.shard, row=stored.row)
    return outcome, result, None


def finish_images(done: Sequence[tuple[FoundImage, ImageResult | str]], store: FeatureStore | None) -> list[FinishedImage]:
    """Store the images of ``done`` that have features, together, and describe each (in order)."""
    return stage_images(done, store)()


Draw = Callable[[FoundImage, ImageResult], OutputError | None]
"""Pictures drawn of an image's result before it is stored (``--viz``): the error that stopped them, or ``None``."""


def stage_images(
    done: Sequence[tuple[FoundImage, ImageResult | str]], store: FeatureStore | None, draw: Draw | None = None
) -> Callable[[], list[FinishedImage]]:
    """``finish_images`` in two steps (``FeatureStore.stage_all``): the features written now, and
    the call that commits them and describes each image, in order (made once, from any thread).
    With ``draw``, each computed image's pictures first: one whose pictures fail is that image's
    error, as a write that fails is, and its features are not stored."""
    refused = _pictures_refused(done, draw) if draw is not None else {}
    computed = [(image, result) for position, (image, result) in enumerate(done)
                if not isinstance(result, str) and position not in refused]
    if store is not None:
        store.discard([image for position, (image, result) in enumerate(done) if isinstance(result, str) or position in refused])
    commit = store.stage_all(computed) if store is not None else lambda: [Stored(0)] * len(computed)

    def finish() -> list[FinishedImage]:
        stored = iter(commit())
        return [finish_image(image, result, refused[position] if position in refused else
                             Stored(0) if isinstance(result, str) else next(stored))
                for position, (image, result) in enumerate(done)]

    return finish


def _pictures_refused(done: Sequence[tuple[FoundImage, ImageResult | str]], draw: Draw) -> dict[int, OutputError]:
    """Each computed image's pictures, in order: the positions whose pictures failed, with why. After an
    error that ends the run (a full disk) the rest are not drawn but left for a re-run, as a store leaves them."""
    refused: dict[int, OutputError] = {}
    ended: OutputError | None = None
    for position, (image, result) in enumerate(done):
        if isinstance(result, str):
            continue
        if ended is not None:
            refused[position] = OutputStopped(f"{ended} (the pictures after it not drawn: run again once it is fixed)")
        elif (error := draw(image, result)) is not None:
            refused[position] = error
            ended = error if error.ends_run else None
    return refused


def process_batch(
    extractor: Extractor, images: Sequence[FoundImage], batch: DecodedBatch, store: FeatureStore | None
) -> list[FinishedImage]:
    """The whole unit of work: one decoded batch in, stored features and outcomes out, in order
    (without the images a store stopped taking after an output error)."""
    threads = writer_threads()
    parts = slices(extract_batch(extractor, images, batch), threads)
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="feature-writer") as writers:
        written = writers.map(finish_images, parts, [store] * len(parts))
        return [finished for part in written for finished in part if finished[0] is not None]


def slices(items: list[T], count: int) -> list[list[T]]:
    """``items`` in at most ``count`` consecutive slices of (nearly) equal size."""
    size = -(-len(items) // count)
    return [items[start : start + size] for start in range(0, len(items), size)] if items else []
