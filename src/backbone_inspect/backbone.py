"""The stage-replaying extractor: torchvision's own ResNet modules, called in order, stopping early."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .stages import DEFAULT_LAYERS, STAGES, check_arch, parse_layers

if TYPE_CHECKING:
    from .weights import LoadedWeights

STEM_MODULES: tuple[str, ...] = ("conv1", "bn1", "relu", "maxpool")


@dataclass(frozen=True)
class StageInfo:
    """One stage as timm's ``feature_info`` describes it: name, channels and stride (reduction)."""

    name: str
    channels: int
    stride: int


def along_height(value: int | tuple[int, ...]) -> int:
    """A convolution's or pooling's kernel size, stride or dilation along the height.

    ResNets use the same value on both axes; PyTorch stores it as an int or a pair.
    """
    return value[0] if isinstance(value, tuple) else int(value)


def _conv_and_pool_stride(modules: Iterable[tuple[str, nn.Module]]) -> int:
    stride = 1
    for qualified_name, module in modules:
        # The downsample branch runs beside the main path, with the same stride: count it once.
        if "downsample" in qualified_name.split("."):
            continue
        if isinstance(module, (nn.Conv2d, nn.MaxPool2d)):
            stride *= along_height(module.stride)
    return stride


def _stage_modules(model: nn.Module, name: str) -> list[tuple[str, nn.Module]]:
    owners = STEM_MODULES if name == "stem" else (name,)
    return [
        (f"{owner}.{sub}" if sub else owner, module)
        for owner in owners
        for sub, module in getattr(model, owner).named_modules()
    ]


