"""``--arch timm:<name>``: timm's own replay (forward_intermediates) under the same stage rule."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from backbone_inspect import Backbone, feature_info, open_features

from conftest import SAMPLES, assert_close_scaled, imagenet_normalised, invoke

timm = pytest.importorskip("timm", reason="timm is not installed: pip install -e '.[timm]'")

MODELS = {
    "resnet18": ("stem", "stage1", "stage2", "stage3", "stage4"),  # a ResNet: act1 at reduction 2 is the stem
    "efficientnet_b0": ("stem", "stage1", "stage2", "stage3", "stage4"),  # stages are the last blocks at a stride
    "convnext_atto": ("stage1", "stage2", "stage3", "stage4"),  # no stride-2 output: no stem
}


def seeded_timm(name: str, seed: int = 2) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False).eval()


def features_only(model: torch.nn.Module, name: str, indices: list[int]) -> torch.nn.Module:
    """timm's own feature extractor for ``out_indices``, holding ``model``'s weights."""
    reference = timm.create_model(name, pretrained=False, features_only=True, out_indices=indices).eval()
    wanted = reference.state_dict()
    # features_only flattens Sequential owners: convnext's stages.0.x is stages_0.x there.
    state = {key if key in wanted else key.replace(".", "_", 1): value for key, value in model.state_dict().items()}
    assert reference.load_state_dict(state, strict=False).missing_keys == []
    return reference


@pytest.mark.parametrize(("name", "stages"), MODELS.items())
def test_stages_equal_timms_own_features_only_model_on_the_same_weights(name: str, stages: tuple[str, ...]) -> None:
    model = seeded_timm(name)
    reductions = [entry["reduction"] for entry in model.feature_info]
    indices = [max(i for i, r in enumerate(reductions) if r == wanted) for wanted in (2, 4, 8, 16, 32)[-len(stages) :]]
    reference = features_only(model, name, indices)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    backbone = Backbone(f"timm:{name}", stages, model=model).eval()
    with torch.no_grad():
        expected, features = reference(x), backbone(x)
    assert list(features) == list(stages)
    for (stage, feature), wanted, channels in zip(features.items(), expected, reference.feature_info.channels()):
        assert_close_scaled(feature, wanted, rtol=1e-6)
        assert backbone.channels[stage] == channels == feature.shape[1]
        assert backbone.strides[stage] == 64 // feature.shape[-1]
    assert [info.name for info in feature_info(f"timm:{name}")] == list(stages)


def test_a_callers_own_model_is_replayed_unchanged_and_must_be_that_arch() -> None:
    from backbone_inspect.errors import UsageError

    model = seeded_timm("resnet18")
    Backbone("timm:resnet18", (2,), model=model)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 1000), "not pruned: the caller's model still classifies"
    with pytest.raises(UsageError, match="the model passed is not a timm:resnet18"):
        Backbone("timm:resnet18", (2,), model=seeded_timm("resnet34"))
    with pytest.raises(UsageError, match=r"^head=True: timm:resnet18 runs through timm's forward_intermediates, which stops"):
        Backbone("timm:resnet18", (2,), head=True)  # a library call names its keyword, not the command's --topk


def test_modules_past_the_deepest_stage_are_not_held() -> None:
    backbone = Backbone("timm:resnet18", (2,))
    keys = set(backbone.state_dict())
    assert any(key.startswith("model.layer2.") for key in keys)
    assert not any(key.startswith(("model.layer3.", "model.layer4.", "model.fc.")) for key in keys)


def test_a_dump_reads_back_equal_to_the_replay_and_describe_names_the_stages(tmp_path: Path) -> None:
    out = tmp_path / "feats"
    result = invoke(SAMPLES, "--arch", "timm:convnext_atto", "--layers", "2,4", "--save", out, "--format", "shards",
                    "--resize", "64", "--crop", "64", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    stored = open_features(out)
    from backbone_inspect.images import Preprocessing, load_image_tensor

    x = imagenet_normalised(load_image_tensor(stored.images[0].image, Preprocessing(resize=64, crop=64)).unsqueeze(0))
    with torch.no_grad():  # the run's weights: seed 0, timm's own initialisation
        expected = features_only(seeded_timm("convnext_atto", seed=0), "convnext_atto", [1, 3])(x)
    features, _ = stored[0]
    for stage, wanted in zip(("stage2", "stage4"), expected):
        assert_close_scaled(features[stage], wanted[0], rtol=1e-5)
    described = invoke("--describe", "--arch", "timm:convnext_atto", "--json")
    rows = json.loads(described.stdout)["stages"]
    assert [(r["name"], r["stride"], r["receptive_field"]) for r in rows] == [(f"stage{i}", 2 ** (i + 1), None) for i in range(1, 5)]


def test_a_timm_checkpoint_loads(tmp_path: Path) -> None:
    model = seeded_timm("resnet18", seed=7)
    torch.save(model.state_dict(), tmp_path / "r18.pth")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        loaded = Backbone("timm:resnet18", (4,), tmp_path / "r18.pth").eval()(x)["stage4"]
        expected = Backbone("timm:resnet18", (4,), model=seeded_timm("resnet18", seed=7)).eval()(x)["stage4"]
    assert torch.equal(loaded, expected)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--arch", "timm:resnet_18"], "Error: unknown timm model 'resnet_18'; did you mean resnet18"),
        (["--arch", "timm:vit_tiny_patch16_224"], "Error: --arch timm:vit_tiny_patch16_224: its feature_info has reductions 16, 16,"),
        (["--arch", "timm:convnext_atto", "--layers", "0"], "Error: --arch timm:convnext_atto has no stride-2 output for the stem"),
        (["--arch", "timm:resnet18", "--topk", "3"], "Error: --topk: timm:resnet18 runs through timm's forward_intermediates"),
        (["--arch", "timm:resnet18.bogus_tag"], "Error: timm model 'resnet18' has no pretrained tag 'bogus_tag'; its tags: a1_in1k,"),
        (["--arch", "timm:swin_tiny_patch4_window7_224", "--crop", "64"],
         "Error: --crop 64: timm:swin_tiny_patch4_window7_224 takes only 224×224 inputs (fixed when it is built); use --crop 224"),
        (["--arch", "timm:resnet18 "], "Error: --arch 'timm:resnet18 ' has spaces around the model name: give timm:resnet18"),
        (["--arch", "timm: resnet18"], "Error: --arch 'timm: resnet18' has spaces around the model name: give timm:resnet18"),
        (["--arch", " resnet18"], "Error: unknown arch ' resnet18' (did you mean resnet18?); valid archs:"),  # refused alike
        (["--arch", "timm:resnet18", "--weights", "IMAGENET1K_V1"], "Error: --weights 'IMAGENET1K_V1' is torchvision's kind of name; for timm:resnet18 give none, DEFAULT"),
    ],
)
def test_what_timm_cannot_do_is_a_usage_error(chelsea: Path, args: list[str], message: str) -> None:
    result = invoke(chelsea, *args, "--device", "cpu")
    assert result.exit_code == 2 and result.stderr.startswith(message) and len(result.stderr.splitlines()) == 1


def test_without_timm_the_error_names_the_extra(chelsea: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    result = invoke(chelsea, "--arch", "timm:resnet18", "--device", "cpu")
    assert result.exit_code == 2
    assert result.stderr == "Error: --arch timm:...: timm is not installed; pip install 'backbone-inspect[timm]'\n"


def test_pretrained_weights_offline_name_the_cache_folder(chelsea: Path) -> None:
    result = invoke(chelsea, "--arch", "timm:resnet18", "--weights", "DEFAULT", "--device", "cpu")
    assert result.exit_code == 1 and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("Error: timm weights for resnet18.a1_in1k are not cached and cannot be downloaded")
    assert "models--timm--resnet18.a1_in1k" in result.stderr


def cached_timm_weights(cache: Path, monkeypatch: pytest.MonkeyPatch, state: dict[str, torch.Tensor] | bytes,
                        name: str = "resnet18.a1_in1k") -> Path:
    """``name``'s weights file in a Hugging Face cache at ``cache``, holding ``state`` (or those bytes)."""
    import huggingface_hub.constants
    from safetensors.torch import save_file

    snapshot = cache / f"models--timm--{name}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    if isinstance(state, bytes):
        (snapshot / "model.safetensors").write_bytes(state)
    else:
        save_file(state, snapshot / "model.safetensors")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return snapshot / "model.safetensors"


