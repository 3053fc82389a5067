"""Local checkpoints: reading them as people have them (wrapped, DDP, detection) and loading their backbone."""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import WeightsError, first_line

if TYPE_CHECKING:
    import torch
    from torch import nn

# torch words it "Unsupported global: GLOBAL x.y" or, for a blocked module (os, subprocess), "unsupported GLOBAL x.y".
_UNSUPPORTED_GLOBAL = re.compile(r"unsupported (?:global: )?GLOBAL ([\w.]+)", re.IGNORECASE)
_EXAMPLES_SHOWN = 5
Aliases = tuple[tuple[str, str], ...]


def _checkpoint_read_error(path: Path, error: Exception) -> WeightsError:
    text, found = str(error), _UNSUPPORTED_GLOBAL.search(str(error))
    if found:
        reason = f"it holds pickled Python objects ({found.group(1)}), not only tensors; save model.state_dict() instead"
    elif "PytorchStreamReader failed" in text or _starts_like_a_zip(path):
        reason = "truncated or corrupt: its zip archive is incomplete (copy or save it again)"
    elif _is_empty(path):
        reason = "the file is empty (copy or save it again)"
    elif "Weights only load failed" in text:
        reason = "not a PyTorch checkpoint (it cannot be unpickled)"
    else:
        reason = f"not a PyTorch checkpoint ({type(error).__name__}: {first_line(error)})"
    return WeightsError(f"cannot read checkpoint {path}: {reason}")


def _is_empty(path: Path) -> bool:
    try:
        return path.stat().st_size == 0
    except OSError:
        return False


def _starts_like_a_zip(path: Path) -> bool:
    """torch.save writes a zip archive: one that will not load is cut short or damaged."""
    try:
        with path.open("rb") as handle:
            return handle.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def _check_is_file(path: Path) -> None:
    if not path.is_file():
        kind = "is a folder, not a file" if path.is_dir() else "is not a regular file" if path.exists() else "does not exist"
        raise WeightsError(f"checkpoint {path} {kind}")


def checkpoint_digest(path: Path) -> str:
    """The SHA-256 of a checkpoint file's bytes: a dump's settings record it beside the path, so a
    checkpoint replaced under the same name (a training run's ``best.pth``) is not taken for the
    one the dump's features were made with. 0.08 s for 100 MB (measured, with SHA-NI)."""
    import hashlib

    _check_is_file(path)
    try:
        digest = hashlib.sha256()
        with path.open("rb") as handle:  # hashlib.file_digest is Python 3.11's
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    except OSError as error:
        raise WeightsError(f"cannot read checkpoint {path}: {error.strerror or error}") from error


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A flat state_dict from a checkpoint as people have them (wrapped, DDP, detection)."""
    import torch

    _check_is_file(path)
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols: the error says it all
            warnings.simplefilter("ignore")
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise _checkpoint_read_error(path, error) from error
    state = _unwrap(loaded)
    if state is None:
        raise WeightsError(f"checkpoint {path} holds no state_dict of tensors")
    return _strip_prefixes(state)


def _unwrap(loaded: Any) -> dict[str, torch.Tensor] | None:
    import torch

    # A wrapper's state_dict or model comes first: training scripts keep tensors beside it
    # (pytorch/examples' ImageNet checkpoints hold best_acc1 as a tensor).
    while isinstance(loaded, Mapping):
        inner = next((loaded[k] for k in ("state_dict", "model") if isinstance(loaded.get(k), Mapping)), None)
        if inner is None:
            tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
            return tensors if tensors and all(isinstance(k, str) for k in tensors) else None
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
        # A detection checkpoint: keep the body (ResNet's; MobileNetV3's features, see weights.py), drop FPN, RPN and heads.
        state = {k[len(body) :]: v for k, v in state.items() if k.startswith(body)}
    return state


def _examples(keys: list[str]) -> str:
    shown = ", ".join(keys[:_EXAMPLES_SHOWN])
    return shown + (f" and {len(keys) - _EXAMPLES_SHOWN} more" if len(keys) > _EXAMPLES_SHOWN else "")


def fit_problems(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> list[str]:
    """What keeps a checkpoint's backbone from loading: missing, unexpected and wrongly shaped keys."""
    # Frozen batch norm (detection checkpoints) has no num_batches_tracked: not a mismatch.
    missing = sorted(k for k in expected if k not in given and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in given if k not in expected)
    wrong_shape = sorted(
        f"{k} {list(given[k].shape)} vs {list(expected[k].shape)}" for k in given if k in expected and given[k].shape != expected[k].shape
    )
    labelled = (("missing", missing), ("unexpected", unexpected), ("wrong shape (checkpoint vs model)", wrong_shape))
    return [f"{label}: {_examples(keys)}" for label, keys in labelled if keys]


