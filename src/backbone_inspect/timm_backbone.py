"""A timm model replayed by timm's own ``forward_intermediates``, with the interface of ``Backbone``."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .stages import DEFAULT_LAYERS, StageInfo, check_arch, parse_layers
from .timm_models import (
    build_timm_model, check_is_timm_model, check_stages, feature_dicts, fixed_input_side, prune_to_stages, refuse_topk,
    stage_indices, timm_skeleton,
)

if TYPE_CHECKING:
    from .weights import LoadedWeights

__all__ = ["TimmBackbone", "timm_skeleton"]


class TimmBackbone(nn.Module):
    """``Backbone("timm:<name>", layers, weights)``: timm's model, pruned after the deepest requested
    stage (``prune_intermediate_layers``), run by ``forward_intermediates(..., stop_early=True)``.

    Channels and strides are the model's ``feature_info``; the stages are its last entries at
    reductions 4, 8, 16 and 32 (the stem: at 2, where it has one). ``weights``: ``None``/``"none"``,
    ``"DEFAULT"`` (timm's pretrained weights) or a checkpoint path. timm's head is not replayed:
    ``head=True`` is refused.
    """

    def __init__(
        self, arch: str, layers: Iterable[int | str] | str | None = DEFAULT_LAYERS, weights: Any = None, *,
        seed: int = 0, model: nn.Module | None = None, head: bool = False,
    ) -> None:
        super().__init__()
        if head:
            refuse_topk(arch, "head=True")
        self.arch = check_arch(arch)
        chosen = None if layers is None else parse_layers(layers, arch)
        self.weights_info: LoadedWeights | None = None
        ours = model is None
        if model is None:
            model, self.weights_info = build_timm_model(arch, weights, seed=seed)
        check_is_timm_model(model, arch)
        infos = feature_dicts(model)
        found = stage_indices(arch, infos)
        self.stage_names: tuple[str, ...] = tuple(found) if chosen is None else chosen
        check_stages(arch, self.stage_names, found)
        self.indices = [found[name] for name in self.stage_names]
        if ours:  # a caller's own model is left whole: the replay still stops after the deepest stage
            prune_to_stages(model, self.arch, self.indices)
        self.model = model
        self.fixed_input: int | None = fixed_input_side(model)
        """The only input side the model takes, where timm fixes it when building (``fixed_input_size``)."""
        self.run_order: tuple[str, ...] = tuple(name for name in found if found[name] <= max(self.indices))
        self.stage_peaks: dict[str, tuple[int, int]] = {
            name: (int(infos[found[name]]["num_chs"]), int(infos[found[name]]["reduction"])) for name in self.run_order
        }
        """Per stage that runs, its (channels, stride): what sizes its slices on a CPU."""
        self.channels: dict[str, int] = {name: self.stage_peaks[name][0] for name in self.stage_names}
        self.strides: dict[str, int] = {name: self.stage_peaks[name][1] for name in self.stage_names}

    @classmethod
    def without_weights(cls, arch: str, layers: Iterable[int | str] | str | None = None) -> TimmBackbone:
        """The replay over the model built without weights; ``layers=None``: every stage it has."""
        backbone = cls(arch, layers, model=timm_skeleton(arch))
        prune_to_stages(backbone.model, backbone.arch, backbone.indices)  # its own skeleton
        return backbone

    def feature_info(self) -> list[StageInfo]:
        return [StageInfo(n, self.channels[n], self.strides[n]) for n in self.stage_names]

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        features = self.model.forward_intermediates(x, indices=self.indices, stop_early=True, intermediates_only=True)
        return OrderedDict(zip(self.stage_names, features))

    def parameters_through(self) -> dict[str, int]:
        """Per stage held, the parameters of the model up to and including it (counted on pruned copies)."""
        import copy

        model, counts = copy.deepcopy(self.model), {}
        for name, index in reversed(list(zip(self.stage_names, self.indices))):
            model.prune_intermediate_layers([index], prune_norm=True, prune_head=True)
            counts[name] = sum(p.numel() for p in model.parameters())
        return counts

    def forward_in_chunks(self, x: torch.Tensor, chunk_sizes: Mapping[str, int]) -> OrderedDict[str, torch.Tensor]:
        """``forward`` on slices of the smallest chunk size: timm's replay runs all stages at once."""
        parts = [self(part) for part in x.split(min(chunk_sizes[name] for name in self.run_order))]
        return OrderedDict((name, torch.cat([part[name] for part in parts])) for name in self.stage_names)
