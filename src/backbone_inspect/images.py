"""Decoding images into correct RGB, and the preprocessing that turns them into uint8 tensors."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ImageError, UsageError

if TYPE_CHECKING:
    import torch
    from PIL import Image

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

ALPHA_BACKGROUND: tuple[int, int, int] = (255, 255, 255)
"""Transparent pixels are composited onto white before the model sees them."""

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".dib", ".tif", ".tiff", ".gif"}
)


@dataclass(frozen=True)
class Preprocessing:
    """Resize the shorter side to ``resize``, centre-crop ``crop`` (``None``: skip), normalise."""

    resize: int | None = 256
    crop: int | None = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["mean"] = list(self.mean)
        values["std"] = list(self.std)
        return values


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    # Pillow's convert("L"/"RGB") clips 16-bit values at 255, which turns almost every pixel
    # white; scale the 0..65535 range down to 0..255 instead (65535 / 257 == 255).
    if image.mode != "I":
        image = image.convert("I")
    return image.point(lambda value: value * (1 / 257)).convert("L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Correct 8-bit RGB from any Pillow mode; transparency is composited onto ``ALPHA_BACKGROUND``."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode.startswith("I"):
        image = _sixteen_bit_to_l(image)
    elif image.mode == "F":
        image = image.convert("L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("LA", "La", "PA", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, ALPHA_BACKGROUND)
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    """Decode ``path`` fully (first frame of animations), apply EXIF orientation, return RGB.

    Raises ``ImageError`` naming the file for anything Pillow cannot decode, including
    truncated files and images over Pillow's decompression-bomb limit.
    """
    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                opened.seek(0)
                opened.load()
                image = ImageOps.exif_transpose(opened)
                return to_rgb(image)
    except Image.DecompressionBombWarning as error:
        raise ImageError(f"{path}: image too large ({error})") from error
    except Image.DecompressionBombError as error:
        raise ImageError(f"{path}: image too large ({error})") from error
    except Image.UnidentifiedImageError as error:
        reason = "empty file" if _is_empty(path) else "not an image Pillow can read"
        raise ImageError(f"{path}: {reason}") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"{path}: cannot decode image ({error})") from error


def _is_empty(path: str | Path) -> bool:
    try:
        return Path(path).stat().st_size == 0
    except OSError:
        return False


def preprocess(image: Image.Image, preprocessing: Preprocessing) -> torch.Tensor:
    """Resize and crop an RGB image as torchvision's ImageClassification does; uint8 CHW tensor.

    Normalisation happens later, on the batch and on the device.
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    if preprocessing.resize is not None:
        image = F.resize(
            image,
            [preprocessing.resize],
            interpolation=InterpolationMode(preprocessing.interpolation),
            antialias=True,
        )
    if preprocessing.crop is not None:
        width, height = image.size
        if preprocessing.crop > min(width, height):
            resized = " after resizing" if preprocessing.resize is not None else ""
            raise ImageError(
                f"image is {height}×{width} (H×W){resized}, smaller than the {preprocessing.crop} px "
                "crop; use a larger --resize or --crop none"
            )
        image = F.center_crop(image, [preprocessing.crop])
    return F.pil_to_tensor(image)


def load_image_tensor(path: str | Path, preprocessing: Preprocessing) -> torch.Tensor:
    """Decode and preprocess one file; ``ImageError`` names the file on failure."""
    image = load_rgb(path)
    try:
        return preprocess(image, preprocessing)
    except ImageError as error:
        raise ImageError(f"{path}: {error}") from error


@dataclass(frozen=True)
class FoundImage:
    """An input image and the path of its feature file relative to the output folder."""

    path: str
    """The path as given, or joined onto the directory argument it was found under."""
    output: str
    """``<stem>.pt`` for a file argument; the path below the directory argument, for a found file."""


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS


def read_path_list(list_file: Path) -> list[str]:
    """Paths from ``--from-list``: one per line; blank lines and ``#`` comments ignored."""
    try:
        text = list_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"--from-list {list_file}: cannot read it ({error})") from error
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _walk_images(directory: str) -> list[FoundImage]:
    found = []
    for root, folders, files in os.walk(directory):
        folders[:] = [name for name in folders if not name.startswith(".")]
        for name in files:
            if is_image_name(name):
                relative = Path(root, name).relative_to(directory)
                found.append(FoundImage(os.path.join(root, name), relative.with_suffix(".pt").as_posix()))
    return found


