from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.transforms._presets import ImageClassification
from backbone_inspect import __version__
from backbone_inspect.images import load_rgb

from conftest import SAMPLES, SMALL, VALID_STAGES, assert_close_scaled, invoke, seeded_model

def reference_features(image: Path, stages: list[str], *, arch="resnet18", seed=0, resize=64, crop=64):
    """Features computed the way a user would without this tool: torchvision's preset and feature extractor."""
    model = seeded_model(arch, seed)
    nodes = {"maxpool" if s == "stem" else s: s for s in stages}
    x = ImageClassification(crop_size=crop, resize_size=resize)(load_rgb(image)).unsqueeze(0)
    with torch.no_grad():
        return {k: v[0] for k, v in create_feature_extractor(model, nodes)(x).items()}


def test_table_shows_every_requested_stage_with_its_numbers(chelsea: Path) -> None:
    result = invoke(chelsea, "--layers", "4,stem,2", *SMALL)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "arch resnet18" in lines[0] and "weights none (seed 0)" in lines[0] and "device cpu" in lines[0]
    assert f"{chelsea}  input 64×64  forward" in result.stdout
    rows = [line for line in lines if line.startswith("│")]
    assert [row.split("│")[1].strip() for row in rows] == ["stem", "layer2", "layer4"]
    expected = reference_features(chelsea, ["stem", "layer2", "layer4"])
    for row, (name, feature) in zip(rows, expected.items()):
        cells = [cell.strip() for cell in row.split("│")[1:-1]]
        assert cells[1] == "×".join(map(str, feature.shape))
        assert cells[2] == str(64 // feature.shape[-1])
        assert cells[3] == "float32"
        assert float(cells[4]) == pytest.approx(feature.mean().item(), rel=1e-3)
        assert float(cells[7]) == pytest.approx(feature.max().item(), rel=1e-3)
        assert cells[8] == f"{(feature == 0).float().mean().item():.1%}"
    assert result.stderr == ""


def test_several_images_give_one_table_each(chelsea: Path) -> None:
    result = invoke(chelsea, SAMPLES / "camera.png", SAMPLES / "coffee.png", *SMALL)
    assert result.exit_code == 0
    assert result.stdout.count("input 64×64") == 3
    assert result.stdout.count("arch resnet18") == 1


def test_json_lines_hold_the_documented_record_and_nothing_else(chelsea: Path) -> None:
    camera = SAMPLES / "camera.png"
    result = invoke(chelsea, camera, "--json", "--layers", "1,3", *SMALL)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["image"] for r in records] == [str(camera), str(chelsea)], "inputs are processed in sorted order"
    for record, image in zip(records, (camera, chelsea)):
        assert record["arch"] == "resnet18" and record["weights"] == "none"
        assert record["input_size"] == [64, 64]
        assert list(record["layers"]) == ["layer1", "layer3"]
        expected = reference_features(image, ["layer1", "layer3"])
        for name, feature in expected.items():
            stats = record["layers"][name]
            assert set(stats) == {"shape", "stride", "dtype", "mean", "std", "min", "max", "zeros", "nonfinite"}
            assert stats["nonfinite"] == 0
            assert stats["shape"] == list(feature.shape)
            assert stats["stride"] == {"layer1": 4, "layer3": 16}[name]
            assert stats["dtype"] == "float32"
            assert stats["mean"] == pytest.approx(feature.mean().item(), rel=1e-4)
            assert stats["std"] == pytest.approx(feature.std().item(), rel=1e-4)
            assert stats["min"] == pytest.approx(feature.min().item(), abs=1e-5)
            assert stats["max"] == pytest.approx(feature.max().item(), rel=1e-4)
            assert stats["zeros"] == pytest.approx((feature == 0).float().mean().item(), abs=1e-6)


