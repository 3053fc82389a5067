from __future__ import annotations

import importlib.util

import pytest
import torch
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor

from backbone_inspect import Backbone
from backbone_inspect.stages import ARCHS, STAGES

from conftest import seeded_model

NEEDS_TIMM = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed: pip install -e '.[timm]'")
TORCHVISION_NODES = {"stem": "maxpool", "layer1": "layer1", "layer2": "layer2", "layer3": "layer3", "layer4": "layer4"}


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_replay_equals_create_feature_extractor_and_forward(arch: str) -> None:
    model = seeded_model(arch, seed=3)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 96, 80)
    reference = create_feature_extractor(model, return_nodes={TORCHVISION_NODES[s]: s for s in STAGES})
    backbone = Backbone(arch, layers=STAGES, model=model).eval()
    with torch.no_grad():
        expected = reference(x)
        features = backbone(x)
        logits = model.fc(torch.flatten(model.avgpool(features["layer4"]), 1))
        torch.testing.assert_close(logits, model(x), rtol=0, atol=0)
    assert list(features) == list(STAGES)
    for name in STAGES:
        torch.testing.assert_close(features[name], expected[name], rtol=0, atol=0)


def test_backbone_built_from_arch_and_seed_equals_seeded_torchvision_model() -> None:
    x = torch.randn(1, 3, 64, 64)
    backbone = Backbone("resnet18", layers=(2, 4), seed=5).eval()
    model = seeded_model("resnet18", seed=5)
    with torch.no_grad():
        features = backbone(x)
        expected = create_feature_extractor(model, {"layer2": "layer2", "layer4": "layer4"})(x)
    assert list(features) == ["layer2", "layer4"]
    for name in features:
        assert torch.equal(features[name], expected[name])


@pytest.mark.parametrize(
    ("layers", "ran", "skipped"),
    [
        ((1,), ["layer1"], ["layer2", "layer3", "layer4"]),
        (("stem",), [], ["layer1", "layer2", "layer3", "layer4"]),
        ((3, 1), ["layer1", "layer2", "layer3"], ["layer4"]),
        ((4,), ["layer1", "layer2", "layer3", "layer4"], []),
    ],
)
def test_replay_stops_after_the_deepest_requested_stage(layers, ran, skipped) -> None:
    model = seeded_model("resnet18")
    calls: dict[str, int] = {name: 0 for name in STAGES[1:]}
    for name in calls:
        getattr(model, name).register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    backbone = Backbone("resnet18", layers=layers, model=model).eval()
    with torch.no_grad():
        backbone(torch.randn(1, 3, 64, 64))
    assert {n for n, c in calls.items() if c == 1} == set(ran)
    assert all(calls[n] == 0 for n in skipped)
    held = {name for name, _ in backbone.named_children()}
    assert not held & set(skipped)


def test_a_model_of_another_arch_is_refused() -> None:
    from backbone_inspect.errors import UsageError

    with pytest.raises(UsageError, match="not a resnet18"):
        Backbone("resnet18", layers=4, model=torchvision.models.resnet34())
    assert Backbone("resnet18", layers=4, model=torchvision.models.resnet18(num_classes=3)).stage_names == ("layer4",)
    headless = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = create_feature_extractor(headless, ["layer4"])(x)["layer4"]
        del headless.fc  # a backbone without its head is still that arch's backbone
        assert torch.equal(Backbone("resnet18", layers=4, model=headless).eval()(x)["layer4"], expected)
    del headless.layer4
    with pytest.raises(UsageError, match=r"^the model passed is not a resnet18: it has no layer4; pass its arch$"):
        Backbone("resnet18", layers=4, model=headless)


def test_layers_are_sorted_and_deduplicated() -> None:
    backbone = Backbone("resnet18", layers="4,layer2,2,stem")
    assert backbone.stage_names == ("stem", "layer2", "layer4")
    with torch.no_grad():
        assert list(backbone.eval()(torch.randn(1, 3, 32, 32))) == ["stem", "layer2", "layer4"]


def test_seed_gives_bit_identical_weights_and_features() -> None:
    x = torch.randn(1, 3, 64, 64)
    first, second, other = (Backbone("resnet18", layers=(4,), seed=s).eval() for s in (7, 7, 8))
    with torch.no_grad():
        assert torch.equal(first(x)["layer4"], second(x)["layer4"])
        assert not torch.equal(first(x)["layer4"], other(x)["layer4"])


