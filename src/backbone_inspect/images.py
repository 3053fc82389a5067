"""Decoding images into correct RGB, and the preprocessing that turns them into uint8 tensors."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import threading
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .colour_modes import to_rgb
from .errors import ImageError

if TYPE_CHECKING:
    import torch
    from PIL import Image

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

MAX_SIDE = 4096
"""The largest ``--resize``/``--crop``: resnet50's first stages take about 1 GB an image at 4096×4096."""
MAX_PIXELS = MAX_SIDE * MAX_SIDE
"""The most pixels an image may have after preprocessing (``--resize none --crop none`` keeps the native size)."""


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


# Held around warnings.catch_warnings, which swaps the process's filters and showwarning (Python 3.11):
# two threads decoding at once (API calls, --decode gpu's Pillow fallback) would leave one's swap behind.
WARNINGS_STATE = threading.Lock()


def load_rgb(path: str | Path) -> Image.Image:
    """Decode ``path`` fully (first frame of animations), apply EXIF orientation, return RGB.

    Raises ``ImageError`` naming the file for anything Pillow cannot decode, including
    truncated files and images over Pillow's decompression-bomb limit.
    """
    from PIL import Image, ImageOps

    _check_regular_file(path)
    said: list[str] = []
    try:
        with WARNINGS_STATE, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                opened.seek(0)
                with _c_library_messages(said) if opened.format == "TIFF" else contextlib.nullcontext():
                    opened.load()
                rgb = to_rgb(ImageOps.exif_transpose(opened))
    except ImageError as error:  # pixel values to_rgb will not guess at
        raise ImageError(f"{path}: {error}") from error
    except Exception as error:  # whatever a decoder raises, one bad file is that file's error
        if said and not isinstance(error, Image.UnidentifiedImageError):
            raise ImageError(f"{path}: cannot decode image ({error}: {'; '.join(said)})") from error
        raise _decode_error(path, error) from error
    for warned in {str(warned.message): warned for warned in caught}.values():  # Pillow's, naming the file
        warnings.warn(f"{path}: {warned.message}", warned.category, stacklevel=2)
    return rgb


def _decode_error(path: str | Path, error: Exception) -> ImageError:
    from PIL import Image

    if isinstance(error, (Image.DecompressionBombWarning, Image.DecompressionBombError)):
        return ImageError(f"{path}: image too large ({error})")
    if isinstance(error, Image.UnidentifiedImageError):
        return ImageError(f"{path}: {'empty file' if _is_empty(path) else 'not an image Pillow can read'}")
    return ImageError(f"{path}: cannot decode image ({error})")


@contextlib.contextmanager
def _c_library_messages(said: list[str]) -> Iterator[None]:
    """Keep what a C library (libtiff) prints on stderr off the terminal, into ``said``: a
    corrupt file is then one ``Error:`` line that carries those words."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode("utf-8", "replace").replace("tempfile.tif: ", "")
            said.extend(line.strip() for line in text.splitlines() if line.strip())


_NOT_REGULAR: tuple[tuple[Any, str], ...] = (
    (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
)


def _check_regular_file(path: str | Path) -> None:
    """Only regular files are images: a named pipe would block, a device never ends."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        raise ImageError(f"{path}: cannot read it ({error.strerror or error})") from error
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _NOT_REGULAR if test(mode)), "not a regular file")
        raise ImageError(f"{path}: {kind}, not an image file")


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

    check_sizes(image.height, image.width, preprocessing)
    if preprocessing.resize is not None:
        image = F.resize(
            image, [preprocessing.resize], interpolation=InterpolationMode(preprocessing.interpolation), antialias=True
        )
    if preprocessing.crop is not None:
        image = F.center_crop(image, [preprocessing.crop])
    return F.pil_to_tensor(image)


def check_sizes(height: int, width: int, preprocessing: Preprocessing) -> tuple[int, int]:
    """[H, W] once resized; ``ImageError`` if that is over ``MAX_PIXELS`` or smaller than the crop.

    Checked before any resizing: a 20000×1 strip would resize to gigabytes.
    """
    height, width = size_after_resize(height, width, preprocessing.resize)
    if height * width > MAX_PIXELS:
        raise ImageError(
            f"image is {height}×{width} (H×W) after resizing, over the {MAX_PIXELS / 1e6:.1f} Mpixel limit "
            f"({MAX_SIDE}×{MAX_SIDE}); use a smaller --resize"
        )
    if preprocessing.crop is not None and preprocessing.crop > min(height, width):
        resized = " after resizing" if preprocessing.resize is not None else ""
        raise ImageError(
            f"image is {height}×{width} (H×W){resized}, smaller than the {preprocessing.crop} px "
            "crop; use a larger --resize or --crop none"
        )
    return height, width


def size_after_resize(height: int, width: int, resize: int | None) -> tuple[int, int]:
    """[H, W] once the shorter side is ``resize`` (torchvision truncates the longer side)."""
    if resize is None:
        return height, width
    short, long = sorted((height, width))
    resized_long = int(resize * long / short)
    return (resize, resized_long) if height <= width else (resized_long, resize)


def load_image_tensor(path: str | Path, preprocessing: Preprocessing) -> torch.Tensor:
    """Decode and preprocess one file; ``ImageError`` names the file on failure."""
    image = load_rgb(path)
    try:
        return preprocess(image, preprocessing)
    except ImageError as error:
        raise ImageError(f"{path}: {error}") from error


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
