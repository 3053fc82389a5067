"""``--engine ray``: the same dump on a Ray cluster, through Ray Data.

Reading and decoding run as Ray tasks on CPUs; the model runs in a pool of actors
(``map_batches`` with a class), each doing exactly what the local engine does per batch:
``dump.extract_batch`` then ``dump.finish_image`` (an atomic write per image). The driver
only plans (what to skip, the settings file), writes the manifest from the actors' outcomes
and reports. Inputs and the output folder must be on storage every node reaches.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import signal
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .errors import UsageError
from .images import FoundImage, ImageDataset, LoadedImage, Preprocessing, collate_batch

DECODE_TASK_CPUS = 0.25
"""What a decoding task reserves: decoding is light next to the model, so up to four run per free CPU."""


@dataclass(frozen=True)
class RayPlan:
    """Where and how wide: the cluster to join and the actor pool."""

    address: str | None
    """``None``: join the cluster this machine belongs to, or start a local one."""
    actors: int | None
    """``None``: one actor per GPU of the cluster when the device may be CUDA, else one."""
    actor_cpus: float
    """CPUs each actor reserves; on CPU-only actors also its torch threads (rounded up)."""


def check_ray_installed() -> None:
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError as error:
        raise UsageError(f"--engine ray needs Ray: pip install 'backbone-inspect[ray]' ({error})") from error


def decode_rows(batch: dict[str, Any], preprocessing: Preprocessing) -> dict[str, Any]:
    """A Ray task: decode and preprocess a batch of rows; a bad image becomes an error, not an exception."""
    import numpy as np

    dataset = ImageDataset([str(path) for path in batch["read_path"]], preprocessing)
    items = [dataset[index] for index in range(len(dataset))]
    return {
        "path": batch["path"],
        "output": batch["output"],
        "pixels": np.array([_pixel_bytes(item) for item in items], dtype=object),
        "shape": np.array([list(item.pixels.shape) if item.pixels is not None else [0, 0, 0] for item in items]),
        "error": np.array([item.error or "" for item in items], dtype=object),
    }


def _pixel_bytes(item: LoadedImage) -> bytes:
    return item.pixels.numpy().tobytes() if item.pixels is not None else b""


def _loaded_images(batch: dict[str, Any]) -> list[LoadedImage]:
    import torch

    loaded = []
    for index, (pixels, shape, error) in enumerate(zip(batch["pixels"], batch["shape"], batch["error"])):
        if error:
            loaded.append(LoadedImage(index, None, str(error)))
        else:
            tensor = torch.frombuffer(bytearray(pixels), dtype=torch.uint8).view(*(int(s) for s in shape))
            loaded.append(LoadedImage(index, tensor))
    return loaded


class FeatureActor:
    """One model, held for the whole run: a Ray Data actor running the local engine's per-batch work."""

    def __init__(
        self,
        extractor_options: dict[str, Any],
        device: str,
        save_dir: str | None,
        save_dtype: str,
        run_meta: dict[str, Any],
        threads: int | None,
    ) -> None:
        import torch

        from .dump import FeatureWriter
        from .pipeline import Extractor, keep_freed_memory, resolve_device

        if threads is not None:
            torch.set_num_threads(threads)
        keep_freed_memory()
        self.extractor = Extractor(**extractor_options, device=resolve_device(device))
        self.writer = FeatureWriter(Path(save_dir), save_dtype, run_meta) if save_dir is not None else None

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        from .dump import process_batch

        images = [FoundImage(str(path), str(output)) for path, output in zip(batch["path"], batch["output"])]
        records = []
        for outcome, kept, output_error in process_batch(self.extractor, images, collate_batch(_loaded_images(batch)), self.writer):
            # The driver needs the statistics, not the tensors: they stay in the files.
            slim = replace(kept, features=OrderedDict(), pixels=None) if kept is not None else None
            records.append(pickle.dumps((outcome, slim, output_error)))
        return {"record": np.array(records, dtype=object)}