def test_pretrained_weights_load_from_the_hugging_face_cache_without_a_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from backbone_inspect.timm_models import build_timm_model

    trained = seeded_timm("resnet18", seed=5)
    cached_timm_weights(tmp_path, monkeypatch, trained.state_dict())
    model, loaded = build_timm_model("timm:resnet18", "DEFAULT")
    assert (loaded.kind, loaded.label, loaded.preprocessing.crop, loaded.preprocessing.interpolation) == ("named", "resnet18.a1_in1k", 224, "bicubic")
    assert loaded.preprocessing.resize == int(224 / 0.95)  # timm's crop_pct for resnet18.a1_in1k
    for key, value in trained.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_default_weights_are_recorded_as_the_tag_timm_resolves_them_to(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cached_timm_weights(tmp_path / "hub", monkeypatch, seeded_timm("resnet18", seed=5).state_dict())
    out, options = tmp_path / "out", ("--arch", "timm:resnet18", "--resize", "64", "--crop", "64", "--device", "cpu")
    result = invoke(SAMPLES / "chelsea.jpg", *options, "--weights", "DEFAULT", "--save", out)
    assert result.exit_code == 0, result.stderr
    assert "weights resnet18.a1_in1k" in result.stdout
    assert json.loads((out / "backbone-inspect.json").read_text())["weights"] == "resnet18.a1_in1k"
    again = invoke(SAMPLES / "chelsea.jpg", *options, "--weights", "pretrained", "--save", out)
    assert again.exit_code == 0 and "processed 0, skipped 1" in again.stderr, again.stderr
    # A dump made before, which recorded "DEFAULT" in its settings and its files, still resumes.
    settings = json.loads((out / "backbone-inspect.json").read_text())
    (out / "backbone-inspect.json").write_text(json.dumps({**settings, "weights": "DEFAULT"}))
    saved = torch.load(out / "chelsea.pt", weights_only=True)
    torch.save({**saved, "meta": {**saved["meta"], "weights": "DEFAULT"}}, out / "chelsea.pt")
    older = invoke(SAMPLES / "chelsea.jpg", *options, "--weights", "DEFAULT", "--save", out)
    assert older.exit_code == 0 and "processed 0, skipped 1" in older.stderr, older.stderr


@pytest.mark.parametrize(("content", "cause"), [
    (b"\x00" * 100, "cannot read cached weights {cached} for timm:resnet18.a1_in1k: SafetensorError: Error while deserializing header"),
    (lambda: seeded_timm("resnet34").state_dict(),
     "cached weights {cached} for timm:resnet18.a1_in1k do not fit it: unexpected: layer1.2.bn1.bias, layer1.2.bn1.num_batches_tracked,"),
    (lambda: timm.create_model("resnet18", num_classes=10).state_dict(),
     "cached weights {cached} for timm:resnet18.a1_in1k do not fit it: wrong shape (checkpoint vs model): fc.bias [10] vs [1000], "
     "fc.weight [10, 512] vs [1000, 512]; delete it"),
], ids=["corrupt", "another arch", "another head"])
def test_unreadable_cached_pretrained_weights_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chelsea: Path, content, cause: str) -> None:
    cached = cached_timm_weights(tmp_path, monkeypatch, content if isinstance(content, bytes) else content())
    result = invoke(chelsea, "--arch", "timm:resnet18", "--weights", "DEFAULT", "--device", "cpu")
    assert result.exit_code == 1 and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("Error: " + cause.format(cached=cached)), result.stderr
    assert result.stderr.endswith("; delete it to download it again\n")


