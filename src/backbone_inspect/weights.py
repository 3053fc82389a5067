"""Weights for a ResNet: none (seeded random), torchvision's named weights, or a local checkpoint."""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from .errors import UsageError, WeightsError
from .images import Preprocessing
from .stages import check_arch

if TYPE_CHECKING:
    import torch
    from torch import nn

HEAD_PREFIX = "fc."
_NAMED_WEIGHTS_PATTERN = re.compile(r"^[A-Z][A-Z0-9_]*$")
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
_EXAMPLES_SHOWN = 5


@dataclass(frozen=True)
class LoadedWeights:
    """What was loaded into the model, for the header and the saved metadata."""

    label: str
    """``none``, the torchvision weights name (``IMAGENET1K_V2``) or the checkpoint path."""
    kind: str
    """``none``, ``named`` or ``checkpoint``."""
    preprocessing: Preprocessing
    """The preprocessing these weights were trained with (ImageNet defaults otherwise)."""
    head_loaded: bool
    head_note: str | None = None
    categories: tuple[str, ...] | None = None


def named_weights_choices(arch: str) -> list[str]:
    from torchvision import models

    return ["DEFAULT", *(member.name for member in models.get_model_weights(arch))]


def _named_weights(arch: str, name: str) -> Any:
    from torchvision import models

    enum = models.get_model_weights(arch)
    if name == "DEFAULT":
        return enum.DEFAULT
    try:
        return enum[name]
    except KeyError:
        raise UsageError(
            f"--weights {name!r} does not exist for {arch}; valid: none, "
            f"{', '.join(named_weights_choices(arch))}, or a checkpoint path"
        ) from None


def _resolve(arch: str, weights: Any) -> tuple[str, Any]:
    """(``none`` | ``named`` | ``checkpoint``, the enum member or path); torchvision only for named weights."""
    if weights is None or (isinstance(weights, str) and weights.lower() == "none"):
        return "none", None
    if _is_weights_enum(weights):
        from torchvision import models

        if type(weights) is not models.get_model_weights(arch):
            raise UsageError(f"weights {weights} belong to another arch than {arch}")
        return "named", weights
    if isinstance(weights, os.PathLike):
        return "checkpoint", Path(weights)
    if not isinstance(weights, str):
        raise UsageError(f"weights must be None, a name or a path, not {type(weights).__name__}")
    if not weights.strip():
        raise UsageError("--weights is empty: give none, a torchvision weights name or a checkpoint path")
    if _NAMED_WEIGHTS_PATTERN.match(weights.upper()) and not Path(weights).exists():
        return "named", _named_weights(arch, weights.upper())
    return "checkpoint", Path(weights)


def _is_weights_enum(weights: Any) -> bool:
    # A torchvision enum member can only come from an imported torchvision: no import needed to rule it out.
    if "torchvision" not in sys.modules:
        return False
    from torchvision.models import WeightsEnum

    return isinstance(weights, WeightsEnum)


def _random_model(arch: str, seed: int) -> nn.Module:
    import torch
    from torchvision import models

    # fork_rng keeps the caller's global RNG untouched while making initialisation reproducible.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return models.get_model(arch, weights=None)


def _hub_state_dict(arch: str, member: Any) -> dict[str, torch.Tensor]:
    import torch

    folder = Path(torch.hub.get_dir()) / "checkpoints"
    filename = os.path.basename(urlparse(member.url).path)
    cached = folder / filename
    # torch.hub reports downloads on stderr; keep stdout clean for --json, and keep its
    # chatter off a non-terminal stderr, where errors must stay one line.
    chatter = sys.stderr if sys.stderr.isatty() else io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            return torch.hub.load_state_dict_from_url(
                member.url,
                map_location="cpu",
                progress=sys.stderr.isatty(),
                check_hash=True,
                weights_only=True,
            )
    except Exception as error:
        if cached.is_file():
            raise WeightsError(
                f"cannot read cached weights {cached} for {arch} {member.name}: {_first_line(error)}; "
                "delete it to download it again"
            ) from error
        raise WeightsError(
            f"{arch} weights {member.name} are not cached and cannot be downloaded "
            f"({_first_line(error)}); put {filename} (from {member.url}) into {folder}"
        ) from error


