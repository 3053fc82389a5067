"""``--decode``: the option's checks, the setting it makes, and the local engine running ``gpu``
one level below the CUDA check, on the CPU, against ``--decode cpu``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from backbone_inspect.config import feature_config
from backbone_inspect.engine import RunCallbacks
from backbone_inspect.errors import UsageError
from backbone_inspect.extractor import Extractor
from backbone_inspect.inputs import FoundImage
from backbone_inspect.local_engine import LocalEngine, decoded_batches
from backbone_inspect.signals import StopRequest
from backbone_inspect.store import settings_differences

from conftest import SMALL, SMALL_OPTIONS, assert_close_scaled, invoke, noise_image, photo_jpeg

NEEDS_CUDA = "Error: --decode gpu: needs a CUDA device (this run's device is cpu); use --decode cpu"


def found_images(root: Path) -> list[FoundImage]:
    """JPEGs of three sizes with a PNG, an EXIF-rotated JPEG and a broken file among them."""
    paths = [photo_jpeg(root / f"p{i}.jpg", [(500, 375), (375, 500), (96, 80)][i % 3], seed=i) for i in range(5)]
    paths.insert(1, noise_image(root / "n.png", (90, 70)))
    paths.insert(4, photo_jpeg(root / "turned.jpg", (200, 100), orientation=8))
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    paths.insert(2, root / "broken.jpg")
    return [FoundImage(str(path), path.stem + ".pt") for path in paths]


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_line_up_with_their_images_as_with_decode_cpu(tmp_path: Path, workers: int) -> None:
    images = found_images(tmp_path)
    options = {**SMALL_OPTIONS, "crop": "none"}
    extractors = [Extractor(feature_config(**options, decode=decode), device="cpu") for decode in ("gpu", "cpu")]
    on_device, on_cpu = (list(decoded_batches(images, one, batch_size=3, workers=workers)) for one in extractors)
    assert [batch_images for batch_images, _ in on_device] == [batch_images for batch_images, _ in on_cpu]
    assert [image for batch_images, _ in on_device for image in batch_images] == images
    for (_, device_batch), (_, cpu_batch) in zip(on_device, on_cpu):
        assert device_batch.indices == cpu_batch.indices and device_batch.errors == cpu_batch.errors
        assert [group.positions for group in device_batch.groups] == [group.positions for group in cpu_batch.groups]
        for device_group, cpu_group in zip(device_batch.groups, cpu_batch.groups):
            assert device_group.pixels.shape == cpu_group.pixels.shape
            assert (device_group.pixels.int() - cpu_group.pixels.int()).abs().max() <= 1


def run_engine(config_options: dict, images: list[FoundImage]) -> dict[str, object]:
    """Each image's features (or error), from the local engine with this config on the CPU."""
    done: dict[str, object] = {}

    def collect(outcome, result) -> None:
        done[outcome.image] = result.features if result is not None else outcome.error

    config = feature_config(**SMALL_OPTIONS, layers=(2, 4), **config_options)
    LocalEngine(batch_size=4, workers=0).run(config, images, None, callbacks=RunCallbacks(on_outcome=collect,
                                             keep_features=True), stop=StopRequest())
    return done


def test_the_engine_gives_the_features_of_decode_cpu(tmp_path: Path) -> None:
    images = found_images(tmp_path)
    on_device, on_cpu = run_engine({"decode": "gpu"}, images), run_engine({"decode": "cpu"}, images)
    assert list(on_device) == list(on_cpu) == [image.path for image in images]
    for path, features in on_cpu.items():
        if isinstance(features, str):
            assert on_device[path] == features and path in features
            continue
        for name, value in features.items():
            assert_close_scaled(on_device[path][name], value, rtol=0.02)


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_decode_gpu_without_cuda_is_a_usage_error_before_any_work(
    tmp_path: Path, chelsea: Path, device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    options = [arg if arg != "cpu" else device for arg in SMALL]
    result = invoke(chelsea, *options, "--decode", "gpu", "--save", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [NEEDS_CUDA] and result.stdout == ""
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--decode", "nvjpeg"], "Error: --decode nvjpeg: expected one of cpu, gpu"),
    (["--decode", "GPU"], "Error: --decode GPU: expected one of cpu, gpu"),
    (["--decode", "gpu", "--engine", "ray"], "Error: --decode gpu works with the local engine only; use --decode cpu with --engine ray"),
])
def test_bad_decode_options_exit_2_in_one_line(tmp_path: Path, chelsea: Path, args: list[str], message: str) -> None:
    if "ray" in args:
        pytest.importorskip("ray")
    result = invoke(chelsea, *SMALL, *args, "--save", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [message]
    assert not (tmp_path / "out").exists()


def test_the_python_api_refuses_decode_gpu_without_cuda(tmp_path: Path, chelsea: Path, monkeypatch) -> None:
    from backbone_inspect import api

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match=r"^--decode gpu: needs a CUDA device \(this run's device is cpu\)"):
        api.dump_features(chelsea, tmp_path / "out", **SMALL_OPTIONS, decode="gpu")
    with pytest.raises(UsageError, match=r"^--decode gpu: needs a CUDA device"):
        api.inspect_images(chelsea, **SMALL_OPTIONS, decode="gpu")
    assert not (tmp_path / "out").exists()


