"""``--engine ray``: the same dump on a Ray cluster, through Ray Data.

Reading and decoding run as Ray tasks on CPUs; the model runs in a pool of actors
(``map_batches`` with a class), each doing exactly what the local engine does per batch:
``batch_work.process_batch``, which writes each image to the store. The driver only checks
the weights and reports each outcome it gets back to the run, which records it. Inputs and the
output folder must be on storage every node reaches.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import signal
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from .errors import InspectError, OutputError, UsageError
from .images import ImageDataset, LoadedImage, Preprocessing, collate_batch
from .inputs import FoundImage
from .outcomes import Outcome
from .precision import warn_if_emulated
from .signals import STOP_SIGNALS

if TYPE_CHECKING:
    from .config import FeatureConfig
    from .engine import RunCallbacks
    from .outcomes import RunSummary, RunTally
    from .signals import StopRequest
    from .store import FeatureStore

DECODE_TASK_CPUS = 0.25
"""What a decoding task reserves: decoding is light next to the model, so up to four run per free CPU."""
MAX_IMAGES_PER_CALL = 1024
"""The most images an actor gets at once (a shard of pooled vectors can hold 16,384): their
decoded pixels travel through Ray's object store together."""


def _first_input_size(config: FeatureConfig, todo: Sequence[FoundImage]) -> list[tuple[int, int]]:
    from .inputs import planned_input_size

    size = next((size for image in todo[:16] if (size := planned_input_size(image.path, config.preprocessing))), None)
    return [size] if size is not None else []


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
        "error": np.array([_as_given(item.error or "", str(read), str(given))
                           for item, read, given in zip(items, batch["read_path"], batch["path"])], dtype=object),
    }


def _as_given(error: str, read_path: str, path: str) -> str:
    """An image's error names it as given, as the local engine's do (the task read it by its absolute path)."""
    return path + error[len(read_path):] if error.startswith(f"{read_path}:") else error


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
    """One model, held for the whole run: a Ray Data actor running the local engine's per-batch work.

    Each call gets one commit's worth of images (a whole shard with ``--format shards``), runs
    them in batches of ``batch_size`` and commits before returning: the driver records only
    images whose shard is on disk, and no actor is left holding a shard when the stream ends.
    """

    def __init__(self, config: FeatureConfig, store: FeatureStore | None, threads: int | None, batch_size: int) -> None:
        import torch

        from .device import keep_freed_memory
        from .extractor import Extractor

        if threads is not None:
            torch.set_num_threads(threads)
        keep_freed_memory()
        saving = store is not None
        self.extractor = Extractor(config, keep_features=saving, feature_dtype=config.save_dtype if saving else None)
        self.store = store
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        from .batch_work import process_batch

        images = [FoundImage(str(path), str(output)) for path, output in zip(batch["path"], batch["output"])]
        loaded, finished = _loaded_images(batch), []
        for start in range(0, len(images), self.batch_size):
            part = slice(start, start + self.batch_size)
            finished += process_batch(self.extractor, images[part], collate_batch(loaded[part]), self.store)
        flush_error = None
        if self.store is not None:
            try:
                self.store.flush()
            except OutputError as error:  # the driver ends the run; images of a failed shard are errors
                flush_error = str(error)
        records = []
        for outcome, kept, output_error in finished:
            outcome = self.store.settled(outcome) if self.store is not None else outcome
            kept, output_error = (kept, output_error) if outcome.status == "ok" else (None, output_error or flush_error)
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


def _actor_resources(engine: RayEngine, device: str, cluster: dict[str, float]) -> tuple[int, dict[str, float], int | None]:
    """(actors, resources of each, torch threads of each)."""
    gpus = int(cluster.get("GPU", 0))
    wants_gpu = gpus > 0 and (device == "auto" or device.startswith("cuda"))
    if wants_gpu:
        return engine.actors or gpus, {"num_gpus": 1, "num_cpus": engine.actor_cpus}, None
    if device.startswith("cuda"):
        raise UsageError(f"--device {device}: the Ray cluster has no GPU")
    return engine.actors or 1, {"num_cpus": engine.actor_cpus}, max(1, math.ceil(engine.actor_cpus))


def _join_cluster(address: str | None) -> None:
    """``ray.init``, keeping the run's own signal handlers: Ray's driver installs its own, and its
    SIGTERM handler aborts the process with a stack dump (exit 134) instead of the run's clean stop."""
    import ray

    _quiet_ray()
    handlers = {number: signal.getsignal(number) for number in STOP_SIGNALS}
    try:
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False, include_dashboard=False)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise UsageError(f"--ray-address {address}: cannot join the Ray cluster: {error}") from error
    finally:
        for number, handler in handlers.items():
            if handler is not None and threading.current_thread() is threading.main_thread():
                signal.signal(number, handler)


