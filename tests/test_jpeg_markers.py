"""Which JPEGs ``--decode gpu`` sends to the device: every kind Pillow writes and decodes is sound;
truncated, corrupt, glued or trailing bytes are not (Pillow then decides, as with --decode cpu)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from backbone_inspect.jpeg_markers import sound_jpeg
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
