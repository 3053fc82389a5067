"""Stage and architecture names. Torch-free, so option parsing and ``--help`` stay instant."""

from __future__ import annotations

from collections.abc import Iterable

from .errors import UsageError

ARCHS: tuple[str, ...] = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
)

STAGES: tuple[str, ...] = ("stem", "layer1", "layer2", "layer3", "layer4")
"""Stage names, shallow to deep; a stage's index in this tuple is its number on the command line."""

DEFAULT_LAYERS: tuple[str, ...] = ("layer2", "layer3", "layer4")


STAGE_ALIASES: dict[str, tuple[str, ...]] = {
    "stem": (),
    **{
        f"layer{number}": (f"C{number + 1}", f"res{number + 1}", f"stage{number}")
        for number in range(1, 5)
    },
}
"""Other names of the stages: FPN's C2-C5, detectron2's res2-res5, Hugging Face's stage1-stage4."""

_BY_ALIAS: dict[str, str] = {alias.lower(): name for name, aliases in STAGE_ALIASES.items() for alias in aliases}


def valid_stages_text() -> str:
    return (
        ", ".join(f"{index}={name}" for index, name in enumerate(STAGES))
        + " (also C2-C5, res2-res5, stage1-stage4 for layer1-layer4)"
    )


def stage_name(token: int | str) -> str:
    """The canonical name of one stage given as an index (``2``), a name (``"layer2"``) or an alias (``"C3"``)."""
    if isinstance(token, bool):
        raise UsageError(f"invalid stage {token!r}; valid stages: {valid_stages_text()}")
    if isinstance(token, int):
        if 0 <= token < len(STAGES):
            return STAGES[token]
        raise UsageError(f"invalid stage {token!r}; valid stages: {valid_stages_text()}")
    if not isinstance(token, str):
        raise UsageError(f"invalid stage {token!r}; valid stages: {valid_stages_text()}")
    text = token.strip()
    if text.isascii() and text.isdigit():
        return stage_name(int(text))
    if text.lower() in STAGES:
        return text.lower()
    if text.lower() in _BY_ALIAS:
        return _BY_ALIAS[text.lower()]
    raise UsageError(f"invalid stage {token!r}; valid stages: {valid_stages_text()}")


def parse_layers(layers: int | str | Iterable[int | str]) -> tuple[str, ...]:
    """Canonical stage names, shallow to deep, without repeats.

    Accepts ``"2,3,4"``, ``"layer2,layer4"``, ``"stem,1"`` or an iterable of indices and names.
    """
    if not isinstance(layers, (int, str, Iterable)) or isinstance(layers, bytes):
        raise UsageError(f"invalid --layers {layers!r}: expected stages by index or name, e.g. '2,3,4'")
    if isinstance(layers, int):
        layers = (layers,)
    if isinstance(layers, str):
        tokens: list[int | str] = list(layers.split(","))
        if any(not str(token).strip() for token in tokens):
            raise UsageError(
                f"invalid --layers {layers!r}: empty stage; valid stages: {valid_stages_text()}"
            )
    else:
        tokens = list(layers)
    if not tokens:
        raise UsageError(f"no stages given; valid stages: {valid_stages_text()}")
    names = {stage_name(token) for token in tokens}
    return tuple(name for name in STAGES if name in names)


def check_arch(arch: str) -> str:
    if arch not in ARCHS:
        raise UsageError(f"unknown arch {arch!r}; valid archs: {', '.join(ARCHS)}")
    return arch