def _record_committed_after_stop(
    store: FeatureStore | None, unreported: Sequence[FoundImage], callbacks: RunCallbacks, tally: RunTally
) -> None:
    """After a stop, files that calls it cut short wrote (their results never reached the driver) are recorded
    as a re-run would find them (``skipped``, naming their shard) and counted as processed; best effort."""
    if store is None or not unreported:
        return
    try:
        found = store.written_since(unreported, time.time() - (time.perf_counter() - tally.started))
    except InspectError:
        return
    for image in found:
        callbacks.on_outcome(Outcome(image.path, image.output, "skipped"), None)
        tally.processed += 1


def check_room_for_decoding(actors: int, actor_cpus: float, cluster_cpus: float) -> None:
    """Actors holding every CPU would leave decoding tasks waiting for ever: refuse up front."""
    if actors * actor_cpus + DECODE_TASK_CPUS > cluster_cpus:
        raise UsageError(
            f"--ray-actors {actors} x --ray-actor-cpus {actor_cpus:g} leave no CPU for decoding on a cluster "
            f"of {cluster_cpus:g} CPUs: use fewer actors or a smaller --ray-actor-cpus"
        )


@dataclass(frozen=True)
class RayEngine:
    """The dump on a Ray cluster: decoding tasks, and a pool of model actors."""

    address: str | None = None
    """``None``: join the cluster this machine belongs to, or start a local one."""
    actors: int | None = None
    """``None``: one actor per GPU of the cluster when the device may be CUDA, else one."""
    actor_cpus: float = 1.0
    """CPUs each actor reserves; on CPU-only actors also its torch threads (rounded up)."""
    batch_size: int = 32
    supports_pictures: bool = False
    supports_device_decode: bool = False

    def label(self, device: str) -> str:
        actors = f"{self.actors} actor(s)" if self.actors else "actors: one per GPU, else 1"
        return f"ray ({self.address or 'local cluster'}, {actors}, device {device})"

    def run(
        self,
        config: FeatureConfig,
        todo: Sequence[FoundImage],
        store: FeatureStore | None,
        *,
        callbacks: RunCallbacks,
        stop: StopRequest,
    ) -> RunSummary:
        """Run ``todo`` on Ray; ``callbacks.on_outcome`` sees each image once it is written (in finishing order).

        A stop request or an output error ends the run: files finished by then are complete
        (written atomically) and reported.
        """
        import ray

        from .extractor import Extractor
        from .local_engine import model_info
        from .outcomes import RunTally

        # The driver's copy only checks the weights and options before the cluster starts; the
        # actors hold the models, on their own devices.
        checked = Extractor(replace(config, compile=False), device="cpu", keep_features=False)
        callbacks.on_start(model_info(checked, device=config.device, engine=self.label(config.device)))
        del checked
        tally = RunTally()
        _join_cluster(self.address)
        reported: set[str] = set()
        try:
            self._stream(config, todo, store, callbacks, stop, tally, reported)
        except KeyboardInterrupt:  # a second Ctrl-C: stop now
            stop.signal_number = signal.SIGINT
        finally:
            ray.shutdown()
        if stop.signal_number is not None:
            _record_committed_after_stop(store, [image for image in todo if image.output not in reported], callbacks, tally)
        return tally.summary(stop.signal_number, len(todo))

    def _stream(
        self, config: FeatureConfig, todo: Sequence[FoundImage], store: FeatureStore | None,
        callbacks: RunCallbacks, stop: StopRequest, tally: RunTally, reported: set[str],
    ) -> None:
        for batch in self._dataset(config, todo, store).iter_batches(batch_size=None, batch_format="numpy"):
            for record in batch["record"]:
                outcome, result, output_error = pickle.loads(record)
                reported.add(outcome.output)
                tally.add(outcome, output_error)
                callbacks.on_outcome(outcome, result)
            if stop() or tally.output_error is not None:
                break

    def _dataset(self, config: FeatureConfig, todo: Sequence[FoundImage], store: FeatureStore | None) -> Any:
        import ray
        import ray.data

        cluster = ray.cluster_resources()
        actors, resources, threads = _actor_resources(self, config.device, cluster)
        check_room_for_decoding(actors, self.actor_cpus, cluster.get("CPU", 0))
        if "num_gpus" not in resources:  # models on CPUs: this machine's stands for theirs (the actors' own warnings are not shown)
            warn_if_emulated(config.dtype, "cpu")
        ray.data.DataContext.get_current().enable_progress_bars = False
        rows = [{"path": image.path, "read_path": os.path.abspath(image.path), "output": image.output} for image in todo]
        dataset = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / self.batch_size)))
        dataset = dataset.map_batches(
            decode_rows, fn_kwargs={"preprocessing": config.preprocessing}, batch_size=self.batch_size, num_cpus=DECODE_TASK_CPUS
        )
        commit = store.commit_size(_first_input_size(config, todo)) if store is not None else None
        return dataset.map_batches(
            FeatureActor,
            fn_constructor_kwargs={"config": config, "store": store, "threads": threads, "batch_size": self.batch_size},
            batch_size=min(commit, MAX_IMAGES_PER_CALL) if commit is not None else self.batch_size,
            concurrency=actors,
            **resources,
        )

