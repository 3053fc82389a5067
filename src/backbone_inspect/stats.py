"""Per-stage statistics of one image's feature map."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

Stride = int | float | list[float]


def measured_stride(input_size: tuple[int, int], feature_size: tuple[int, int]) -> tuple[float, float]:
    """Input size over feature size, per axis (H, W)."""
    return (input_size[0] / feature_size[0], input_size[1] / feature_size[1])


def stride_value(stride: tuple[float, float]) -> Stride:
    """One number when both axes agree (an int when whole), else ``[H, W]``."""
    height, width = (round(value, 4) for value in stride)
    if height != width:
        return [height, width]
    return int(height) if float(height).is_integer() else height


def stride_text(stride: tuple[float, float]) -> str:
    value = stride_value(stride)
    if isinstance(value, list):
        return "×".join(f"{v:g}" for v in value)
    return f"{value:g}"


@dataclass(frozen=True)
class StageStats:
    """What one stage produced for one image; statistics are computed in float32."""

    name: str
    shape: tuple[int, int, int]
    stride: tuple[float, float]
    dtype: str
    mean: float
    std: float
    min: float
    max: float
    zeros: float
    """Fraction of exactly-zero elements."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "stride": stride_value(self.stride),
            "dtype": self.dtype,
            "mean": self.mean,
            "std": self.std,
            "min": self.min,
            "max": self.max,
            "zeros": self.zeros,
        }


def stage_stats(name: str, feature: torch.Tensor, input_size: tuple[int, int]) -> StageStats:
    """Statistics of one image's feature map ``feature`` of shape [C, H, W]."""
    if feature.dim() != 3:
        raise ValueError(f"expected a [C, H, W] feature map, got shape {list(feature.shape)}")
    values = feature.detach().float()
    channels, height, width = values.shape
    return StageStats(
        name=name,
        shape=(channels, height, width),
        stride=measured_stride(input_size, (height, width)),
        dtype=str(feature.dtype).removeprefix("torch."),
        mean=values.mean().item(),
        std=values.std().item() if values.numel() > 1 else 0.0,
        min=values.min().item(),
        max=values.max().item(),
        zeros=(values == 0).sum().item() / values.numel(),
    )
