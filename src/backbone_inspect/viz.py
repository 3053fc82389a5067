"""Pictures of feature maps, drawn with Pillow alone: a grid of the most active channels, and the
mean activation as a heatmap over the input."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw, ImageFont

from .errors import OutputError
from .files import atomic_write

if TYPE_CHECKING:
    import torch

    from .results import ImageResult

VIRIDIS_ANCHORS: tuple[tuple[int, int, int], ...] = (
    (68, 1, 84), (65, 68, 135), (42, 120, 142), (34, 168, 132), (122, 209, 81), (253, 231, 37),
)
TILE = 128
GAP = 8
CAPTION = 18
HEADER = 44
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
NONFINITE = (150, 150, 150)
"""NaN and inf cells: a neutral grey, in no colour of viridis."""
NONFINITE_NOTE = "grey: NaN or inf"
HEATMAP_SIDE = 336
"""The shorter side of the heatmap panels: big enough to read, whatever the input size..."""
HEATMAP_LONGEST = 4 * HEATMAP_SIDE
"""...unless the longer side would then pass this: a panel is never over 336×1344 pixels, whatever the input."""
MIN_WIDTH = 420
"""Pictures are at least this wide: room for the header."""


def scaled_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """``width``×``height`` scaled, the aspect ratio kept, at least a pixel each way."""
    return max(1, round(width * scale)), max(1, round(height * scale))


def heatmap_size(width: int, height: int) -> tuple[int, int]:
    """A heatmap panel's size for an input of ``width``×``height``: the shorter side ``HEATMAP_SIDE``,
    the longer one at most ``HEATMAP_LONGEST`` (a thin strip gets a thinner panel)."""
    return scaled_size(width, height, min(HEATMAP_SIDE / min(width, height), HEATMAP_LONGEST / max(width, height)))


def viridis_palette() -> list[int]:
    """A 256-entry viridis palette (flattened RGB), interpolated between its anchors."""
    palette = []
    steps = len(VIRIDIS_ANCHORS) - 1
    for level in range(256):
        position = level / 255 * steps
        low = min(int(position), steps - 1)
        fraction = position - low
        palette.extend(
            round(a + (b - a) * fraction) for a, b in zip(VIRIDIS_ANCHORS[low], VIRIDIS_ANCHORS[low + 1])
        )
    return palette


def finite_range(values: torch.Tensor) -> tuple[float, float] | None:
    """The min and max of a map's finite values; ``None`` when it has none."""
    finite = values[values.isfinite()]
    return (finite.min().item(), finite.max().item()) if finite.numel() else None


def normalised_gray(values: torch.Tensor) -> Image.Image:
    """A 2-D map scaled to 0..255 by the min and max of its finite values (a constant map is black;
    NaN and inf are black too here: ``paint_nonfinite`` draws them)."""
    import torch
    from torchvision.transforms.functional import to_pil_image

    values = values.detach().float().cpu()
    low, high = finite_range(values) or (0.0, 0.0)
    scaled = ((values - low) / (high - low)).nan_to_num(0, 0, 0) if high > low else torch.zeros_like(values)
    return to_pil_image((scaled * 255).round().byte())


def paint_nonfinite(image: Image.Image, values: torch.Tensor) -> Image.Image:
    """``image`` (the 2-D map ``values`` drawn at any size) with its NaN and inf cells in ``NONFINITE`` grey."""
    from torchvision.transforms.functional import to_pil_image

    missing = ~values.detach().cpu().isfinite()
    if missing.any():
        mask = to_pil_image(missing.byte() * 255).resize(image.size, Image.Resampling.NEAREST)
        image.paste(NONFINITE, mask=mask)
    return image


def colourise(gray: Image.Image) -> Image.Image:
    indexed = gray.convert("P")
    indexed.putpalette(viridis_palette())
    return indexed.convert("RGB")


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def _header(result_stage: str, feature: torch.Tensor, stride: str) -> str:
    channels, height, width = feature.shape
    # The default font has no "×": the pictures say "x".
    return f"{result_stage}  ·  {channels}x{height}x{width}  ·  stride {stride.replace('×', 'x')}"


def most_active_channels(feature: torch.Tensor, count: int) -> list[int]:
    """Indices of the ``count`` channels with the highest mean activation, most active first."""
    means = feature.detach().float().mean(dim=(1, 2))
    ranked = means.nan_to_num(-math.inf, math.inf, -math.inf)  # a NaN mean ranks lowest
    return ranked.sort(descending=True, stable=True).indices[:count].tolist()


