"""Stage and architecture names. Torch-free, so option parsing and ``--help`` stay instant.

Stage indices mean the same on every arch: 0 is the stem, 1-4 are the stride-4, 8, 16 and 32
outputs. Their names are the family's: ResNet's ``stem, layer1..layer4``, every other family's
``stem, stage1..stage4``; each also answers to FPN's ``C2..C5`` and to its module path in the
model (``features.3``); ResNet's also to detectron2's ``res2..res5`` and to ``stage1..stage4``.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import UsageError
from .families import ARCHS, FAMILIES, STAGE_NAMES, TIMM_PREFIX, family_of, is_timm

__all__ = ["ARCHS", "DEFAULT_LAYERS", "STAGES", "StageInfo", "check_arch", "parse_layers", "stage_aliases", "stage_name", "stage_names"]

STAGES: tuple[str, ...] = family_of("resnet50").stage_names  # type: ignore[union-attr]
"""ResNet's stage names, shallow to deep; a stage's index in this tuple is its number on the command line."""

DEFAULT_LAYERS: tuple[int, ...] = (2, 3, 4)
"""The stride-8, 16 and 32 stages of any arch: a feature pyramid's input."""


@dataclass(frozen=True)
class StageInfo:
    """One stage as timm's ``feature_info`` describes it: name, channels and stride (reduction)."""

    name: str
    channels: int
    stride: int


@dataclass(frozen=True)
class StageDescription:
    """One stage of an arch for an input size, as ``--describe`` shows it."""

    name: str
    aliases: tuple[str, ...]
    channels: int
    stride: int
    output_size: tuple[int, int]
    receptive_field: int | None
    """In input pixels, along the convolutions and poolings; ``None`` where attention mixes whole windows."""
    parameters: int
    """Up to and including this stage."""

    def bytes_per_image(self, element_size: int) -> int:
        return self.channels * self.output_size[0] * self.output_size[1] * element_size


def stage_names(arch: str) -> tuple[str, ...]:
    """The five stage names of ``arch``, by index."""
    family = family_of(arch)
    return family.stage_names if family is not None else STAGE_NAMES


def stage_aliases(arch: str) -> dict[str, tuple[str, ...]]:
    """Each stage's other names on ``arch``: C2-C5, the family's own patterns (ResNet's res2-res5 and
    stage1-4), its module path."""
    family, names = family_of(arch), stage_names(arch)
    aliases: dict[str, tuple[str, ...]] = {}
    for index, name in enumerate(names):
        others = [f"C{index + 1}"] if index else []
        if family is not None:
            others += [pattern.format(c=index + 1, i=index) for pattern in family.alias_patterns] if index else []
            others += [family.stage_steps[index]] if family.path_aliases else []
        aliases[name] = tuple(other for other in others if other != name)
    return aliases


def valid_stages_text(arch: str = "resnet50") -> str:
    names, family = stage_names(arch), family_of(arch)
    patterns = family.alias_patterns if family is not None else ()
    ranges = ["C2-C5", *(f"{pattern.format(c=2, i=1)}-{pattern.format(c=5, i=4)}" for pattern in patterns)]
    others = f"{', '.join(ranges)} for {names[1]}-{names[4]}"
    if family is not None and family.path_aliases:
        others += f"; module paths {', '.join(family.stage_steps)}"
    return ", ".join(f"{index}={name}" for index, name in enumerate(names)) + f" (also {others})"


def stage_name(token: int | str, arch: str = "resnet50") -> str:
    """The canonical name on ``arch`` of one stage given as an index (``2``), a name (``"layer2"``) or an alias (``"C3"``)."""
    names = stage_names(arch)
    by_alias = {alias.lower(): name for name, aliases in stage_aliases(arch).items() for alias in (name, *aliases)}
    index = _as_index(token)
    if index is not None and 0 <= index < len(names):
        return names[index]
    text = token.strip() if isinstance(token, str) else None
    if text is not None and text.isascii() and text.isdigit():
        return stage_name(int(text), arch)
    if text is not None and text.lower() in by_alias:
        return by_alias[text.lower()]
    raise UsageError(f"invalid stage {token!r}; valid stages: {valid_stages_text(arch)}")


def _as_index(value: object) -> int | None:
    """``value`` as a whole number when it is one (an int, numpy's, a 0-d integer tensor), not a bool or text."""
    if isinstance(value, (bool, str, bytes)) or not hasattr(value, "__index__"):
        return None
    try:
        return operator.index(value)
    except TypeError:  # a float tensor has __index__ too
        return None


def parse_layers(layers: int | str | Iterable[int | str], arch: str = "resnet50") -> tuple[str, ...]:
    """Canonical stage names of ``arch``, shallow to deep, without repeats.

    Accepts ``"2,3,4"``, ``"layer2,layer4"``, ``"stem,1"`` or an iterable of indices and names.
    """
    if (not isinstance(layers, (int, str, Iterable)) and not hasattr(layers, "__index__")) or isinstance(layers, bytes):
        raise UsageError(f"invalid --layers {layers!r}: expected stages by index or name, e.g. '2,3,4'")
    if _as_index(layers) is not None or isinstance(layers, bool):  # one stage: an int, numpy's or a 0-d tensor's
        layers = (layers,)
    if isinstance(layers, str):
        tokens: list[int | str] = list(layers.split(","))
        if any(not str(token).strip() for token in tokens):
            raise UsageError(
                f"invalid --layers {layers!r}: empty stage; valid stages: {valid_stages_text(arch)}"
            )
    else:
        tokens = list(layers)
    if not tokens:
        raise UsageError(f"no stages given; valid stages: {valid_stages_text(arch)}")
    chosen = {stage_name(token, arch) for token in tokens}
    return tuple(name for name in stage_names(arch) if name in chosen)


def check_arch(arch: str) -> str:
    """``arch`` when it is a known torchvision arch or ``timm:<name>`` (a timm name is checked when built)."""
    if isinstance(arch, str) and is_timm(arch) and not arch[len(TIMM_PREFIX) :].strip():
        raise UsageError(f"--arch {arch!r} names no timm model: give timm:<model name>, e.g. timm:resnet50d")
    if isinstance(arch, str) and is_timm(arch) and arch[len(TIMM_PREFIX) :] != arch[len(TIMM_PREFIX) :].strip():
        # refused, as a torchvision name with spaces is: the name is recorded as given, and must be the model's
        raise UsageError(f"--arch {arch!r} has spaces around the model name: give {TIMM_PREFIX}{arch[len(TIMM_PREFIX) :].strip()}")
    if not isinstance(arch, str) or not (arch in ARCHS or (is_timm(arch) and arch[len(TIMM_PREFIX) :].strip())):
        by_family = "; ".join(f"{family.name}: {', '.join(family.archs)}" for family in FAMILIES)
        closest = _closest_arch(arch) if isinstance(arch, str) else None
        raise UsageError(f"unknown arch {arch!r}{f' (did you mean {closest}?)' if closest else ''}; valid archs: {by_family}; "
                         "or timm:<model name> (with timm installed)")
    return arch


def _closest_arch(arch: str) -> str | None:
    """The torchvision arch a mistyped name most likely meant (its case aside), or ``None``."""
    import difflib

    by_lower = {name.lower(): name for name in ARCHS}
    found = difflib.get_close_matches(arch.strip().lower(), list(by_lower), n=1, cutoff=0.8)
    return by_lower[found[0]] if found else None
