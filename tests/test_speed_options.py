"""The speed options change how the numbers are computed, never what they are (beyond dtype noise)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from torchvision.models.feature_extraction import create_feature_extractor

from backbone_inspect.images import LoadedImage, collate_batch
from backbone_inspect.config import feature_config
from backbone_inspect.extractor import Extractor
from backbone_inspect.stats import batch_stage_stats, stage_stats

from conftest import SMALL, SMALL_OPTIONS, assert_close_scaled, imagenet_normalised, invoke, many_images, seeded_model


def extractor_on_cpu(**options) -> Extractor:
    return Extractor(feature_config(**options), device="cpu")


def pixels(count: int = 3, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def reference(x_uint8: torch.Tensor, stages: list[str]) -> dict[str, torch.Tensor]:
    x = imagenet_normalised(x_uint8)
    with torch.no_grad():
        return create_feature_extractor(seeded_model("resnet18"), {s: s for s in stages})(x)


@pytest.mark.parametrize("channels_last", [True, False])
def test_memory_format_does_not_change_the_features(channels_last: bool) -> None:
    x = pixels()
    extractor = extractor_on_cpu(arch="resnet18", layers=(1, 4), channels_last=channels_last)
    assert extractor.channels_last is channels_last
    features = extractor.forward(x)
    assert features["layer1"].is_contiguous(memory_format=torch.channels_last) is channels_last
    expected = reference(x, ["layer1", "layer4"])
    for name in expected:
        assert_close_scaled(features[name], expected[name])


def test_channels_last_is_the_default_on_cpu() -> None:
    assert extractor_on_cpu(arch="resnet18", layers=(1,)).channels_last


def test_bfloat16_compute_is_close_to_float32_and_stats_stay_float32() -> None:
    x = pixels()
    extractor = extractor_on_cpu(arch="resnet18", layers=(2, 4), dtype="bfloat16")
    features = extractor.forward(x)
    assert all(f.dtype == torch.bfloat16 for f in features.values())
    expected = reference(x, ["layer2", "layer4"])
    for name in expected:
        error = (features[name].float() - expected[name]).norm() / expected[name].norm()
        assert error < 0.05, (name, error.item())
    results = extractor.extract([(f"img{i}", x[i]) for i in range(3)])
    assert results[0].stats[0].dtype == "bfloat16"
    exact = stage_stats("layer2", features["layer2"][0].float(), (64, 64))
    assert results[0].stats[0].mean == pytest.approx(exact.mean, rel=1e-6)


@pytest.fixture(autouse=True)
def _denormals_as_they_were():
    """torch 2.4's inductor loads C++ built with -ffast-math, which turns flush-to-zero on for the
    whole process: the tests run after these in it (numpy then warns on Ray's import) must not see it."""
    yield
    torch.set_flush_denormal(False)


@pytest.mark.skipif(not any(shutil.which(name) for name in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")),
                    reason="torch.compile on the CPU builds C++: no compiler here")
def test_compiled_extractor_keeps_the_replay_and_its_numbers() -> None:
    x = pixels(2)
    compiled = extractor_on_cpu(arch="resnet18", layers=(1, 3), compile=True)
    assert compiled.backbone.run_order == ("stem", "layer1", "layer2", "layer3")
    features = compiled.forward(x)
    expected = reference(x, ["layer1", "layer3"])
    assert list(features) == ["layer1", "layer3"]
    for name in expected:
        assert_close_scaled(features[name], expected[name])


def test_batched_statistics_equal_per_image_statistics() -> None:
    features = torch.relu(torch.randn(4, 8, 5, 6))
    features[2] = 0  # an all-zero map: std 0, zeros 100%
    batched = batch_stage_stats("layer3", features.contiguous(memory_format=torch.channels_last), (80, 96))
    for row, stats in enumerate(batched):
        one = features[row]
        assert stats.shape == (8, 5, 6) and stats.stride == (16.0, 16.0)
        assert stats.mean == pytest.approx(one.mean().item(), rel=1e-6, abs=1e-9)
        assert stats.std == pytest.approx(one.std().item(), rel=1e-5, abs=1e-9)
        assert (stats.min, stats.max) == (one.min().item(), one.max().item())
        assert stats.zeros == (one == 0).sum().item() / one.numel()


def test_batches_are_stacked_by_size_in_the_worker() -> None:
    items = [
        LoadedImage(10, torch.zeros(3, 8, 8, dtype=torch.uint8)),
        LoadedImage(11, None, "bad.jpg: empty file"),
        LoadedImage(12, torch.ones(3, 8, 6, dtype=torch.uint8)),
        LoadedImage(13, torch.full((3, 8, 8), 2, dtype=torch.uint8)),
    ]
    batch = collate_batch(items)
    assert batch.indices == (10, 11, 12, 13) and batch.errors == {1: "bad.jpg: empty file"}
    assert [(g.positions, tuple(g.pixels.shape)) for g in batch.groups] == [((0, 3), (2, 3, 8, 8)), ((2,), (1, 3, 8, 6))]
    assert torch.equal(batch.groups[0].pixels[1], items[3].pixels)


@pytest.mark.cuda_by_default
@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning memory needs CUDA")
def test_decoded_batches_can_be_pinned() -> None:
    batch = collate_batch([LoadedImage(0, torch.zeros(3, 8, 8, dtype=torch.uint8))])
    assert batch.pin_memory().groups[0].pixels.is_pinned()


def test_cli_dtype_options_and_saved_dtype_are_independent(tmp_path: Path, chelsea: Path) -> None:
    result = invoke(chelsea, "--dtype", "bfloat16", "--save", tmp_path, "--json", "--no-channels-last", *SMALL)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert {stats["dtype"] for stats in record["layers"].values()} == {"bfloat16"}
    saved = torch.load(tmp_path / "chelsea.pt", weights_only=True)["features"]
    assert {t.dtype for t in saved.values()} == {torch.float32}
    bad = invoke(chelsea, "--dtype", "float8", *SMALL)
    assert bad.exit_code == 2 and bad.stderr == "Error: invalid --dtype 'float8': expected float32, tf32, float16, bfloat16\n"


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize(
    "sizes",
    [
        {"stem": 1, "layer1": 1, "layer2": 2, "layer3": 4, "layer4": 8},  # deeper stages, bigger slices
        {"stem": 2, "layer1": 3, "layer2": 3, "layer3": 1, "layer4": 5},  # uneven, shrinking, not dividing 5
        {"stem": 8, "layer1": 8, "layer2": 8, "layer3": 8, "layer4": 8},  # one slice: the plain replay
    ],
)
def test_forward_in_chunks_gives_the_models_own_features(arch: str, sizes: dict[str, int]) -> None:
    from backbone_inspect import Backbone

    stages = ["layer1", "layer2", "layer4"]
    model = seeded_model(arch)
    x = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = create_feature_extractor(model, {s: s for s in stages})(x)
        got = Backbone(arch, stages, model=model).eval().forward_in_chunks(x, sizes)
    assert list(got) == stages
    for stage in stages:
        assert_close_scaled(got[stage], expected[stage])


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize(("dtype", "cache_mib"), [(torch.float32, 32), (torch.bfloat16, 32), (torch.float32, 4)])
def test_cache_chunk_sizes_are_the_largest_slices_whose_activations_fit(arch: str, dtype: torch.dtype, cache_mib: int) -> None:
    from backbone_inspect import Backbone
    from backbone_inspect.device import cache_chunk_sizes

    import torchvision

    with torch.device("meta"):
        model = torchvision.models.get_model(arch).eval().to(dtype)
    backbone = Backbone(arch, "4", model=model)
    cache = cache_mib * 1024 * 1024
    sizes = cache_chunk_sizes(backbone, 224, 224, element_size=torch.empty((), dtype=dtype).element_size(), cache_bytes=cache)
    # The largest tensor of each stage, per image, from a real forward on the meta device.
    with torch.device("meta"):
        x = torch.empty(1, 3, 224, 224, dtype=dtype)
        largest = {"stem": model.conv1(x)}
        h = model.maxpool(model.relu(model.bn1(largest["stem"])))
        for name in ("layer1", "layer2", "layer3", "layer4"):
            h = largest[name] = getattr(model, name)(h)
    for name, tensor in largest.items():
        per_image = tensor.numel() * tensor.element_size()
        size = sizes[name]
        assert size & (size - 1) == 0, "a power of two"
        assert size == 1 or size * per_image <= cache * 3 // 4
        assert 2 * size * per_image > cache * 3 // 4


def test_extractor_runs_cache_sized_slices_on_cpu_and_whole_batches_when_compiled() -> None:
    extractor = extractor_on_cpu(arch="resnet18", layers=(1, 4))
    assert extractor._cache_bytes is not None and extractor._cache_bytes > 0
    x = pixels(count=6)
    got, expected = extractor.forward(x), reference(x, ["layer1", "layer4"])
    assert list(got) == list(expected)
    for name in expected:
        assert_close_scaled(got[name], expected[name])
    sizes = extractor._chunk_sizes(torch.empty(6, 3, 64, 64))
    assert set(sizes) == {"stem", "layer1", "layer2", "layer3", "layer4"} and max(sizes.values()) <= 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_fast_zero_count_equals_count_nonzero(dtype: torch.dtype) -> None:
    from backbone_inspect.stats import _count_nonzero

    values = torch.randn(4, 8, 9, 7, generator=torch.Generator().manual_seed(2)).relu().to(dtype)
    values[1] = 0
    values[2, :, 0] = -0.0
    channels_last = values.contiguous(memory_format=torch.channels_last)
    expected = torch.count_nonzero(values, dim=(1, 2, 3))
    assert torch.equal(_count_nonzero(values, (1, 2, 3)).long(), expected)
    assert torch.equal(_count_nonzero(channels_last, (1, 2, 3)).long(), expected)


def test_a_run_leaves_the_objects_it_found_to_reference_counting_and_unfreezes_them(tmp_path: Path) -> None:
    """Full collections otherwise walk the whole process (torch's modules, every planned image) again and again."""
    import gc

    from backbone_inspect import dump_features

    gc.unfreeze()  # what else froze in this process (on a GPU machine, 375 objects before this test ran)
    frozen_while_running = []
    summary = dump_features(many_images(tmp_path / "in", 3), tmp_path / "out", **SMALL_OPTIONS,
                            on_outcome=lambda outcome: frozen_while_running.append(gc.get_freeze_count()))
    assert summary.processed == 3 and len(frozen_while_running) == 3 and min(frozen_while_running) > 0
    assert gc.get_freeze_count() == 0


def test_a_collector_the_caller_froze_stays_as_it_is(monkeypatch) -> None:
    """Counted calls, not the frozen count: objects that die while frozen leave the count (Python 3.12)."""
    import gc

    from backbone_inspect.device import frozen_collector

    calls = []
    monkeypatch.setattr(gc, "get_freeze_count", lambda: 375)
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    monkeypatch.setattr(gc, "unfreeze", lambda: calls.append("unfreeze"))
    with frozen_collector():
        calls.append("block")
    assert calls == ["block"]
    monkeypatch.setattr(gc, "get_freeze_count", lambda: 0)
    with frozen_collector():
        calls.append("block")
    assert calls == ["block", "freeze", "block", "unfreeze"]
