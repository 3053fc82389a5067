"""The local engine: decoding in DataLoader workers, the model in this process, writes in a thread.

``process_batch`` is the unit of work, decoded images in, stored features and outcomes out;
the Ray engine's actors call the same function.
"""

from __future__ import annotations

import collections
import functools
import signal
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from .config import FeatureConfig
from .device import keep_freed_memory, resolve_device
from .engine import ModelInfo, RunCallbacks
from .errors import OutputError, OutputStopped
from .extractor import Extractor, ImageResult
from .images import DecodedBatch, ImageDataset, collate_batch
from .inputs import FoundImage
from .outcomes import Outcome, RunSummary, RunTally
from .options import default_workers
from .shards import local_processes_from_env, local_rank_from_env, shard_from_env
from .signals import StopRequest
from .store import FeatureStore, Stored


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
        refused = extractor.refuses(group.input_size)
        if refused is not None:
            done.update((position, f"{name}: {refused}") for position, name in zip(group.positions, names))
            continue
        done.update(zip(group.positions, extractor.forward_group(names, group)))
    return [(images[position], done[position]) for position in range(len(images))]


T = TypeVar("T")
B = TypeVar("B")

WRITER_THREADS = 4
"""Slices of a batch written at once: each slice's files are committed together (one sync for
all where the filesystem allows), while the other slices write theirs."""

FinishedImage = tuple[Outcome | None, ImageResult | None, str | None]
"""An image's manifest line, its result (when it has one) and the output error that should end the run."""
Slice = Future[list[FinishedImage]]
"""A slice of a batch being written: its images' outcomes, in order."""


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


def process_batch(
    extractor: Extractor, images: Sequence[FoundImage], batch: DecodedBatch, store: FeatureStore | None
) -> list[FinishedImage]:
    """The whole unit of work: one decoded batch in, stored features and outcomes out, in order
    (without the images a store stopped taking after an output error)."""
    parts = _slices(extract_batch(extractor, images, batch), WRITER_THREADS)
    with ThreadPoolExecutor(max_workers=WRITER_THREADS, thread_name_prefix="feature-writer") as writers:
        written = writers.map(finish_images, parts, [store] * len(parts))
        return [finished for part in written for finished in part if finished[0] is not None]


def _ignore_stop_signals(_: int) -> None:
    # Ctrl-C, and a scheduler's SIGTERM to the whole process group (Slurm, systemd, Kubernetes),
    # reach the workers too; the main process decides when to stop and shuts them down itself.
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, signal.SIG_IGN)


def decoded_batches(
    images: Sequence[FoundImage], extractor: Extractor, *, batch_size: int, workers: int
) -> Iterator[tuple[list[FoundImage], DecodedBatch]]:
    """Decoded, preprocessed batches, in order; with ``workers`` > 0 decoding overlaps the forward.

    With ``--decode gpu`` (the extractor's config) the workers leave JPEGs encoded, and a thread of this process decodes
    them on the extractor's device, in one call per batch, a batch ahead (``device_decode``).
    """
    paths, preprocessing = [image.path for image in images], extractor.preprocessing
    if extractor.config.decode == "gpu":
        from .device_decode import JpegDataset, collate_encoded, decoded_ahead, finish_on_device

        finish = functools.partial(finish_on_device, preprocessing=preprocessing, device=extractor.device)
        loaded = _loaded_batches(JpegDataset(paths, preprocessing), collate_encoded, extractor, batch_size, workers)
        batches: Iterator[DecodedBatch] = decoded_ahead(loaded, finish)
    else:
        batches = _loaded_batches(ImageDataset(paths, preprocessing), collate_batch, extractor, batch_size, workers)
    try:
        for batch in batches:
            yield [images[index] for index in batch.indices], batch
    finally:  # however the run ends, the decoding processes end with it (see _loaded_batches)
        getattr(batches, "close", lambda: None)()


def _loaded_batches(
    dataset: Any, collate: Callable[[list[Any]], B], extractor: Extractor, batch_size: int, workers: int
) -> Iterator[B]:
    """``collate``d batches of ``dataset``, in order: in ``workers`` processes, or in this one (0)."""
    if workers == 0:
        for start in range(0, len(dataset), batch_size):
            yield collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        return
    loaded = iter(torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate,
        worker_init_fn=_ignore_stop_signals,
        pin_memory=extractor.device.type == "cuda",
        prefetch_factor=2,
    ))
    try:
        yield from loaded
    finally:
        # The DataLoader's own shutdown, now: left to the garbage collector after an error (whose
        # traceback holds this generator), the workers would outlive the run, and at exit, as they
        # ignore SIGTERM (_ignore_stop_signals), the interpreter would wait for them for ever.
        getattr(loaded, "_shutdown_workers", lambda: None)()


def model_info(extractor: Extractor, *, device: str, engine: str | None = None) -> ModelInfo:
    strides = {name: extractor.backbone.strides[name] for name in extractor.stage_names}
    return ModelInfo(extractor.arch, extractor.weights, extractor.seed, device, engine, strides, extractor.config.dtype)


