"""The run configuration: everything that decides the features, resolved once from the options.

``feature_config(...)`` checks every option and plans the weights and the preprocessing
without loading anything (torchvision is imported only for named weights). The result is
frozen and picklable: both engines and the output store are handed the same object.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from .errors import UsageError
from .images import MAX_SIDE, Preprocessing
from .families import family_of, is_timm
from .options import DECODERS, POOLINGS, check_choice, check_device_spec, check_dtype, check_flag, check_seed, parse_size, read_categories
from .stages import DEFAULT_LAYERS, check_arch, parse_layers
from .weights import WeightsPlan, plan_weights


@dataclass(frozen=True)
class FeatureConfig:
    """What makes features: the model, the stages, the preprocessing and the numbers' dtypes."""

    arch: str
    stages: tuple[str, ...]
    """Canonical stage names, shallow to deep."""
    weights: WeightsPlan
    seed: int
    """Seed of the random initialisation (it decides the numbers only with ``weights`` none)."""
    preprocessing: Preprocessing
    """The weights' own preprocessing with ``resize``/``crop`` applied."""
    dtype: str = "float32"
    """The compute dtype; statistics are computed in float32 whatever it is."""
    save_dtype: str = "float32"
    channels_last: bool | None = None
    """``None``: where it is faster (cpu, cuda)."""
    compile: bool = False
    topk: int = 0
    categories: tuple[str, ...] | None = None
    """Class names for ``topk``; ``None``: the named weights' own."""
    device: str = "auto"
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``: resolved where the model runs."""
    pool: str = "none"
    """``avg``/``max``: each stage's features are one vector [C] (global pooling over H×W on the
    device); statistics still describe the full maps."""
    decode: str = "cpu"
    """``gpu``: JPEGs decoded, resized and cropped on the CUDA device (``device_decode``); its
    numbers differ slightly from Pillow's, so it is a setting of the dump."""

    def settings(self) -> dict[str, Any]:
        """What makes two dumps comparable: resuming into a folder needs the same settings.

        Recorded in the folder's settings file and in every feature file's ``meta``.
        """
        return {
            "arch": self.arch,
            "weights": self.weights.label,
            "weights_sha256": self._checkpoint_digest(),
            "seed": self.seed if self.weights.kind == "none" else None,
            "layers": list(self.stages),
            "preprocessing": self.preprocessing.to_dict(),
            "dtype": self.dtype,
            "save_dtype": self.save_dtype,
            "pool": self.pool,
            "decode": self.decode,
        }

    def _checkpoint_digest(self) -> str | None:
        """A checkpoint's SHA-256 (``WeightsError`` when it cannot be read); ``None`` for other weights,
        whose name says which they are."""
        if self.weights.kind != "checkpoint":
            return None
        from pathlib import Path

        from .checkpoints import checkpoint_digest

        return checkpoint_digest(Path(self.weights.label))