def test_decode_is_a_setting_and_older_folders_were_made_with_cpu() -> None:
    cpu, gpu = feature_config(**SMALL_OPTIONS).settings(), feature_config(**SMALL_OPTIONS, decode="gpu").settings()
    assert cpu["decode"] == "cpu" and gpu["decode"] == "gpu"
    older = {key: value for key, value in cpu.items() if key != "decode"}
    assert settings_differences(older, cpu) == []
    assert settings_differences(older, gpu) == ['decode "cpu" (now "gpu")']


def test_a_dump_folder_of_decode_cpu_refuses_decode_gpu(tmp_path: Path, chelsea: Path, monkeypatch) -> None:
    assert invoke(chelsea, *SMALL, "--save", tmp_path / "out").exit_code == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # past the CUDA check: the folder refuses first
    monkeypatch.setattr("backbone_inspect.device.resolve_device", lambda spec, **_: torch.device("cuda"))
    monkeypatch.setattr("backbone_inspect.device_transforms.resizes_tensors_with", lambda interpolation, device: True)
    result = invoke(chelsea, *SMALL, "--decode", "gpu", "--save", tmp_path / "out")
    assert result.exit_code == 2 and 'decode "cpu" (now "gpu")' in result.stderr


def test_torchvisions_deprecation_of_its_decoders_is_no_warning_line(tmp_path: Path, capsys) -> None:
    from backbone_inspect.device_decode import decode_jpegs
    from backbone_inspect.screen import warnings_as_lines

    data = torch.frombuffer(bytearray(photo_jpeg(tmp_path / "p.jpg").read_bytes()), dtype=torch.uint8)
    with warnings_as_lines():
        (image,) = decode_jpegs([data], torch.device("cpu"))
    assert image.shape == (3, 375, 500) and "Warning" not in capsys.readouterr().err


def test_deprecations_are_no_warning_lines_and_other_warnings_are_one_line_once(capsys) -> None:
    """Python 3.12 deprecates a fork with threads running: DataLoader workers made it the first line of stderr."""
    import warnings

    from backbone_inspect.screen import warnings_as_lines

    with warnings_as_lines():
        for pid in (101, 102):
            warnings.warn(f"This process (pid={pid}) is multi-threaded, use of fork() may lead to deadlocks in the child.",
                          DeprecationWarning, stacklevel=1)
            warnings.warn("a feature is going away", PendingDeprecationWarning, stacklevel=1)
            warnings.warn("input 100×150 is not divisible by 32", UserWarning, stacklevel=1)
    assert capsys.readouterr().err == "Warning: input 100×150 is not divisible by 32\n"


@pytest.mark.parametrize("decode", ["gpu", "cpu"])
def test_an_error_in_the_decoding_ends_the_worker_processes_with_it(tmp_path: Path, monkeypatch, decode: str) -> None:
    """Left to the garbage collector, workers that ignore SIGTERM kept the process from exiting after such an error."""
    import multiprocessing

    import backbone_inspect.device_decode as device_decode
    import backbone_inspect.local_engine as local_engine

    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return original(*args, **kwargs)

    if decode == "gpu":
        original = device_decode.preprocess_same_size
        monkeypatch.setattr(device_decode, "preprocess_same_size", failing)
    else:
        original = local_engine.collate_batch  # the same failure where the CPU path's batches arrive
        monkeypatch.setattr(local_engine, "collate_batch", failing)
    images = [FoundImage(str(photo_jpeg(tmp_path / f"p{i}.jpg", (96, 80), seed=i)), f"p{i}.pt") for i in range(12)]
    extractor = Extractor(feature_config(**SMALL_OPTIONS, decode=decode), device="cpu")
    with pytest.raises(RuntimeError, match="simulated") as failure:
        for _ in decoded_batches(images, extractor, batch_size=2, workers=2):
            pass
    assert failure.value is not None  # the traceback (and the generators in it) still held here
    assert multiprocessing.active_children() == []