def test_an_empty_timm_name_is_a_usage_error(chelsea: Path) -> None:
    result = invoke(chelsea, "--arch", "timm:", "--device", "cpu")
    assert result.exit_code == 2
    assert result.stderr == "Error: --arch 'timm:' names no timm model: give timm:<model name>, e.g. timm:resnet50d\n"


def test_slices_of_a_batch_give_timms_own_features() -> None:
    model = seeded_timm("convnext_atto")
    x = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = features_only(model, "convnext_atto", [0, 3])(x)
        got = Backbone("timm:convnext_atto", (1, 4), model=model).eval().forward_in_chunks(x, {f"stage{i}": 2 for i in range(1, 5)})
    for stage, wanted in zip(("stage1", "stage4"), expected):
        assert_close_scaled(got[stage], wanted, rtol=1e-6)


@pytest.mark.parametrize("arch", ["timm:resnet18", "timm:convnext_atto", "resnet18"])
def test_channels_and_strides_name_only_the_stages_returned_as_on_every_backbone(arch: str) -> None:
    backbone = Backbone(arch, ("C3", "C5")).eval()
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 64, 64))
    assert list(backbone.channels) == list(backbone.strides) == list(backbone.stage_names) == list(features)
    assert backbone.channels == {name: value.shape[1] for name, value in features.items()}
    assert backbone.strides == {name: 64 // value.shape[-1] for name, value in features.items()}


def test_cached_weights_that_do_not_fit_name_only_the_keys_that_do_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from backbone_inspect.errors import WeightsError
    from backbone_inspect.timm_models import build_timm_model

    state = {key: value.contiguous() for key, value in timm.create_model("convnext_nano", num_classes=11821).state_dict().items()}
    state["stem.0.weight"] = torch.zeros(80, 3, 2, 2)  # one body tensor of the wrong shape; the head is the tag's own (11821)
    found = cached_timm_weights(tmp_path, monkeypatch, state, name="convnext_nano.in12k")
    with pytest.raises(WeightsError) as refused:
        build_timm_model("timm:convnext_nano.in12k", "DEFAULT")
    assert str(refused.value) == (f"cached weights {found} for timm:convnext_nano.in12k do not fit it: wrong shape (checkpoint "
                                  "vs model): stem.0.weight [80, 3, 2, 2] vs [80, 3, 4, 4]; delete it to download it again")


def test_a_model_holding_a_5d_parameter_runs_in_channels_last() -> None:
    """lambda_resnet26t's lambda layers hold a 5-D parameter: ``Module.to(memory_format=channels_last)`` refused
    the whole model ("required rank 4 tensor to use channels_last format"), so the command failed at its default."""
    from backbone_inspect.config import feature_config
    from backbone_inspect.extractor import Extractor

    extractor = Extractor(feature_config(arch="timm:lambda_resnet26t", layers=(4,), channels_last=True), device="cpu")
    model = seeded_timm("lambda_resnet26t", seed=0)  # the run's weights: seed 0, timm's own initialisation
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = extractor.backbone(x.contiguous(memory_format=torch.channels_last))["stage4"]
        (expected,) = model.forward_intermediates(x, indices=[len(model.feature_info) - 1], intermediates_only=True)
    assert_close_scaled(got, expected)
    assert any(value.dim() == 5 for value in extractor.backbone.parameters())
    assert all(value.is_contiguous(memory_format=torch.channels_last) for value in extractor.backbone.parameters() if value.dim() == 4)