def find_images(inputs: list[str]) -> list[FoundImage]:
    """Every image under the inputs (files as given, directories searched recursively), sorted.

    Hidden files and folders and files without an image extension are skipped inside
    directories; a file named explicitly is always taken. A path that does not exist is a
    usage error, and so is finding no image at all.
    """
    found: dict[str, FoundImage] = {}
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            images = _walk_images(given)
        elif path.exists():
            images = [FoundImage(given, f"{path.stem}.pt")]
        else:
            raise UsageError(f"{given}: no such file or directory")
        for image in images:
            found.setdefault(os.path.normpath(image.path), image)
    if not found:
        raise UsageError(f"no images found in {', '.join(inputs) or 'the inputs'}")
    return sorted(found.values(), key=lambda image: image.path)


def check_output_collisions(images: Iterable[FoundImage]) -> None:
    """Inputs that would write the same feature file are a usage error, before any work."""
    sources: dict[str, list[str]] = {}
    for image in images:
        sources.setdefault(image.output, []).append(image.path)
    clashes = [f"{', '.join(paths)} -> {output}" for output, paths in sources.items() if len(paths) > 1]
    if clashes:
        raise UsageError(f"inputs would overwrite each other's output: {'; '.join(clashes)}")


@dataclass(frozen=True)
class LoadedImage:
    """What a dataset item gives: the preprocessed pixels, or why there are none."""

    index: int
    pixels: torch.Tensor | None
    error: str | None = None


class ImageDataset:
    """A map-style dataset (for ``torch.utils.data.DataLoader``) of decoded, preprocessed images.

    A bad image is an item with an ``error``, not an exception: one file never stops a run.
    """

    def __init__(self, paths: list[str], preprocessing: Preprocessing) -> None:
        self.paths = paths
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> LoadedImage:
        try:
            return LoadedImage(index, load_image_tensor(self.paths[index], self.preprocessing))
        except ImageError as error:
            return LoadedImage(index, None, str(error))


@dataclass(frozen=True)
class SizeGroup:
    """Images of one size within a batch, stacked: one forward pass."""

    positions: tuple[int, ...]
    """Their positions in the batch."""
    pixels: torch.Tensor
    """uint8 [N, 3, H, W]."""

    @property
    def input_size(self) -> tuple[int, int]:
        return (int(self.pixels.shape[2]), int(self.pixels.shape[3]))


@dataclass(frozen=True)
class DecodedBatch:
    """A batch as the DataLoader hands it over: stacked by size, with the errors beside."""

    indices: tuple[int, ...]
    """Dataset indices of the batch's images, in order."""
    groups: tuple[SizeGroup, ...]
    errors: dict[int, str]
    """Position in the batch -> why that image has no pixels."""

    def pin_memory(self) -> DecodedBatch:
        """Called by the DataLoader's pin-memory thread when feeding a GPU."""
        pinned = tuple(SizeGroup(group.positions, group.pixels.pin_memory()) for group in self.groups)
        return DecodedBatch(self.indices, pinned, self.errors)


def collate_batch(items: list[LoadedImage]) -> DecodedBatch:
    """Group a batch's images by size and stack each group (in the worker process).

    Images of different sizes (``--crop none``) become separate groups: never padded.
    """
    import torch

    by_size: dict[tuple[int, ...], list[int]] = {}
    for position, item in enumerate(items):
        if item.pixels is not None:
            by_size.setdefault(tuple(item.pixels.shape), []).append(position)
    groups = tuple(
        SizeGroup(tuple(positions), torch.stack([items[p].pixels for p in positions]))  # type: ignore[misc]
        for positions in by_size.values()
    )
    errors = {position: item.error or "unknown error" for position, item in enumerate(items) if item.pixels is None}
    return DecodedBatch(tuple(item.index for item in items), groups, errors)


def planned_input_size(path: str, preprocessing: Preprocessing) -> tuple[int, int] | None:
    """The [H, W] an image will have after preprocessing, from its header alone; None if unreadable."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                width, height = opened.size
                exif_orientation = opened.getexif().get(0x0112)
        if exif_orientation in (5, 6, 7, 8):  # EXIF orientations that swap axes
            width, height = height, width
    except Exception:
        return None
    if preprocessing.crop is not None:
        return (preprocessing.crop, preprocessing.crop)
    if preprocessing.resize is None:
        return (height, width)
    short, long = sorted((height, width))
    # torchvision's rule for resizing the shorter side: the longer one is truncated.
    resized_long = int(preprocessing.resize * long / short)
    return (preprocessing.resize, resized_long) if height <= width else (resized_long, preprocessing.resize)