@dataclass(frozen=True)
class LocalEngine:
    """Runs in this process: ``workers`` decoding processes (0: decode in-process; ``None``: the
    default for the device, see ``options.default_workers``), batches of ``batch_size``."""

    batch_size: int = 32
    workers: int | None = 0
    supports_pictures: bool = True
    supports_device_decode: bool = True

    def run(
        self,
        config: FeatureConfig,
        todo: Sequence[FoundImage],
        store: FeatureStore | None,
        *,
        callbacks: RunCallbacks,
        stop: StopRequest,
    ) -> RunSummary:
        """Run every image of ``todo``; ``callbacks.on_outcome`` sees each, in order, once it is written.

        Files are written by ``WRITER_THREADS`` background threads while the next batch computes;
        at most about two batches of features are held at once (plus the shards not yet
        committed), so memory stays flat. A stop request, a second Ctrl-C or an output error ends
        the run, and every file written by then is reported.
        """
        keep_freed_memory()
        # Under torchrun or Slurm, device auto is this process's own GPU (LOCAL_RANK).
        local_rank = local_rank_from_env() if shard_from_env(strict=False) else None
        keep = store is not None or callbacks.keep_features
        extractor = Extractor(config, device=resolve_device(config.device, local_rank=local_rank), keep_features=keep,
                              feature_dtype=config.save_dtype if store is not None else None)
        callbacks.on_start(model_info(extractor, device=str(extractor.device)))
        workers = self.workers_for(extractor.device.type) if len(todo) > self.batch_size else 0
        batches = decoded_batches(todo, extractor, batch_size=self.batch_size, workers=workers)
        return _drive(extractor, batches, store, callbacks.on_outcome, stop, len(todo))

    def workers_for(self, device_type: str) -> int:
        """The decoding processes for a model on ``device_type``: ``workers``, or the device's default."""
        if self.workers is not None:
            return self.workers
        return default_workers(device_type, processes_here=local_processes_from_env() if shard_from_env(strict=False) else 1)


def _drive(
    extractor: Extractor,
    batches: Iterator[tuple[list[FoundImage], DecodedBatch]],
    store: FeatureStore | None,
    on_outcome: Callable[[Outcome, ImageResult | None], None],
    stop: StopRequest,
    total: int,
) -> RunSummary:
    tally = RunTally()
    pending: collections.deque[Slice] = collections.deque()
    executor = ThreadPoolExecutor(max_workers=WRITER_THREADS, thread_name_prefix="feature-writer")
    report = functools.partial(_report, tally=tally, on_outcome=on_outcome)
    try:
        for images, batch in batches:
            # A batch is written in WRITER_THREADS slices, in order: few tasks however fast the model runs.
            done = extract_batch(extractor, images, batch, stop)
            with stop.shield():  # every write started is tracked, every write reported is recorded whole
                pending.extend(executor.submit(finish_images, part, store) for part in _slices(done, WRITER_THREADS))
                while pending and (pending[0].done() or len(pending) > 2 * WRITER_THREADS):
                    report(pending.popleft())
            if stop() or tally.output_error is not None:
                break
    except KeyboardInterrupt:  # a second Ctrl-C: stop now, report what is written
        stop.signal_number = signal.SIGINT
        for future in pending:
            future.cancel()
    finally:
        # Whatever ends the run, every file written is reported (and so recorded) first.
        stop.finishing = True
        getattr(batches, "close", lambda: None)()
        failure = _report_all(pending, report)
        executor.shutdown(wait=True)
    if failure is not None:
        raise failure
    return tally.summary(stop.signal_number, total)


def _slices(items: list[T], count: int) -> list[list[T]]:
    size = -(-len(items) // count)
    return [items[start : start + size] for start in range(0, len(items), size)] if items else []


def finish_images(done: Sequence[tuple[FoundImage, ImageResult | str]], store: FeatureStore | None) -> list[FinishedImage]:
    """Store the images of ``done`` that have features, together, and describe each (in order)."""
    computed = [(image, result) for image, result in done if not isinstance(result, str)]
    stored = iter(store.write_all(computed) if store is not None else [Stored(0)] * len(computed))
    return [finish_image(image, result, Stored(0) if isinstance(result, str) else next(stored)) for image, result in done]


def _report_all(pending: collections.deque[Slice], report: Callable[[Slice], None]) -> BaseException | None:
    """Report every finished image, even after one report fails (stdout closed); the first failure."""
    failure = None
    while pending:
        future = pending.popleft()
        try:
            if not future.cancelled():
                report(future)
        except BaseException as error:  # noqa: BLE001 - raised again by the caller once all are recorded
            failure = failure or error
    return failure


def _report(future: Slice, *, tally: RunTally, on_outcome: Callable[[Outcome, ImageResult | None], None]) -> None:
    """Report each image of a finished slice, all of them even if one report fails; then raise that failure."""
    failure = None
    for outcome, result, output_error in future.result():
        if outcome is None:  # left for a re-run: the store stopped after an output error, which ends the run
            tally.output_error = tally.output_error or output_error
            continue
        tally.add(outcome, output_error)
        try:
            on_outcome(outcome, result)
        except OutputError as error:  # e.g. a picture that cannot be written
            tally.output_error = tally.output_error or str(error)
        except BaseException as error:  # noqa: BLE001 - stdout closed: the others are still recorded
            failure = failure or error
    if failure is not None:
        raise failure
