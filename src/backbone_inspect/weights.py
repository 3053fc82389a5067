"""Weights for a torchvision model: none (seeded random), torchvision's named weights, or a local checkpoint."""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from .errors import UsageError, WeightsError, first_line
from .images import Preprocessing
from .families import family_of
from .stages import check_arch

if TYPE_CHECKING:
    import torch
    from torch import nn

_NAMED_WEIGHTS_PATTERN = re.compile(r"^[A-Z][A-Z0-9_]*$")
DETECTION_BODY_ALIASES = (("", "features."),)
"""torchvision's detection bodies without ``backbone.body.``: ResNet's body keeps the model's keys
(``layer1.``), MobileNetV3's is an ``IntermediateLayerGetter`` over ``features`` (its ``3.`` is ``features.3.``)."""


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


def _named_weights(arch: str, name: str, given: str | None = None) -> Any:
    from torchvision import models

    enum = models.get_model_weights(arch)
    if name == "DEFAULT":
        return enum.DEFAULT
    try:
        return enum[name]
    except KeyError:
        raise UsageError(
            f"--weights {given or name!r} does not exist for {arch}; valid: none, "
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
        return "named", _named_weights(arch, weights.upper(), given=weights)
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

    from .options import check_seed

    seed = check_seed(seed)  # the generator's own error for a str does not name the option
    # fork_rng keeps the caller's global RNG untouched while making initialisation reproducible. The
    # model is built on the CPU: only the CPU generator is seeded (torch.manual_seed would also reseed
    # the caller's CUDA generators, and wait for CUDA's start while warm_up_cuda's thread is in it).
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        return models.get_model(arch, weights=None)


def _hub_file(member: Any) -> Path:
    """Where torch.hub keeps the file of a torchvision weights member."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(member.url).path)


def _hub_state_dict(arch: str, member: Any) -> dict[str, torch.Tensor]:
    import torch

    cached = _hub_file(member)
    folder, filename = cached.parent, cached.name
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
                f"cannot read cached weights {cached} for {arch} {member.name}: {type(error).__name__}: {first_line(error)}; "
                "delete it to download it again"
            ) from error
        raise WeightsError(
            f"{arch} weights {member.name} are not cached and cannot be downloaded "
            f"({first_line(error)}); put {filename} (from {member.url}) into {folder}"
        ) from error


def _load_named(model: nn.Module, arch: str, member: Any) -> None:
    """The named weights into ``model``; a cached file holding other weights is named, as one unreadable is."""
    from .checkpoints import fit_problems

    state = _hub_state_dict(arch, member)
    problems = fit_problems(model.state_dict(), state)
    if problems:
        raise WeightsError(
            f"cached weights {_hub_file(member)} for {arch} {member.name} do not fit {arch}: "
            + "; ".join(problems) + "; delete it to download it again"
        )
    model.load_state_dict(state)


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
    """The torchvision model ``arch`` with ``weights`` loaded, and a description of them."""
    plan = plan_weights(arch, weights)
    model = _random_model(arch, seed)
    if plan.kind == "none":
        return model, LoadedWeights("none", "none", plan.preprocessing, head_loaded=False)
    if plan.kind == "checkpoint":
        from .checkpoints import load_checkpoint_into

        head = family_of(arch).head_prefixes  # type: ignore[union-attr]
        note = load_checkpoint_into(model, arch, Path(plan.label), head, DETECTION_BODY_ALIASES)
        return model, LoadedWeights(plan.label, "checkpoint", plan.preprocessing, head_loaded=note is None, head_note=note)
    member = _named_weights(arch, plan.label)
    _load_named(model, arch, member)
    return model, LoadedWeights(
        label=plan.label,
        kind="named",
        preprocessing=plan.preprocessing,
        head_loaded=True,
        categories=tuple(member.meta.get("categories") or ()) or None,
    )
