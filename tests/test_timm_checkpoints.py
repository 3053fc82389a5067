"""Local checkpoints for ``--arch timm:<name>``: what the replay runs must load, whatever else they hold."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from backbone_inspect import Backbone
from backbone_inspect.errors import WeightsError

from conftest import assert_close_scaled

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
