"""Look inside torchvision ResNet backbones by replaying their own stages."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Backbone", "StageInfo", "feature_info", "__version__"]

if TYPE_CHECKING:
    from .backbone import Backbone, StageInfo, feature_info


def __getattr__(name: str) -> Any:
    # torch is imported on first use, so that `backbone-inspect --help` stays instant.
    if name in ("Backbone", "StageInfo", "feature_info"):
        from . import backbone

        return getattr(backbone, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
