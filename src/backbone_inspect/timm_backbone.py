"""A timm model replayed by timm's own ``forward_intermediates``, with the interface of ``Backbone``."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .stages import DEFAULT_LAYERS, StageDescription, StageInfo, check_arch, parse_layers, stage_aliases
from .timm_models import build_timm_model, check_stages, check_timm_config, feature_dicts, stage_indices, timm_skeleton

if TYPE_CHECKING:
    from .weights import LoadedWeights

__all__ = ["TimmBackbone", "describe_timm_stages", "timm_skeleton"]


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
            check_timm_config(arch, (), topk=1)
        self.arch = check_arch(arch)
        chosen = None if layers is None else parse_layers(layers, arch)
        self.weights_info: LoadedWeights | None = None
        if model is None:
            model, self.weights_info = build_timm_model(arch, weights, seed=seed)
        infos = feature_dicts(model)
        found = stage_indices(arch, infos)
        self.stage_names: tuple[str, ...] = tuple(found) if chosen is None else chosen
        check_stages(arch, self.stage_names, found)
        self.indices = [found[name] for name in self.stage_names]
        model.prune_intermediate_layers(self.indices, prune_norm=True, prune_head=True)
        self.model = model
        self.run_order: tuple[str, ...] = tuple(name for name in found if found[name] <= max(self.indices))
        self.channels: dict[str, int] = {name: int(infos[found[name]]["num_chs"]) for name in self.run_order}
        self.strides: dict[str, int] = {name: int(infos[found[name]]["reduction"]) for name in self.run_order}
        self.stage_peaks: dict[str, tuple[int, int]] = {name: (self.channels[name], self.strides[name]) for name in self.run_order}

    @classmethod
    def without_weights(cls, arch: str, layers: Iterable[int | str] | str | None = None) -> TimmBackbone:
        """The replay over the model built without weights; ``layers=None``: every stage it has."""
        return cls(arch, layers, model=timm_skeleton(arch))

    def feature_info(self) -> list[StageInfo]:
        return [StageInfo(n, self.channels[n], self.strides[n]) for n in self.stage_names]

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        features = self.model.forward_intermediates(x, indices=self.indices, stop_early=True, intermediates_only=True)
        return OrderedDict(zip(self.stage_names, features))

    def forward_in_chunks(self, x: torch.Tensor, chunk_sizes: Mapping[str, int]) -> OrderedDict[str, torch.Tensor]:
        """``forward`` on slices of the smallest chunk size: timm's replay runs all stages at once."""
        parts = [self(part) for part in x.split(min(chunk_sizes[name] for name in self.run_order))]
        return OrderedDict((name, torch.cat([part[name] for part in parts])) for name in self.stage_names)


def describe_timm_stages(arch: str, input_size: tuple[int, int]) -> list[StageDescription]:
    """Every stage a timm model has, for one input size, built on the meta device; parameters
    counted up to each stage by pruning the model after it, deepest first."""
    backbone = TimmBackbone.without_weights(arch)
    state = {key: torch.empty_like(value, device="meta") for key, value in backbone.state_dict(keep_vars=True).items()}
    with torch.no_grad():
        features = torch.func.functional_call(backbone, state, (torch.empty(1, 3, *input_size, device="meta"),))
    counts, aliases = {}, stage_aliases(arch)
    for name, index in reversed(list(zip(backbone.stage_names, backbone.indices))):
        backbone.model.prune_intermediate_layers([index], prune_norm=True, prune_head=True)
        counts[name] = sum(p.numel() for p in backbone.model.parameters())
    return [
        StageDescription(
            name=name, aliases=aliases[name], channels=backbone.channels[name], stride=backbone.strides[name],
            output_size=(int(features[name].shape[2]), int(features[name].shape[3])), receptive_field=None,
            parameters=counts[name],
        )
        for name in backbone.stage_names
    ]

