from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms._presets import ImageClassification
from torchvision.transforms.functional import pil_to_tensor

from backbone_inspect.errors import ImageError
from backbone_inspect.colour_modes import ALPHA_BACKGROUND
from backbone_inspect.images import Preprocessing, load_image_tensor, load_rgb, preprocess

from conftest import SAMPLES


def gradient_rgb(width: int = 40, height: int = 30) -> Image.Image:
    image = Image.new("RGB", (width, height))
    image.putdata([(x * 255 // width, y * 255 // height, (x + y) % 256) for y in range(height) for x in range(width)])
    return image


def pixels(image: Image.Image) -> torch.Tensor:
    return pil_to_tensor(image).to(torch.int32)


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp", ".bmp", ".tiff", ".gif"])
def test_every_format_decodes_to_rgb(tmp_path: Path, suffix: str) -> None:
    source = gradient_rgb()
    path = tmp_path / f"image{suffix}"
    source.save(path)
    decoded = load_rgb(path)
    assert decoded.mode == "RGB" and decoded.size == source.size
    lossy_tolerance = {".jpg": 10, ".webp": 10, ".gif": 15}
    if suffix in lossy_tolerance:
        assert (pixels(decoded) - pixels(source)).abs().float().mean() <= lossy_tolerance[suffix]
    else:
        assert torch.equal(pixels(decoded), pixels(source))


def test_gif_gives_its_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), color) for color in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "animated.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    with Image.open(path) as opened:
        assert opened.n_frames == 2
    assert load_rgb(path).getpixel((4, 4)) == (255, 0, 0)


def test_sixteen_bit_png_equals_its_eight_bit_twin(tmp_path: Path) -> None:
    eight = gradient_rgb().convert("L")
    sixteen = Image.new("I;16", eight.size)
    sixteen.putdata([value * 257 for value in eight.tobytes()])
    sixteen.save(tmp_path / "sixteen.png")
    eight.save(tmp_path / "eight.png")
    with Image.open(tmp_path / "sixteen.png") as opened:
        assert opened.mode.startswith("I")
        naive = opened.convert("RGB")
    assert torch.equal(pixels(load_rgb(tmp_path / "sixteen.png")), pixels(load_rgb(tmp_path / "eight.png")))
    assert pixels(naive).float().mean() > pixels(eight.convert("RGB")).float().mean() + 50, (
        "the plain conversion this guards against really does wash the picture out"
    )


def test_thirty_two_bit_integer_mode_is_treated_as_sixteen_bit(tmp_path: Path) -> None:
    eight = gradient_rgb().convert("L")
    wide = eight.convert("I").point(lambda value: value * 257)
    wide.save(tmp_path / "wide.tiff")
    assert torch.equal(pixels(load_rgb(tmp_path / "wide.tiff")), pixels(eight.convert("RGB")))


def test_grayscale_becomes_three_equal_channels() -> None:
    decoded = load_rgb(SAMPLES / "camera.png")
    with Image.open(SAMPLES / "camera.png") as opened:
        assert opened.mode == "L"
        gray = pixels(opened)
    rgb = pixels(decoded)
    assert rgb.shape[0] == 3 and all(torch.equal(rgb[c : c + 1], gray) for c in range(3))


def half_transparent(mode: str) -> Image.Image:
    """Opaque black on the left half, fully transparent (with a yellow colour underneath) on the right."""
    if mode == "P":
        image = Image.new("P", (10, 10), 1)
        image.putpalette([255, 255, 0, 0, 0, 0])
        image.paste(0, (5, 0, 10, 10))
        image.info["transparency"] = 0
        return image
    image = Image.new("RGBA", (10, 10), (0, 0, 0, 255))
    image.paste((255, 255, 0, 0), (5, 0, 10, 10))
    return image.convert(mode)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_composited_onto_the_documented_background(tmp_path: Path, mode: str) -> None:
    path = tmp_path / f"{mode}.png"
    image = half_transparent(mode)
    image.save(path, **({"transparency": 0} if mode == "P" else {}))
    with Image.open(path) as opened:
        assert opened.mode == mode
        assert opened.convert("RGB").getpixel((7, 5)) != ALPHA_BACKGROUND, "a plain conversion ignores alpha"
    decoded = load_rgb(path)
    assert decoded.getpixel((2, 5)) == (0, 0, 0)
    assert decoded.getpixel((7, 5)) == ALPHA_BACKGROUND


def test_cmyk_jpeg_and_tiff_give_the_right_colours(tmp_path: Path) -> None:
    source = Image.new("RGB", (16, 16), (200, 30, 60))
    for suffix in (".jpg", ".tiff"):
        path = tmp_path / f"cmyk{suffix}"
        source.convert("CMYK").save(path)
        with Image.open(path) as opened:
            assert opened.mode == "CMYK"
        red, green, blue = load_rgb(path).getpixel((8, 8))
        assert abs(red - 200) <= 8 and abs(green - 30) <= 8 and abs(blue - 60) <= 8


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    upright = Image.new("RGB", (20, 10), (0, 0, 0))
    upright.paste((255, 255, 255), (0, 0, 10, 10))  # white on the left
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # 10x20 as a camera would store it
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif, quality=95)
    decoded = load_rgb(path)
    expected = stored.transpose(Image.Transpose.ROTATE_270)
    assert decoded.size == expected.size == (20, 10)
    assert (pixels(decoded) - pixels(expected)).abs().float().mean() < 3


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty file"),
        (b"this is a text file, not an image\n", "not an image"),
        (None, "cannot decode"),  # truncated JPEG
    ],
)
def test_bad_files_raise_an_image_error_naming_the_file(tmp_path: Path, content: bytes | None, reason: str) -> None:
    path = tmp_path / "bad.jpg"
    if content is None:
        buffer = io.BytesIO()
        gradient_rgb(200, 200).save(buffer, format="JPEG")
        content = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    path.write_bytes(content)
    with pytest.raises(ImageError, match=reason) as caught:
        load_rgb(path)
    assert str(path) in str(caught.value)


