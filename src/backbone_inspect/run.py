"""One run, in the order its data flows: inputs → store (what is done) → engine → outcomes.

``plan_run`` claims the store and splits the selected images into what to do and what to skip;
``execute_run`` opens the store, records the skipped images, runs the engine, records each
outcome, draws pictures, pools the statistics and returns the ``RunSummary``. The CLI and
``dump_features``/``inspect_images`` are both built on these two.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .engine import Engine, ModelInfo, RunCallbacks
from .errors import OutputError, UsageError
from .options import check_engine, check_positive, max_workers
from .outcomes import Outcome, RunSummary
from .signals import StopRequest, stop_on_signals
from .stats import SummaryAccumulator
from .store import FeatureStore, FolderStore

if TYPE_CHECKING:
    from .config import FeatureConfig
    from .results import ImageResult
    from .inputs import FoundImage, InputPlan
    from .shards import Shard


@dataclass(frozen=True)
class Pictures:
    """``--viz``: PNGs per image and stage under ``folder``, ``channels`` channels in each grid."""

    folder: Path
    channels: int = 16

    def __post_init__(self) -> None:
        if isinstance(self.channels, bool) or not isinstance(self.channels, int) or self.channels < 1:
            raise UsageError(f"--viz-channels {self.channels!r}: expected a positive number of channels")

    def draw(self, image: FoundImage, result: ImageResult) -> OutputError | None:
        """``folder/<image>/``'s pictures of one result; the error that stopped them, or ``None``."""
        from .viz import write_viz

        return write_viz(self.folder / Path(image.output).with_suffix(""), result, self.channels)

    def claim(self) -> None:
        """The folder made, and a file written and removed there: ``OutputError`` before any work if it cannot be."""
        from .viz import claim_folder

        claim_folder(self.folder)


@dataclass(frozen=True)
class RunPlan:
    """What a run will do, decided before any image is computed."""

    config: FeatureConfig
    inputs: InputPlan
    engine: Engine
    store: FeatureStore | None
    pictures: Pictures | None
    todo: tuple[FoundImage, ...]
    skipped: tuple[FoundImage, ...]
    redo: tuple[FoundImage, ...]
    """Part of ``todo``: stored already, but unreadable or made with other settings."""


def plan_run(
    config: FeatureConfig,
    inputs: InputPlan,
    engine: Engine,
    store: FeatureStore | None = None,
    *,
    pictures: Pictures | None = None,
    overwrite: bool = False,
    dry_run: bool = False,
) -> RunPlan:
    """Claim the store (``UsageError`` if it holds other settings) and split what is done from what is not.

    A dry run only compares the settings: it creates and writes nothing.
    """
    if pictures is not None and not engine.supports_pictures:
        raise UsageError("--viz works with the local engine only: draw pictures of a few images without --engine ray")
    if pictures is not None and config.pool != "none":
        raise UsageError("--viz draws the full feature maps: leave out --pool, or draw a few images in a run of their own")
    check_decode(config, engine)
    if pictures is not None:
        check_pictures_outside_inputs(pictures.folder, inputs.folders)
        if not dry_run:
            pictures.claim()
    if store is None:
        return RunPlan(config, inputs, engine, None, pictures, inputs.selected, (), ())
    store.claim(overwrite=overwrite, record=not dry_run)
    found = {"found": inputs.found} if isinstance(store, FolderStore) else {}  # every slice's images (a store of one's own: none)
    split = store.split_done(inputs.selected, overwrite=overwrite, **found)
    if inputs.named_files and isinstance(store, FolderStore):
        from .reader import warn_if_saved_under_other_names

        warn_if_saved_under_other_names(store.folder, split.todo)
    return RunPlan(config, inputs, engine, store, pictures, split.todo, split.skipped, split.redo)


def check_pictures_outside_inputs(folder: Path, input_folders: Sequence[str]) -> None:
    """``UsageError`` when the ``--viz`` folder is, or holds, an input folder: its pictures would be inputs
    of the next run (a folder below the inputs is left out of them; an image named alone is not searched for)."""
    pictures = os.path.realpath(folder)
    for given in input_folders:
        real = os.path.realpath(given)
        if real == pictures or real.startswith(pictures.rstrip(os.sep) + os.sep):
            raise UsageError(f"--viz {folder} holds the input folder {given}: its pictures would be inputs of the next run; "
                             "give --viz a folder outside the inputs")


