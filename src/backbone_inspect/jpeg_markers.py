"""Whether a JPEG's marker structure is sound, read from its bytes without decoding any pixels.

nvJPEG decodes some broken files that libjpeg (Pillow) refuses: stray markers in the middle of
the compressed data come out as grey or smeared pixels instead of an error. ``--decode gpu``
sends the device only files whose segments chain cleanly from the start-of-image marker to the
end-of-image marker that closes the file; anything else goes through Pillow, which decides, with
the same error as ``--decode cpu``. A walk over the markers costs microseconds: the compressed
data is searched for its next marker by a regular expression, in C.
"""

from __future__ import annotations

import re

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
    """Start-of-image, then length-prefixed segments with one frame before the first scan, each
    scan's data up to the next marker, and the end-of-image marker as the file's last two bytes."""
    if not data.startswith(START) or not data.endswith(END):
        return False
    position, frames = 2, 0
    while position + 2 <= len(data) and data[position] == 0xFF:
        while data[position + 1] == 0xFF and position + 2 < len(data):  # fill bytes before a marker
            position += 1
        marker = data[position + 1]
        if marker == END[1]:
            return frames == 1 and position + 2 == len(data)
        if marker not in _SEGMENTS or (marker in _FRAMES and frames) or (marker == 0xDA and not frames):
            return False
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        position += 2 + length
        if length < 2 or position > len(data) - 2:
            return False
        frames += marker in _FRAMES
        if marker == 0xDA:  # the scan's compressed data runs to the next marker
            found = _NEXT_MARKER.search(data, position)
            position = found.start() if found else len(data)
    return False
