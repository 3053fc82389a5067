"""The local engine: decoding in DataLoader workers, the model in this process, writes in threads.

Each batch goes through ``batch_work``'s steps (launch, collect, finish), the unit of work the
Ray engine's actors run too; here, on a GPU, the next batch is launched before this one is
collected, so the device never waits for the interpreter.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import signal
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from .batch_work import Draw, FinishedImage, Slice, collect_batch, launch_batch, slices, stage_images, writer_threads
from .config import FeatureConfig
from .device import frozen_collector, is_out_of_memory, keep_freed_memory, out_of_memory, process_device, warm_up_cuda
from .engine import ModelInfo, RunCallbacks
from .errors import OutputError
from .extractor import Extractor
from .images import DecodedBatch, ImageDataset, collate_batch
from .inputs import FoundImage
from .options import default_workers
from .outcomes import Outcome, RunSummary, RunTally
from .precision import TORCH_DTYPES, warn_if_emulated
from .results import ImageResult
from .shards import local_processes_from_env, shard_from_env
from .signals import StopRequest
from .store import FeatureStore


B = TypeVar("B")

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
        from .device_decode import JpegDataset, collate_encoded, decoded_ahead, finish_on_device, side_stream

        finish = functools.partial(finish_on_device, preprocessing=preprocessing, device=extractor.device,
                                   side=side_stream(extractor.device))
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
    default for the device, see ``options.default_workers``), batches of ``batch_size``.
    ``overlap``: launch each batch on the device before the previous one's results are built
    (``None``: on CUDA, where the forward runs asynchronously; on a CPU it only holds a batch longer)."""

    batch_size: int = 32
    workers: int | None = 0
    overlap: bool | None = None
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

        Files are written by background threads (``batch_work.writer_threads``) while the next batch computes.
        Memory stays flat: at most two batches of features wait for the writers, one is being
        collected and, with ``overlap``, one more is on the device (plus the shards not yet
        committed). A stop request, a second Ctrl-C or an output error ends the run, and every
        file written by then is reported.
        """
        keep_freed_memory()
        extractor = _extractor(config, saving=store is not None, keep_features=callbacks.keep_features)
        callbacks.on_start(model_info(extractor, device=str(extractor.device)))
        workers = self.workers_for(extractor.device.type) if len(todo) > self.batch_size else 0
        batches = decoded_batches(todo, extractor, batch_size=self.batch_size, workers=workers)
        writes = _Writes(store, callbacks.on_outcome, callbacks.draw)
        overlap = self.overlap if self.overlap is not None else extractor.device.type == "cuda"
        # Under torchrun each process's GPU is its current device for the run, or the DataLoader's
        # pinning thread would open a CUDA context on GPU 0 in every process.
        try:
            with torch.cuda.device(extractor.device) if extractor.device.type == "cuda" else contextlib.nullcontext(), \
                    frozen_collector():  # before the DataLoader's workers fork
                _drive(extractor, batches, writes, stop, overlap=overlap)
        except RuntimeError as error:
            if is_out_of_memory(error):
                raise out_of_memory(error, extractor.device, self.batch_size, saving=store is not None) from error
            raise
        if writes.failure is not None:
            raise writes.failure
        return writes.tally.summary(stop.signal_number, len(todo))

    def workers_for(self, device_type: str) -> int:
        """The decoding processes for a model on ``device_type``: ``workers``, or the device's default."""
        if self.workers is not None:
            return self.workers
        return default_workers(device_type, processes_here=local_processes_from_env() if shard_from_env(strict=False) else 1)


def _extractor(config: FeatureConfig, *, saving: bool, keep_features: bool) -> Extractor:
    """The run's extractor, on this process's device; CUDA is started while the model is built."""
    device = process_device(config.device)
    warn_if_emulated(config.dtype, device.type)
    warming = warm_up_cuda(device, TORCH_DTYPES[config.dtype])  # while torchvision loads and the model is built
    try:
        return Extractor(config, device=device, keep_features=saving or keep_features, keep_pixels=keep_features,
                         feature_dtype=config.save_dtype if saving else None)
    finally:
        if warming is not None:
            warming.join()  # before any decoding process is forked


