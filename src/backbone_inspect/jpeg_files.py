"""The JPEG files ``--decode gpu`` gives the device: their bytes, EXIF orientation and size, read
in the DataLoader workers; and whether a JPEG's marker structure is sound, without decoding pixels.

nvJPEG decodes some broken files that libjpeg (Pillow) refuses: stray markers in the middle of
the compressed data come out as grey or smeared pixels instead of an error. ``--decode gpu``
sends the device only files whose segments chain cleanly from the start-of-image marker to the
end-of-image marker that closes the file; anything else goes through Pillow, which decides, with
the same error as ``--decode cpu``. A walk over the markers costs microseconds: the compressed
data is searched for its next marker by a regular expression, in C.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from typing import TYPE_CHECKING

from .errors import ImageError
from .images import WARNINGS_STATE, _check_regular_file

if TYPE_CHECKING:
    import torch

NVJPEG_MODES = ("RGB", "L")
"""Pillow modes whose JPEGs the device decodes to the same RGB as Pillow; CMYK/YCCK go to Pillow."""
MAX_JPEG_BYTES = 64 * 2**20
"""Larger files go to Pillow (whose limits then apply): the workers never read a huge file whole."""
START = b"\xff\xd8"
END = b"\xff\xd9"
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
"""In compressed data, 0xFF is followed by 0x00 (a stuffed byte), a restart marker or more 0xFF
(fill); any other byte after it is the next segment's marker."""
_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
"""Start-of-frame markers (0xC4 DHT, 0xC8 JPG and 0xCC DAC are not frames)."""
_SEGMENTS = frozenset([0xC4, 0xCC, 0xDA, 0xDB, 0xDC, 0xDD, 0xFE, *range(0xE0, 0xF0)]) | _FRAMES
"""Markers followed by a length: tables, scans, restart interval, comments, APPn, frames."""


def sound_jpeg(data: bytes) -> bool:
    """Start-of-image, then length-prefixed segments with one frame before the first of at least one
    scan, each scan's data up to the next marker, and the end-of-image marker as the file's last two bytes."""
    if not data.startswith(START) or not data.endswith(END):
        return False
    position, frames, scans = 2, 0, 0
    while position + 2 <= len(data) and data[position] == 0xFF:
        while data[position + 1] == 0xFF and position + 2 < len(data):  # fill bytes before a marker
            position += 1
        marker = data[position + 1]
        if marker == END[1]:
            return frames == 1 and scans > 0 and position + 2 == len(data)
        if marker not in _SEGMENTS or (marker in _FRAMES and frames) or (marker == 0xDA and not frames):
            return False
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        position += 2 + length
        if length < 2 or position > len(data) - 2:
            return False
        frames += marker in _FRAMES
        if marker == 0xDA:  # the scan's compressed data runs to the next marker
            scans += 1
            found = _NEXT_MARKER.search(data, position)
            position = found.start() if found else len(data)
    return False


def read_jpeg(path: str) -> tuple[torch.Tensor, int, int] | None:
    """The bytes, EXIF orientation and area of a JPEG the device can decode; ``None`` for anything else.

    The bytes decide, not the name: a PNG called ``.jpg`` is not a JPEG. A file whose markers do
    not chain from start to end (``sound_jpeg``) may be truncated or corrupt:
    Pillow says whether it is (nvJPEG would fill what is missing with grey, or decode stray
    markers as pixels). Anything that cannot be read also goes to the CPU path, which names the
    file in the same error as ``--decode cpu``.
    """
    import torch

    try:
        _check_regular_file(path)
        with open(path, "rb") as file:
            start = file.read(len(START))
            if start != START or os.fstat(file.fileno()).st_size > MAX_JPEG_BYTES:
                return None  # not read further: Pillow decides (a video named .jpg is not read whole here)
            data = start + file.read()
    except (ImageError, OSError):
        return None
    if not sound_jpeg(data):
        return None
    header = _jpeg_header(data)
    if header is None:
        return None
    return torch.frombuffer(bytearray(data), dtype=torch.uint8), *header


def _jpeg_header(data: bytes) -> tuple[int, int] | None:
    """EXIF orientation and W×H from the header (Pillow reads no pixels here); ``None``: not for the device."""
    from PIL import Image

    try:
        with WARNINGS_STATE, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # too large: the CPU path says so
            with Image.open(io.BytesIO(data)) as opened:
                if opened.format != "JPEG" or opened.mode not in NVJPEG_MODES:
                    return None
                orientation, area = opened.getexif().get(0x0112, 1), opened.width * opened.height
    except Exception:  # noqa: BLE001 - whatever Pillow raises, the CPU path reports it properly
        return None
    # As Pillow's exif_transpose looks it up: 6, 6.0 and the rational 6/1 are all orientation 6.
    try:
        return _ORIENTATIONS.get(orientation, 1), area
    except TypeError:  # unhashable (a tuple of lists, say): no orientation Pillow would apply
        return 1, area


_ORIENTATIONS = {value: value for value in range(1, 9)}
