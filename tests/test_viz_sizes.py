"""Pictures are bounded whatever the input's shape: no strip of an image makes a huge PNG."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image, ImageStat

from backbone_inspect.viz import (
    GAP, HEADER, HEATMAP_LONGEST, HEATMAP_SIDE, MIN_WIDTH, TILE, channel_grid, heatmap_overlay, heatmap_size,
)

from conftest import invoke, manifest


@pytest.mark.parametrize(("width", "height", "expected"), [
    (224, 224, (336, 336)),
    (448, 224, (672, 336)),
    (20, 4000, (7, 1344)),
    (4000, 20, (1344, 7)),
    (1, 6000, (1, 1344)),
    (6000, 1, (1344, 1)),
    (1, 1, (336, 336)),
])
def test_a_heatmap_panel_keeps_the_aspect_ratio_within_its_bounds(width: int, height: int, expected: tuple[int, int]) -> None:
    assert heatmap_size(width, height) == expected
    assert max(expected) <= HEATMAP_LONGEST and min(expected) <= HEATMAP_SIDE


@pytest.mark.parametrize("shape", [(4000, 20), (20, 4000), (6000, 1), (1, 6000)])
def test_a_strip_of_an_image_gives_a_heatmap_of_bounded_size(shape: tuple[int, int]) -> None:
    height, width = shape
    pixels = torch.full((3, height, width), 200, dtype=torch.uint8)
    feature = torch.rand(8, max(1, height // 4), max(1, width // 4))
    picture = heatmap_overlay("layer1", feature, pixels, "4")
    panel = heatmap_size(width, height)
    assert picture.size == (max(3 * GAP + 2 * panel[0], MIN_WIDTH), HEADER + panel[1] + GAP)
    assert picture.width * picture.height <= (3 * GAP + 2 * HEATMAP_LONGEST) * (HEADER + HEATMAP_LONGEST + GAP)
    shown = picture.crop((GAP, HEADER, GAP + panel[0], HEADER + panel[1]))
    assert ImageStat.Stat(shown).mean == pytest.approx([200, 200, 200], abs=1), "the input is drawn at its place"


def test_a_channel_keeps_its_aspect_ratio_in_its_tile() -> None:
    feature = torch.zeros(1, 4, 16)
    feature[0, :, :8] = 1.0  # the left half bright
    grid = channel_grid("layer1", feature, "4", count=1)
    tile = grid.crop((GAP, HEADER, GAP + TILE, HEADER + TILE)).convert("L")
    rows = [ImageStat.Stat(tile.crop((0, y, TILE, y + 1))).mean[0] for y in range(TILE)]
    drawn = [y for y, mean in enumerate(rows) if mean < 254]
    assert (drawn[0], drawn[-1] + 1) == ((TILE - TILE // 4) // 2, (TILE - TILE // 4) // 2 + TILE // 4), "a 4×16 map is 32 px tall, centred"
    assert tile.getpixel((TILE // 4, TILE // 2)) > 200 > 80 > tile.getpixel((3 * TILE // 4, TILE // 2))


def test_the_cli_draws_a_tall_strip_in_a_bounded_picture(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    generator = torch.Generator().manual_seed(0)
    strip = torch.randint(0, 256, (4000, 20), dtype=torch.uint8, generator=generator)
    Image.fromarray(strip.numpy(), "L").save(tmp_path / "in" / "strip.png")
    result = invoke(tmp_path / "in", "--resize", "none", "--crop", "none", "--arch", "resnet18", "--layers", "1",
                    "--viz", tmp_path / "viz", "--save", tmp_path / "out", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert [record["status"] for record in manifest(tmp_path / "out")] == ["ok"]
    with Image.open(tmp_path / "viz" / "strip" / "layer1-heatmap.png") as heat:
        assert heat.size == (MIN_WIDTH, HEADER + HEATMAP_LONGEST + GAP)
    with Image.open(tmp_path / "viz" / "strip" / "layer1-channels.png") as grid:
        assert grid.size == (max(GAP + 4 * (TILE + GAP), MIN_WIDTH), HEADER + 4 * (TILE + 18 + GAP) + GAP)
