"""Look inside CNN backbones (torchvision's families, timm's models) by replaying their own stages.

The API, by what people do with it:

- ``dump_features(inputs, save, ...)``: what ``backbone-inspect INPUTS --save DIR`` does.
- ``open_features(DIR)``: a dump read back (either format), as a torch ``Dataset``.
- ``inspect_images(inputs, ...)``: per-stage statistics (and features when asked), nothing saved.
- ``Backbone``, ``feature_info``: the replay itself, as an ``nn.Module`` (FPN, detection).
- ``feature_config``, ``plan_inputs``, ``make_store``, ``PtFileStore``, ``ShardStore``, ``make_engine``, ``plan_run``,
  ``execute_run``: the pieces those are built from, for pipelines of your own.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "Backbone": "backbone",
    "StageInfo": "stages",
    "feature_info": "backbone",
    "dump_features": "api",
    "open_features": "reader",
    "StoredFeatures": "reader",
    "inspect_images": "api",
    "Inspection": "api",
    "FeatureConfig": "config",
    "feature_config": "config",
    "plan_inputs": "inputs",
    "FeatureStore": "store",
    "PtFileStore": "pt_store",
    "ShardStore": "shard_store",
    "make_store": "run",
    "make_engine": "run",
    "RunCallbacks": "engine",
    "plan_run": "run",
    "execute_run": "run",
    "RunSummary": "outcomes",
    "Outcome": "outcomes",
    "InspectError": "errors",
    "UsageError": "errors",
    "WeightsError": "errors",
    "OutputError": "errors",
    "RunStopped": "errors",
}
__all__ = [*_EXPORTS, "__version__"]

if TYPE_CHECKING:
    from .api import Inspection, dump_features, inspect_images
    from .backbone import Backbone, feature_info
    from .stages import StageInfo
    from .config import FeatureConfig, feature_config
    from .engine import RunCallbacks
    from .errors import InspectError, OutputError, RunStopped, UsageError, WeightsError
    from .inputs import plan_inputs
    from .outcomes import Outcome, RunSummary
    from .pt_store import PtFileStore
    from .shard_store import ShardStore
    from .reader import StoredFeatures, open_features
    from .run import execute_run, make_engine, make_store, plan_run
    from .store import FeatureStore


def __getattr__(name: str) -> Any:
    # torch is imported on first use, so that `backbone-inspect --help` stays instant.
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
