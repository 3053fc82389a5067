"""Correct 8-bit RGB from any Pillow colour mode: alpha composited, 16-bit and float scaled, never clipped."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import ImageError

if TYPE_CHECKING:
    from PIL import Image

ALPHA_BACKGROUND: tuple[int, int, int] = (255, 255, 255)
"""Transparent pixels are composited onto white before the model sees them."""
SIXTEEN_BIT_MAX = 65535
"""Integer images (``I;16``, ``I``) are read as 16-bit: 0..65535, scaled by 1/257 to 0..255."""


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    """Pillow's convert("L"/"RGB") clips 16-bit values at 255, which turns almost every pixel
    white; scale the 0..65535 range down to 0..255 instead (65535 / 257 == 255). ``ImageError``
    (without the file's name) for a 32-bit image with values outside that range."""
    if image.mode != "I":
        image = image.convert("I")
    low, high = image.getextrema()
    if low < 0 or high > SIXTEEN_BIT_MAX:
        raise ImageError(f"32-bit integer image with values from {low} to {high}: only 0..65535 is read "
                         "(16-bit, as 0..255); save it as 8- or 16-bit")
    return image.point(lambda value: value * (1 / 257)).convert("L")


def _float_to_l(image: Image.Image) -> Image.Image:
    """A 32-bit float image (``F``) with values in 0..1, as 0..255 (rounded). Any other range has no
    one reading (0..255 data, HDR radiance, depth): ``ImageError`` (without the file's name), as for NaN or inf."""
    import numpy as np
    from PIL import Image

    values = np.asarray(image, dtype=np.float32)
    if not np.isfinite(values).all():
        raise ImageError("32-bit float image with NaN or infinite values: save it as 8- or 16-bit")
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if low < 0 or high > 1:
        raise ImageError(f"32-bit float image with values from {low:.6g} to {high:.6g}: only 0..1 is read "
                         "(as 0..255); save it as 8- or 16-bit, or scaled to 0..1")
    return Image.fromarray(np.rint(values * 255).astype(np.uint8), "L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Correct 8-bit RGB from any Pillow mode; transparency is composited onto ``ALPHA_BACKGROUND``.
    ``ImageError`` (without the file's name) for integer or float values it will not guess at."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode.startswith("I"):
        image = _sixteen_bit_to_l(image)
    elif image.mode == "F":
        image = _float_to_l(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("LA", "La", "PA", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, ALPHA_BACKGROUND)
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")
