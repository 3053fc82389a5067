"""The numbers a device computes with: compute dtypes, TF32, cuDNN's autotuning, native bfloat16.

PyTorch runs float32 convolutions on CUDA as TF32 by default (cuDNN's ``allow_tf32``), which
measured 1.2e-3 relative error at resnet50's layer4 against a float64 reference, against
2.6e-6 with TF32 off. Here ``float32`` means float32 on every device and ``tf32`` is the
explicit faster choice. The flags are process-wide, so they are set around each forward pass
and put back as they were: a library user's own settings survive.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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
    """
    cudnn = torch.backends.cudnn
    saved_benchmark, cudnn.benchmark = cudnn.benchmark, autotune
    restore = _set_tf32(tf32)
    try:
        yield
    finally:
        restore()
        cudnn.benchmark = saved_benchmark


def _set_tf32(tf32: bool) -> Callable[[], None]:
    """TF32 on or off for CUDA's convolutions and matmuls; the call that puts every setting back.

    torch 2.9 added a per-backend ``fp32_precision`` beside the legacy flags and keeps both: a
    legacy reader (``torch.backends.cudnn.allow_tf32``, ``get_float32_matmul_precision``, and
    inductor, which reads them: pytorch/pytorch#166387) raises once the two disagree. So both are set, to
    the same mode: the legacy flags first (they rewrite the new values), then the new values
    explicitly. Where the legacy flags cannot be read (the user's own settings mix the two APIs)
    they cannot be put back either: the new API alone is set.
    """
    mode = "tf32" if tf32 else "ieee"
    new_api = _fp32_precision_settings()
    saved_new = [(setting, setting.fp32_precision) for setting in new_api]
    saved_legacy = _legacy_tf32_flags(strict=not new_api)
    if saved_legacy is not None:
        _set_legacy_tf32_flags("high" if tf32 else "highest", tf32)
    cuda_new_api = [torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn.rnn] if new_api else []
    for setting in cuda_new_api:
        setting.fp32_precision = mode

    def restore() -> None:
        if saved_legacy is not None:
            _set_legacy_tf32_flags(*saved_legacy)
        for setting, value in saved_new:
            setting.fp32_precision = value

    return restore


@functools.cache  # asked on every CUDA batch; torch's backend objects do not change
def _fp32_precision_settings() -> tuple[Any, ...]:
    """torch's objects with an ``fp32_precision`` (2.9 on; none before): the global one and each backend's."""
    backends = torch.backends
    candidates = [backends, backends.cuda.matmul, backends.cudnn, getattr(backends.cudnn, "conv", None),
                  getattr(backends.cudnn, "rnn", None), backends.mkldnn, getattr(backends.mkldnn, "matmul", None),
                  getattr(backends.mkldnn, "conv", None), getattr(backends.mkldnn, "rnn", None)]
    return tuple(candidate for candidate in candidates if hasattr(candidate, "fp32_precision"))


def _legacy_tf32_flags(*, strict: bool = False) -> tuple[str, bool] | None:
    """The matmul precision and cuDNN's ``allow_tf32``; ``None`` where torch refuses to read them
    (the new API was set apart from them), unless ``strict``."""
    try:
        return torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    except RuntimeError:
        if strict:
            raise
        return None


def _set_legacy_tf32_flags(matmul: str, cudnn: bool) -> None:
    """``matmul``: a precision as ``torch.set_float32_matmul_precision`` takes it ("high": TF32).

    Not ``matmul.allow_tf32``: from torch 2.9 it leaves oneDNN's matmul precision as it was, which
    ``set_float32_matmul_precision("high")`` had also set, and the legacy reader then raises.
    """
    # Unsilenced: torch 2.9 says once per process that the new API exists (2.11 and 2.14 do not). A
    # catch_warnings here would swap the process's warning filters on every CUDA batch, under the
    # feet of threads decoding with Pillow, and make every "once" warning show again.
    torch.set_float32_matmul_precision(matmul)
    torch.backends.cudnn.allow_tf32 = cudnn


NATIVE_CPU_FLAGS = {
    "bfloat16": ("avx512_bf16", "amx_bf16", "bf16"),
    "float16": ("avx512_fp16", "amx_fp16", "asimdhp"),
}
"""The /proc/cpuinfo flags (x86's, then Arm's) of CPUs that compute each half-precision dtype natively."""


def cpu_computes_natively(dtype: str, cpuinfo: Path = Path("/proc/cpuinfo")) -> bool | None:
    """Whether this CPU computes ``dtype`` (bfloat16, float16) natively; ``None``: unknown.

    Without it oneDNN converts to float32 and back around every operation: bfloat16 measured 4x
    slower than float32 on an AMD EPYC without AVX-512; float16 5.5x with oneDNN held to AVX2.
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
            return bool(set(value.split()) & set(NATIVE_CPU_FLAGS[dtype]))
    return None


class EmulatedDtypeWarning(UserWarning):
    """``--dtype bfloat16`` or ``float16`` on a CPU that emulates it."""


def warn_if_emulated(name: str, device_type: str) -> None:
    """One warning for a half-precision ``--dtype`` this CPU emulates (slower than float32), for a model on ``device_type``."""
    if name in NATIVE_CPU_FLAGS and device_type == "cpu" and cpu_computes_natively(name) is False:
        *x86, arm = NATIVE_CPU_FLAGS[name]
        warnings.warn(EmulatedDtypeWarning(
            f"--dtype {name}: this CPU has no native {name} (no {' or '.join(x86)} flag, or {arm} on Arm, "
            "in /proc/cpuinfo), so it is emulated and slower than float32; use --dtype float32"
        ), stacklevel=3)
