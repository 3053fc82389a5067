from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
import torchvision

from backbone_inspect import Backbone
from backbone_inspect.errors import UsageError, WeightsError
from backbone_inspect.store import settings_differences
from backbone_inspect.weights import build_model

from conftest import SMALL, invoke, seeded_model


def trained_like(arch: str, seed: int, num_classes: int = 1000) -> torch.nn.Module:
    """A model with non-default values everywhere, batch-norm statistics included."""
    torch.manual_seed(seed)
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if buffer.is_floating_point():
                buffer.uniform_(0.5, 1.5)
    return model.eval()


def assert_same_backbone(loaded: torch.nn.Module, reference: torch.nn.Module) -> None:
    expected = reference.state_dict()
    for key, value in loaded.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(value, expected[key]), key


def named_weights_file(torch_home: Path, member) -> Path:
    folder = torch_home / "hub" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / os.path.basename(urlparse(member.url).path)


def test_no_weights_is_the_seeded_random_initialisation() -> None:
    model, loaded = build_model("resnet18", None, seed=4)
    assert loaded.label == "none" and loaded.kind == "none" and not loaded.head_loaded
    assert_same_backbone(model, seeded_model("resnet18", seed=4))


@pytest.mark.parametrize(
    ("arch", "name", "expected_name", "resize"),
    [
        ("resnet18", "IMAGENET1K_V1", "IMAGENET1K_V1", 256),
        ("resnet50", "DEFAULT", "IMAGENET1K_V2", 232),
        ("resnet50", "IMAGENET1K_V1", "IMAGENET1K_V1", 256),
    ],
)
def test_named_weights_load_from_the_torch_hub_cache(torch_home: Path, arch, name, expected_name, resize) -> None:
    member = torchvision.models.get_model_weights(arch)[expected_name]
    reference = trained_like(arch, seed=11)
    torch.save(reference.state_dict(), named_weights_file(torch_home, member))
    model, loaded = build_model(arch, name)
    assert loaded.label == expected_name and loaded.kind == "named" and loaded.head_loaded
    assert loaded.preprocessing.resize == resize and loaded.preprocessing.crop == 224
    assert loaded.categories is not None and len(loaded.categories) == 1000
    assert torch.equal(model.state_dict()["fc.weight"], reference.state_dict()["fc.weight"])
    assert_same_backbone(model, reference)


def test_named_weights_offline_and_not_cached_name_the_file_and_folder(torch_home: Path) -> None:
    member = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    expected = named_weights_file(torch_home, member)
    with pytest.raises(WeightsError) as caught:
        build_model("resnet18", "IMAGENET1K_V1")
    message = str(caught.value)
    assert expected.name in message and str(expected.parent) in message
    assert not expected.exists() and not any(expected.parent.iterdir())


def test_cached_named_weights_of_another_arch_name_the_file(torch_home: Path) -> None:
    member = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cached = named_weights_file(torch_home, member)
    torch.save(torchvision.models.resnet34().state_dict(), cached)
    with pytest.raises(WeightsError) as caught:
        build_model("resnet18", "DEFAULT")
    message = str(caught.value)
    assert message.startswith(f"cached weights {cached} for resnet18 IMAGENET1K_V1 do not fit resnet18: unexpected: layer1.2.bn1.bias")
    assert message.endswith("; delete it to download it again") and "\n" not in message


def test_unknown_weights_name_for_the_arch_lists_the_valid_ones() -> None:
    with pytest.raises(UsageError, match="'IMAGENET1K_V2' does not exist for resnet18; valid: none, DEFAULT, IMAGENET1K_V1"):
        build_model("resnet18", "IMAGENET1K_V2")


def _detection_state_dict(reference: torch.nn.Module) -> dict[str, torch.Tensor]:
    detector = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    body = detector.backbone.body
    state = body.state_dict()
    state.update({k: v for k, v in reference.state_dict().items() if k in state})
    full = detector.state_dict()
    full.update({f"backbone.body.{k}": v for k, v in state.items()})
    return full