def check_decode(config: FeatureConfig, engine: Engine) -> None:
    """``--decode gpu`` needs the local engine and a CUDA device (``UsageError`` before any work)."""
    if config.decode != "gpu":
        return
    if not engine.supports_device_decode:
        raise UsageError("--decode gpu works with the local engine only; use --decode cpu with --engine ray")
    from .device import process_device
    from .device_transforms import resizes_tensors_with

    device = process_device(config.device)  # the GPU this process will use: the resize is asked of it
    if device.type != "cuda":
        raise UsageError(f"--decode gpu: needs a CUDA device (this run's device is {device.type}); use --decode cpu")
    interpolation = config.preprocessing.interpolation
    if config.preprocessing.resize is not None and not resizes_tensors_with(interpolation, device):
        raise UsageError(f"--decode gpu: these weights resize with {interpolation} interpolation, which only Pillow does; "
                         "use --decode cpu")


def redo_warning(redo: Sequence[FoundImage]) -> str:
    """What a run says when it computes stored files again."""
    return (f"{len(redo)} existing feature file(s) are unreadable or were made with other settings "
            f"(e.g. {redo[0].output}); they are computed again")


@dataclass(frozen=True)
class DumpEstimate:
    """A dry run: the counts, and the bytes the store will take."""

    to_do: int
    to_skip: int
    unreadable: int
    """Images to do whose header cannot be read: they will fail."""
    estimated_bytes: int
    format: str | None = None
    """The store's format (``pt``, ``shards``)."""
    location: str | None = None
    save_dtype: str = "float32"
    pool: str = "none"


def estimate_run(plan: RunPlan) -> DumpEstimate:
    """Count and size a plan from the images' headers and the stage shapes; computes nothing."""
    from .inputs import planned_input_size

    sizes = [planned_input_size(image.path, plan.config.preprocessing) for image in plan.todo]
    readable = [size for size in sizes if size is not None]
    estimate = plan.store.estimate_bytes(readable) if plan.store is not None else 0
    store, config = plan.store, plan.config
    return DumpEstimate(len(plan.todo), len(plan.skipped), len(sizes) - len(readable), estimate,
                        store.FORMAT if store else None, store.location if store else None, config.save_dtype, config.pool)


def execute_run(plan: RunPlan, *, callbacks: RunCallbacks = RunCallbacks(), stop: StopRequest | None = None) -> RunSummary:
    """Run the plan on its engine; every outcome is recorded in the store before ``callbacks`` see it.

    The store is opened (its settings written) only once the engine has its model: weights that
    cannot load or a device this machine lacks leave no settings behind. ``stop``: a request the
    caller sets (e.g. from its own signal handlers); without one, SIGINT and SIGTERM stop the
    run cleanly while it lasts. The summary says whether it stopped.
    """
    accumulator = SummaryAccumulator()
    recorded = _recording(plan, accumulator, callbacks)
    try:
        if stop is not None:
            summary = _flushed(plan.store, plan.engine.run(plan.config, plan.todo, plan.store, callbacks=recorded, stop=stop))
        else:
            with stop_on_signals() as own_stop:  # the last commit too: a signal then must not cut it short
                summary = plan.engine.run(plan.config, plan.todo, plan.store, callbacks=recorded, stop=own_stop)
                summary = _flushed(plan.store, summary)
    finally:
        if plan.store is not None:
            plan.store.close()
    return dataclasses.replace(
        summary, skipped=len(plan.skipped), stages=tuple(accumulator.summaries()), shard=plan.inputs.shard
    )


def _flushed(store: FeatureStore | None, summary: RunSummary) -> RunSummary:
    """Commit what the store holds (the last, smaller shard, also after a stop); a failure is the run's output error.
    The run's seconds include this wait: shards still being committed are part of the run's writing."""
    if store is None:
        return summary
    started = time.perf_counter()
    try:
        store.flush()
    except OutputError as error:  # the store's account once every commit is done: whole, where the run's first word was not
        summary = dataclasses.replace(summary, output_error=str(error), output_error_shown=summary.output_error_shown and summary.output_error == str(error))
    return dataclasses.replace(summary, processed=summary.processed - store.unsaved, failed=summary.failed + store.unsaved,
                               bytes_written=summary.bytes_written - store.unsaved_bytes, seconds=summary.seconds + time.perf_counter() - started)