INTERPOLATIONS = ["nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_the_probe_answers_as_the_device_path_resizes_on_that_device(interpolation: str, device: str) -> None:
    """Asked on the CPU, lanczos passed and then failed on CUDA, where torch has no kernel for it."""
    from backbone_inspect.device_transforms import preprocess_on_device, resizes_tensors_with
    from backbone_inspect.images import Preprocessing

    try:  # the device path's own resize, of a photo-sized image, on that device
        preprocess_on_device(torch.zeros(3, 300, 400, dtype=torch.uint8, device=device), Preprocessing(interpolation=interpolation))
        resizable = True
    except NotImplementedError:
        resizable = False
    assert resizes_tensors_with(interpolation, torch.device(device)) is resizable


def test_the_usual_interpolations_are_not_probed_on_the_gpu(monkeypatch) -> None:
    """A probe there starts CUDA on the main thread, ahead of warm_up_cuda's thread."""
    from torchvision.transforms.v2 import functional as F

    from backbone_inspect.device_transforms import resizes_tensors_with

    monkeypatch.setattr(F, "resize", lambda *args, **options: pytest.fail("probed"))
    assert all(resizes_tensors_with(name, torch.device("cuda", 0)) for name in ("nearest", "nearest-exact", "bilinear", "bicubic"))


@pytest.mark.parametrize("failure", [NotImplementedError("no kernel"), AssertionError("align_corners is unexpectedly None"),
                                     ValueError("mode")])
def test_a_resize_that_fails_in_the_probe_is_unsupported_not_a_traceback(monkeypatch, failure: Exception) -> None:
    """A torch with lanczos under a torchvision that passes no align_corners asserts (torch 2.14's interpolate)."""
    from torchvision.transforms.v2 import functional as F

    from backbone_inspect.device_transforms import resizes_tensors_with

    def resize(*args, **options):
        raise failure

    monkeypatch.setattr(F, "resize", resize)
    assert resizes_tensors_with("lanczos", torch.device("cpu")) is False


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_decode_gpu_refuses_the_interpolations_the_runs_gpu_cannot_resize_with(interpolation: str, monkeypatch) -> None:
    import dataclasses

    from backbone_inspect.images import Preprocessing
    from backbone_inspect.run import check_decode

    asked, on_cuda = [], ("nearest", "nearest-exact", "bilinear", "bicubic")  # what torch 2.14's CUDA answers

    def gpu_resizes_with(name: str, device: torch.device) -> bool:
        asked.append((name, device))
        return name in on_cuda

    monkeypatch.setenv("LOCAL_RANK", "1"), monkeypatch.setenv("RANK", "1"), monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr("backbone_inspect.device.resolve_device", lambda spec, local_rank=None: torch.device("cuda", local_rank))
    monkeypatch.setattr("backbone_inspect.device_transforms.resizes_tensors_with", gpu_resizes_with)
    config = dataclasses.replace(feature_config(**SMALL_OPTIONS, decode="gpu"), preprocessing=Preprocessing(interpolation=interpolation))
    if interpolation in on_cuda:
        check_decode(config, LocalEngine())
    else:
        with pytest.raises(UsageError, match=rf"^--decode gpu: these weights resize with {interpolation} interpolation, "
                                              "which only Pillow does; use --decode cpu$"):
            check_decode(config, LocalEngine())
    assert asked == [(interpolation, torch.device("cuda", 1))], "asked of this rank's own GPU"
    unresized = dataclasses.replace(config, preprocessing=Preprocessing(resize=None, crop=None, interpolation=interpolation))
    check_decode(unresized, LocalEngine())  # nothing is resized: nothing to refuse
    assert len(asked) == 1
