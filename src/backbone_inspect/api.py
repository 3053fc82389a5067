"""The Python API: ``dump_features`` (what ``backbone-inspect INPUTS --save DIR`` does) and
``inspect_images`` (statistics, and features when asked, without saving)."""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from .engine import RunCallbacks
from .errors import OutputError, RunStopped, UsageError
from .options import check_flag, output_folder
from .run import Pictures, execute_run, make_engine, plan_run, redo_warning
from .stages import DEFAULT_LAYERS

if TYPE_CHECKING:
    from .engine import ModelInfo
    from .results import ImageResult
    from .outcomes import Outcome, RunSummary
    from .shards import Shard

PathLike = str | os.PathLike[str]


def dump_features(
    inputs: PathLike | Sequence[PathLike], save: PathLike, *, from_list: PathLike | None = None,
    arch: str = "resnet50", layers: Iterable[int | str] | str = DEFAULT_LAYERS, weights: Any = None, seed: int = 0,
    resize: int | str | None = None, crop: int | str | None = None, device: str = "auto",
    save_dtype: str = "float32", format: str = "pt", shard_size: int | str | None = None, pool: str = "none",
    dtype: str = "float32", channels_last: bool | None = None, compile: bool = False, batch_size: int = 32,
    workers: int | None = None, decode: str = "cpu", overwrite: bool = False, shard: str | Shard | None = None,
    engine: str = "local", ray_address: str | None = None, ray_actors: int | None = None, ray_actor_cpus: float | None = None,
    viz: PathLike | None = None, viz_channels: int = 16, on_outcome: Callable[[Outcome], None] | None = None,
) -> RunSummary:
    """Exactly what ``backbone-inspect INPUTS --save SAVE`` does; the keywords are its long options.

    Writes ``SAVE/<output>.pt`` per image (``format="shards"``: safetensors shards of
    ``shard_size`` images), ``SAVE/manifest*.jsonl`` and the settings file; ``open_features(SAVE)``
    reads either back. Resumes (images already saved with the same settings are skipped) unless ``overwrite``.
    Bad images are recorded and counted in ``failed``; the others are still saved. Raises
    ``UsageError`` for bad options or inputs and a folder of other settings (nothing computed),
    ``WeightsError``, ``OutputError`` when the folder cannot be written (with ``.summary`` once
    the run began) and ``RunStopped`` on SIGINT/SIGTERM (files written by then are complete;
    calling again finishes the rest). ``on_outcome`` sees each image's manifest line as it is done.
    ``decode="gpu"``: JPEGs decoded and resized on the CUDA device (``UsageError`` without one). ``resize``/``crop``
    ``None``: the option not given (the weights' preset, 256/224); ``"none"``: the image's own size, as ``--resize none``.
    """
    from .config import feature_config
    from .inputs import plan_inputs
    from .run import make_store

    callbacks = _outcome_callbacks(on_outcome)
    config = feature_config(arch=arch, layers=layers, weights=weights, seed=seed, resize=resize, crop=crop, dtype=dtype,
                            save_dtype=save_dtype, channels_last=channels_last, compile=compile, device=device, pool=pool,
                            decode=decode)
    folder, pictures = output_folder("--save", save), _pictures(viz, viz_channels)
    found = plan_inputs(inputs, from_list=from_list, shard=shard, outputs=(folder, pictures and pictures.folder), advise_srun=engine != "ray")
    runner = make_engine(engine, batch_size=batch_size, workers=workers, ray_address=ray_address,
                         ray_actors=ray_actors, ray_actor_cpus=ray_actor_cpus)
    store = make_store(folder, config, format=format, shard=found.shard, shard_size=shard_size)
    plan = plan_run(config, found, runner, store, pictures=pictures, overwrite=bool(check_flag("--overwrite", overwrite)))
    if plan.redo:
        warnings.warn(redo_warning(plan.redo), stacklevel=2)
    return raise_if_ended_early(execute_run(plan, callbacks=callbacks))


def _outcome_callbacks(on_outcome: Callable[[Outcome], None] | None) -> RunCallbacks:
    """``on_outcome`` called with each image's outcome; ``UsageError`` before any work unless it can be called."""
    if on_outcome is None:
        return RunCallbacks()
    if not callable(on_outcome):
        raise UsageError(f"on_outcome {on_outcome!r}: expected a function taking each image's Outcome, or None")
    return RunCallbacks(on_outcome=lambda outcome, _: on_outcome(outcome))


