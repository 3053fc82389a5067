"""The stage replay: a torchvision model's own modules, called in order, stopping after the deepest stage asked for."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import groupby
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .families import Family, family_of, is_timm
from .errors import UsageError
from .options import check_flag
from .stages import DEFAULT_LAYERS, StageInfo, check_arch, parse_layers
from .timm_models import check_not_timm_model

if TYPE_CHECKING:
    from .weights import LoadedWeights

PROBE_SIZE = 224
"""The input side of the meta-device pass that measures channels and strides (a multiple of 32)."""


def torchvision_family(arch: str) -> Family:
    family = family_of(check_arch(arch))
    if family is None:
        raise ValueError(f"{arch} is not a torchvision arch")
    return family


class Backbone(nn.Module):
    """A torchvision backbone replayed stage by stage; ``Backbone("timm:<name>", ...)`` replays a timm model.

    ``Backbone(arch="convnext_tiny", layers=(2, 3, 4), weights=None)`` holds torchvision's own
    modules (``families.py`` lists them for each family) up to the deepest requested stage and
    returns ``OrderedDict[stage name, Tensor (N, C, H, W)]``, shallow to deep. Modules deeper
    than the deepest requested stage are neither held nor run. Stage 0 is the stem, 1-4 the
    stride-4, 8, 16 and 32 outputs, on every arch.

    ``weights``: ``None``/``"none"`` (random, from ``seed``), a torchvision weights name
    (``"DEFAULT"``, ``"IMAGENET1K_V1"`` ...) or enum member, or the path to a local checkpoint.
    ``model``: an already built torchvision model of ``arch`` to replay instead. ``head=True``
    also holds the modules the model's forward runs after its stride-32 stage (which must be
    requested), for ``classify``.
    """

    def __new__(cls, arch: str = "resnet50", *args: Any, **kwargs: Any) -> Any:
        if cls is Backbone and is_timm(arch):
            from .timm_backbone import TimmBackbone

            return TimmBackbone(arch, *args, **kwargs)  # the same interface, over timm's own replay
        return super().__new__(cls)

    def __init__(
        self, arch: str = "resnet50", layers: Iterable[int | str] | str = DEFAULT_LAYERS, weights: Any = None, *,
        seed: int = 0, model: nn.Module | None = None, head: bool = False,
    ) -> None:
        super().__init__()
        from .weights import build_model

        torchvision_family(arch)
        parse_layers(layers, arch)  # bad names fail before anything is built
        self.weights_info: LoadedWeights | None = None
        if model is None:
            model, self.weights_info = build_model(arch, weights, seed=seed)
            measured = model
        else:
            measured = _checked_reference(model, arch)  # measured instead of the caller's model, whose hooks stay quiet
        self._hold_stages(arch, layers, model, measured, head)

    @classmethod
    def without_weights(cls, arch: str, layers: Iterable[int | str] | str | None = None) -> Backbone:
        """The replay over ``arch`` built without weights (``skeleton``): for shapes and parameter counts.
        ``layers=None``: every stage the arch has."""
        if is_timm(arch):
            from .timm_backbone import TimmBackbone

            return TimmBackbone.without_weights(arch, layers)
        backbone = super().__new__(cls)
        nn.Module.__init__(backbone)
        backbone.weights_info = None
        built = skeleton(arch)
        backbone._hold_stages(arch, (0, 1, 2, 3, 4) if layers is None else layers, built, built, head=False)
        return backbone

    def _hold_stages(self, arch: str, layers: Iterable[int | str] | str, model: nn.Module, measured: nn.Module, head: bool) -> None:
        self.family = torchvision_family(arch)
        self.arch = arch
        self.stage_names: tuple[str, ...] = parse_layers(layers, arch)
        self.run_order: tuple[str, ...] = self.family.stage_names[: self.family.stage_names.index(self.stage_names[-1]) + 1]
        """Every stage that runs, shallow to deep: the stem, then each up to the deepest requested."""
        self.head_paths: tuple[str, ...] = self._head_paths(head)
        self.fixed_input: int | None = self.family.fixed_input
        """The only input side the model takes, where it is fixed when built (MaxViT)."""
        for path in (*self.family.steps_through(self.stage_names[-1]), *self.head_paths):
            _hold(self, path, model.get_submodule(path))
        shapes = _stage_output_shapes(measured, self.family, self.run_order)
        self.channels: dict[str, int] = {name: shapes[name][-1][0] for name in self.stage_names}
        self.strides: dict[str, int] = {name: shapes[name][-1][1] for name in self.stage_names}
        self.stage_peaks: dict[str, tuple[int, int]] = {
            name: max(outputs, key=lambda output: output[0] / output[1] ** 2) for name, outputs in shapes.items()
        }
        """Per stage that runs, (channels, stride) of its largest step output: what sizes its slices on a CPU."""

    def _head_paths(self, head: bool) -> tuple[str, ...]:
        if not check_flag("head", head):
            return ()
        if self.stage_names[-1] != self.family.stage_names[-1]:
            raise UsageError(f"head=True needs {self.family.stage_names[-1]} among the layers: the classifier runs on it")
        return tuple(path for path in self.family.head if path != "flatten")

    def feature_info(self) -> list[StageInfo]:
        return [StageInfo(n, self.channels[n], self.strides[n]) for n in self.stage_names]

    def parameters_through(self) -> dict[str, int]:
        """Per stage held, the parameters of every module up to and including it."""
        return {
            name: sum(p.numel() for path in self.family.steps_through(name) for p in self.get_submodule(path).parameters())
            for name in self.run_order
        }

    def run_stage(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """One stage of the replay, in the model's own layout (Swin's stages are (N, H, W, C))."""
        for path in self.family.steps_of(name):
            x = self.get_submodule(path)(x)
        return x

    def as_nchw(self, x: torch.Tensor) -> torch.Tensor:
        """A stage's output as (N, C, H, W), whatever layout the model computes it in."""
        return _as_nchw(self.family, x)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        features: OrderedDict[str, torch.Tensor] = OrderedDict()
        for name in self.run_order:
            x = self.run_stage(name, x)
            if name in self.stage_names:
                features[name] = self.as_nchw(x)
        return features

    @property
    def classes(self) -> int:
        """The number of classes of the held head (its last linear layer)."""
        linears = [m for path in self.head_paths for m in self.get_submodule(path).modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise UsageError("this Backbone holds no classifier (nn.Linear): build it with head=True, from a model whose head has one")
        return linears[-1].out_features

    def classify(self, deepest: torch.Tensor) -> torch.Tensor:
        """The model's own head on the stride-32 stage's features (N, C, H, W), as its forward runs it."""
        if not self.head_paths:
            raise UsageError("this Backbone holds no head; build it with head=True")
        x = deepest.permute(0, 2, 3, 1) if self.family.channels_last_outputs else deepest
        for path in self.family.head:
            x = torch.flatten(x, 1) if path == "flatten" else self.get_submodule(path)(x)
        return x

    def forward_in_chunks(self, x: torch.Tensor, chunk_sizes: Mapping[str, int]) -> OrderedDict[str, torch.Tensor]:
        """``forward``, with each stage run on slices of at most ``chunk_sizes[stage]`` images.

        The same modules in the same order, so the same numbers up to float noise. Depth first:
        a deep stage's slice is made from its inputs' slices just computed, while they are still
        in cache. On a CPU, small slices keep the large early activations in cache, and large ones
        share the reading of the deep stages' weights (see ``device.cache_chunk_sizes``).
        """
        pieces: dict[str, list[torch.Tensor]] = {name: [] for name in self.stage_names}
        self._run_depth_first(x, _runs_of_equal_size(self.run_order, chunk_sizes), pieces)
        return OrderedDict((name, self.as_nchw(_joined(parts))) for name, parts in pieces.items())

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


def _as_nchw(family: Family, x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2) if family.channels_last_outputs else x


def _hold(owner: nn.Module, path: str, module: nn.Module) -> None:
    """Register ``module`` under its path in the model (``features.3``), so state_dict keys stay the model's."""
    *parents, leaf = path.split(".")
    for part in parents:
        if part not in owner._modules:
            owner.add_module(part, nn.ModuleDict())
        owner = owner._modules[part]  # type: ignore[assignment]
    owner.add_module(leaf, module)


class _StepShapes(nn.Module):
    """Runs a model's stages step by step and returns, per stage, each step's (channels, height)."""

    def __init__(self, model: nn.Module, family: Family, run_order: Sequence[str]) -> None:
        super().__init__()
        self.model, self.family, self.run_order = model, family, run_order

    def forward(self, x: torch.Tensor) -> dict[str, list[tuple[int, int]]]:
        shapes: dict[str, list[tuple[int, int]]] = {}
        for name in self.run_order:
            shapes[name] = []
            for path in self.family.steps_of(name):
                x = self.model.get_submodule(path)(x)
                nchw = _as_nchw(self.family, x)
                shapes[name].append((int(nchw.shape[1]), int(nchw.shape[2])))
        return shapes


def _stage_output_shapes(model: nn.Module, family: Family, run_order: Sequence[str]) -> dict[str, list[tuple[int, int]]]:
    """Per stage that runs, each step's output (channels, stride), from a pass on the meta device: no compute."""
    size = family.fixed_input or PROBE_SIZE
    shapes = meta_call(_StepShapes(model, family, run_order), (size, size))
    return {name: [(channels, size // height) for channels, height in outputs] for name, outputs in shapes.items()}


def meta_call(module: nn.Module, input_size: tuple[int, int]) -> Any:
    """``module`` run in eval mode on one (1, 3, H, W) input on the meta device, its parameters and
    buffers replaced by meta tensors: shapes without compute, the module itself untouched."""
    state = {name: torch.empty_like(value, device="meta") for name, value in module.state_dict(keep_vars=True).items()}
    dtype = next((value.dtype for value in state.values() if value.is_floating_point()), torch.float32)
    with torch.no_grad(), evaluating(module):
        return torch.func.functional_call(module, state, (torch.empty(1, 3, *input_size, dtype=dtype, device="meta"),))


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode, each submodule's own mode put back after: batch norm in training mode
    takes a slow decomposed path on the meta device (and a meta pass must update nothing)."""
    modes = [(submodule, submodule.training) for submodule in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for submodule, training in modes:
            submodule.training = training


def skeleton(arch: str) -> nn.Module:
    """``arch`` built in eval mode without weights: on the meta device (no memory, no compute), except
    where the builder itself reads tensor values (RegNet's block widths), then on the CPU."""
    if is_timm(arch):
        from .timm_backbone import timm_skeleton

        return timm_skeleton(arch)
    from torchvision import models

    torchvision_family(arch)
    try:
        with torch.device("meta"):
            return models.get_model(arch, weights=None).eval()
    except NotImplementedError:  # "Cannot copy out of meta tensor": RegNet's BlockParams.from_init_params
        return models.get_model(arch, weights=None).eval()


def _checked_reference(model: nn.Module, arch: str) -> nn.Module:
    """``arch`` built without weights; ``UsageError`` unless ``model``'s parameters outside the head have its shapes."""
    if not isinstance(model, nn.Module):
        raise UsageError(f"model {model!r}: expected a torchvision {arch} already built (a torch.nn.Module), or leave it out")
    check_not_timm_model(model, arch)  # timm's resnet18 has torchvision's keys, not its modules
    family, reference, held = torchvision_family(arch), skeleton(arch), {name for name, _ in model.named_modules()}
    missing = [step for step in family.steps if step not in held]
    if _body_shapes(model, family) != _body_shapes(reference, family) or missing:  # the head may be gone (head=False)
        raise UsageError(f"the model passed is not a {arch}: {f'it has no {missing[0]}' if missing else 'its backbone differs'}; pass its arch")
    return reference


def _body_shapes(model: nn.Module, family: Family) -> dict[str, torch.Size]:
    return {
        key: value.shape
        for key, value in model.state_dict().items()
        if not key.startswith(family.head_prefixes) and not key.endswith("num_batches_tracked")
    }


def _joined(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(list(parts))


def _runs_of_equal_size(names: Sequence[str], sizes: Mapping[str, int]) -> list[tuple[tuple[str, ...], int]]:
    return [(tuple(run), size) for size, run in groupby(names, key=sizes.__getitem__)]


def feature_info(arch: str = "resnet50", layers: Iterable[int | str] | str | None = None) -> list[StageInfo]:
    """Channels and stride of each stage of ``arch`` (``None``: every one), measured on the model built without weights."""
    return Backbone.without_weights(arch, layers).feature_info()