def _head_note(head: Mapping[str, torch.Tensor], expected_head: Mapping[str, torch.Tensor], arch: str) -> str | None:
    """Why a checkpoint's classifier head is not loaded; ``None`` when it fits."""
    if not head:
        return "classifier head not loaded: the checkpoint has none"
    fits = all(k in expected_head and head[k].shape == expected_head[k].shape for k in head)
    lacking = sorted(k for k in expected_head if k not in head and not k.endswith("num_batches_tracked"))
    if fits and not lacking:
        return None
    if fits:  # a detection body ends inside the head (MobileNetV3's features.16): the classifier is not there
        return f"classifier head not loaded: the checkpoint has only part of it (no {_examples(lacking)})"
    def shapes(tensors: Mapping[str, torch.Tensor]) -> str:
        return ", ".join(f"{k} {list(v.shape)}" for k, v in sorted(tensors.items()) if k.endswith("weight"))

    return f"classifier head not loaded: checkpoint has {shapes(head)}; {arch} has {shapes(expected_head)}"


def _renamed(state: Mapping[str, torch.Tensor], expected: Mapping[str, Any], aliases: Aliases) -> dict[str, torch.Tensor]:
    """``state`` with each key the model lacks renamed by the first alias ``(old prefix, new prefix)``
    that gives a key the model has and the checkpoint does not."""
    def rename(key: str) -> str:
        for old, new in () if key in expected else aliases:
            candidate = new + key[len(old) :]
            if key.startswith(old) and candidate in expected and candidate not in state:
                return candidate
        return key

    return {rename(key): value for key, value in state.items()}


def _layout_hint(state: Mapping[str, torch.Tensor], expected: Mapping[str, Any]) -> str:
    """Why a detection checkpoint's keys cannot be matched, where it is one ``backbone.body.`` did not unwrap."""
    if any(key.startswith("backbone.") for key in state) and not any(key.startswith("backbone.") for key in expected):
        return (
            "; its backbone is not under backbone.body. (torchvision's Faster/Mask R-CNN, RetinaNet and FCOS layout) "
            "but in another detector's layout (SSD's backbone.features regroups the blocks), which cannot be mapped"
        )
    return ""


def load_checkpoint_into(
    model: nn.Module, arch: str, path: Path, head_prefixes: tuple[str, ...], aliases: Aliases = (),
) -> str | None:
    """Load the backbone of a local checkpoint; the head (the state under ``head_prefixes``) only
    when it has the model's shapes. Returns why the head was not loaded, or ``None`` when it was.
    ``aliases``: key prefixes of other layouts of the same modules, as ``(theirs, the model's)``.
    """
    expected = model.state_dict()
    state = _renamed(read_checkpoint(path), expected, aliases)
    backbone = {k: v for k, v in expected.items() if not k.startswith(head_prefixes)}
    given = {k: v for k, v in state.items() if not k.startswith(head_prefixes)}
    problems = fit_problems(backbone, given)
    if problems:
        raise WeightsError(f"checkpoint {path} does not fit {arch}: " + "; ".join(problems) + _layout_hint(state, expected))
    head = {k: v for k, v in state.items() if k.startswith(head_prefixes)}
    note = _head_note(head, {k: v for k, v in expected.items() if k.startswith(head_prefixes)}, arch)
    model.load_state_dict({**given, **(head if note is None else {})}, strict=False)
    return note
