"""The numbers a device computes with: compute dtypes, TF32, cuDNN's autotuning, native bfloat16.

PyTorch runs float32 convolutions on CUDA as TF32 by default (cuDNN's ``allow_tf32``), which
measured 1.2e-3 relative error at resnet50's layer4 against a float64 reference, against
2.6e-6 with TF32 off. Here ``float32`` means float32 on every device and ``tf32`` is the
explicit faster choice. The flags are process-wide, so they are set around each forward pass
and put back as they were: a library user's own settings survive.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from .errors import UsageError

TORCH_DTYPES: dict[str, torch.dtype] = {  # the names are options.COMPUTE_DTYPES and options.SAVE_DTYPES
    "float32": torch.float32,
    "tf32": torch.float32,  # stored as float32; only CUDA's convolutions and matmuls round to TF32
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def check_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype of ``--dtype name`` on ``device``; ``tf32`` exists on CUDA only."""
    if name == "tf32" and device.type != "cuda":
        raise UsageError(f"--dtype tf32: TF32 is a CUDA mode (this run's device is {device.type}); use --dtype float32")
    return TORCH_DTYPES[name]


@contextlib.contextmanager
def cuda_math(*, tf32: bool, autotune: bool) -> Iterator[None]:
    """TF32 on or off and cuDNN's benchmark search on or off for a block; the settings found are restored.

    ``autotune``: cuDNN times every kernel for a new input shape (about a second for resnet50's
    first forward on an H200): worth it for a long run of one shape, never for a one-off.
    Through torch's per-backend ``fp32_precision`` where it exists (torch 2.9 on): reading the
    legacy ``allow_tf32`` after a user set the new API is an error there.
    """
    cudnn = torch.backends.cudnn
    saved_benchmark, cudnn.benchmark = cudnn.benchmark, autotune
    backends = _precision_backends()
    saved = [(backend, getattr(backend, name)) for backend, name in backends]
    for backend, name in backends:
        setattr(backend, name, _precision_value(name, tf32))
    try:
        yield
    finally:
        for (backend, name), (_, value) in zip(backends, saved):
            setattr(backend, name, value)
        cudnn.benchmark = saved_benchmark


def _precision_backends() -> list[tuple[object, str]]:
    """The (object, attribute) pairs that decide TF32 for convolutions and matmuls."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        return [(torch.backends.cuda.matmul, "fp32_precision"), (conv, "fp32_precision")]
    return [(torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32")]


def _precision_value(name: str, tf32: bool) -> object:
    if name == "fp32_precision":
        return "tf32" if tf32 else "ieee"
    return tf32


def cpu_has_native_bfloat16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool | None:
    """Whether this CPU computes bfloat16 natively (x86 AVX-512 BF16 or AMX, Arm BF16); ``None``: unknown.

    Without it oneDNN converts to float32 and back around every operation: measured 4x slower
    than float32 on an AMD EPYC without AVX-512.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            found = set(value.split())
            return bool(found & {"avx512_bf16", "amx_bf16", "bf16"})
    return None


class SlowBfloat16Warning(UserWarning):
    """``--dtype bfloat16`` on a CPU that emulates it."""


def warn_if_slow_bfloat16(name: str, device: torch.device) -> None:
    if name == "bfloat16" and device.type == "cpu" and cpu_has_native_bfloat16() is False:
        warnings.warn(SlowBfloat16Warning(
            "--dtype bfloat16: this CPU has no native bfloat16 (no avx512_bf16 or amx_bf16 flag, or bf16 on Arm, "
            "in /proc/cpuinfo), so it is emulated and slower than float32; use --dtype float32"
        ), stacklevel=3)
