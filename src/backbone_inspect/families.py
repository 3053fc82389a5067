"""The architectures the replay knows, one declared entry per family. Torch-free.

Each entry says, in torchvision's own module paths, what the model's ``forward`` runs in order up
to its stride-32 stage (``steps``), which of those outputs are the stages (``stage_steps``:
the stem, then the stride-4, 8, 16 and 32 outputs), and what its forward runs after that, up to
the logits (``head``; ``flatten`` is ``torch.flatten(x, 1)``). Read them against
``torchvision/models/<family>.py``: each ``steps`` is that model's ``forward`` (and its
``features`` Sequential) unrolled. Channels and strides are never written here: they are measured
on the built model (``anatomy.py``), and a test checks each stage against that rule.

Where a family's blocks keep the stride of their input for a while (EfficientNet, MobileNetV3),
a stage is the *last* block before the next stride change, as in timm's ``feature_info``.
"""

from __future__ import annotations

from dataclasses import dataclass

TIMM_PREFIX = "timm:"

RESNET_STAGE_NAMES: tuple[str, ...] = ("stem", "layer1", "layer2", "layer3", "layer4")
STAGE_NAMES: tuple[str, ...] = ("stem", "stage1", "stage2", "stage3", "stage4")


@dataclass(frozen=True)
class Family:
    """One family of torchvision backbones that share a layout."""

    name: str
    title: str
    """The family as its papers name it (several entries may share one: EfficientNetV2's layouts)."""
    archs: tuple[str, ...]
    """torchvision's builders of this family (``torchvision.models.get_model`` names)."""
    steps: tuple[str, ...]
    """Module paths the model's forward runs in order, through its stride-32 stage."""
    stage_steps: tuple[str, ...]
    """The step whose output is each stage: the stem, then the stride-4, 8, 16 and 32 outputs."""
    head: tuple[str, ...]
    """From the stride-32 stage to the logits, as the model's forward runs it."""
    stage_names: tuple[str, ...] = STAGE_NAMES
    channels_last_outputs: bool = False
    """Stages computed as (N, H, W, C) (Swin): the replay returns them as (N, C, H, W)."""
    shortcuts: tuple[str, ...] = ()
    """Submodule names of a block's projection shortcut: beside the main path, left out of the receptive field."""
    attention: bool = False
    """Attention mixes whole windows: no receptive field is counted from convolutions."""
    fixed_input: int | None = None
    """The only input size (square) the built model takes, where it is fixed at build time."""
    alias_patterns: tuple[str, ...] = ()
    """More names of stages 1-4 beside FPN's ``C{c}``: ``{c}`` is the C number, ``{i}`` the index."""
    path_aliases: bool = True
    """Whether each stage also answers to its module path (not where the paths are the names)."""

    def stage_path(self, stage: str) -> str:
        return self.stage_steps[self.stage_names.index(stage)]

    def steps_through(self, stage: str) -> tuple[str, ...]:
        """The steps that run up to and including ``stage``'s output."""
        return self.steps[: self.steps.index(self.stage_path(stage)) + 1]

    def steps_of(self, stage: str) -> tuple[str, ...]:
        """The steps one stage runs: those after the previous stage's output, up to its own."""
        index = self.stage_names.index(stage)
        before = self.steps_through(self.stage_names[index - 1]) if index else ()
        return self.steps_through(stage)[len(before) :]

    @property
    def head_prefixes(self) -> tuple[str, ...]:
        """The state_dict prefixes of the head's modules (the classifier a checkpoint may lack)."""
        return tuple(f"{path}." for path in self.head if path != "flatten")


def _indexed(owner: str, count: int) -> tuple[str, ...]:
    return tuple(f"{owner}.{index}" for index in range(count))


def _builders(prefix: str, *names: str) -> tuple[str, ...]:
    return tuple(f"{prefix}{name}" for name in names)


