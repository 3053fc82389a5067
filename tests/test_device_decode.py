"""``--decode gpu``, run here with device cpu (decode_jpeg takes the same path to the same batch
structure), against the CPU path (Pillow, ``load_image_tensor``) as the reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from backbone_inspect.device_decode import JpegDataset, collate_encoded, finish_on_device, side_stream
from backbone_inspect.errors import ImageError
from backbone_inspect.images import DecodedBatch, Preprocessing, load_image_tensor

from conftest import noise_image, photo_jpeg

MEAN_LEVELS = 0.25
"""Most the mean absolute difference from Pillow's preprocessing may be, in uint8 levels: the
decoders agree exactly (both libjpeg-turbo here); Pillow resizes in fixed point, this path in
float32, rounded (measured: 0.17)."""
MAX_LEVELS = 1
"""Most any pixel may differ from Pillow's, in uint8 levels (measured: 1)."""


def on_device(paths: list[str], preprocessing: Preprocessing) -> DecodedBatch:
    """One batch through the workers' half and the device's half, as the local engine runs them."""
    dataset = JpegDataset(paths, preprocessing)
    return finish_on_device(collate_encoded([dataset[i] for i in range(len(paths))]), preprocessing, "cpu")


def by_position(batch: DecodedBatch) -> dict[int, torch.Tensor | str]:
    found: dict[int, torch.Tensor | str] = dict(batch.errors)
    for group in batch.groups:
        assert list(group.positions) == sorted(group.positions)
        found.update(zip(group.positions, group.pixels))
    return found


def reference(path: str, preprocessing: Preprocessing) -> torch.Tensor | str:
    try:
        return load_image_tensor(path, preprocessing)
    except ImageError as error:
        return str(error)


def assert_like_the_cpu_path(paths: list[str], preprocessing: Preprocessing, mean: float = MEAN_LEVELS,
                             largest: int = MAX_LEVELS) -> None:
    batch = on_device(paths, preprocessing)
    found = by_position(batch)
    assert batch.indices == tuple(range(len(paths))) and sorted(found) == list(range(len(paths)))
    for position, path in enumerate(paths):
        expected, actual = reference(path, preprocessing), found[position]
        if isinstance(expected, str):
            assert actual == expected
            continue
        assert not isinstance(actual, str), actual
        assert actual.dtype == torch.uint8 and actual.shape == expected.shape, path
        difference = (actual.int() - expected.int()).abs()
        assert difference.float().mean() <= mean and difference.max() <= largest, path


@pytest.mark.parametrize(("resize", "crop"), [(256, 224), (None, None), (256, None), (None, 224), (160, 128)])
def test_jpegs_come_out_as_pillow_preprocesses_them(tmp_path: Path, resize: int | None, crop: int | None) -> None:
    sizes = [(500, 375), (375, 500), (640, 480), (333, 257)]
    paths = [str(photo_jpeg(tmp_path / f"p{i}.jpg", sizes[i % 4], seed=i)) for i in range(8)]
    assert_like_the_cpu_path(paths, Preprocessing(resize=resize, crop=crop))


def test_bicubic_weights_are_honoured(tmp_path: Path) -> None:
    # Pillow's bicubic rounds to uint8 between its two passes; this path does not (measured: mean 0.18, max 6).
    paths = [str(photo_jpeg(tmp_path / f"p{i}.jpg", seed=i)) for i in range(3)]
    assert_like_the_cpu_path(paths, Preprocessing(interpolation="bicubic"), mean=0.25, largest=8)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_applied_as_pillow_does(tmp_path: Path, orientation: int) -> None:
    # No resize: the pixels must then be identical, so a wrong flip or turn cannot hide.
    paths = [str(photo_jpeg(tmp_path / "o.jpg", (120, 80), orientation=orientation)),
             str(photo_jpeg(tmp_path / "plain.jpg", (120, 80), seed=3))]
    preprocessing = Preprocessing(resize=None, crop=None)
    found = by_position(on_device(paths, preprocessing))
    assert torch.equal(found[0], load_image_tensor(paths[0], preprocessing))
    assert found[0].shape[1:] == ((80, 120) if orientation < 5 else (120, 80))
    assert torch.equal(found[1], load_image_tensor(paths[1], preprocessing))