def feature_config(
    *, arch: str = "resnet50", layers: Iterable[int | str] | str | int = DEFAULT_LAYERS, weights: Any = None,
    seed: int = 0, resize: int | str | None = None, crop: int | str | None = None, dtype: str = "float32",
    save_dtype: str = "float32", channels_last: bool | None = None, compile: bool = False, topk: int = 0,
    categories: Sequence[str] | str | os.PathLike[str] | None = None, device: str = "auto", pool: str = "none", decode: str = "cpu",
) -> FeatureConfig:
    """Check the options and resolve them into one ``FeatureConfig`` (``UsageError`` on bad values).

    ``weights``: ``None``/``"none"`` (random, from ``seed``), a torchvision weights name
    (``"DEFAULT"``, ``"IMAGENET1K_V2"``) or enum member, or a checkpoint path.
    ``resize``/``crop``: pixels, ``"none"`` to skip the step, ``None`` for the weights' own.
    ``categories``: class names, or the path of a file with one per line.
    ``pool``: ``none``, or ``avg``/``max`` to reduce each stage to a vector of its channels.
    ``decode``: ``cpu`` (Pillow, in the workers) or ``gpu`` (JPEGs on the CUDA device, which ``plan_run`` checks).
    """
    arch, stages = check_arch(arch), parse_layers(layers, arch)
    dtype, save_dtype, device = check_dtype("--dtype", dtype), check_dtype("--save-dtype", save_dtype), check_device_spec(device)
    if dtype == "tf32" and device in ("cpu", "mps"):  # auto is resolved where the model runs
        raise UsageError(f"--dtype tf32: TF32 is a CUDA mode (--device {device}); use --dtype float32")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 0:
        raise UsageError(f"--topk {topk!r}: expected a positive number of classes")
    if categories is not None and not topk:  # the command's rule: names for the classes --topk shows
        raise UsageError("--categories needs --topk K")
    plan = plan_timm_weights(arch, weights) if is_timm(arch) else plan_weights(arch, weights)
    preprocessing = _preprocessing(plan.preprocessing, parse_size("--resize", resize), parse_size("--crop", crop))
    _check_arch_takes(arch, stages, topk, preprocessing)
    return FeatureConfig(
        arch=arch, stages=stages, weights=plan, seed=check_seed(seed), preprocessing=preprocessing, dtype=dtype, save_dtype=save_dtype,
        channels_last=check_flag("--channels-last", channels_last, optional=True),
        compile=bool(check_flag("--compile", compile)),
        topk=topk,
        categories=_category_names(categories),
        device=device,
        pool=check_choice("--pool", pool, POOLINGS),
        decode=check_choice("--decode", decode, DECODERS),
    )


def plan_timm_weights(arch: str, weights: Any) -> WeightsPlan:
    """timm's weights plan (``timm_models``; importing timm only for a timm arch, first: it names the extra when missing)."""
    from .timm_models import plan_timm_weights as plan

    return plan(arch, weights)


def _check_arch_takes(arch: str, stages: tuple[str, ...], topk: int, preprocessing: Preprocessing) -> None:
    """Usage errors for what an arch cannot take: another input size than its fixed one (MaxViT, some
    timm models); for a timm model also a stage it lacks and ``--topk``."""
    if is_timm(arch):
        from .timm_models import check_timm_config

        fixed = check_timm_config(arch, stages, topk)
    else:
        fixed = family_of(arch).fixed_input  # type: ignore[union-attr]
    if fixed is not None and preprocessing.crop != fixed:
        crop = "none" if preprocessing.crop is None else preprocessing.crop
        raise UsageError(f"--crop {crop}: {arch} takes only {fixed}×{fixed} inputs (fixed when it is built); use --crop {fixed}")


def _preprocessing(own: Preprocessing, resize: int | str | None, crop: int | str | None) -> Preprocessing:
    """The weights' preprocessing with the overrides applied: ``None`` keeps a value, ``"none"`` skips the step."""
    given = {key: value for key, value in (("resize", resize), ("crop", crop)) if value is not None}
    preprocessing = replace(own, **{key: (None if value == "none" else value) for key, value in given.items()})
    for option in ("resize", "crop"):
        side = getattr(preprocessing, option)
        if side is not None and side > MAX_SIDE:
            raise UsageError(f"--{option} {side}: at most {MAX_SIDE} px (a larger input does not fit in memory)")
    if preprocessing.resize is not None and preprocessing.crop is not None and preprocessing.crop > preprocessing.resize:
        def told(option: str) -> str:
            return "" if option in given else " (the weights' own; give --" + option + " none to skip it)"

        raise UsageError(
            f"--crop {preprocessing.crop}{told('crop')} is larger than --resize {preprocessing.resize}{told('resize')}: "
            "every image would be smaller than its crop"
        )
    return preprocessing


def _category_names(categories: Sequence[str] | str | os.PathLike[str] | None) -> tuple[str, ...] | None:
    if categories is None:
        return None
    if isinstance(categories, (str, os.PathLike)) or not isinstance(categories, Sequence):
        return tuple(read_categories(categories))  # type: ignore[arg-type]
    return tuple(str(name) for name in categories)