FAMILIES: tuple[Family, ...] = (
    Family(
        name="resnet",
        title="ResNet",
        archs=(
            *_builders("resnet", "18", "34", "50", "101", "152"),
            *_builders("resnext", "50_32x4d", "101_32x8d", "101_64x4d"),
            *_builders("wide_resnet", "50_2", "101_2"),
        ),
        steps=("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"),
        stage_steps=("maxpool", "layer1", "layer2", "layer3", "layer4"),
        head=("avgpool", "flatten", "fc"),
        stage_names=RESNET_STAGE_NAMES,
        shortcuts=("downsample",),
        alias_patterns=("res{c}", "stage{i}"),  # detectron2's and Hugging Face's names
        path_aliases=False,
    ),
    Family(
        name="regnet",
        title="RegNet",
        archs=(
            *_builders("regnet_x_", "400mf", "800mf", "1_6gf", "3_2gf", "8gf", "16gf", "32gf"),
            *_builders("regnet_y_", "400mf", "800mf", "1_6gf", "3_2gf", "8gf", "16gf", "32gf", "128gf"),
        ),
        steps=("stem", *_builders("trunk_output.block", "1", "2", "3", "4")),
        stage_steps=("stem", *_builders("trunk_output.block", "1", "2", "3", "4")),
        head=("avgpool", "flatten", "fc"),
        shortcuts=("proj",),
    ),
    Family(
        name="convnext",
        title="ConvNeXt",
        archs=_builders("convnext_", "tiny", "small", "base", "large"),
        steps=_indexed("features", 8),  # stem, stage, downsample, stage, downsample, ...
        stage_steps=("features.0", "features.1", "features.3", "features.5", "features.7"),
        head=("avgpool", "classifier"),
    ),
    Family(
        name="efficientnet",
        title="EfficientNet",
        archs=_builders("efficientnet_b", *"01234567"),
        steps=_indexed("features", 8),  # features.8, the last 1×1 convolution, opens the head
        stage_steps=("features.1", "features.2", "features.3", "features.5", "features.7"),
        head=("features.8", "avgpool", "flatten", "classifier"),
    ),
    Family(
        name="efficientnet_v2_s",
        title="EfficientNetV2",
        archs=("efficientnet_v2_s",),
        steps=_indexed("features", 7),  # six block stages
        stage_steps=("features.1", "features.2", "features.3", "features.5", "features.6"),
        head=("features.7", "avgpool", "flatten", "classifier"),
    ),
    Family(
        name="efficientnet_v2_m_l",
        title="EfficientNetV2",
        archs=("efficientnet_v2_m", "efficientnet_v2_l"),
        steps=_indexed("features", 8),  # seven block stages: two at stride 32
        stage_steps=("features.1", "features.2", "features.3", "features.5", "features.7"),
        head=("features.8", "avgpool", "flatten", "classifier"),
    ),
    Family(
        name="mobilenet_v3_large",
        title="MobileNetV3",
        archs=("mobilenet_v3_large",),
        steps=_indexed("features", 16),
        stage_steps=("features.1", "features.3", "features.6", "features.12", "features.15"),
        head=("features.16", "avgpool", "flatten", "classifier"),
    ),
    Family(
        name="mobilenet_v3_small",
        title="MobileNetV3",
        archs=("mobilenet_v3_small",),
        steps=_indexed("features", 12),
        stage_steps=("features.0", "features.1", "features.3", "features.8", "features.11"),
        head=("features.12", "avgpool", "flatten", "classifier"),
    ),
    Family(
        name="swin",
        title="Swin",
        archs=("swin_t", "swin_s", "swin_b", "swin_v2_t", "swin_v2_s", "swin_v2_b"),
        steps=_indexed("features", 8),  # patch embedding, stage, patch merging, stage, ...
        stage_steps=("features.0", "features.1", "features.3", "features.5", "features.7"),
        head=("norm", "permute", "avgpool", "flatten", "head"),
        channels_last_outputs=True,
        attention=True,
    ),
    Family(
        name="maxvit",
        title="MaxViT",
        archs=("maxvit_t",),
        steps=("stem", *_indexed("blocks", 4)),
        stage_steps=("stem", *_indexed("blocks", 4)),
        head=("classifier",),
        attention=True,
        fixed_input=224,
    ),
)

ARCHS: tuple[str, ...] = tuple(arch for family in FAMILIES for arch in family.archs)
_BY_ARCH: dict[str, Family] = {arch: family for family in FAMILIES for arch in family.archs}


def is_timm(arch: str) -> bool:
    return isinstance(arch, str) and arch.startswith(TIMM_PREFIX)


def family_of(arch: str) -> Family | None:
    """The declared family of a torchvision arch; ``None`` for an unknown arch or a timm model."""
    return _BY_ARCH.get(arch)