def _recording(plan: RunPlan, accumulator: SummaryAccumulator, callbacks: RunCallbacks) -> RunCallbacks:
    """The caller's callbacks, behind the run's own work: open the store, then per outcome record,
    draw, pool. A callback that fails (stdout closed by its reader) ends the run once; the
    images already in hand are still recorded."""
    store, pictures, failed = plan.store, plan.pictures, []

    def on_start(info: ModelInfo) -> None:
        if store is not None:
            store.open()
            for image in plan.skipped:
                store.record(Outcome(image.path, image.output, "skipped"))
        callbacks.on_start(info)

    def on_outcome(outcome: Outcome, result: ImageResult | None) -> None:
        unrecorded = None
        if store is not None:
            try:
                store.record(outcome)
            except OutputError as error:  # a manifest that cannot be written: the image is still shown, then the run ends
                unrecorded = error
        if result is not None:
            for stats in result.stats:
                accumulator.add(stats)
        if not failed:
            try:
                callbacks.on_outcome(outcome, result)
            except BaseException:
                failed.append(True)
                raise
        if unrecorded is not None:
            raise unrecorded

    return RunCallbacks(on_start, on_outcome, keep_features=callbacks.keep_features or pictures is not None,
                        draw=pictures.draw if pictures is not None else None)


def make_store(folder: str | Path, config: FeatureConfig, *, format: str = "pt", shard: Shard | None = None,
               shard_size: int | str | None = None) -> FeatureStore:
    """The store of ``--format`` (``pt`` or ``shards``) for ``folder``; ``UsageError`` on bad options."""
    from .options import FORMATS, check_choice, check_shard_size
    from .pt_store import PtFileStore

    size = check_shard_size(shard_size)
    if check_choice("--format", format, FORMATS) == "pt":
        if size is not None:
            raise UsageError("--shard-size needs --format shards")
        return PtFileStore(folder, config, shard=shard)
    from .shard_store import ShardStore

    return ShardStore(folder, config, shard=shard, shard_size=size)


def make_engine(
    name: str = "local",
    *,
    batch_size: int = 32,
    workers: int | None = None,
    ray_address: str | None = None,
    ray_actors: int | None = None,
    ray_actor_cpus: float | None = None,
) -> Engine:
    """The engine ``name`` (``local`` or ``ray``) with its options, checked (``UsageError``)."""
    check_engine(name)
    check_positive("--batch-size", batch_size)
    if name == "local":
        given = [option for option, value in (("--ray-address", ray_address), ("--ray-actors", ray_actors),
                                              ("--ray-actor-cpus", ray_actor_cpus)) if value is not None]
        if given:
            raise UsageError(f"{given[0]} needs --engine ray")
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
            raise UsageError(f"--workers {workers!r}: expected 0 or more processes")
        if workers is not None and workers > max_workers():
            raise UsageError(
                f"--workers {workers}: at most {max_workers()} on this machine of {os.cpu_count() or 1} CPUs "
                "(4 per CPU: each is a process holding decoded images)"
            )
        from .local_engine import LocalEngine

        return LocalEngine(batch_size=batch_size, workers=workers)
    if workers is not None:
        raise UsageError("--workers is for the local engine: with --engine ray, Ray schedules the decoding itself")
    from .ray_engine import RayEngine, check_ray_installed
    check_ray_installed()
    if ray_actors is not None:
        check_positive("--ray-actors", ray_actors)
    cpus = 1.0 if ray_actor_cpus is None else ray_actor_cpus  # not given: one CPU an actor
    if isinstance(cpus, bool) or not isinstance(cpus, (int, float)) or not 0 < cpus < math.inf:
        raise UsageError(f"--ray-actor-cpus {cpus!r}: expected a positive number of CPUs")
    return RayEngine(address=ray_address, actors=ray_actors, actor_cpus=float(cpus), batch_size=batch_size)

