"""torchvision detection checkpoints (``backbone.body.``) load the backbone of their arch, whichever family."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.models import detection
from torchvision.models.detection.backbone_utils import mobilenet_backbone

from backbone_inspect import Backbone
from backbone_inspect.errors import WeightsError


def randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter and floating buffer (batch-norm statistics, frozen or not) drawn anew."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
    return model.eval()


DETECTORS = {
    "fasterrcnn_mobilenet_v3_large_fpn": lambda: detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None),
    # as the pretrained detectors are built: frozen batch norm, no num_batches_tracked
    "frozen batch norm": lambda: detection.FasterRCNN(
        mobilenet_backbone(backbone_name="mobilenet_v3_large", weights=None, fpn=True), num_classes=3),
}


@pytest.mark.parametrize("detector", DETECTORS)
def test_a_mobilenet_detection_checkpoint_loads_its_body_as_features(tmp_path: Path, detector: str) -> None:
    model = randomised(DETECTORS[detector](), seed=4)
    path = tmp_path / "detector.pth"
    torch.save(model.state_dict(), path)
    backbone = Backbone("mobilenet_v3_large", (0, 1, 2, 3, 4), path).eval()
    body = model.backbone.body.state_dict()  # an IntermediateLayerGetter over features: its "3." is features.3.
    held = backbone.state_dict()
    assert all(key.startswith("features.") for key in held) and len(held) > 200
    for key, value in held.items():  # features.0 … features.15: the body's tensors, each
        if not key.endswith("num_batches_tracked") or detector != "frozen batch norm":
            assert torch.equal(value, body[key.removeprefix("features.")]), key
    assert backbone.weights_info.head_note.startswith("classifier head not loaded: the checkpoint has only part of it (no classifier.0.bias")
    reference = torchvision.models.mobilenet_v3_large().eval()
    reference.features.load_state_dict(body, strict=False)  # frozen batch norm has no num_batches_tracked
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, features = Backbone("mobilenet_v3_large", (0, 1, 2, 3, 4), model=reference)(x), backbone(x)
    for name in expected:
        assert torch.allclose(features[name], expected[name], rtol=1e-5, atol=1e-5), name


def test_an_ssd_checkpoint_says_its_layout_cannot_be_mapped(tmp_path: Path) -> None:
    path = tmp_path / "ssdlite.pth"
    torch.save(detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None).state_dict(), path)
    with pytest.raises(WeightsError) as caught:
        Backbone("mobilenet_v3_large", (4,), path)
    message = str(caught.value)
    assert message.startswith(f"checkpoint {path} does not fit mobilenet_v3_large: missing: features.0.0.weight")
    assert message.endswith("; its backbone is not under backbone.body. (torchvision's Faster/Mask R-CNN, RetinaNet and FCOS "
                            "layout) but in another detector's layout (SSD's backbone.features regroups the blocks), which cannot be mapped")
    assert "\n" not in message
