"""timm's models (``--arch timm:<name>``, the optional ``[timm]`` extra): names, weights, and which
of a model's ``feature_info`` entries are the stages.

The stage rule is the torchvision families' own: stage 1-4 are the last ``feature_info`` entries
at reductions 4, 8, 16 and 32, stage 0 the last at reduction 2. A model without all four of 4-32
(a ViT: 16 throughout) is no feature pyramid, and is refused.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UsageError, WeightsError, first_line
from .families import TIMM_PREFIX
from .options import check_seed
from .images import Preprocessing
from .stages import STAGE_NAMES, check_arch
from .weights import LoadedWeights, WeightsPlan

if TYPE_CHECKING:
    from torch import nn

PYRAMID_REDUCTIONS: tuple[int, ...] = (2, 4, 8, 16, 32)
"""The reduction of each stage index: the stem's, then stages 1-4's."""
NAMED_WEIGHTS = ("DEFAULT", "PRETRAINED")


def import_timm() -> Any:
    try:
        import timm
    except ImportError:
        raise UsageError("--arch timm:...: timm is not installed; pip install 'backbone-inspect[timm]'") from None
    return timm


def timm_name(arch: str) -> str:
    """The timm model name of ``timm:<name>``, checked against timm's registry."""
    timm, name = import_timm(), check_arch(arch)[len(TIMM_PREFIX) :]
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UsageError(f"unknown timm model {name!r}; {hint}timm.list_models('pattern*') lists them")
    base, _, tag = name.partition(".")
    if tag and name not in timm.list_pretrained(f"{base}.*"):
        tags = ", ".join(known.partition(".")[2] for known in timm.list_pretrained(f"{base}.*"))
        raise UsageError(f"timm model {base!r} has no pretrained tag {tag!r}; its tags: {tags or 'none'}")
    return name


def check_is_timm_model(model: nn.Module, arch: str) -> None:
    """``UsageError`` unless ``model`` is a timm model built by the architecture ``arch`` names."""
    built_by = getattr(getattr(model, "pretrained_cfg", None), "get", lambda key: None)("architecture")
    name = timm_name(arch).split(".")[0]
    if built_by != name:
        raise UsageError(f"the model passed is not a {TIMM_PREFIX}{name}: pass timm.create_model({name!r}) or its arch")
    check_replayable(model, name)


def check_replayable(model: nn.Module, name: str) -> None:
    """``UsageError`` where this timm's model class has no ``forward_intermediates`` (timm 1.0.29's InceptionV3)."""
    if not hasattr(model, "forward_intermediates"):
        raise UsageError(
            f"{TIMM_PREFIX}{name}: timm {import_timm().__version__}'s {type(model).__name__} has no forward_intermediates, "
            "which the replay runs; a newer timm has it for more models (pip install -U timm)"
        )


def prune_to_stages(model: nn.Module, arch: str, indices: list[int]) -> None:
    """timm's own ``prune_intermediate_layers`` to the deepest of ``indices``, its norm and head dropped;
    ``UsageError`` where this timm cannot prune the model (timm 1.0.29's EfficientViT asserts "Cannot
    disable pooling")."""
    try:
        model.prune_intermediate_layers(indices, prune_norm=True, prune_head=True)
    except (AssertionError, NotImplementedError, ValueError, TypeError, AttributeError, RuntimeError) as error:
        raise UsageError(
            f"{arch}: timm {import_timm().__version__} cannot cut its {type(model).__name__} to the stages asked for "
            f"({first_line(error)}); a newer timm may (pip install -U timm)"
        ) from error


def check_not_timm_model(model: nn.Module, arch: str) -> None:
    """``UsageError`` for a timm model passed to replay as torchvision's ``arch``, naming the arch that replays it."""
    if not type(model).__module__.startswith("timm."):
        return
    name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or arch
    raise UsageError(f"the model passed is timm's {name}, not torchvision's {arch}: pass arch \"{TIMM_PREFIX}{name}\" to replay it")


def fixed_input_side(model: nn.Module) -> int | None:
    """The input side a timm model is built for, where its config says the size is fixed."""
    config = getattr(model, "pretrained_cfg", None) or {}
    return int(config["input_size"][-1]) if config.get("fixed_input_size") else None