@dataclass(frozen=True)
class Inspection:
    """What ``inspect_images`` found: each image's result, and the images that failed."""

    results: tuple[ImageResult, ...]
    """Sorted by path, folders expanded, as the command prints them (``image`` names each): per-stage
    statistics (``stats``), and ``features`` when asked."""
    failures: tuple[Outcome, ...]
    """Images that could not be processed; ``error`` says why."""
    summary: RunSummary
    """Counts, time, and per-stage statistics pooled over every image (``stages``)."""
    model: ModelInfo | None
    """The model that ran: arch, weights, device."""


def inspect_images(
    inputs: PathLike | Sequence[PathLike], *, from_list: PathLike | None = None, features: bool = False,
    arch: str = "resnet50", layers: Iterable[int | str] | str = DEFAULT_LAYERS, weights: Any = None, seed: int = 0,
    resize: int | str | None = None, crop: int | str | None = None, device: str = "auto",
    dtype: str = "float32", channels_last: bool | None = None, compile: bool = False, batch_size: int = 32,
    workers: int | None = None, decode: str = "cpu", topk: int = 0, categories: Sequence[str] | PathLike | None = None,
    viz: PathLike | None = None, viz_channels: int = 16, pool: str = "none",
) -> Inspection:
    """What ``backbone-inspect INPUTS`` shows, as objects: nothing is saved (``viz`` draws pictures).

    ``features=True`` keeps every image's feature maps (CPU tensors [C, H, W], or [C] with
    ``pool`` ``avg``/``max``; in memory: mind the size for many images) and its preprocessed
    input (``pixels``). Bad images are in ``failures``; the others are still inspected. Raises
    as ``dump_features`` does.
    """
    from .config import feature_config
    from .inputs import plan_inputs

    check_flag("features", features)
    config = feature_config(arch=arch, layers=layers, weights=weights, seed=seed, resize=resize, crop=crop,
                            dtype=dtype, channels_last=channels_last, compile=compile, topk=topk,
                            categories=categories, device=device, pool=pool, decode=decode)
    pictures = _pictures(viz, viz_channels)
    found = plan_inputs(inputs, from_list=from_list, shard_from_environment=False, check_collisions=viz is not None,
                        outputs=(pictures and pictures.folder,))
    runner = make_engine("local", batch_size=batch_size, workers=workers)
    results: list[ImageResult] = []
    failures: list[Outcome] = []
    models: list[ModelInfo] = []

    def collect(outcome: Outcome, result: ImageResult | None) -> None:
        if result is None:
            failures.append(outcome)
        else:
            results.append(_handed_back(result, features))

    callbacks = RunCallbacks(models.append, collect, keep_features=features)
    summary = execute_run(plan_run(config, found, runner, pictures=pictures), callbacks=callbacks)
    raise_if_ended_early(summary)
    return Inspection(tuple(results), tuple(failures), summary, models[0] if models else None)


def _handed_back(result: ImageResult, features: bool) -> ImageResult:
    """The result without its maps and pixels, or with its maps as ordinary tensors of their own: those
    computed under ``torch.inference_mode`` refuse in-place updates and autograd (a head trained on them)."""
    if not features:
        return replace(result, features=OrderedDict(), pixels=None)
    import torch

    with torch.inference_mode(False):
        return replace(result, features=OrderedDict((name, value.clone()) for name, value in result.features.items()))


def _pictures(viz: PathLike | None, channels: int) -> Pictures | None:
    if viz is None and channels != 16:  # the command's rule: the picture options need --viz
        raise UsageError("--viz-channels needs --viz DIR")
    return Pictures(output_folder("--viz", viz), channels) if viz is not None else None


def raise_if_ended_early(summary: RunSummary) -> RunSummary:
    """The summary of a run that went to its end; ``RunStopped`` or ``OutputError`` (with ``.summary``) if not."""
    import signal

    if summary.stopped_by is not None:
        name = signal.Signals(summary.stopped_by).name
        raise RunStopped(
            f"stopped by {name}: processed {summary.processed}, {summary.left} left (run again to finish)",
            signal_number=summary.stopped_by, summary=summary,
        )
    if summary.output_error is not None:
        error = OutputError(summary.output_error)
        error.summary = summary
        raise error
    return summary