CHECKPOINT_LAYOUTS = {
    "plain": lambda sd: sd,
    "state_dict key": lambda sd: {"state_dict": sd, "epoch": 3},
    "state_dict key beside tensors": lambda sd: {"state_dict": sd, "best_acc1": torch.tensor(76.1), "epoch": 90},
    "model key beside tensors": lambda sd: {"model": sd, "step": torch.tensor(100)},
    "model key": lambda sd: {"model": sd, "optimizer": {"lr": 0.1}},
    "DataParallel prefix": lambda sd: {f"module.{k}": v for k, v in sd.items()},
    "DDP under state_dict": lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
}


@pytest.mark.parametrize("layout", CHECKPOINT_LAYOUTS)
def test_local_checkpoint_layouts_load_the_whole_model(tmp_path: Path, layout: str) -> None:
    reference = trained_like("resnet18", seed=21)
    path = tmp_path / "checkpoint.pth"
    torch.save(CHECKPOINT_LAYOUTS[layout](reference.state_dict()), path)
    model, loaded = build_model("resnet18", str(path))
    assert loaded.kind == "checkpoint" and loaded.label == str(path)
    assert loaded.head_loaded and loaded.head_note is None
    assert torch.equal(model.state_dict()["fc.weight"], reference.state_dict()["fc.weight"])
    assert_same_backbone(model, reference)


def test_detection_checkpoint_loads_its_resnet_body(tmp_path: Path) -> None:
    reference = trained_like("resnet50", seed=5)
    path = tmp_path / "fasterrcnn.pth"
    torch.save(_detection_state_dict(reference), path)
    backbone = Backbone("resnet50", layers=(2, 3, 4), weights=path).eval()
    assert not backbone.weights_info.head_loaded
    assert "has none" in backbone.weights_info.head_note
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = Backbone("resnet50", layers=(2, 3, 4), model=reference)(x)
        features = backbone(x)
    for name in expected:
        assert torch.equal(features[name], expected[name])


@pytest.mark.parametrize("head", ["other classes", "no head"])
def test_fine_tuned_or_headless_checkpoints_still_load_the_backbone(tmp_path: Path, head: str) -> None:
    reference = trained_like("resnet18", seed=8, num_classes=10)
    state = reference.state_dict()
    if head == "no head":
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    path = tmp_path / "finetuned.pt"
    torch.save(state, path)
    model, loaded = build_model("resnet18", str(path), seed=0)
    assert not loaded.head_loaded
    assert loaded.head_note.startswith("classifier head not loaded")
    if head == "other classes":
        assert "[10, 512]" in loaded.head_note and "[1000, 512]" in loaded.head_note
    assert_same_backbone(model, reference)
    assert model.fc.weight.shape == (1000, 512)


def test_mismatched_checkpoint_names_the_arch_and_keys(tmp_path: Path) -> None:
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    with pytest.raises(WeightsError) as caught:
        build_model("resnet18", str(path))
    message = str(caught.value)
    assert f"checkpoint {path} does not fit resnet18" in message
    assert "unexpected: layer1.0.bn3.bias" in message
    assert "wrong shape (checkpoint vs model): layer1.0.conv1.weight [64, 64, 1, 1] vs [64, 64, 3, 3]" in message


