from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image, ImageStat

from backbone_inspect.viz import HEADER, HEATMAP_SIDE, TILE, channel_grid, heatmap_overlay, most_active_channels

from conftest import SAMPLES, SMALL, invoke, noise_image


def bright_fraction(image: Image.Image, box: tuple[int, int, int, int]) -> float:
    """Mean brightness (0..1) of a region: viridis runs from dark purple to bright yellow."""
    return ImageStat.Stat(image.crop(box).convert("L")).mean[0] / 255


def test_grid_shows_the_most_active_channels_first_with_their_pattern_in_place() -> None:
    feature = torch.zeros(32, 8, 8)
    feature[5, :4, :4] = 10.0  # most active: bright top-left quadrant
    feature[9, 4:, 4:] = 6.0  # second: bright bottom-right quadrant
    feature[20] = torch.rand(8, 8)
    assert most_active_channels(feature, 3)[:2] == [5, 9]
    grid = channel_grid("layer3", feature, "16", count=4)
    columns = 2
    assert grid.width >= 8 + columns * (TILE + 8)
    first = (8, HEADER, 8 + TILE, HEADER + TILE)
    second = (8 + TILE + 8, HEADER, 8 + 2 * TILE + 8, HEADER + TILE)
    def quadrant(tile, dx, dy):
        left, top = tile[0] + dx * TILE // 2, tile[1] + dy * TILE // 2
        return (left, top, left + TILE // 2, top + TILE // 2)
    assert bright_fraction(grid, quadrant(first, 0, 0)) > 0.8 > 0.3 > bright_fraction(grid, quadrant(first, 1, 1))
    assert bright_fraction(grid, quadrant(second, 1, 1)) > 0.8 > 0.3 > bright_fraction(grid, quadrant(second, 0, 0))


def test_heatmap_overlay_is_hot_where_the_activation_is() -> None:
    feature = torch.zeros(16, 7, 7)
    feature[:, 5:, 5:] = 3.0  # bottom-right corner
    pixels = torch.full((3, 224, 224), 128, dtype=torch.uint8)
    picture = heatmap_overlay("layer4", feature, pixels, "32")
    assert picture.size == (8 * 3 + 2 * HEATMAP_SIDE, HEADER + HEATMAP_SIDE + 8)
    right = 8 * 2 + HEATMAP_SIDE
    corner = HEATMAP_SIDE // 4
    hot = (right + HEATMAP_SIDE - corner, HEADER + HEATMAP_SIDE - corner, right + HEATMAP_SIDE, HEADER + HEATMAP_SIDE)
    cold = (right, HEADER, right + corner, HEADER + corner)
    assert bright_fraction(picture, hot) > bright_fraction(picture, cold) + 0.2
    left_panel = picture.crop((8, HEADER, 8 + HEATMAP_SIDE, HEADER + HEATMAP_SIDE))
    assert ImageStat.Stat(left_panel).mean == pytest.approx([128, 128, 128], abs=1), "the input is shown as it is"


def test_cli_writes_readable_pngs_per_image_and_stage(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    Image.open(SAMPLES / "chelsea.jpg").save(folder / "sub" / "cat.png")
    Image.open(SAMPLES / "camera.png").save(folder / "camera.png")
    viz = tmp_path / "viz"
    result = invoke(folder, "--viz", viz, "--viz-channels", "9", "--layers", "1,C5", *SMALL)
    assert result.exit_code == 0, result.output
    names = sorted(p.relative_to(viz).as_posix() for p in viz.rglob("*") if p.is_file())
    assert names == [
        "camera/layer1-channels.png", "camera/layer1-heatmap.png", "camera/layer4-channels.png", "camera/layer4-heatmap.png",
        "sub/cat/layer1-channels.png", "sub/cat/layer1-heatmap.png", "sub/cat/layer4-channels.png", "sub/cat/layer4-heatmap.png",
    ]
    for name in names:
        with Image.open(viz / name) as picture:
            picture.load()
            assert picture.format == "PNG" and picture.mode == "RGB"
            assert max(ImageStat.Stat(picture).stddev) > 10, f"{name} is blank"
    with Image.open(viz / "camera" / "layer1-channels.png") as grid:
        assert grid.size == (max(8 + 3 * (TILE + 8), 420), HEADER + 3 * (TILE + 18 + 8) + 8)
    with Image.open(viz / "camera" / "layer4-heatmap.png") as heat:
        assert heat.size == (8 * 3 + 2 * HEATMAP_SIDE, HEADER + HEATMAP_SIDE + 8)
    assert not [p for p in viz.rglob("*.tmp")]


@pytest.mark.parametrize("arch", ["swin_t", "efficientnet_b0"])
def test_pictures_of_other_families_are_drawn_per_stage(tmp_path: Path, arch: str) -> None:
    result = invoke(SAMPLES / "chelsea.jpg", "--viz", tmp_path / "viz", "--arch", arch, "--layers", "1,4",
                    "--resize", "64", "--crop", "64", "--device", "cpu")
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "viz" / "chelsea").iterdir())
    assert names == ["stage1-channels.png", "stage1-heatmap.png", "stage4-channels.png", "stage4-heatmap.png"]
    for name in names:
        with Image.open(tmp_path / "viz" / "chelsea" / name) as picture:
            assert picture.format == "PNG" and max(ImageStat.Stat(picture).stddev) > 10, name


def test_a_pictures_folder_that_cannot_be_written_is_one_error_before_any_image(tmp_path: Path) -> None:
    (tmp_path / "a file").write_text("in the way")
    result = invoke(SAMPLES, *SMALL, "--viz", tmp_path / "a file" / "pics")
    assert result.exit_code == 1
    assert result.stderr == f"Error: cannot write pictures under {tmp_path / 'a file' / 'pics'}: Not a directory\n"
    assert result.stdout == ""  # no image was computed
    dry = invoke(SAMPLES, *SMALL, "--viz", tmp_path / "fresh", "--save", tmp_path / "out", "--dry-run")
    assert dry.exit_code == 0 and not (tmp_path / "fresh").exists()  # a dry run creates nothing


def test_a_picture_folder_beside_an_image_named_alone_is_not_refused(tmp_path: Path) -> None:
    # A file named on the command line is not searched for: pictures beside it are never the next run's inputs.
    photo = noise_image(tmp_path / "b.png", seed=1)
    result = invoke(photo, "--viz", tmp_path, "--layers", "4", *SMALL)
    assert result.exit_code == 0, result.output
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png")) == [
        "b.png", "b/layer4-channels.png", "b/layer4-heatmap.png"]
