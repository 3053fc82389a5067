"""What a local checkpoint for a timm model must hold: the modules timm's replay runs, under timm's
own keys or those of timm's ``features_only`` model of the same name."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


def timm_head_prefixes(model: nn.Module, deepest: int) -> tuple[str, ...]:
    """The state_dict prefixes of the modules the replay never runs: what ``prune_intermediate_layers``
    drops after ``deepest`` (the stride-32 stage), the final norm and the head (``head.norm``, EfficientNet's
    ``conv_head`` and ``bn2``), and the top-level modules ``forward_intermediates`` does not enter (timm
    1.0.29 prunes ConvNeXt's head but keeps its ``head.norm``). ``model`` is pruned: pass a copy or a skeleton."""
    whole = list(model.state_dict())
    model.prune_intermediate_layers([deepest], prune_norm=True, prune_head=True)
    kept = set(model.state_dict())
    dropped = {_dropped_owner(key, kept) for key in whole if key not in kept}
    unentered = {f"{name}." for name in _children_not_entered(model, deepest)}
    found = dropped | {prefix for prefix in unentered if any(key.startswith(prefix) for key in whole)}
    return tuple(sorted(prefix for prefix in found if not any(prefix.startswith(other) for other in found - {prefix})))


def _children_not_entered(model: nn.Module, deepest: int) -> list[str]:
    """The top-level children none of whose modules run in ``forward_intermediates`` up to ``deepest``,
    learnt from one pass on the meta device (none where that pass fails: then pruning alone decides)."""
    import torch

    config = getattr(model, "pretrained_cfg", None) or {}
    side = int(config.get("input_size", (3, 224, 224))[-1])
    entered: set[int] = set()
    hooks = [module.register_forward_pre_hook(lambda module, _: entered.add(id(module))) for module in model.modules()]
    try:
        with torch.no_grad():
            model.to("meta").forward_intermediates(
                torch.empty(1, 3, side, side, device="meta"), indices=[deepest], stop_early=True, intermediates_only=True
            )
    except Exception:  # a model whose pass reads values: pruning alone decides
        return []
    finally:
        for hook in hooks:
            hook.remove()
    return [name for name, child in model.named_children() if not any(id(module) in entered for module in child.modules())]


def _dropped_owner(key: str, kept: set[str]) -> str:
    """The shortest module path above ``key`` that keeps nothing (``head.`` rather than ``head.fc.``)."""
    parts = key.split(".")
    for depth in range(1, len(parts)):
        prefix = ".".join(parts[:depth]) + "."
        if not any(other.startswith(prefix) for other in kept):
            return prefix
    return key


def features_only_aliases(model: nn.Module) -> tuple[tuple[str, str], ...]:
    """Key prefixes of timm's ``features_only`` models → the model's own: ``FeatureListNet`` flattens
    the first level of a top-level ``Sequential`` (``stages.0.`` is ``stages_0.`` there), and
    ``FeatureGetterNet`` holds the model under ``model.``."""
    from torch import nn

    flattened = tuple(
        (f"{name}_{child}.", f"{name}.{child}.")
        for name, owner in model.named_children()
        if isinstance(owner, nn.Sequential)
        for child, _ in owner.named_children()
    )
    return (*flattened, ("model.", ""))


def cached_misfit(path: str, skeleton: nn.Module) -> list[str]:
    """Why a cached pretrained weights file does not load into the model ``skeleton`` is built as: its missing,
    unexpected and wrongly shaped keys (none where the file cannot be read, or fits)."""
    import torch

    from .checkpoints import fit_problems

    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        return fit_problems(skeleton.state_dict(), state) if isinstance(state, dict) else []
    except Exception:  # unreadable: timm's own error says why
        return []