def channel_grid(stage: str, feature: torch.Tensor, stride: str, count: int = 16) -> Image.Image:
    """The ``count`` most active channels of a [C, H, W] map, each min-max normalised, in a grid."""
    chosen = most_active_channels(feature, count)
    columns = math.ceil(math.sqrt(len(chosen)))
    rows = math.ceil(len(chosen) / columns)
    width = GAP + columns * (TILE + GAP)
    height = HEADER + rows * (TILE + CAPTION + GAP) + GAP
    canvas = Image.new("RGB", (max(width, MIN_WIDTH), height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((GAP, 6), _header(stage, feature, stride), fill=TEXT, font=_font(15))
    finite = bool(feature[chosen].isfinite().all())
    draw.text(
        (GAP, 25), f"{len(chosen)} most active of {feature.shape[0]} channels, each min-max normalised"
        + ("" if finite else f"; {NONFINITE_NOTE}"), fill=(90, 90, 90), font=_font(12),
    )
    means = feature.detach().float().mean(dim=(1, 2))
    for slot, channel in enumerate(chosen):
        row, column = divmod(slot, columns)
        left = GAP + column * (TILE + GAP)
        top = HEADER + row * (TILE + CAPTION + GAP)
        canvas.paste(*_tile(feature[channel], left, top))
        draw.text(
            (left, top + TILE + 2), f"ch {channel}  mean {means[channel].item():.3g}", fill=TEXT, font=_font(11)
        )
    return canvas


def _tile(channel: torch.Tensor, left: int, top: int) -> tuple[Image.Image, tuple[int, int]]:
    """One channel fitted into a ``TILE`` square, its aspect ratio kept, centred; where to paste it.
    Nearest neighbour: every feature-map cell stays visible as a square."""
    height, width = channel.shape
    size = scaled_size(width, height, TILE / max(width, height))
    tile = paint_nonfinite(colourise(normalised_gray(channel)).resize(size, Image.Resampling.NEAREST), channel)
    return tile, (left + (TILE - size[0]) // 2, top + (TILE - size[1]) // 2)


def heatmap_overlay(stage: str, feature: torch.Tensor, pixels: torch.Tensor, stride: str) -> Image.Image:
    """The input beside the channel-mean activation, upsampled and overlaid on it."""
    from torchvision.transforms.functional import to_pil_image

    picture = to_pil_image(pixels.cpu())
    size = heatmap_size(picture.width, picture.height)
    picture = picture.resize(size, Image.Resampling.BILINEAR)
    mean_map = feature.detach().float().mean(dim=0)
    heat = colourise(normalised_gray(mean_map).resize(size, Image.Resampling.BILINEAR))
    overlay = paint_nonfinite(Image.blend(picture, heat, 0.55), mean_map)
    canvas = Image.new("RGB", (max(GAP * 3 + size[0] * 2, MIN_WIDTH), HEADER + size[1] + GAP), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((GAP, 6), _header(stage, feature, stride), fill=TEXT, font=_font(15))
    draw.text((GAP, 25), heatmap_legend(mean_map), fill=(90, 90, 90), font=_font(12))
    canvas.paste(picture, (GAP, HEADER))
    canvas.paste(overlay, (GAP * 2 + size[0], HEADER))
    return canvas


def heatmap_legend(mean_map: torch.Tensor) -> str:
    """What the heatmap's colours stand for: the range of its finite values, and grey where it has others."""
    span = finite_range(mean_map)
    legend = "mean over channels, " + (f"{span[0]:.3g} (dark) to {span[1]:.3g} (yellow)" if span else "no finite values")
    return legend if bool(mean_map.isfinite().all()) else f"{legend}; {NONFINITE_NOTE}"


def save_png(path: Path, image: Image.Image) -> None:
    atomic_write(path, lambda handle: image.save(handle, format="PNG"))


def write_visualisations(folder: Path, result: ImageResult, channels: int = 16) -> list[Path]:
    """``folder/<stage>-channels.png`` and ``folder/<stage>-heatmap.png`` for each stage of a result.
    ``OutputError`` naming the picture that cannot be drawn or written (see ``picture_error``)."""
    from .stats import stride_text

    written = []
    for stats in result.stats:
        feature = result.features[stats.name]
        stride = stride_text(stats.stride)
        drawings: list[tuple[Path, Callable[[], Image.Image]]] = [
            (folder / f"{stats.name}-channels.png", lambda: channel_grid(stats.name, feature, stride, channels))]
        if result.pixels is not None:
            pixels = result.pixels
            drawings.append((folder / f"{stats.name}-heatmap.png", lambda: heatmap_overlay(stats.name, feature, pixels, stride)))
        for path, draw in drawings:
            try:
                save_png(path, draw())
            except (OSError, MemoryError, RuntimeError) as error:
                from .device import is_out_of_memory

                if isinstance(error, RuntimeError) and not is_out_of_memory(error):  # torch's allocators raise RuntimeError
                    raise
                raise picture_error(path, error) from error
            written.append(path)
    return written


def write_viz(folder: Path, result: ImageResult, channels: int) -> OutputError | None:
    """An image's pictures drawn; the ``OutputError`` that stopped them, or ``None``."""
    try:
        write_visualisations(folder, result, channels)
    except OutputError as error:
        return error
    return None


def picture_error(path: Path, error: OSError | MemoryError | RuntimeError) -> OutputError:
    """The picture's own error (``ends_run`` False) when only it cannot be made: too big for the memory,
    a name too long, a file in the way of its folder; a full or read-only disk ends the run, as for ``--save``."""
    from .files import output_error

    if isinstance(error, OSError):
        return output_error(path, error)
    failure = OutputError(f"cannot draw {path}: out of memory")
    failure.ends_run = False
    return failure


def claim_folder(folder: Path) -> None:
    """The pictures' folder made, and a file written and removed there: ``OutputError`` if it cannot be."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        raise OutputError(f"cannot write pictures under {folder}: {error.strerror or error}") from error
