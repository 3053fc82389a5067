"""What an arch's stages are, measured on the model built without weights: channels, strides,
output sizes, receptive fields and parameters (``--describe``, ``feature_info``)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from torch import nn

from .backbone import Backbone, meta_call
from .errors import UsageError
from .families import is_timm
from .stages import StageDescription, stage_aliases


SIDE_ANY_ARCH_TAKES = 256
"""An input side every arch runs on: ``smallest_input_side`` looks no further."""
REFUSED_SIZE = "cannot take inputs of this size"
"""What ``size_refused`` says after the arch: the model's forward failed at that size, which names none it takes."""


def smallest_input_side(backbone: Backbone, *, largest_tried: int = SIDE_ANY_ARCH_TAKES) -> int:
    """The smallest square input side (px) the replay runs on, found on the meta device: 1 for
    archs whose every convolution pads; 32 for ConvNeXt, whose 2×2 downsampling layers do not.
    Not searched for timm models (1), where the sizes a model takes need not be all above one."""
    if is_timm(backbone.arch) or _runs_at(backbone, 1):
        return 1
    low, high = 2, largest_tried
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if _runs_at(backbone, middle) else (middle + 1, high)
    return low


def _runs_at(backbone: Backbone, side: int | tuple[int, int]) -> bool:
    try:
        stages = meta_call(backbone, side if isinstance(side, tuple) else (side, side))
    except (RuntimeError, ValueError, IndexError, AssertionError):
        return False
    # Older torch (2.4 measured) lets a kernel larger than its input through on the meta device, as an empty map.
    return all(value.numel() > 0 for value in stages.values())


def input_size_problem(backbone: Backbone, input_size: tuple[int, int]) -> str | None:
    """Why the arch cannot take inputs of this size (H, W): not its fixed size, or under its smallest; else ``None``."""
    fixed = backbone.fixed_input
    if fixed is not None:
        return None if tuple(input_size) == (fixed, fixed) else f"{backbone.arch} takes only {fixed}×{fixed} inputs (fixed when it is built)"
    if min(input_size) >= SIDE_ANY_ARCH_TAKES:
        return None
    if is_timm(backbone.arch):  # the size itself tried: the sizes a timm model takes need not all be above one
        return size_refused(backbone, input_size)
    smallest = smallest_input_side(backbone)
    return None if min(input_size) >= smallest else f"{backbone.arch} takes inputs of at least {smallest}×{smallest} px"


def size_refused(backbone: Backbone, input_size: tuple[int, int]) -> str | None:
    """Why the model refuses inputs of this size, tried on the meta device (timm's halonet26t takes
    multiples of 256 only), or ``None`` where it takes them."""
    return None if _runs_at(backbone, tuple(input_size)) else f"{backbone.arch} {REFUSED_SIZE}"


def check_input_size(backbone: Backbone, input_size: tuple[int, int]) -> None:
    """``UsageError`` for an input size the arch cannot take (``input_size_problem``)."""
    problem = input_size_problem(backbone, input_size)
    if problem is None:
        return
    given = f"{input_size[0]}×{input_size[1]}"
    if problem.endswith(REFUSED_SIZE):  # the model's own refusal names no size it takes: say which was given, and what to change
        raise UsageError(f"{problem.removesuffix('this size')}{given}; try another --input-size")
    raise UsageError(f"{problem}, not {given}")


def along_height(value: int | tuple[int, ...]) -> int:
    """A convolution's or pooling's kernel size, stride or dilation along the height (PyTorch stores an int or a pair)."""
    return value[0] if isinstance(value, tuple) else int(value)


def _main_path(backbone: Backbone, name: str) -> Iterator[nn.Module]:
    """The convolutions and max poolings of one stage in the order they run, projection shortcuts left out."""
    for path in backbone.family.steps_of(name):
        for qualified_name, module in backbone.get_submodule(path).named_modules():
            if not set(qualified_name.split(".")) & set(backbone.family.shortcuts) and isinstance(module, (nn.Conv2d, nn.MaxPool2d)):
                yield module


def receptive_fields(backbone: Backbone) -> dict[str, int | None]:
    """Theoretical receptive field of one output position of each stage that runs, in input pixels.

    Each convolution or pooling of kernel k and dilation d widens it by (k - 1) * d * jump, where
    jump is the product of the strides before it. Squeeze-and-excitation's global gating
    (RegNetY, EfficientNet, MobileNetV3) is not counted; attention families get ``None``.
    """
    field, jump, fields = 1, 1, {}
    for name in backbone.run_order:
        for module in _main_path(backbone, name):
            kernel, stride, dilation = (along_height(v) for v in (module.kernel_size, module.stride, module.dilation))
            field += (kernel - 1) * dilation * jump
            jump *= stride
        fields[name] = None if backbone.family.attention else field
    return fields


def describe_stages(arch: str, input_size: tuple[int, int]) -> list[StageDescription]:
    """Every stage of ``arch`` for one input size, on the model built without weights."""
    backbone = Backbone.without_weights(arch).eval()
    check_input_size(backbone, input_size)
    shapes, counts = meta_shapes(backbone, input_size), backbone.parameters_through()
    fields = {name: None for name in backbone.stage_names} if is_timm(arch) else receptive_fields(backbone)
    aliases = stage_aliases(arch)
    return [
        StageDescription(
            name=name, aliases=aliases[name], channels=backbone.channels[name], stride=backbone.strides[name],
            output_size=shapes[name][1:], receptive_field=fields[name], parameters=counts[name],
        )
        for name in backbone.stage_names
    ]


def meta_shapes(backbone: Backbone, input_size: tuple[int, int]) -> dict[str, tuple[int, int, int]]:
    """Each returned stage's (C, H, W) for one input size: the replay run on the meta device, without compute."""
    features = meta_call(backbone, input_size)
    return {name: (int(value.shape[1]), int(value.shape[2]), int(value.shape[3])) for name, value in features.items()}


def stage_shapes(
    arch: str, stages: tuple[str, ...], input_sizes: Iterable[tuple[int, int]]
) -> dict[tuple[int, int], dict[str, tuple[int, int, int]]]:
    """Per input size, the (C, H, W) of ``stages`` of ``arch``, from the model built once without weights."""
    backbone = Backbone.without_weights(arch, stages).eval()
    # A size the arch cannot take fails alone when the run gets to it: nothing to write for it.
    return {size: {} if input_size_problem(backbone, size) else meta_shapes(backbone, size) for size in set(input_sizes)}