def test_building_does_not_touch_the_global_rng(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    reseeded: list[int] = []  # what torch.manual_seed also does: reseed every CUDA generator (queued until CUDA starts)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded.append)
    Backbone("resnet18", layers=(1,), seed=9)
    assert torch.equal(torch.rand(3), expected) and reseeded == []


def test_backbone_trains_like_any_module() -> None:
    backbone = Backbone("resnet18", layers=(2, 3))
    assert backbone.training
    before = backbone.bn1.running_mean.clone()
    out = backbone(torch.randn(2, 3, 64, 64))
    sum(feature.mean() for feature in out.values()).backward()
    assert backbone.conv1.weight.grad is not None and backbone.conv1.weight.grad.abs().sum() > 0
    assert backbone.layer3[0].conv1.weight.grad is not None
    assert not torch.equal(backbone.bn1.running_mean, before), "train mode updates batch-norm statistics"
    backbone.eval()
    frozen = backbone.bn1.running_mean.clone()
    with torch.no_grad():
        backbone(torch.randn(2, 3, 64, 64))
    assert torch.equal(backbone.bn1.running_mean, frozen)


def test_state_dict_keys_are_torchvisions_own() -> None:
    backbone = Backbone("resnet18", layers=(2,))
    model = torchvision.models.resnet18()
    keys = set(backbone.state_dict())
    assert keys <= set(model.state_dict())
    assert any(k.startswith("layer2.") for k in keys)
    assert not any(k.startswith(("layer3.", "layer4.", "fc.")) for k in keys)
    assert backbone.load_state_dict(model.state_dict(), strict=False).missing_keys == []


@pytest.mark.parametrize("layers", [(5,), (-1,), ("abc",), (), "2,,3", ""])
def test_invalid_layers_raise_a_usage_error_listing_valid_stages(layers) -> None:
    from backbone_inspect.errors import UsageError

    with pytest.raises(UsageError, match="valid stages: 0=stem, 1=layer1, 2=layer2, 3=layer3, 4=layer4"):
        Backbone("resnet18", layers=layers)


@pytest.mark.parametrize("arch", ["resnet19", None, 5, b"resnet18"])
def test_unknown_arch_lists_the_valid_ones(arch: object) -> None:
    from backbone_inspect.backbone import feature_info
    from backbone_inspect.errors import UsageError

    for build in (Backbone, feature_info, Backbone.without_weights):
        with pytest.raises(UsageError, match="valid archs: resnet: resnet18, resnet34, .*; convnext: convnext_tiny, .*timm:<model name>"):
            build(arch)


def test_arch_list_is_every_classification_builder_of_torchvisions_cnn_families() -> None:
    names = set(torchvision.models.list_models(module=torchvision.models))
    prefixes = ("resnet", "resnext", "wide_resnet", "regnet", "convnext", "efficientnet", "mobilenet_v3", "swin", "maxvit")
    assert set(ARCHS) == {n for n in names if n.startswith(prefixes)}
    assert len(ARCHS) == len(set(ARCHS))


@pytest.mark.parametrize(
    ("arch", "keywords", "message"),
    [
        ("resnet18", {"seed": "1"}, "invalid --seed '1': expected a whole number"),
        ("resnet18", {"seed": 1.5}, "invalid --seed 1.5: expected a whole number"),
        pytest.param("timm:resnet18", {"seed": "1"}, "invalid --seed '1': expected a whole number", marks=NEEDS_TIMM),
        ("resnet18", {"model": "resnet18"}, "model 'resnet18': expected a torchvision resnet18 already built"),
        pytest.param("timm:resnet18", {"model": "resnet18"}, "the model passed is not a timm:resnet18", marks=NEEDS_TIMM),
        pytest.param("resnet18", {"model": "timm:resnet18"},  # timm's resnet18 has torchvision's state_dict keys
                     """the model passed is timm's resnet18, not torchvision's resnet18: pass arch "timm:resnet18" to replay it$""",
                     marks=NEEDS_TIMM),
        pytest.param("convnext_tiny", {"model": "timm:convnext_tiny"},
                     """the model passed is timm's convnext_tiny, not torchvision's convnext_tiny: pass arch "timm:convnext_tiny" to replay it$""",
                     marks=NEEDS_TIMM),
    ],
)
def test_a_bad_seed_or_model_is_a_usage_error_naming_it(arch: str, keywords: dict, message: str) -> None:
    from backbone_inspect.errors import UsageError

    if str(keywords.get("model")).startswith("timm:"):
        keywords = {"model": timm_model(keywords["model"].removeprefix("timm:"))}
    with pytest.raises(UsageError, match=f"^{message}"):
        Backbone(arch, layers=4, **keywords)


def timm_model(name: str) -> torch.nn.Module:
    import timm

    return timm.create_model(name, pretrained=False)


def test_misusing_the_head_is_a_usage_error_that_says_how_to_fix_it() -> None:
    from backbone_inspect.errors import UsageError

    with pytest.raises(UsageError, match=r"^head=True needs layer4 among the layers: the classifier runs on it$"):
        Backbone("resnet18", layers=2, head=True)
    with pytest.raises(UsageError, match=r"^head 'yes': expected True or False$"):  # a truthy string was taken as True
        Backbone("resnet18", layers=4, head="yes")
    with pytest.raises(UsageError, match=r"^this Backbone holds no head; build it with head=True$"):
        Backbone("resnet18", layers=4).classify(torch.zeros(1, 512, 2, 2))
    model = torchvision.models.resnet18()
    model.fc = torch.nn.Identity()  # a head without its classifier
    with pytest.raises(UsageError, match=r"^this Backbone holds no classifier \(nn\.Linear\)"):
        Backbone("resnet18", layers=4, model=model, head=True).classes


def test_layers_given_as_numpy_or_tensor_integers_are_the_same_stages() -> None:
    import numpy

    expected = Backbone("resnet18", layers=(2, 3, 4)).stage_names
    for layers in (numpy.arange(2, 5), list(numpy.arange(2, 5)), torch.tensor([2, 3, 4]), (numpy.int64(2), 3, torch.tensor(4))):
        assert Backbone("resnet18", layers=layers).stage_names == expected
    assert Backbone("resnet18", layers=numpy.int64(3)).stage_names == ("layer3",)
    from backbone_inspect.errors import UsageError

    with pytest.raises(UsageError, match=r"^invalid stage tensor\(2\.\)"):
        Backbone("resnet18", layers=torch.tensor([2.0]))
