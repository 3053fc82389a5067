"""Which JPEGs ``--decode gpu`` sends to the device: every kind Pillow writes and decodes is sound;
truncated, corrupt, glued or trailing bytes are not (Pillow then decides, as with --decode cpu)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from backbone_inspect.jpeg_files import sound_jpeg
from conftest import SAMPLES, photo_jpeg

SAVED_AS = {
    "baseline": {"quality": 90},
    "progressive": {"quality": 75, "progressive": True},
    "optimized progressive": {"quality": 90, "progressive": True, "optimize": True},
    "4:2:2": {"quality": 50, "subsampling": 1},
    "restart markers every 2 blocks": {"quality": 80, "restart_marker_blocks": 2},
    "restart markers every row": {"quality": 80, "restart_marker_rows": 1},
}


def saved(path: Path, mode: str, size: tuple[int, int], options: dict) -> bytes:
    pixels = torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    Image.frombytes("RGB", size, pixels.numpy().tobytes()).convert(mode).save(path, "JPEG", **options)
    return path.read_bytes()


@pytest.mark.parametrize("options", list(SAVED_AS.values()), ids=list(SAVED_AS))
@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("size", [(500, 375), (17, 9), (1, 1)])
def test_every_jpeg_pillow_writes_is_sound(tmp_path: Path, options: dict, mode: str, size: tuple[int, int]) -> None:
    data = saved(tmp_path / "x.jpg", mode, size, options)
    with Image.open(tmp_path / "x.jpg") as image:
        image.load()  # Pillow decodes it: the reference says it is a good file
    assert sound_jpeg(data)


def good() -> bytes:
    return (SAMPLES / "chelsea.jpg").read_bytes()


BROKEN = {
    "stray frame markers in the data": lambda data: data[:3000] + b"\xff\xc0" * 1000 + data[5000:],
    "cut short": lambda data: data[:5000],
    "cut inside a header": lambda data: data[:300] + b"\xff\xd9",
    "bytes after the end": lambda data: data + b"\x00\x00\xff\xd9",
    "two images glued": lambda data: data + data,
    "no start marker": lambda data: data[2:],
    "a scan before any frame": lambda data: b"\xff\xd8\xff\xda\x00\x02" + data[-100:],
    "a length past the end": lambda data: data[:2] + b"\xff\xe1\xff\xff" + data[-2:],
    "empty": lambda data: b"",
}


@pytest.mark.parametrize("broken", list(BROKEN.values()), ids=list(BROKEN))
def test_truncated_corrupt_and_glued_files_are_not(broken) -> None:
    assert sound_jpeg(good())
    assert not sound_jpeg(broken(good()))


def test_the_sample_photos_and_exif_rotated_jpegs_are_sound(tmp_path: Path) -> None:
    assert all(sound_jpeg(path.read_bytes()) for path in SAMPLES.glob("*.jpg"))
    assert sound_jpeg(photo_jpeg(tmp_path / "rotated.jpg", orientation=6).read_bytes())


def exif_orientation(value_type: int, packed: bytes) -> bytes:
    """A little-endian EXIF block with one Orientation entry of the given TIFF type (one value)."""
    import struct

    entry = struct.pack("<HHI", 0x0112, value_type, 1) + packed
    return b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1) + entry + struct.pack("<I", 0)


@pytest.mark.parametrize(("value_type", "packed"), [
    (3, (6).to_bytes(2, "little") + b"\x00\x00"),  # SHORT: the usual
    (11, __import__("struct").pack("<f", 6.0)),  # FLOAT
    (4, (6).to_bytes(4, "little")),  # LONG
], ids=["short", "float", "long"])
def test_the_orientation_is_read_as_pillow_applies_it(tmp_path: Path, value_type: int, packed: bytes) -> None:
    from PIL import ImageOps

    from backbone_inspect.jpeg_files import read_jpeg

    path = tmp_path / "turned.jpg"
    Image.new("RGB", (60, 40), (200, 30, 30)).save(path, "JPEG", exif=exif_orientation(value_type, packed))
    with Image.open(path) as image:
        upright = ImageOps.exif_transpose(image)
    assert upright.size == (40, 60)  # Pillow turns it: orientation 6
    read = read_jpeg(str(path))
    assert read is not None and read[1] == 6 and read[2] == 60 * 40


def test_only_jpegs_are_read_and_never_a_huge_file_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import backbone_inspect.jpeg_files as jpeg_files

    (tmp_path / "video.jpg").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(1000))
    assert jpeg_files.read_jpeg(str(tmp_path / "video.jpg")) is None
    photo = photo_jpeg(tmp_path / "photo.jpg")
    assert jpeg_files.read_jpeg(str(photo)) is not None
    monkeypatch.setattr(jpeg_files, "MAX_JPEG_BYTES", photo.stat().st_size - 1)
    assert jpeg_files.read_jpeg(str(photo)) is None  # Pillow decides


def test_a_frame_without_any_scan_is_not_sound() -> None:
    data = good()
    frame_at = data.index(b"\xff\xc0")
    length = int.from_bytes(data[frame_at + 2 : frame_at + 4], "big")
    assert not sound_jpeg(b"\xff\xd8" + data[frame_at : frame_at + 2 + length] + b"\xff\xd9")