def bad_and_other_files(root: Path) -> list[str]:
    """Good JPEGs between every kind of file nvJPEG must not, or cannot, decode."""
    root.mkdir()
    photo_jpeg(root / "good.jpg", seed=1)
    noise_image(root / "plain.png", (300, 260))
    photo_jpeg(root / "gray.jpg", seed=2, mode="L")
    photo_jpeg(root / "cmyk.jpg", seed=3, mode="CMYK")
    (root / "truncated.jpg").write_bytes((root / "good.jpg").read_bytes()[:5000])
    good = (root / "good.jpg").read_bytes()
    (root / "corrupt.jpg").write_bytes(good[:3000] + b"\xff\xc0" * 1000 + good[5000:])  # a sound header: for the device
    (root / "empty.jpg").write_bytes(b"")
    (root / "folder.jpg").mkdir()
    noise_image(root / "png.png", (280, 300)).rename(root / "png-named.jpg")
    photo_jpeg(root / "tiny.jpg", (100, 90), seed=4)
    photo_jpeg(root / "last.jpg", (375, 500), seed=5, orientation=6)
    names = ["good", "plain.png", "gray", "cmyk", "truncated", "corrupt", "empty", "folder", "png-named", "tiny", "last"]
    return [str(root / (name if "." in name else name + ".jpg")) for name in names]


def test_bad_files_are_errors_naming_them_and_the_batch_goes_on(tmp_path: Path) -> None:
    paths = bad_and_other_files(tmp_path / "mixed")
    assert_like_the_cpu_path(paths, Preprocessing())
    errors = on_device(paths, Preprocessing()).errors
    assert sorted(errors) == [4, 5, 6, 7]
    assert all(message.startswith(paths[position] + ": ") for position, message in errors.items())
    assert "truncated" in errors[4] and "empty file" in errors[6] and "a folder" in errors[7]


def test_only_clean_rgb_and_gray_jpegs_are_left_for_the_device(tmp_path: Path) -> None:
    paths = bad_and_other_files(tmp_path / "mixed")
    dataset = JpegDataset(paths, Preprocessing())
    batch = collate_encoded([dataset[i] for i in range(len(paths))])
    assert [jpeg.position for jpeg in batch.jpegs] == [0, 2, 9, 10]  # not corrupt.jpg: a stray marker in its data
    assert [jpeg.orientation for jpeg in batch.jpegs] == [1, 1, 1, 6]
    assert [jpeg.area for jpeg in batch.jpegs] == [500 * 375, 500 * 375, 100 * 90, 375 * 500]
    assert all(jpeg.path == paths[jpeg.position] for jpeg in batch.jpegs)
    assert all(bytes(jpeg.data.numpy()) == Path(jpeg.path).read_bytes() for jpeg in batch.jpegs)
    assert len({jpeg.data.untyped_storage().data_ptr() for jpeg in batch.jpegs}) == 1  # one block to share
    assert sorted(batch.decoded.errors) == [4, 5, 6, 7]
    assert [group.positions for group in batch.decoded.groups] == [(1, 3, 8)]


def test_sizes_are_grouped_in_batch_order_never_padded(tmp_path: Path) -> None:
    sizes = [(500, 375), (375, 500), (500, 375), (200, 100), (375, 500)]
    paths = [str(photo_jpeg(tmp_path / f"s{i}.jpg", size, seed=i)) for i, size in enumerate(sizes)]
    paths.insert(2, str(noise_image(tmp_path / "n.png", (500, 375))))
    batch = on_device(paths, Preprocessing(resize=256, crop=None))
    shapes = {group.positions: tuple(group.pixels.shape) for group in batch.groups}
    assert shapes == {(0, 2, 3): (3, 3, 256, 341), (1, 5): (2, 3, 341, 256), (4,): (1, 3, 256, 512)}
    assert_like_the_cpu_path(paths, Preprocessing(resize=256, crop=None))