def stage_indices(arch: str, feature_info: list[dict[str, Any]]) -> dict[str, int]:
    """Stage name → index into the model's ``feature_info`` (the stem only where it has a reduction-2 entry)."""
    reductions = [int(entry["reduction"]) for entry in feature_info]
    found = {
        name: max(index for index, reduction in enumerate(reductions) if reduction == wanted)
        for name, wanted in zip(STAGE_NAMES, PYRAMID_REDUCTIONS)
        if wanted in reductions
    }
    if any(name not in found for name in STAGE_NAMES[1:]):
        raise UsageError(
            f"--arch {arch}: its feature_info has reductions {', '.join(map(str, reductions))}, not a pyramid "
            "of stride-4, 8, 16 and 32 outputs; the stages are defined for CNN-like models"
        )
    return found


def feature_dicts(model: nn.Module) -> list[dict[str, Any]]:
    """A timm model's ``feature_info`` as a list of dicts (``num_chs``, ``reduction``, ``module``)."""
    info = model.feature_info
    return info.get_dicts() if hasattr(info, "get_dicts") else list(info)


def check_stages(arch: str, stages: tuple[str, ...], found: dict[str, int]) -> None:
    if any(name not in found for name in stages):
        raise UsageError(f"--arch {arch} has no stride-2 output for the stem (its first stage has stride 4): choose among 1-4")


def refuse_topk(arch: str, asked_by: str = "--topk") -> None:
    """``UsageError``: the head cannot run (``asked_by``: the option or keyword that asked for it)."""
    raise UsageError(f"{asked_by}: {arch} runs through timm's forward_intermediates, which stops before the classifier; use a torchvision arch")


def check_timm_config(arch: str, stages: tuple[str, ...], topk: int) -> int | None:
    """Usage errors a timm arch raises before anything is run (a stage it lacks, ``--topk``); the input
    side it is fixed to, where it is."""
    if topk:
        refuse_topk(arch)
    model = timm_skeleton(arch)
    check_stages(arch, stages, stage_indices(arch, feature_dicts(model)))
    return fixed_input_side(model)


def timm_skeleton(arch: str) -> nn.Module:
    """A timm model built without weights, on the meta device where its builder allows, in eval mode."""
    import torch

    timm, name = import_timm(), timm_name(arch)
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False).eval()
    except (NotImplementedError, RuntimeError):  # a builder that reads tensor values
        model = timm.create_model(name, pretrained=False).eval()
    check_replayable(model, name)
    return model


def plan_timm_weights(arch: str, weights: Any = None) -> WeightsPlan:
    """``none``, ``DEFAULT``/``pretrained`` (timm's pretrained weights, from its Hugging Face cache) or a checkpoint path."""
    name = timm_name(arch)
    if isinstance(weights, WeightsPlan):
        if weights.arch != arch:
            raise UsageError(f"weights planned for {weights.arch} cannot load into {arch}")
        return weights
    if weights is None or (isinstance(weights, str) and weights.strip().lower() == "none"):
        return WeightsPlan(arch, "none", "none", Preprocessing())
    if isinstance(weights, str) and weights.strip().upper() in NAMED_WEIGHTS and not Path(weights).exists():
        return WeightsPlan(arch, "named", pretrained_name(name), _timm_preprocessing(name))
    if isinstance(weights, str) and weights.strip().isupper() and not Path(weights).exists():
        raise UsageError(f"--weights {weights!r} is torchvision's kind of name; for {arch} give none, DEFAULT (timm's pretrained weights) or a checkpoint path")
    if isinstance(weights, (str, os.PathLike)) and str(weights).strip():
        return WeightsPlan(arch, "checkpoint", str(weights), Preprocessing())
    raise UsageError(f"--weights {weights!r} for {arch}: give none, DEFAULT (timm's pretrained weights) or a checkpoint path")


def pretrained_name(name: str) -> str:
    """The pretrained weights ``name`` loads, with the tag timm resolves it to (``resnet18.a1_in1k``): what
    the header and a dump's settings record, as torchvision's ``DEFAULT`` is recorded as the name it stands for."""
    from timm.models import get_pretrained_cfg

    base, tag = name.partition(".")[0], getattr(get_pretrained_cfg(name), "tag", "") or ""
    return f"{base}.{tag}" if tag else base


def _timm_preprocessing(name: str) -> Preprocessing:
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg

    config = resolve_data_config(pretrained_cfg=get_pretrained_cfg(name).to_dict())
    crop = int(config["input_size"][-1])
    return Preprocessing(
        resize=int(crop / config["crop_pct"]), crop=crop, interpolation=str(config["interpolation"]),
        mean=tuple(float(v) for v in config["mean"]), std=tuple(float(v) for v in config["std"]),
    )