def _quiet_ray() -> None:
    # Ray and Ray Data log progress, tuning hints and cluster chatter to stderr; the command's
    # own lines are what its users read. Ray's own logs stay in /tmp/ray/session_latest/logs.
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"ray(\.|$)")


def _actor_resources(plan: RayPlan, device: str, cluster: dict[str, float]) -> tuple[int, dict[str, float], int | None]:
    """(actors, resources of each, torch threads of each)."""
    gpus = int(cluster.get("GPU", 0))
    wants_gpu = gpus > 0 and (device == "auto" or device.startswith("cuda"))
    if wants_gpu:
        return plan.actors or gpus, {"num_gpus": 1, "num_cpus": plan.actor_cpus}, None
    if device.startswith("cuda"):
        raise UsageError(f"--device {device}: the Ray cluster has no GPU")
    return plan.actors or 1, {"num_cpus": plan.actor_cpus}, max(1, math.ceil(plan.actor_cpus))


def check_room_for_decoding(actors: int, actor_cpus: float, cluster_cpus: float) -> None:
    """Actors holding every CPU would leave decoding tasks waiting for ever: refuse up front."""
    if actors * actor_cpus + DECODE_TASK_CPUS > cluster_cpus:
        raise UsageError(
            f"--ray-actors {actors} x --ray-actor-cpus {actor_cpus:g} leave no CPU for decoding on a cluster "
            f"of {cluster_cpus:g} CPUs: use fewer actors or a smaller --ray-actor-cpus"
        )


def run_ray_dump(
    todo: Sequence[FoundImage],
    *,
    plan: RayPlan,
    extractor_options: dict[str, Any],
    device: str,
    preprocessing: Preprocessing,
    save_dir: Path | None,
    save_dtype: str,
    run_meta: dict[str, Any],
    on_outcome: Callable[[Any, Any], None],
    batch_size: int,
    stop: Any,
) -> Any:
    """Run ``todo`` on Ray; ``on_outcome`` sees each image once its file is written (in finishing order).

    Returns the local engine's ``RunSummary``. A stop request or an output error ends the run:
    files finished by then are complete (written atomically) and reported.
    """
    import ray
    import ray.data

    from .dump import RunSummary

    summary = RunSummary()
    _quiet_ray()
    try:
        ray.init(address=plan.address, logging_level=logging.ERROR, log_to_driver=False, include_dashboard=False)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise UsageError(f"--ray-address {plan.address}: cannot join the Ray cluster: {error}") from error
    try:
        cluster = ray.cluster_resources()
        actors, resources, threads = _actor_resources(plan, device, cluster)
        check_room_for_decoding(actors, plan.actor_cpus, cluster.get("CPU", 0))
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        rows = [{"path": image.path, "read_path": os.path.abspath(image.path), "output": image.output} for image in todo]
        dataset = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / batch_size)))
        dataset = dataset.map_batches(
            decode_rows, fn_kwargs={"preprocessing": preprocessing}, batch_size=batch_size, num_cpus=DECODE_TASK_CPUS
        )
        dataset = dataset.map_batches(
            FeatureActor,
            fn_constructor_kwargs={
                "extractor_options": extractor_options,
                "device": device,
                "save_dir": str(save_dir.resolve()) if save_dir is not None else None,
                "save_dtype": save_dtype,
                "run_meta": run_meta,
                "threads": threads,
            },
            batch_size=batch_size,
            concurrency=actors,
            **resources,
        )
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for record in batch["record"]:
                outcome, result, output_error = pickle.loads(record)
                summary.add(outcome, output_error)
                on_outcome(outcome, result)
            if stop() or summary.output_error is not None:
                break
    except KeyboardInterrupt:  # a second Ctrl-C: stop now
        stop.signal_number = signal.SIGINT
    finally:
        ray.shutdown()
    summary.finish(stop.signal_number, len(todo))
    return summary