def test_missing_and_unreadable_checkpoints_are_named(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=f"checkpoint {tmp_path / 'nope.pt'} does not exist"):
        build_model("resnet18", str(tmp_path / "nope.pt"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(WeightsError, match=f"cannot read checkpoint {garbage}: not a PyTorch checkpoint"):
        build_model("resnet18", str(garbage))


class RunsCode:
    """A pickle that runs a command when loaded without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize(("extra", "global_name"), [
    (lambda marker: Path("x"), "pathlib.PosixPath"),
    (RunsCode, "posix.system"),  # a blocked module: torch words that error otherwise
])
def test_checkpoints_are_loaded_with_weights_only(tmp_path: Path, extra, global_name: str) -> None:
    path, marker = tmp_path / "pickled.pt", tmp_path / "code-ran"
    torch.save({"state_dict": torchvision.models.resnet18().state_dict(), "config": extra(marker)}, path)
    with pytest.raises(WeightsError, match=rf"cannot read checkpoint .*pickled.pt: it holds pickled Python objects \({global_name}\), not only tensors; save model.state_dict\(\) instead$"):
        build_model("resnet18", str(path))
    assert not marker.exists()


def test_weights_enum_of_another_arch_is_refused() -> None:
    with pytest.raises(UsageError, match="belong to another arch than resnet50"):
        build_model("resnet50", torchvision.models.ResNet18_Weights.IMAGENET1K_V1)


def test_a_checkpoint_replaced_under_its_name_is_not_taken_for_the_one_a_dump_was_made_with(tmp_path: Path, photos: Path) -> None:
    checkpoint, out = tmp_path / "best.pth", tmp_path / "out"
    torch.save(seeded_model("resnet18", seed=1).state_dict(), checkpoint)
    first = checkpoint.read_bytes()
    assert invoke(photos / "a", "--save", out, *SMALL, "--weights", checkpoint).exit_code == 0
    digest = json.loads((out / "backbone-inspect.json").read_text())["weights_sha256"]
    assert digest == hashlib.sha256(first).hexdigest() == features_meta(out / "cat.pt")["weights_sha256"]
    checkpoint.write_bytes(first)  # the same weights, copied again (another modification time): resumed
    again = invoke(photos / "a", "--save", out, *SMALL, "--weights", checkpoint)
    assert again.exit_code == 0 and "processed 0, skipped 1" in again.stderr
    torch.save(seeded_model("resnet18", seed=2).state_dict(), checkpoint)  # trained further, saved under its name
    replaced = invoke(photos / "a", "--save", out, *SMALL, "--weights", checkpoint)
    assert replaced.exit_code == 2 and "--overwrite" in replaced.stderr
    assert f'weights_sha256 "{digest}" (now "{hashlib.sha256(checkpoint.read_bytes()).hexdigest()}")' in replaced.stderr


def test_folders_made_before_checkpoint_digests_were_recorded_resume_as_before() -> None:
    current = {"weights": "best.pth", "weights_sha256": "ab" * 32, "seed": None}
    assert settings_differences({"weights": "best.pth", "seed": None}, current) == []
    assert settings_differences({"weights": "best.pth", "weights_sha256": "cd" * 32, "seed": None}, current) != []


@pytest.mark.parametrize("format", ["pt", "shards"])
def test_a_checkpoint_dump_made_before_digests_resumes_and_reads_back_mixed(tmp_path: Path, photos: Path, format: str) -> None:
    from backbone_inspect import open_features

    checkpoint, out = tmp_path / "best.pth", tmp_path / "out"
    torch.save(seeded_model("resnet18", seed=1).state_dict(), checkpoint)
    options = (*SMALL, "--layers", "4", "--weights", checkpoint, "--save", out, "--format", format)
    assert invoke(photos / "a", *options).exit_code == 0
    settings_file = out / "backbone-inspect.json"  # as an earlier version wrote it: no weights_sha256
    old = json.loads(settings_file.read_text())
    del old["weights_sha256"]
    settings_file.write_text(json.dumps(old))
    if format == "pt":
        saved = torch.load(out / "cat.pt", weights_only=True)
        del saved["meta"]["weights_sha256"]
        torch.save(saved, out / "cat.pt")
    else:  # the shard's own settings are checked on resume too
        from safetensors.torch import load_file, save_file
        from safetensors import safe_open

        [shard] = out.rglob("*.safetensors")
        with safe_open(str(shard), framework="pt") as opened:
            metadata = opened.metadata()
        shard_settings = json.loads(metadata["settings"])
        del shard_settings["weights_sha256"]
        save_file(load_file(shard), shard, metadata={**metadata, "settings": json.dumps(shard_settings)})
    resumed = invoke(photos / "a", photos / "b" / "deep", *options)
    assert resumed.exit_code == 0 and "processed 1, skipped 1" in resumed.stderr, resumed.output
    assert json.loads(settings_file.read_text())["weights_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    dump = open_features(out)
    assert sorted(meta["output"] for _, meta in dump) == ["cat.pt", "dog.pt"]


def features_meta(path: Path) -> dict:
    return torch.load(path, weights_only=True)["meta"]
