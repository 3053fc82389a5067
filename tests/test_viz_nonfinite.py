"""NaN and inf in feature maps are drawn in grey, outside the legend's range and last in the ranking."""

from __future__ import annotations

import math

import torch

from backbone_inspect.viz import (
    GAP, HEADER, HEATMAP_SIDE, NONFINITE, TILE, channel_grid, heatmap_legend, heatmap_overlay, most_active_channels,
    viridis_palette,
)

NAN, INF = math.nan, math.inf
VIRIDIS = {tuple(viridis_palette()[i : i + 3]) for i in range(0, 768, 3)}


def test_channels_with_a_nan_mean_rank_last_in_a_stable_order() -> None:
    feature = torch.ones(5, 4, 4)
    feature[0] = NAN
    feature[1, 0, 0] = NAN  # high otherwise: its mean is still NaN
    feature[1] += 10
    feature[2] *= 3
    feature[3, 1, 1] = INF
    assert most_active_channels(feature, 5) == [3, 2, 4, 0, 1]
    assert most_active_channels(feature, 2) == [3, 2]


def test_the_legend_ranges_over_finite_values_only() -> None:
    assert heatmap_legend(torch.tensor([[1.0, 2.0], [3.0, 4.0]])) == "mean over channels, 1 (dark) to 4 (yellow)"
    assert heatmap_legend(torch.tensor([[NAN, 2.0], [-INF, 4.0]])) == (
        "mean over channels, 2 (dark) to 4 (yellow); grey: NaN or inf")
    assert heatmap_legend(torch.full((2, 2), NAN)) == "mean over channels, no finite values; grey: NaN or inf"


def test_nan_and_inf_cells_are_grey_and_the_rest_keeps_its_full_range() -> None:
    channel = torch.arange(16, dtype=torch.float32).reshape(4, 4)
    channel[0, 0], channel[3, 3] = NAN, INF
    grid = channel_grid("layer1", channel[None], "4", count=1)
    cell = TILE // 4
    def colour(row: int, column: int) -> tuple[int, int, int]:
        return grid.getpixel((GAP + column * cell + cell // 2, HEADER + row * cell + cell // 2))
    assert colour(0, 0) == colour(3, 3) == NONFINITE
    assert NONFINITE not in VIRIDIS
    assert colour(0, 1) == tuple(viridis_palette()[:3]), "the smallest finite value is the darkest"
    assert colour(3, 2) == tuple(viridis_palette()[-3:]), "the largest finite value is the brightest"


def test_the_heatmap_shows_nan_cells_in_grey_over_the_input() -> None:
    feature = torch.rand(3, 2, 2, generator=torch.Generator().manual_seed(0))
    feature[1, 0, 1] = NAN
    picture = heatmap_overlay("layer4", feature, torch.full((3, 64, 64), 30, dtype=torch.uint8), "32")
    right = 2 * GAP + HEATMAP_SIDE
    quarter = HEATMAP_SIDE // 4
    assert picture.getpixel((right + 3 * quarter, HEADER + quarter)) == NONFINITE
    assert picture.getpixel((right + quarter, HEADER + 3 * quarter)) != NONFINITE
