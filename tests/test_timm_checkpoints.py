"""Local checkpoints for ``--arch timm:<name>``: what the replay runs must load, whatever else they hold."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from backbone_inspect import Backbone
from backbone_inspect.errors import WeightsError

from conftest import assert_close_scaled, invoke

timm = pytest.importorskip("timm", reason="timm is not installed: pip install -e '.[timm]'")

HEADS = {  # what timm's forward_intermediates never runs to the last stage: the final norm and the head
    "convnext_atto": ("head.",),
    "efficientnet_b0": ("conv_head.", "bn2.", "classifier."),
    "resnet18": ("fc.",),
}
X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def trained_timm(name: str, seed: int = 3) -> torch.nn.Module:
    """A timm model with non-default values everywhere, batch-norm statistics included."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False)
    with torch.no_grad():
        for buffer in model.buffers():
            if buffer.is_floating_point():
                buffer.uniform_(0.5, 1.5)
    return model.eval()


def features_only(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """timm's own features_only model of ``name`` (every feature_info entry) holding ``model``'s weights."""
    reference = timm.create_model(name, pretrained=False, features_only=True).eval()
    wanted = reference.state_dict()
    # features_only flattens Sequential owners: convnext's stages.0.x is stages_0.x there.
    state = {key if key in wanted else key.replace(".", "_", 1): value for key, value in model.state_dict().items()}
    assert reference.load_state_dict(state, strict=False).missing_keys == []
    return reference


def assert_replay_equals_timms_own(name: str, path: Path, model: torch.nn.Module) -> Backbone:
    backbone = Backbone(f"timm:{name}", (1, 2, 3, 4), path).eval()
    with torch.no_grad():
        expected, features = features_only(model, name)(X)[-4:], backbone(X)
    for feature, wanted in zip(features.values(), expected, strict=True):
        assert_close_scaled(feature, wanted, rtol=1e-6)
    return backbone


@pytest.mark.parametrize("name", HEADS)
def test_a_checkpoint_without_its_head_loads_the_backbone(tmp_path: Path, name: str) -> None:
    model, path = trained_timm(name), tmp_path / "nohead.pth"
    torch.save({k: v for k, v in model.state_dict().items() if not k.startswith(HEADS[name])}, path)
    backbone = assert_replay_equals_timms_own(name, path, model)
    assert backbone.weights_info.head_note == "classifier head not loaded: the checkpoint has none"


@pytest.mark.parametrize("name", ["convnext_atto", "efficientnet_b0"])
def test_timms_own_features_only_state_dict_loads(tmp_path: Path, name: str) -> None:
    model, path = trained_timm(name), tmp_path / "features.pth"
    torch.save(features_only(model, name).state_dict(), path)
    backbone = assert_replay_equals_timms_own(name, path, model)
    assert not backbone.weights_info.head_loaded


def test_a_whole_checkpoint_loads_its_head_too(tmp_path: Path) -> None:
    from backbone_inspect.timm_models import build_timm_model

    model, path = trained_timm("efficientnet_b0"), tmp_path / "whole.pth"
    torch.save(model.state_dict(), path)
    loaded, weights = build_timm_model("timm:efficientnet_b0", path)
    assert weights.head_loaded and weights.head_note is None
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_a_checkpoint_missing_what_the_replay_runs_is_still_refused(tmp_path: Path) -> None:
    path = tmp_path / "partial.pth"
    torch.save({k: v for k, v in trained_timm("convnext_atto").state_dict().items() if not k.startswith("stages.3.")}, path)
    with pytest.raises(WeightsError, match=rf"^checkpoint {path} does not fit timm:convnext_atto: missing: stages\.3\.blocks"):
        Backbone("timm:convnext_atto", (1,), path)


def test_a_head_norm_that_pruning_keeps_is_still_head(tmp_path: Path, monkeypatch) -> None:
    """timm 1.0.29 prunes ConvNeXt's classifier but keeps ``head.norm``, which forward_intermediates never runs."""
    from timm.models.convnext import ConvNeXt

    prune = ConvNeXt.prune_intermediate_layers

    def prune_keeping_head_norm(self, *args, **kwargs):
        head_norm = self.head.norm
        kept = prune(self, *args, **kwargs)
        self.head.norm = head_norm
        return kept

    monkeypatch.setattr(ConvNeXt, "prune_intermediate_layers", prune_keeping_head_norm)
    model, path = trained_timm("convnext_atto"), tmp_path / "nohead.pth"
    torch.save({k: v for k, v in model.state_dict().items() if not k.startswith("head.")}, path)
    backbone = assert_replay_equals_timms_own("convnext_atto", path, model)
    assert backbone.weights_info.head_note == "classifier head not loaded: the checkpoint has none"


def test_a_timm_model_without_forward_intermediates_is_a_usage_error_naming_timm(monkeypatch) -> None:
    """timm 1.0.29's InceptionV3 has none: 'the model passed is not a timm:inception_v3' named no cause."""
    from timm.models.convnext import ConvNeXt

    from backbone_inspect.errors import UsageError

    monkeypatch.delattr(ConvNeXt, "forward_intermediates")
    said = (f"timm:convnext_atto: timm {timm.__version__}'s ConvNeXt has no forward_intermediates, which the replay "
            "runs; a newer timm has it for more models (pip install -U timm)")
    result = invoke("--describe", "--arch", "timm:convnext_atto")
    assert (result.exit_code, result.stderr) == (2, f"Error: {said}\n")
    with pytest.raises(UsageError) as raised:
        Backbone("timm:convnext_atto", (4,), model=timm.create_model("convnext_atto"))
    assert str(raised.value) == said


def test_a_timm_that_cannot_prune_its_model_is_a_usage_error_naming_timm(monkeypatch, tmp_path: Path) -> None:
    """timm 1.0.29's EfficientViT asserts 'Cannot disable pooling' in its own prune: that was a bare AssertionError, exit 1."""
    from timm.models.convnext import ConvNeXt

    from backbone_inspect.errors import UsageError

    def refuses(self, *args, **kwargs):
        raise AssertionError("Cannot disable pooling")

    monkeypatch.setattr(ConvNeXt, "prune_intermediate_layers", refuses)
    said = (f"timm:convnext_atto: timm {timm.__version__} cannot cut its ConvNeXt to the stages asked for "
            "(Cannot disable pooling); a newer timm may (pip install -U timm)")
    image = tmp_path / "grey.png"
    from PIL import Image

    Image.new("RGB", (40, 40), (128, 128, 128)).save(image)
    for args in (["--describe"], [str(image), "--device", "cpu", "--save", str(tmp_path / "out")]):
        result = invoke(*args, "--arch", "timm:convnext_atto")
        assert (result.exit_code, result.stderr) == (2, f"Error: {said}\n"), args
    assert not list((tmp_path / "out").glob("[!.]*")), "no settings, manifest or features (the lock file stays, as always)"
    with pytest.raises(UsageError) as raised:
        Backbone("timm:convnext_atto", (4,))
    assert str(raised.value) == said