@pytest.mark.cuda_by_default
def test_stride_is_measured_per_axis_when_the_input_is_not_a_multiple(tmp_path: Path) -> None:
    path = tmp_path / "odd.png"
    Image.new("RGB", (100, 70), (120, 80, 40)).save(path)
    result = invoke(path, "--json", "--arch", "resnet18", "--resize", "none", "--crop", "none", "--layers", "1,4")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["input_size"] == [70, 100]
    layer1, layer4 = record["layers"]["layer1"], record["layers"]["layer4"]
    assert layer1["shape"][1:] == [18, 25] and layer1["stride"] == [round(70 / 18, 4), 4]
    assert layer4["shape"][1:] == [3, 4] and layer4["stride"] == [round(70 / 3, 4), 25]
    table = invoke(path, "--arch", "resnet18", "--resize", "none", "--crop", "none", "--layers", "4")
    assert "23.3333×25" in table.stdout


def test_save_writes_each_images_own_features_and_meta(tmp_path: Path, chelsea: Path) -> None:
    out = tmp_path / "feats"
    camera = SAMPLES / "camera.png"
    result = invoke(chelsea, camera, "--save", out, "--layers", "2,4", *SMALL)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.pt")) == ["camera.pt", "chelsea.pt"]
    for image in (chelsea, camera):
        saved = torch.load(out / f"{image.stem}.pt", weights_only=True)
        assert list(saved["features"]) == ["layer2", "layer4"]
        expected = reference_features(image, ["layer2", "layer4"])
        for name, tensor in saved["features"].items():
            assert_close_scaled(tensor, expected[name])
            assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
        meta = saved["meta"]
        assert meta["image"] == str(image) and meta["arch"] == "resnet18" and meta["weights"] == "none"
        assert meta["input_size"] == [64, 64] and meta["version"] == __version__
        assert meta["preprocessing"] == {
            "resize": 64,
            "crop": 64,
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
            "interpolation": "bilinear",
        }


def test_saved_file_size_is_about_its_own_tensors(tmp_path: Path, chelsea: Path) -> None:
    result = invoke(chelsea, "--save", tmp_path, "--layers", "1", *SMALL)
    assert result.exit_code == 0
    tensor_bytes = 64 * 16 * 16 * 4
    assert tensor_bytes < (tmp_path / "chelsea.pt").stat().st_size < tensor_bytes + 4096


def test_save_leaves_no_temporary_files_and_replaces_atomically(tmp_path: Path, chelsea: Path, monkeypatch) -> None:
    (tmp_path / "chelsea.pt").write_bytes(b"previous complete file")

    real_fsync = os.fsync

    def disk_full_at_the_feature_file(descriptor: int) -> None:
        if os.fstat(descriptor).st_size > 4096:  # the .pt being written, half on disk
            raise OSError(28, "No space left on device")
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", disk_full_at_the_feature_file)
    result = invoke(chelsea, "--save", tmp_path, "--overwrite", *SMALL)
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: cannot write {tmp_path / 'chelsea.pt'}: No space left on device"]
    assert (tmp_path / "chelsea.pt").read_bytes() == b"previous complete file"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".manifest.jsonl.lock", "backbone-inspect.json", "chelsea.pt", "manifest.jsonl"]