@pytest.mark.parametrize(("size", "resize", "crop", "says"), [
    ((2000, 16), 1024, None, "over the 16.8 Mpixel limit"),
    ((100, 90), None, 224, "smaller than the 224 px crop"),
    ((300, 200), None, 250, "image is 200×300 (H×W), smaller than the 250 px crop"),
])
def test_sizes_it_refuses_are_the_same_errors(tmp_path: Path, size: tuple[int, int], resize: int | None,
                                              crop: int | None, says: str) -> None:
    paths = [str(photo_jpeg(tmp_path / "bad.jpg", size, seed=1)), str(photo_jpeg(tmp_path / "ok.jpg", (400, 400)))]
    preprocessing = Preprocessing(resize=resize, crop=crop)
    batch = on_device(paths, preprocessing)
    assert batch.errors == {0: reference(paths[0], preprocessing)} and says in batch.errors[0]
    assert [group.positions for group in batch.groups] == [(1,)]


def test_a_jpeg_the_decoder_rejects_falls_back_to_pillow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file nvJPEG fails on (one bad file fails the batched call) is decoded by Pillow; the rest by the device."""
    import torchvision.io

    paths = [str(photo_jpeg(tmp_path / f"p{i}.jpg", seed=i)) for i in range(3)]
    rejected = JpegDataset(paths, Preprocessing())[1].data
    real, calls = torchvision.io.decode_jpeg, []

    def rejecting(datas: list[torch.Tensor] | torch.Tensor, **options: object) -> list[torch.Tensor] | torch.Tensor:
        given = datas if isinstance(datas, list) else [datas]  # a file alone is decoded as one tensor
        calls.append(len(given))
        if any(torch.equal(data, rejected) for data in given):
            raise RuntimeError("nvjpegDecode failed")
        return real(datas, **options)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", rejecting)
    assert_like_the_cpu_path(paths, Preprocessing())
    assert calls == [3, 1, 1, 1]


def test_pillow_mode_checks_match_what_pillow_writes(tmp_path: Path) -> None:
    with Image.open(photo_jpeg(tmp_path / "c.jpg", mode="CMYK")) as opened:
        assert opened.mode == "CMYK"  # the CMYK case above is a real CMYK JPEG


def test_batches_finished_ahead_come_out_in_order() -> None:
    from backbone_inspect.device_decode import decoded_ahead

    finished: list[int] = []

    def finish(batch: int) -> int:
        finished.append(batch)
        return batch * 10

    taken = []
    for result in decoded_ahead(iter(range(5)), finish):  # type: ignore[arg-type]
        taken.append((result, len(finished)))
    assert [result for result, _ in taken] == [0, 10, 20, 30, 40]
    assert all(count >= index + 1 for index, (_, count) in enumerate(taken))
    assert list(decoded_ahead(iter([]), finish)) == []  # type: ignore[arg-type]


def test_a_batch_of_large_images_is_decoded_in_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import backbone_inspect.device_decode as device_decode
    from backbone_inspect.device_decode import EncodedJpeg, decode_parts

    jpegs = [EncodedJpeg(position, "", torch.empty(0), area=area) for position, area in enumerate([5, 5, 3, 12, 1, 9])]
    assert [[jpeg.position for jpeg in part] for part in decode_parts(jpegs, 10)] == [[0, 1], [2], [3], [4, 5]]
    assert decode_parts([], 10) == []
    monkeypatch.setattr(device_decode, "DECODE_AREA", 2 * 500 * 375)
    paths = [str(photo_jpeg(tmp_path / f"p{i}.jpg", seed=i)) for i in range(5)]
    assert_like_the_cpu_path(paths, Preprocessing())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG needs CUDA")
def test_on_cuda_nvjpeg_gives_pillows_shapes_and_errors_and_close_pixels(tmp_path: Path) -> None:
    # nvJPEG's IDCT and chroma upsampling are its own: only the mean is bounded here.
    paths = bad_and_other_files(tmp_path / "mixed")
    dataset = JpegDataset(paths, Preprocessing())
    batch = finish_on_device(collate_encoded([dataset[i] for i in range(len(paths))]), Preprocessing(), "cuda")
    assert all(group.pixels.is_cuda for group in batch.groups)
    found = by_position(batch)
    for position, path in enumerate(paths):
        expected = reference(path, Preprocessing())
        if isinstance(expected, str):
            assert found[position] == expected
        else:
            assert (found[position].cpu().float() - expected.float()).abs().mean() <= 2, path


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG needs CUDA")
@pytest.mark.parametrize("own_stream", [False, True])
def test_on_cuda_nvjpeg_never_writes_memory_that_queued_kernels_still_use(tmp_path: Path, own_stream: bool) -> None:
    # nvJPEG decodes on a stream that does not wait for the caller's. Blocks of its output's size
    # are freed on the host while a fill of them is still queued behind a sleep on the GPU: were
    # one handed to nvJPEG, the fill would land on the decoded image before its resize reads it.
    paths = [str(photo_jpeg(tmp_path / f"p{i}.jpg", seed=i)) for i in range(6)]
    dataset = JpegDataset(paths, Preprocessing())
    encoded = collate_encoded([dataset[i] for i in range(len(paths))])
    device = torch.device("cuda")
    quiet = by_position(finish_on_device(encoded, Preprocessing(), device))
    side = side_stream(device) if own_stream else None
    stuck = [torch.empty(3 * 375 * 500, dtype=torch.uint8, device=device) for _ in range(24)]
    torch.cuda._sleep(1_000_000_000)  # about 0.5 s of GPU time (cycles) before the fills run
    for block in stuck:
        block.fill_(77)
    del stuck, block
    busy = by_position(finish_on_device(encoded, Preprocessing(), device, side))
    torch.cuda.synchronize()
    for position, expected in quiet.items():
        assert (busy[position].int() - expected.int()).abs().max() <= 1, paths[position]


@pytest.mark.parametrize("preprocessing", [Preprocessing(), Preprocessing(resize=100, crop=None),
                                           Preprocessing(resize=64, crop=64, interpolation="bicubic")])
def test_images_of_one_size_are_preprocessed_together_as_they_are_one_by_one(
    preprocessing: Preprocessing, monkeypatch: pytest.MonkeyPatch
) -> None:
    import backbone_inspect.device_transforms as device_transforms
    from backbone_inspect.device_transforms import preprocess_on_device, preprocess_same_size

    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 375, 500), dtype=torch.uint8, generator=generator) for _ in range(5)]
    one_by_one = [preprocess_on_device(image, preprocessing) for image in images]
    monkeypatch.setattr(device_transforms, "RESIZE_PIXELS", 2 * 375 * 500)  # slices of two, and one left
    for together in (preprocess_same_size(images, preprocessing), device_transforms.preprocess_same_size(images[:1], preprocessing)):
        assert all(torch.equal(a, b) for a, b in zip(together, one_by_one))
    assert len(preprocess_same_size(images, preprocessing)) == 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG needs CUDA")
def test_on_cuda_a_shrink_too_steep_for_the_gpu_is_resized_on_the_cpu_from_nvjpegs_pixels(tmp_path: Path) -> None:
    from torchvision.io import decode_jpeg

    from backbone_inspect.device_transforms import preprocess_on_device

    paths = [str(photo_jpeg(tmp_path / f"big{i}.jpg", size=(2000, 1500), seed=i)) for i in range(2)]
    paths.append(str(photo_jpeg(tmp_path / "small.jpg", seed=5)))  # 375 px high: the device's own resize
    preprocessing = Preprocessing(resize=12, crop=None)  # 125x from the large photos: past CUDA's kernel
    dataset = JpegDataset(paths, preprocessing)
    device = torch.device("cuda")
    batch = by_position(finish_on_device(collate_encoded([dataset[i] for i in range(3)]), preprocessing, device,
                                         side_stream(device)))
    torch.cuda.synchronize()
    for position, path in enumerate(paths):
        decoded = decode_jpeg(torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8), device=device)
        expected = preprocess_on_device(decoded.cpu(), preprocessing)  # nvJPEG's pixels, resized on the CPU
        assert batch[position].is_cuda and batch[position].shape == expected.shape
        if position < 2:
            assert torch.equal(batch[position].cpu(), expected), path
        else:
            assert (batch[position].cpu().int() - expected.int()).abs().max() <= 1, path