def build_timm_model(arch: str, weights: Any = None, *, seed: int = 0) -> tuple[nn.Module, LoadedWeights]:
    """The timm model of ``arch`` with its weights loaded, and a description of them."""
    import torch

    timm, plan = import_timm(), plan_timm_weights(arch, weights)
    name = timm_name(arch)
    if plan.kind == "named":
        return _pretrained(timm, plan.label), LoadedWeights(plan.label, "named", plan.preprocessing, head_loaded=True)
    with torch.random.fork_rng(devices=[]):  # the CPU generator only, as weights._random_model seeds it
        torch.random.default_generator.manual_seed(check_seed(seed))
        model = timm.create_model(name, pretrained=False)
    if plan.kind == "none":
        return model, LoadedWeights("none", "none", plan.preprocessing, head_loaded=False)
    from .checkpoints import load_checkpoint_into
    from .timm_checkpoints import features_only_aliases, timm_head_prefixes

    skeleton = timm_skeleton(arch)  # pruned to learn what the replay runs: the rest is the head
    prefixes = timm_head_prefixes(skeleton, stage_indices(arch, feature_dicts(skeleton))["stage4"])
    note = load_checkpoint_into(model, arch, Path(plan.label), prefixes, features_only_aliases(model))
    return model, LoadedWeights(plan.label, "checkpoint", plan.preprocessing, head_loaded=note is None, head_note=note)


HUB_FILES = ("model.safetensors", "pytorch_model.bin")
"""The files timm's Hugging Face repositories hold its weights in, in the order timm tries them."""


def _pretrained(timm: Any, name: str) -> nn.Module:
    """timm's pretrained model, read from the Hugging Face cache without a request when cached there."""
    import huggingface_hub
    from huggingface_hub import constants
    from timm.models import get_pretrained_cfg

    hub_id = get_pretrained_cfg(name).hf_hub_id or name
    cached = [huggingface_hub.try_to_load_from_cache(hub_id, file, cache_dir=constants.HF_HUB_CACHE) for file in HUB_FILES]
    found = next((path for path in cached if isinstance(path, str)), None)
    if found is not None:
        try:
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": found, "source": "file"})
        except Exception as error:
            raise _unreadable_cached(found, name, error) from error
    folder = Path(constants.HF_HUB_CACHE) / f"models--{hub_id.replace('/', '--')}"
    missing = (
        f"timm weights for {name} are not cached and cannot be downloaded (%s); on a machine online run "
        f"timm.create_model({name!r}, pretrained=True), then copy {folder.name} from its Hugging Face cache into {folder.parent}"
    )
    if constants.HF_HUB_OFFLINE or not _resolves("huggingface.co"):
        raise WeightsError(missing % ("offline: HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "huggingface.co cannot be resolved"))
    try:
        with _quiet_hub():
            return timm.create_model(name, pretrained=True)
    except Exception as error:
        raise WeightsError(missing % first_line(error)) from error


def _unreadable_cached(found: str, name: str, error: Exception) -> WeightsError:
    """A cached weights file that will not load: which keys do not fit, where that is why, else timm's error."""
    from .timm_checkpoints import cached_misfit

    arch = f"{TIMM_PREFIX}{name}"
    problems = cached_misfit(found, timm_skeleton(arch))  # with the tag: its head's size is the tag's
    if problems:
        return WeightsError(f"cached weights {found} for {arch} do not fit it: {'; '.join(problems)}; delete it to download it again")
    return WeightsError(f"cannot read cached weights {found} for {arch}: {type(error).__name__}: {first_line(error)}; delete it to download it again")


def _resolves(host: str) -> bool:
    """Whether the host name resolves: offline machines fail here at once, not after the hub's retries."""
    import socket

    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _quiet_hub() -> Any:
    """Hugging Face's progress and retry messages kept off a non-terminal stderr, where errors stay one line."""
    import logging

    hub_log, level = logging.getLogger("huggingface_hub"), logging.getLogger("huggingface_hub").level
    chatter = sys.stderr if sys.stderr.isatty() else io.StringIO()
    if not sys.stderr.isatty():
        hub_log.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            yield
    finally:
        hub_log.setLevel(level)