def test_two_inputs_with_one_output_name_are_refused_before_any_work(tmp_path: Path, chelsea: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    twin = other / "chelsea.png"
    Image.open(chelsea).save(twin)
    out = tmp_path / "out"
    result = invoke(chelsea, twin, "--save", out, *SMALL)
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: inputs would overwrite each other's output:")
    assert str(chelsea) in result.stderr and str(twin) in result.stderr
    assert not out.exists()
    assert result.stdout == ""


def test_bad_images_are_named_and_the_others_still_processed(tmp_path: Path, chelsea: Path) -> None:
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(chelsea.read_bytes()[:5000])
    out = tmp_path / "out"
    result = invoke(empty, chelsea, text, truncated, "--save", out, "--json", *SMALL)
    assert result.exit_code == 1
    errors = result.stderr.splitlines()[:-1]
    assert result.stderr.splitlines()[-1].startswith("processed 1, skipped 0, failed 3 in ")
    assert errors == [
        f"Error: {empty}: empty file",
        f"Error: {text}: not an image Pillow can read",
        errors[2],
    ]
    assert errors[2].startswith(f"Error: {truncated}: cannot decode image")
    assert [json.loads(line)["image"] for line in result.stdout.splitlines()] == [str(chelsea)]
    assert sorted(p.name for p in out.glob("*.pt")) == ["chelsea.pt"]


@pytest.mark.parametrize("layers", ["5", "-1", "abc", "", "2,,3"])
def test_invalid_layers_exit_2_listing_valid_stages(chelsea: Path, layers: str) -> None:
    result = invoke(chelsea, "--layers", layers, *SMALL)
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: ") and VALID_STAGES in result.stderr
    assert len(result.stderr.splitlines()) == 1 and result.stdout == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--arch", "ResNet18"], "Error: unknown arch 'ResNet18' (did you mean resnet18?); valid archs: resnet: resnet18,"),
        (["--arch", "vgg16"], "Error: unknown arch 'vgg16'; valid archs: resnet: resnet18,"),  # nothing close: no guess
        (["--arch", "resnet19"], "Error: unknown arch 'resnet19' (did you mean resnet18?); valid archs: resnet: resnet18, resnet34, resnet50, resnet101, resnet152, resnext50_32x4d, resnext101_32x8d, resnext101_64x4d, wide_resnet50_2, wide_resnet101_2; regnet: regnet_x_400mf,"),
        (["--device", "gpu"], "Error: invalid --device 'gpu': expected auto, cpu, cuda, cuda:N or mps"),
        (["--device", "cuda:0"], "Error: --device cuda:0: CUDA is not available on this machine"),
        (["--device", "mps"], "Error: --device mps: MPS is not available on this machine"),
        (["--resize", "-3"], "Error: invalid --resize '-3': expected a positive number of pixels or 'none'"),
        (["--crop", "big"], "Error: invalid --crop 'big': expected a positive number of pixels or 'none'"),
        (["--weights", "IMAGENET1K_V2", "--arch", "resnet18"], "Error: --weights 'IMAGENET1K_V2' does not exist for resnet18; valid: none, DEFAULT, IMAGENET1K_V1, or a checkpoint path"),
        (["--bogus"], "Error: No such option: --bogus"),
        (["--seed", "x"], "Error: Invalid value for '--seed'"),
        (["--input-size", "320"], "Error: --input-size 320 is for --describe: images are sized by --resize and --crop"),
    ],
)
def test_usage_errors_exit_2_with_one_line(chelsea: Path, args: list[str], message: str) -> None:
    if "cuda:0" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if "mps" in args and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    result = invoke(chelsea, *args) if "--arch" in args else invoke(chelsea, "--arch", "resnet18", *args)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(message)
    assert len(result.stderr.splitlines()) == 1
    assert "Traceback" not in result.output


def test_missing_input_paths_exit_2_before_any_work(tmp_path: Path, chelsea: Path) -> None:
    result = invoke(chelsea, tmp_path / "missing.jpg", "--save", tmp_path / "out", *SMALL)
    assert result.exit_code == 2
    assert result.stderr == f"Error: {tmp_path / 'missing.jpg'}: no such file or directory\n"
    assert not (tmp_path / "out").exists()
    no_args = invoke()
    assert no_args.exit_code == 2 and no_args.stderr == "Error: no inputs: give image files or folders, or --from-list FILE\n"