def stage_channels(model: nn.Module, name: str) -> int:
    """Output channels of a stage, read from its last convolution."""
    convs = [m for _, m in _stage_modules(model, name) if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


def stage_stride(model: nn.Module, name: str) -> int:
    """Nominal stride of a stage's output: the product of the strides on the path up to it."""
    stride = 1
    for stage in STAGES[: STAGES.index(name) + 1]:
        stride *= _conv_and_pool_stride(_stage_modules(model, stage))
    return stride


def stage_receptive_field(model: nn.Module, name: str) -> int:
    """Theoretical receptive field of one output position of a stage, in input pixels.

    Walks the main path (the downsample branch sees a subset of the same window):
    each convolution or pooling of kernel k, dilation d widens it by (k - 1) * d * jump,
    where jump is the product of the strides before it.
    """
    field, jump = 1, 1
    for stage in STAGES[: STAGES.index(name) + 1]:
        for qualified_name, module in _stage_modules(model, stage):
            if "downsample" in qualified_name.split(".") or not isinstance(module, (nn.Conv2d, nn.MaxPool2d)):
                continue
            kernel, stride, dilation = (along_height(v) for v in (module.kernel_size, module.stride, module.dilation))
            field += (kernel - 1) * dilation * jump
            jump *= stride
    return field


def stage_parameters(model: nn.Module, name: str) -> int:
    """Parameters of every module up to and including a stage."""
    return sum(
        parameter.numel()
        for stage in STAGES[: STAGES.index(name) + 1]
        for owner in (STEM_MODULES if stage == "stem" else (stage,))
        for parameter in getattr(model, owner).parameters()
    )


@dataclass(frozen=True)
class StageDescription:
    """One stage of an arch for an input size, as ``--describe`` shows it."""

    name: str
    aliases: tuple[str, ...]
    channels: int
    stride: int
    output_size: tuple[int, int]
    receptive_field: int
    parameters: int
    """Up to and including this stage."""

    def bytes_per_image(self, element_size: int) -> int:
        return self.channels * self.output_size[0] * self.output_size[1] * element_size


def describe_stages(arch: str, input_size: tuple[int, int]) -> list[StageDescription]:
    """Every stage of ``arch`` for one input size, built on the meta device: no weights, no compute."""
    from torchvision import models

    from .stages import STAGE_ALIASES

    with torch.device("meta"):
        # Eval mode, as the command runs: batch norm in training mode refuses a 1×1 map of one image.
        model = models.get_model(check_arch(arch), weights=None).eval()
        features = Backbone(arch, STAGES, model=model)(torch.empty(1, 3, *input_size))
    return [
        StageDescription(
            name=name,
            aliases=STAGE_ALIASES[name],
            channels=stage_channels(model, name),
            stride=stage_stride(model, name),
            output_size=(int(features[name].shape[2]), int(features[name].shape[3])),
            receptive_field=stage_receptive_field(model, name),
            parameters=stage_parameters(model, name),
        )
        for name in STAGES
    ]


def stage_infos(model: nn.Module, layers: Iterable[int | str] | str = STAGES) -> list[StageInfo]:
    return [
        StageInfo(name, stage_channels(model, name), stage_stride(model, name))
        for name in parse_layers(layers)
    ]


def feature_info(arch: str = "resnet50", layers: Iterable[int | str] | str = STAGES) -> list[StageInfo]:
    """Channels and stride of each stage of ``arch``, read from the model built on the meta device."""
    from torchvision import models

    with torch.device("meta"):
        model = models.get_model(check_arch(arch), weights=None)
    return stage_infos(model, layers)


def _backbone_shapes(model: nn.Module) -> dict[str, torch.Size]:
    return {
        key: value.shape
        for key, value in model.state_dict().items()
        if not key.startswith("fc.") and not key.endswith("num_batches_tracked")
    }


def _check_is_arch(model: nn.Module, arch: str) -> None:
    from torchvision import models

    from .errors import UsageError

    with torch.device("meta"):
        reference = models.get_model(arch, weights=None)
    if _backbone_shapes(model) != _backbone_shapes(reference):
        raise UsageError(f"the model passed is not a {arch}: its backbone's parameters differ; pass its arch")


class Backbone(nn.Module):
    """A torchvision ResNet replayed stage by stage.

    ``Backbone(arch="resnet50", layers=(2, 3, 4), weights=None)`` holds torchvision's own modules
    (``conv1``, ``bn1``, ``relu``, ``maxpool``, ``layer1`` ... up to the deepest requested stage)
    and returns ``OrderedDict[stage name, Tensor]``, shallow to deep. Stages deeper than the
    deepest requested one are neither held nor run.

    ``weights``: ``None``/``"none"`` (random, from ``seed``), a torchvision weights name
    (``"DEFAULT"``, ``"IMAGENET1K_V1"``, ``"IMAGENET1K_V2"``) or enum member, or the path to a
    local checkpoint. ``model``: an already built torchvision ResNet to replay instead.
    ``head=True`` also holds the model's ``avgpool`` and ``fc`` (layer4 must be requested), for
    ``classify``.
    """

    def __init__(
        self,
        arch: str = "resnet50",
        layers: Iterable[int | str] | str = DEFAULT_LAYERS,
        weights: Any = None,
        *,
        seed: int = 0,
        model: nn.Module | None = None,
        head: bool = False,
    ) -> None:
        super().__init__()
        from .weights import build_model

        self.arch = check_arch(arch)
        self.stage_names: tuple[str, ...] = parse_layers(layers)
        if model is None:
            model, self.weights_info = build_model(self.arch, weights, seed=seed)
        else:
            _check_is_arch(model, self.arch)
            self.weights_info = None
        self.weights_info: LoadedWeights | None
        self.conv1 = model.conv1
        self.bn1 = model.bn1
        self.relu = model.relu
        self.maxpool = model.maxpool
        deepest = STAGES.index(self.stage_names[-1])
        self.layer_names: tuple[str, ...] = STAGES[1 : deepest + 1]
        for name in self.layer_names:
            self.add_module(name, getattr(model, name))
        if head:
            if self.stage_names[-1] != "layer4":
                raise ValueError("head=True needs layer4 among the layers: the classifier runs on it")
            self.avgpool = model.avgpool
            self.fc = model.fc
        self.channels: dict[str, int] = {n: stage_channels(model, n) for n in self.stage_names}
        self.strides: dict[str, int] = {n: stage_stride(model, n) for n in self.stage_names}

    def feature_info(self) -> list[StageInfo]:
        return [StageInfo(n, self.channels[n], self.strides[n]) for n in self.stage_names]

    def classify(self, layer4: torch.Tensor) -> torch.Tensor:
        """The model's own head on layer4 features: avgpool -> flatten -> fc, as its forward does."""
        if not hasattr(self, "fc"):
            raise RuntimeError("this Backbone holds no head; build it with head=True")
        return self.fc(torch.flatten(self.avgpool(layer4), 1))

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        features: OrderedDict[str, torch.Tensor] = OrderedDict()
        for name in self.run_order:
            x = self.run_stage(name, x)
            if name in self.stage_names:
                features[name] = x
        return features

    @property
    def run_order(self) -> tuple[str, ...]:
        """Every stage that runs, shallow to deep: the stem, then layer1 .. the deepest requested."""
        return ("stem", *self.layer_names)

    def run_stage(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """One stage of the replay: the stem (conv1 -> bn1 -> relu -> maxpool) or a layer."""
        if name == "stem":
            return self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return getattr(self, name)(x)

    def forward_in_chunks(self, x: torch.Tensor, chunk_sizes: Mapping[str, int]) -> OrderedDict[str, torch.Tensor]:
        """``forward``, with each stage run on slices of at most ``chunk_sizes[stage]`` images.

        The same modules in the same order, so the same numbers up to float noise. Depth first:
        a deep stage's slice is made from its inputs' slices just computed, while they are still
        in cache. On a CPU, small slices keep the large early activations in cache, and large ones
        share the reading of the deep stages' weights (see ``pipeline.cache_chunk_sizes``).
        """
        pieces: dict[str, list[torch.Tensor]] = {name: [] for name in self.stage_names}
        self._run_depth_first(x, _runs_of_equal_size(self.run_order, chunk_sizes), pieces)
        return OrderedDict((name, _joined(parts)) for name, parts in pieces.items())

    def _run_depth_first(
        self, x: torch.Tensor, runs: Sequence[tuple[tuple[str, ...], int]], pieces: dict[str, list[torch.Tensor]]
    ) -> list[torch.Tensor]:
        *shallower, (names, size) = runs
        outputs = []
        for part in x.split(size):
            if shallower:
                part = _joined(self._run_depth_first(part, shallower, pieces))
            for name in names:
                part = self.run_stage(name, part)
                if name in pieces:
                    pieces[name].append(part)
            outputs.append(part)
        return outputs


def _joined(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(list(parts))


def _runs_of_equal_size(names: Sequence[str], sizes: Mapping[str, int]) -> list[tuple[tuple[str, ...], int]]:
    runs: list[tuple[tuple[str, ...], int]] = []
    for name in names:
        if runs and runs[-1][1] == sizes[name]:
            runs[-1] = (runs[-1][0] + (name,), sizes[name])
        else:
            runs.append(((name,), sizes[name]))
    return runs