def _first_line(error: BaseException) -> str:
    text = _ANSI_ESCAPE.sub("", str(getattr(error, "reason", None) or error)).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _checkpoint_read_error(path: Path, error: Exception) -> WeightsError:
    found = _UNSUPPORTED_GLOBAL.search(str(error))
    if found:
        reason = (
            f"it holds pickled Python objects ({found.group(1)}), not only tensors; "
            "save model.state_dict() instead"
        )
    elif "Weights only load failed" in str(error):
        reason = "not a PyTorch checkpoint (it cannot be unpickled)"
    else:
        reason = f"not a PyTorch checkpoint ({type(error).__name__}: {_first_line(error)})"
    return WeightsError(f"cannot read checkpoint {path}: {reason}")


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A flat state_dict from a checkpoint as people have them (wrapped, DDP, detection)."""
    import torch

    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise _checkpoint_read_error(path, error) from error
    state = _unwrap(loaded)
    if state is None:
        raise WeightsError(f"checkpoint {path} holds no state_dict of tensors")
    return _strip_prefixes(state)


def _unwrap(loaded: Any) -> dict[str, torch.Tensor] | None:
    import torch

    while isinstance(loaded, Mapping):
        tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
        if tensors and all(isinstance(k, str) for k in tensors):
            return tensors
        inner = next((loaded[k] for k in ("state_dict", "model") if isinstance(loaded.get(k), Mapping)), None)
        if inner is None:
            return None
        loaded = inner
    return None


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    def strip_module(key: str) -> str:
        while key.startswith("module."):
            key = key[len("module.") :]
        return key

    state = {strip_module(k): v for k, v in state.items()}
    body = "backbone.body."
    if any(k.startswith(body) for k in state):
        # A detection checkpoint: keep the ResNet body, drop FPN, RPN and heads.
        state = {k[len(body) :]: v for k, v in state.items() if k.startswith(body)}
    return state


def _examples(keys: list[str]) -> str:
    shown = ", ".join(keys[:_EXAMPLES_SHOWN])
    return shown + (f" and {len(keys) - _EXAMPLES_SHOWN} more" if len(keys) > _EXAMPLES_SHOWN else "")


def _fit_problems(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> list[str]:
    """What keeps a checkpoint's backbone from loading: missing, unexpected and wrongly shaped keys."""
    # Frozen batch norm (detection checkpoints) has no num_batches_tracked: not a mismatch.
    missing = sorted(k for k in expected if k not in given and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in given if k not in expected)
    wrong_shape = sorted(
        f"{k} {list(given[k].shape)} vs {list(expected[k].shape)}" for k in given if k in expected and given[k].shape != expected[k].shape
    )
    labelled = (("missing", missing), ("unexpected", unexpected), ("wrong shape (checkpoint vs model)", wrong_shape))
    return [f"{label}: {_examples(keys)}" for label, keys in labelled if keys]


def _head_note(head: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], arch: str) -> str | None:
    """Why a checkpoint's classifier head is not loaded; ``None`` when it fits."""
    if not head:
        return "classifier head not loaded: the checkpoint has none"
    expected_head = {k: v for k, v in expected.items() if k.startswith(HEAD_PREFIX)}
    if head.keys() == expected_head.keys() and all(head[k].shape == expected_head[k].shape for k in head):
        return None
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in sorted(head.items()))
    return f"classifier head not loaded: checkpoint has {shapes}, {arch} has {list(expected['fc.weight'].shape)}"


def load_checkpoint_into(model: nn.Module, arch: str, path: Path) -> LoadedWeights:
    """Load the backbone of a local checkpoint; the head only when it has the model's shape."""
    state = read_checkpoint(path)
    expected = model.state_dict()
    backbone = {k: v for k, v in expected.items() if not k.startswith(HEAD_PREFIX)}
    given = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}
    problems = _fit_problems(backbone, given)
    if problems:
        raise WeightsError(f"checkpoint {path} does not fit {arch}: " + "; ".join(problems))
    head = {k: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
    note = _head_note(head, expected, arch)
    model.load_state_dict({**given, **(head if note is None else {})}, strict=False)
    return LoadedWeights(str(path), "checkpoint", Preprocessing(), head_loaded=note is None, head_note=note)


def _named_preprocessing(member: Any) -> Preprocessing:
    transform = member.transforms()
    return Preprocessing(
        resize=int(transform.resize_size[0]),
        crop=int(transform.crop_size[0]),
        mean=tuple(float(v) for v in transform.mean),
        std=tuple(float(v) for v in transform.std),
        interpolation=transform.interpolation.value,
    )


@dataclass(frozen=True)
class WeightsPlan:
    """What ``--weights`` names, resolved without loading anything; plain values, so it pickles."""

    arch: str
    kind: str
    """``none``, ``named`` or ``checkpoint``."""
    label: str
    """``none``, the torchvision weights name or the checkpoint path."""
    preprocessing: Preprocessing
    """The preprocessing these weights were trained with (ImageNet defaults otherwise)."""


def plan_weights(arch: str, weights: Any = None) -> WeightsPlan:
    """``weights`` (None, ``"none"``, a weights name or enum member, a path, or a plan) as a plan for ``arch``.

    Imports torchvision only for named weights.
    """
    if isinstance(weights, WeightsPlan):
        if weights.arch != arch:
            raise UsageError(f"weights planned for {weights.arch} cannot load into {arch}")
        return weights
    kind, value = _resolve(check_arch(arch), weights)
    if kind == "named":
        return WeightsPlan(arch, kind, value.name, _named_preprocessing(value))
    if kind == "checkpoint":
        return WeightsPlan(arch, kind, str(value), Preprocessing())
    return WeightsPlan(arch, kind, "none", Preprocessing())


def build_model(arch: str, weights: Any = None, *, seed: int = 0) -> tuple[nn.Module, LoadedWeights]:
    """The torchvision ResNet ``arch`` with ``weights`` loaded, and a description of them."""
    plan = plan_weights(arch, weights)
    model = _random_model(arch, seed)
    if plan.kind == "none":
        return model, LoadedWeights("none", "none", plan.preprocessing, head_loaded=False)
    if plan.kind == "checkpoint":
        return model, load_checkpoint_into(model, arch, Path(plan.label))
    member = _named_weights(arch, plan.label)
    model.load_state_dict(_hub_state_dict(arch, member))
    return model, LoadedWeights(
        label=plan.label,
        kind="named",
        preprocessing=plan.preprocessing,
        head_loaded=True,
        categories=tuple(member.meta.get("categories") or ()) or None,
    )
