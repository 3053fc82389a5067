"""Engines: what runs the model over the images. Every engine has the same ``run`` signature.

``run(config, todo, store, callbacks=..., stop=...)`` builds the model(s) from the config, calls
``callbacks.on_start`` once they are ready, computes each image of ``todo``, writes it to
``store`` (when there is one) and calls ``callbacks.on_outcome`` for each, then returns the
``RunSummary``. The local engine runs in this process; the Ray engine on a Ray cluster.
``run.make_engine`` picks one by name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol


if TYPE_CHECKING:
    from .batch_work import Draw
    from .config import FeatureConfig
    from .results import ImageResult
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
    dtype: str = "float32"
    """The compute dtype the model runs in (``tf32``: float32 with CUDA's TF32 convolutions)."""


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
    draw: Draw | None = None
    """Pictures of each computed image, drawn before it is stored (``--viz``; engines with ``supports_pictures``):
    an error returned is that image's, as a write's is (``batch_work.stage_images``)."""


class Engine(Protocol):
    supports_pictures: bool
    supports_device_decode: bool
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
