"""Engines: what runs the model over the images. Every engine has the same ``run`` signature.

``run(config, todo, store, callbacks=..., stop=...)`` builds the model(s) from the config, calls
``callbacks.on_start`` once they are ready, computes each image of ``todo``, writes it to
``store`` (when there is one) and calls ``callbacks.on_outcome`` for each, then returns the
``RunSummary``. The local engine runs in this process; the Ray engine on a Ray cluster.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .errors import UsageError
from .options import check_engine, default_workers

if TYPE_CHECKING:
    from .config import FeatureConfig
    from .extractor import ImageResult
    from .inputs import FoundImage
    from .outcomes import Outcome, RunSummary
    from .signals import StopRequest
    from .store import FeatureStore
    from .weights import LoadedWeights


@dataclass(frozen=True)
class ModelInfo:
    """The model a run uses, once loaded: for the header above the results."""

    arch: str
    weights: LoadedWeights
    seed: int
    device: str
    """Where the model runs (``cpu``, ``cuda:0``); with a cluster engine, the device each actor resolves."""
    engine: str | None
    """The engine and its cluster, when the models run outside this process."""
    strides: dict[str, int]
    """Nominal stride of each requested stage."""


def _ignore(*_: Any) -> None:
    return None


@dataclass(frozen=True)
class RunCallbacks:
    """What a run tells its caller while it goes: the model once ready, then each image."""

    on_start: Callable[[ModelInfo], None] = _ignore
    on_outcome: Callable[[Outcome, ImageResult | None], None] = _ignore
    """Each image once it is written: its manifest line and, unless it failed, its result."""
    keep_features: bool = False
    """Whether ``on_outcome`` needs the feature tensors (features saved to a store are kept anyway)."""


class Engine(Protocol):
    supports_pictures: bool
    """Whether ``on_outcome`` gets the features and input pixels pictures are drawn from."""

    def run(
        self,
        config: FeatureConfig,
        todo: Sequence[FoundImage],
        store: FeatureStore | None,
        *,
        callbacks: RunCallbacks,
        stop: StopRequest,
    ) -> RunSummary: ...


def make_engine(
    name: str = "local",
    *,
    batch_size: int = 32,
    workers: int | None = None,
    ray_address: str | None = None,
    ray_actors: int | None = None,
    ray_actor_cpus: float = 1.0,
) -> Engine:
    """The engine ``name`` (``local`` or ``ray``) with its options, checked (``UsageError``)."""
    check_engine(name)
    _check_positive("--batch-size", batch_size)
    if name == "local":
        given = [option for option, value in (("--ray-address", ray_address), ("--ray-actors", ray_actors)) if value is not None]
        if given:
            raise UsageError(f"{given[0]} needs --engine ray")
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
            raise UsageError(f"--workers {workers!r}: expected 0 or more processes")
        from .local_engine import LocalEngine

        return LocalEngine(batch_size=batch_size, workers=default_workers() if workers is None else workers)
    from .ray_engine import RayEngine, check_ray_installed

    check_ray_installed()
    if ray_actors is not None:
        _check_positive("--ray-actors", ray_actors)
    if not ray_actor_cpus > 0:
        raise UsageError(f"--ray-actor-cpus {ray_actor_cpus!r}: expected a positive number of CPUs")
    return RayEngine(address=ray_address, actors=ray_actors, actor_cpus=float(ray_actor_cpus), batch_size=batch_size)


def _check_positive(option: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{option} {value!r}: expected a positive whole number")
