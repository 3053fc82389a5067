"""On a CUDA machine: the GPU gives the CPU's numbers at each dtype's precision, float32 is float32,
one-off shapes are not autotuned, batches arrive pinned, and torchrun's LOCAL_RANK picks the GPU.

Skipped where CUDA is absent (the CPU-side logic of the same features is in test_precision.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.models.feature_extraction import create_feature_extractor

from backbone_inspect import dump_features, open_features
from backbone_inspect.config import feature_config
from backbone_inspect.device import resolve_device, warm_up_cuda
from backbone_inspect.device_transforms import cuda_resizes, preprocess_on_device, shared_memory_per_block
from backbone_inspect.engine import RunCallbacks
from backbone_inspect.extractor import Extractor
from backbone_inspect.inputs import plan_inputs
from backbone_inspect.local_engine import LocalEngine, decoded_batches
from backbone_inspect.signals import StopRequest
from backbone_inspect.images import Preprocessing, load_image_tensor
from conftest import (SAMPLES, SMALL_OPTIONS, assert_close_scaled, imagenet_normalised, many_images, photo_jpeg, precision_state,
                      seeded_model)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TOLERANCE = {"float32": 1e-5, "tf32": 5e-3, "float16": 1e-2, "bfloat16": 5e-2}
"""Relative error allowed against a float64 reference at layer4 (measured on an H200: float32 with
TF32 off 2.6e-6, TF32 1.2e-3, float16 1.4e-3, bfloat16 1.1e-2)."""

AUTOTUNED_FLOAT32 = 5e-5
"""Between two float32 runs of which one repeats a batch shape: cuDNN's benchmark search may then
pick FFT or Winograd kernels, exact to about 1e-5, not 1e-6; TF32 would still be 20x over it."""


def float64_reference(pixels: torch.Tensor, arch: str, stages: list[str]) -> dict[str, torch.Tensor]:
    """torchvision's own model in float64 on the CPU, fed the same normalised pixels."""
    x = imagenet_normalised(pixels, torch.float64)
    with torch.no_grad():
        return create_feature_extractor(seeded_model(arch).double(), {s: s for s in stages})(x)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual = actual.to("cpu", torch.float64)
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_cuda_matches_a_float64_reference_at_each_dtypes_precision(dtype: str) -> None:
    pixels = load_image_tensor(SAMPLES / "chelsea.jpg", Preprocessing()).expand(2, -1, -1, -1).clone()
    pixels[1] = torch.randint(0, 256, pixels[1].shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    expected = float64_reference(pixels, "resnet50", ["layer2", "layer4"])
    on_gpu = Extractor(feature_config(arch="resnet50", layers=(2, 4), dtype=dtype), device="cuda").forward(pixels)
    on_cpu = Extractor(feature_config(arch="resnet50", layers=(2, 4)), device="cpu").forward(pixels)
    for name in expected:
        assert on_gpu[name].dtype == {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype, torch.float32)
        assert relative_error(on_gpu[name], expected[name]) <= TOLERANCE[dtype], name
        assert relative_error(on_cpu[name], expected[name]) <= TOLERANCE["float32"], name
    if dtype == "tf32" and torch.cuda.get_device_capability() >= (8, 0):
        assert relative_error(on_gpu["layer4"], expected["layer4"]) > TOLERANCE["float32"], "TF32 was not on"


def test_float32_runs_without_tf32_and_autotunes_only_a_repeated_shape() -> None:
    extractor = Extractor(feature_config(**{**SMALL_OPTIONS, "device": "cuda"}, layers=(1,)), device="cuda")
    seen: list[tuple[object, ...]] = []
    extractor.backbone.conv1.register_forward_hook(lambda *_: seen.append(precision_state()))
    users = precision_state()
    batch = torch.zeros(2, 3, 64, 64, dtype=torch.uint8)
    for pixels in (batch, batch, batch[:1], batch):
        extractor.forward(pixels)
    assert [(matmul, conv, autotune) for matmul, conv, _, autotune in seen] == [
        ("ieee", "ieee", False), ("ieee", "ieee", True), ("ieee", "ieee", False), ("ieee", "ieee", True)]
    assert precision_state() == users


@pytest.mark.parametrize(("output_format", "pool"), [("pt", "none"), ("shards", "none"), ("shards", "avg")])
def test_a_dump_on_cuda_reads_back_like_the_same_dump_on_the_cpu(tmp_path: Path, output_format: str, pool: str) -> None:
    images = many_images(tmp_path / "images", 20)
    options = {**SMALL_OPTIONS, "layers": (2, 4), "format": output_format, "pool": pool, "batch_size": 8, "workers": 1}
    on_cpu = dump_features(images, tmp_path / "cpu", **options)
    on_gpu = dump_features(images, tmp_path / "gpu", **{**options, "device": "cuda"})
    assert (on_cpu.processed, on_gpu.processed, on_gpu.failed) == (20, 20, 0)
    cpu, gpu = open_features(tmp_path / "cpu"), open_features(tmp_path / "gpu")
    assert [entry.image for entry in gpu.images] == [entry.image for entry in cpu.images]
    for index in range(len(cpu)):
        for name, expected in cpu[index][0].items():
            assert_close_scaled(gpu[index][0][name], expected, rtol=AUTOTUNED_FLOAT32)


def test_batches_for_a_gpu_arrive_in_pinned_memory(tmp_path: Path) -> None:
    images = plan_inputs([many_images(tmp_path, 6)]).selected
    extractor = Extractor(feature_config(**{**SMALL_OPTIONS, "device": "cuda"}), device="cuda", keep_features=False)
    batches = list(decoded_batches(images, extractor, batch_size=4, workers=1))
    assert [len(found) for found, _ in batches] == [4, 2]
    assert all(group.pixels.is_pinned() for _, batch in batches for group in batch.groups)


@pytest.mark.parametrize("local_rank", [0, 1, 2])
def test_torchruns_local_rank_picks_the_gpu(local_rank: int) -> None:
    for spec in ("auto", "cuda"):
        assert resolve_device(spec, local_rank=local_rank) == torch.device("cuda", local_rank % torch.cuda.device_count())
        assert resolve_device(spec) == torch.device("cuda")
    assert resolve_device("cuda:0", local_rank=local_rank) == torch.device("cuda", 0)


def test_the_warm_up_starts_cuda_without_touching_the_precision_flags() -> None:
    users = precision_state()
    thread = warm_up_cuda(torch.device("cuda"), torch.float16)
    assert thread is not None
    thread.join(timeout=120)
    assert not thread.is_alive() and torch.cuda.is_initialized()
    assert precision_state() == users


def test_a_long_dump_on_cuda_overlaps_batches_and_reads_back_like_one_batch_at_a_time(tmp_path: Path) -> None:
    images = plan_inputs([many_images(tmp_path / "images", 24)]).selected
    config = feature_config(**{**SMALL_OPTIONS, "device": "cuda"}, layers=(1, 4))
    kept: dict[bool, dict[str, dict[str, torch.Tensor]]] = {}
    for overlap in (True, False):
        seen: dict[str, dict[str, torch.Tensor]] = {}
        callbacks = RunCallbacks(on_outcome=lambda outcome, result: seen.update({outcome.image: dict(result.features)}),
                                 keep_features=True)
        summary = LocalEngine(batch_size=5, workers=1, overlap=overlap).run(config, images, None, callbacks=callbacks, stop=StopRequest())
        assert summary.processed == 24
        kept[overlap] = seen
    assert list(kept[True]) == list(kept[False]) == [image.path for image in images]
    for path, features in kept[False].items():
        for name, expected in features.items():
            assert_close_scaled(kept[True][path][name], expected, rtol=AUTOTUNED_FLOAT32)


def test_pixels_decoded_on_the_gpu_reach_the_results_whole(tmp_path: Path) -> None:
    for index in range(3):
        photo_jpeg(tmp_path / f"photo{index}.jpg", seed=index)
    config = feature_config(**{**SMALL_OPTIONS, "device": "cuda"}, layers=(1,), decode="gpu")
    extractor = Extractor(config, device="cuda", keep_pixels=True)
    images = plan_inputs([tmp_path]).selected
    [(found, batch)] = list(decoded_batches(images, extractor, batch_size=4, workers=0))
    for group in batch.groups:
        assert group.pixels.device.type == "cuda"
        results = extractor.launch_group([found[position].path for position in group.positions], group).results()
        assert all(torch.equal(result.pixels, group.pixels[row].cpu()) for row, result in enumerate(results))


SHARED = shared_memory_per_block(torch.device("cuda")) if torch.cuda.is_available() else 0


def steepest_taken(interpolation: str, output: tuple[int, int], grow: int) -> int:
    """The largest ``n`` for which ``cuda_resizes`` takes the shrink of output + n × grow (per axis) to ``output``."""
    n = 0
    while cuda_resizes(tuple(o + (n + 1) * g for o, g in zip(output, grow)), output, interpolation, SHARED):
        n += 1
    return n


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("grow", [(10, 10), (0, 10), (10, 0)])
def test_cuda_resizes_says_which_shrinks_torchs_cuda_kernel_takes(interpolation: str, grow: tuple[int, int]) -> None:
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    output = (10, 10)
    edge = steepest_taken(interpolation, output, grow)
    seen = set()
    for n in range(edge - 2, edge + 3):
        source = tuple(o + n * g for o, g in zip(output, grow))
        try:
            F.resize(torch.zeros(1, 3, *source, device="cuda"), list(output), interpolation=InterpolationMode(interpolation),
                     antialias=True)
            taken = True
        except RuntimeError as error:
            assert "shared memory" in str(error), error
            taken = False
        assert cuda_resizes(source, output, interpolation, SHARED) == taken, source
        seen.add(taken)
    assert seen == {True, False}


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_a_shrink_too_steep_for_cuda_is_resized_on_the_cpu_with_the_same_pixels(interpolation: str) -> None:
    image = torch.randint(0, 256, (3, 1500, 2000), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    preprocessing = Preprocessing(resize=12, crop=None, interpolation=interpolation)
    assert not cuda_resizes((1500, 2000), (12, 16), interpolation)
    on_gpu = preprocess_on_device(image.cuda(), preprocessing)
    assert on_gpu.device.type == "cuda" and on_gpu.shape == (3, 12, 16)
    assert torch.equal(on_gpu.cpu(), preprocess_on_device(image, preprocessing))