def test_decompression_bombs_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "huge.png"
    Image.new("L", (300, 300)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 300 - 1)  # the warning zone, below 2x the limit
    with pytest.raises(ImageError, match="too large"):
        load_rgb(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)  # the error zone
    with pytest.raises(ImageError, match="too large"):
        load_rgb(path)


@pytest.mark.parametrize(("resize", "crop"), [(256, 224), (232, 224), (64, 48)])
def test_preprocessing_equals_torchvisions_classification_preset(resize: int, crop: int) -> None:
    image = load_rgb(SAMPLES / "chelsea.jpg")
    mine = preprocess(image, Preprocessing(resize=resize, crop=crop))
    reference = ImageClassification(crop_size=crop, resize_size=resize)(image)
    assert mine.dtype == torch.uint8 and mine.shape == (3, crop, crop)
    normalised = (mine.float() / 255 - torch.tensor(Preprocessing().mean).view(3, 1, 1)) / torch.tensor(
        Preprocessing().std
    ).view(3, 1, 1)
    torch.testing.assert_close(normalised, reference, rtol=0, atol=1e-5)


def test_native_resolution_keeps_the_image_size() -> None:
    tensor = load_image_tensor(SAMPLES / "chelsea.jpg", Preprocessing(resize=None, crop=None))
    assert tensor.shape == (3, 300, 451)


def test_resize_without_crop_keeps_the_aspect_ratio() -> None:
    tensor = load_image_tensor(SAMPLES / "chelsea.jpg", Preprocessing(resize=100, crop=None))
    assert tensor.shape == (3, 100, 150)


def test_crop_larger_than_the_image_is_an_error_not_padding(tmp_path: Path) -> None:
    path = tmp_path / "small.png"
    gradient_rgb(40, 30).save(path)
    with pytest.raises(ImageError, match=r"small.png: image is 30×40 \(H×W\), smaller than the 64 px crop"):
        load_image_tensor(path, Preprocessing(resize=None, crop=64))


def test_pillows_warnings_about_a_file_name_it(tmp_path: Path) -> None:
    import struct
    import warnings

    from PIL import ImageOps

    from conftest import SMALL, invoke

    # An EXIF block whose description tag points past its end: Pillow warns, and decodes the image.
    ifd = struct.pack("<H", 2) + struct.pack("<HHII", 0x0112, 3, 1, 6) + struct.pack("<HHII", 0x010E, 2, 400, 200)
    path = tmp_path / "odd exif.jpg"
    Image.new("RGB", (40, 30), (200, 100, 50)).save(path, exif=b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + ifd + b"\x00" * 4)
    with warnings.catch_warnings(record=True) as caught, Image.open(path) as opened:
        warnings.simplefilter("always")
        ImageOps.exif_transpose(opened)
    said = {str(warning.message) for warning in caught}
    assert said, "Pillow no longer warns about this file"
    result = invoke(path, *SMALL)
    assert result.exit_code == 0
    assert [line for line in result.stderr.splitlines() if line.startswith("Warning:")] == [f"Warning: {path}: {message}" for message in said]


def test_decoding_in_several_threads_leaves_the_processs_warnings_as_they_were(tmp_path: Path) -> None:
    import struct
    import threading
    import warnings

    ifd = struct.pack("<H", 1) + struct.pack("<HHII", 0x010E, 2, 400, 200)  # a tag past the block's end: Pillow warns
    warns = tmp_path / "warns.jpg"
    Image.new("RGB", (40, 30)).save(warns, exif=b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + ifd + b"\x00" * 4)
    with warnings.catch_warnings(record=True) as caught:  # around the threads' whole life: nothing interleaves with it
        warnings.simplefilter("always")
        filters, show = list(warnings.filters), warnings.showwarning
        threads = [threading.Thread(target=lambda: [load_rgb(warns) for _ in range(150)]) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert warnings.filters == filters and warnings.showwarning is show
    assert len(caught) == 450 and all(str(warning.message).startswith(f"{warns}: ") for warning in caught)