def test_weights_failures_exit_1_naming_the_file(tmp_path: Path, chelsea: Path, torch_home: Path) -> None:
    missing = invoke(chelsea, "--weights", tmp_path / "nope.pth", *SMALL)
    assert missing.exit_code == 1
    assert missing.stderr == f"Error: checkpoint {tmp_path / 'nope.pth'} does not exist\n"
    offline = invoke(chelsea, "--weights", "DEFAULT", "--json", *SMALL)
    assert offline.exit_code == 1 and offline.stdout == ""
    folder = torch_home / "hub" / "checkpoints"
    assert f"put resnet18-f37072fd.pth (from https://download.pytorch.org/models/resnet18-f37072fd.pth) into {folder}" in offline.stderr
    assert offline.stderr.splitlines()[-1].startswith("Error: resnet18 weights IMAGENET1K_V1 are not cached")
    mismatched = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), mismatched)
    result = invoke(chelsea, "--weights", mismatched, *SMALL)
    assert result.exit_code == 1 and result.stderr.startswith(f"Error: checkpoint {mismatched} does not fit resnet18: ")


def test_named_weights_use_their_own_preprocessing(chelsea: Path, torch_home: Path) -> None:
    member = torchvision.models.ResNet50_Weights.IMAGENET1K_V2
    folder = torch_home / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.manual_seed(2)
    model = torchvision.models.resnet50().eval()
    torch.save(model.state_dict(), folder / Path(member.url).name)
    result = invoke(chelsea, "--weights", "DEFAULT", "--layers", "4", "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["weights"] == "IMAGENET1K_V2" and record["input_size"] == [224, 224]
    x = member.transforms()(load_rgb(chelsea)).unsqueeze(0)
    assert member.transforms().resize_size == [232]
    with torch.no_grad():
        expected = create_feature_extractor(model, {"layer4": "layer4"})(x)["layer4"][0]
    assert record["layers"]["layer4"]["mean"] == pytest.approx(expected.mean().item(), rel=1e-4)
    assert record["layers"]["layer4"]["max"] == pytest.approx(expected.max().item(), rel=1e-4)


def test_checkpoint_with_another_head_says_so_in_the_header(tmp_path: Path, chelsea: Path) -> None:
    path = tmp_path / ("a_long_name_of_a_fine_tuned_checkpoint_" * 3 + ".pth")  # longer than the 140 columns, wherever tmp_path is
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    result = invoke(chelsea, "--weights", path, *SMALL)
    assert result.exit_code == 0, result.output
    assert f"arch resnet18  weights {path}  device cpu" in result.stdout.splitlines()[0], "the header is one line"
    assert "classifier head not loaded: checkpoint has fc.weight [10, 512]; resnet18 has fc.weight [1000, 512]" in " ".join(result.stdout.split())


def test_version_and_help() -> None:
    assert invoke("--version").stdout == f"backbone-inspect {__version__}\n"
    help_result = invoke("--help")
    assert help_result.exit_code == 0
    for option in ("--layers", "--arch", "--weights", "--seed", "--resize", "--crop", "--device", "--json", "--save", "--debug"):
        assert option in help_result.stdout


def test_the_same_command_gives_bit_identical_features(tmp_path: Path, chelsea: Path) -> None:
    for folder in ("first", "second"):
        assert invoke(chelsea, "--save", tmp_path / folder, "--layers", "1,4", *SMALL).exit_code == 0
    first, second = (torch.load(tmp_path / f / "chelsea.pt", weights_only=True)["features"] for f in ("first", "second"))
    assert all(torch.equal(first[name], second[name]) for name in ("layer1", "layer4"))
    other = invoke(chelsea, "--save", tmp_path / "other", "--seed", "1", "--layers", "4", *SMALL)
    assert other.exit_code == 0
    assert not torch.equal(torch.load(tmp_path / "other" / "chelsea.pt", weights_only=True)["features"]["layer4"], first["layer4"])


def test_unexpected_errors_are_one_line_unless_debug(chelsea: Path, monkeypatch) -> None:
    from backbone_inspect.extractor import Extractor

    def broken(self, names, group):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(Extractor, "launch_group", broken)
    result = invoke(chelsea, *SMALL)
    assert result.exit_code == 1
    assert result.stderr == "Error: RuntimeError: boom\\nsecond line (run with --debug for the traceback)\n"
    debug = invoke(chelsea, "--debug", *SMALL)
    assert debug.exit_code == 1 and isinstance(debug.exception, RuntimeError)
