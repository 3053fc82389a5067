"""Backbone as the body of torchvision's detection stack: FPN on top, Faster R-CNN around it."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from backbone_inspect import Backbone


class BackboneWithFPN(nn.Module):
    """The recipe from the README: Backbone's stages into torchvision's FPN."""

    def __init__(self, backbone: Backbone, out_channels: int = 64) -> None:
        super().__init__()
        self.body = backbone
        self.fpn = FeaturePyramidNetwork(
            in_channels_list=[backbone.channels[name] for name in backbone.stage_names],
            out_channels=out_channels,
            extra_blocks=LastLevelMaxPool(),
        )
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(self.body(x))


ARCHS = ["resnet18", "convnext_tiny", "regnet_x_400mf"]


def build_detector(arch: str) -> FasterRCNN:
    torch.manual_seed(0)
    body = BackboneWithFPN(Backbone(arch, layers=("C3", "C4", "C5")))
    anchors = AnchorGenerator(sizes=((16,), (32,), (64,), (128,)), aspect_ratios=((0.5, 1.0, 2.0),) * 4)
    pooler = MultiScaleRoIAlign(featmap_names=list(body.body.stage_names), output_size=7, sampling_ratio=2)
    return FasterRCNN(body, num_classes=3, rpn_anchor_generator=anchors, box_roi_pool=pooler, min_size=128, max_size=128)


@pytest.mark.parametrize("arch", ARCHS)
def test_fpn_over_backbone_gives_one_level_per_stage_with_matching_strides(arch: str) -> None:
    backbone = Backbone(arch, layers=(2, 3, 4)).eval()
    with torch.no_grad():
        levels = BackboneWithFPN(backbone).eval()(torch.randn(1, 3, 128, 128))
    assert list(levels) == [*backbone.stage_names, "pool"]
    assert [backbone.strides[name] for name in backbone.stage_names] == [8, 16, 32]
    for name in backbone.stage_names:
        assert levels[name].shape == (1, 64, 128 // backbone.strides[name], 128 // backbone.strides[name])


@pytest.mark.parametrize("arch", ["resnet18", "convnext_tiny"])
def test_faster_rcnn_on_backbone_runs_eval_and_a_training_step(arch: str) -> None:
    detector = build_detector(arch)
    image = torch.rand(3, 128, 128)
    image[:, 32:96, 32:96] = 1.0  # a bright square to find
    target = {"boxes": torch.tensor([[32.0, 32.0, 96.0, 96.0]]), "labels": torch.tensor([1])}

    detector.train()
    optimiser = torch.optim.SGD(detector.parameters(), lr=0.01)
    first = next(detector.backbone.body.parameters())
    first_before = first.detach().clone()
    losses = detector([image], [target])
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert all(p.grad is not None for p in detector.backbone.body.parameters()), "every held stage is in the graph"
    optimiser.step()
    assert not torch.equal(first, first_before), "the backbone trains"

    detector.eval()
    with torch.no_grad():
        (prediction,) = detector([image])
    assert set(prediction) == {"boxes", "labels", "scores"}
    assert prediction["boxes"].shape[1:] == (4,) and len(prediction["boxes"]) == len(prediction["scores"])
