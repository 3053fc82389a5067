"""Parsing of option values that needs no torch, so usage errors are instant."""

from __future__ import annotations

import re

from .errors import UsageError

_DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def parse_size(option: str, value: str | None) -> int | None | str:
    """``--resize``/``--crop``: a positive int, ``none``, or ``None`` when not given (use the weights')."""
    if value is None:
        return None
    text = value.strip().lower()
    if text == "none":
        return "none"
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise UsageError(f"invalid {option} {value!r}: expected a positive number of pixels or 'none'")


def check_device_spec(spec: str) -> str:
    text = spec.strip().lower()
    if not _DEVICE_PATTERN.match(text):
        raise UsageError(f"invalid --device {spec!r}: expected auto, cpu, cuda, cuda:N or mps")
    return text


DTYPE_NAMES: tuple[str, ...] = ("float32", "float16", "bfloat16")


def check_dtype(option: str, name: str) -> str:
    """``--dtype`` and ``--save-dtype``: one of ``DTYPE_NAMES``."""
    if name not in DTYPE_NAMES:
        raise UsageError(f"invalid {option} {name!r}: expected {', '.join(DTYPE_NAMES)}")
    return name
