"""32-bit images: float in 0..1 and integers in 0..65535 are read; other values are the file's error, never a guess."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backbone_inspect.errors import ImageError
from backbone_inspect.images import load_rgb

from conftest import SAMPLES, SMALL, invoke


def gray_gradient() -> np.ndarray:
    return (np.arange(40 * 30).reshape(30, 40) % 256).astype(np.uint8)


def test_a_float_tiff_in_zero_to_one_equals_its_eight_bit_twin(tmp_path: Path) -> None:
    eight = gray_gradient()
    Image.fromarray(eight.astype(np.float32) / 255, "F").save(tmp_path / "float.tiff")
    with Image.open(tmp_path / "float.tiff") as opened:
        assert opened.mode == "F"
        assert np.asarray(opened.convert("RGB")).max() <= 1, "the plain conversion this guards against is black"
    decoded = np.asarray(load_rgb(tmp_path / "float.tiff"))
    assert decoded.shape == (30, 40, 3) and all(np.array_equal(decoded[..., c], eight) for c in range(3))


@pytest.mark.parametrize(("values", "reason"), [
    (lambda g: g * 255.0, "32-bit float image with values from 0 to 255: only 0..1 is read (as 0..255); "
                          "save it as 8- or 16-bit, or scaled to 0..1"),
    (lambda g: g - 0.5, "32-bit float image with values from -0.5 to 0.5: only 0..1 is read (as 0..255); "
                        "save it as 8- or 16-bit, or scaled to 0..1"),
    (lambda g: np.where(g > 0.5, math.nan, g), "32-bit float image with NaN or infinite values: save it as 8- or 16-bit"),
    (lambda g: np.where(g > 0.5, math.inf, g), "32-bit float image with NaN or infinite values: save it as 8- or 16-bit"),
], ids=["0..255", "negative", "nan", "inf"])
def test_a_float_tiff_out_of_zero_to_one_is_that_files_error(tmp_path: Path, values, reason: str) -> None:
    ramp = np.linspace(0, 1, 40 * 30, dtype=np.float32).reshape(30, 40)
    Image.fromarray(values(ramp).astype(np.float32), "F").save(tmp_path / "float.tiff")
    with pytest.raises(ImageError) as raised:
        load_rgb(tmp_path / "float.tiff")
    assert str(raised.value) == f"{tmp_path / 'float.tiff'}: {reason}"


def test_a_thirty_two_bit_integer_tiff_past_sixteen_bits_is_that_files_error(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0, 70000]], dtype=np.int32), "I").save(tmp_path / "wide.tiff")
    with pytest.raises(ImageError) as raised:
        load_rgb(tmp_path / "wide.tiff")
    assert str(raised.value) == (f"{tmp_path / 'wide.tiff'}: 32-bit integer image with values from 0 to 70000: "
                                 "only 0..65535 is read (16-bit, as 0..255); save it as 8- or 16-bit")


def test_the_cli_reads_a_float_tiff_and_names_one_it_will_not_guess_at(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    ramp = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    Image.fromarray(ramp, "F").save(folder / "a_unit.tiff")
    Image.fromarray(ramp * 255, "F").save(folder / "b_bytes.tiff")
    Image.open(SAMPLES / "chelsea.jpg").save(folder / "c_cat.png")
    result = invoke(folder, "--json", *SMALL)
    assert result.exit_code == 1
    assert result.stderr.splitlines()[0] == (f"Error: {folder / 'b_bytes.tiff'}: 32-bit float image with values from 0 "
                                             "to 255: only 0..1 is read (as 0..255); save it as 8- or 16-bit, or scaled to 0..1")
    assert [line.split('"image": ')[1].split(",")[0] for line in result.stdout.splitlines()] == [
        f'"{folder / "a_unit.tiff"}"', f'"{folder / "c_cat.png"}"']