def _drive(
    extractor: Extractor,
    batches: Iterator[tuple[list[FoundImage], DecodedBatch]],
    writes: _Writes,
    stop: StopRequest,
    *,
    overlap: bool,
) -> None:
    """Each batch launched, collected and handed to the writers, in order. With ``overlap``, a
    batch is collected only once the next one is launched: the device computes the next batch
    while this one's results are built. A stop, a second Ctrl-C or an output error ends the run."""
    in_flight = None
    try:
        for images, batch in batches:
            launched = launch_batch(extractor, images, batch, stop)
            ready, in_flight = (in_flight, launched) if overlap else (launched, None)
            writes.write(collect_batch(ready), stop)
            ready = launched = None  # a batch's maps leave the device once it is collected
            if stop() or writes.tally.output_error is not None:
                break
        if writes.tally.output_error is None:  # the batch still on the device is computed: kept too
            in_flight, last = None, in_flight
            writes.write(collect_batch(last), stop)
    except KeyboardInterrupt:  # a second Ctrl-C: stop now, report what is written
        stop.signal_number = signal.SIGINT
        writes.cancel()
    except Exception:  # the next batch failed (e.g. out of memory): the one already computed is still kept
        with contextlib.suppress(Exception):
            writes.write(collect_batch(in_flight), stop)
        raise
    finally:
        # Whatever ends the run, every file written is reported (and so recorded) first.
        stop.finishing = True
        getattr(batches, "close", lambda: None)()
        writes.finish()


class _Writes:
    """The writer threads: each batch written in slices (``writer_threads``), each slice committed
    by one more thread while the writers write the next, and reported in order."""

    def __init__(self, store: FeatureStore | None, on_outcome: Callable[[Outcome, ImageResult | None], None],
                 draw: Draw | None = None) -> None:
        self.store, self._draw = store, draw
        self.tally = RunTally()
        self._report = functools.partial(_report, tally=self.tally, on_outcome=on_outcome)
        self._threads = writer_threads()
        self._staging: collections.deque[Future[Callable[[], list[FinishedImage]]]] = collections.deque()
        self._pending: collections.deque[Slice] = collections.deque()
        self._writers = ThreadPoolExecutor(max_workers=self._threads, thread_name_prefix="feature-writer")
        # One committer, in order: a slice's sync waits on the disk while the writers write the next.
        self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feature-committer")
        self.failure: BaseException | None = None

    def write(self, done: list[tuple[FoundImage, ImageResult | str]], stop: StopRequest) -> None:
        # In a few slices, in order: few tasks however fast the model runs.
        with stop.shield():  # every write started is tracked, every write reported is recorded whole
            for part in slices(done, self._threads):
                staged = self._writers.submit(stage_images, part, self.store, self._draw)
                self._staging.append(staged)
                self._pending.append(self._committer.submit(_committed, staged))
            while self._staging and self._staging[0].done():
                self._staging.popleft()
            while self._pending and (self._pending[0].done() or len(self._pending) > 2 * self._threads):
                self._report(self._pending.popleft())

    def cancel(self) -> None:
        """Drop the slices not yet being written (a slice written is still committed and reported)."""
        for staged in self._staging:
            staged.cancel()

    def finish(self) -> None:
        """Report every write still pending (keeping the first failure to report), then stop the threads."""
        self.failure = _report_all(self._pending, self._report)
        self._writers.shutdown(wait=True)
        self._committer.shutdown(wait=True)


def _committed(staged: Future[Callable[[], list[FinishedImage]]]) -> list[FinishedImage]:
    """A slice's files committed once written, and its images described; nothing if it was dropped."""
    try:
        commit = staged.result()
    except CancelledError:
        return []
    return commit()


def _report_all(pending: collections.deque[Slice], report: Callable[[Slice], None]) -> BaseException | None:
    """Report every finished image, even after one report fails (stdout closed); the first failure."""
    failure = None
    while pending:
        future = pending.popleft()
        try:
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
        except OutputError as error:  # e.g. a manifest line that cannot be written
            tally.output_error = tally.output_error or str(error)
        except BaseException as error:  # noqa: BLE001 - stdout closed: the others are still recorded
            failure = failure or error
    if failure is not None:
        raise failure
