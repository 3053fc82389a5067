"""The machine the model runs on: device choice, cache-sized slices of a batch, the allocator."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import InspectError, UsageError
from .options import check_device_spec

if TYPE_CHECKING:
    from .backbone import Backbone


def resolve_device(spec: str, *, local_rank: int | None = None) -> torch.device:
    """``auto`` (cuda, then mps, then cpu), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; exit 2 if absent.

    ``local_rank``: under torchrun or Slurm, ``auto`` and ``cuda`` pick ``cuda:LOCAL_RANK`` (plain
    ``cuda`` would put every process of the node on GPU 0); ``cuda:N`` is taken as given.
    """
    text = check_device_spec(spec)
    mps_available = hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    if text == "auto":
        if torch.cuda.is_available():
            if local_rank is not None:
                return torch.device("cuda", local_rank % torch.cuda.device_count())
            return torch.device("cuda")
        return torch.device("mps") if mps_available else torch.device("cpu")
    device = torch.device(text)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UsageError(f"--device {spec}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
        if device.index is None and local_rank is not None:
            return torch.device("cuda", local_rank % count)
    if device.type == "mps" and not mps_available:
        raise UsageError(f"--device {spec}: MPS is not available on this machine")
    return device


def process_device(spec: str) -> torch.device:
    """``resolve_device`` for this process: under torchrun or Slurm, ``auto`` and ``cuda`` are its own GPU (LOCAL_RANK)."""
    from .shards import local_rank_from_env, shard_from_env

    return resolve_device(spec, local_rank=local_rank_from_env() if shard_from_env(strict=False) else None)


def default_channels_last(device: torch.device) -> bool:
    """channels_last where measured faster: CPU (oneDNN) and CUDA (cuDNN); not MPS."""
    return device.type in ("cpu", "cuda")


def to_channels_last(module: torch.nn.Module) -> torch.nn.Module:
    """``module``'s 4-D parameters and buffers in channels_last, the rest as they are: ``Module.to(memory_format=...)``
    refuses a model holding a 5-D tensor (timm's lambda_resnet26t: "required rank 4 tensor")."""
    return module._apply(lambda tensor: tensor.contiguous(memory_format=torch.channels_last) if tensor.dim() == 4 else tensor)


DEFAULT_CACHE_BYTES = 32 * 1024 * 1024


def last_level_cache_bytes() -> int:
    """Size of the CPU's largest (last-level) cache, from Linux sysfs; 32 MiB where unknown."""
    sizes: dict[int, int] = {}
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level = int((index / "level").read_text())
            text = (index / "size").read_text().strip().upper()
        except (OSError, ValueError):
            continue
        units = {"K": 1024, "M": 1024**2, "G": 1024**3}
        multiplier = units.get(text[-1:], 1)
        digits = text[:-1] if text[-1:] in units else text
        if digits.isascii() and digits.isdigit():
            sizes[level] = int(digits) * multiplier
    return sizes[max(sizes)] if sizes else DEFAULT_CACHE_BYTES


def cache_chunk_sizes(
    backbone: Backbone, height: int, width: int, *, element_size: int, cache_bytes: int
) -> dict[str, int]:
    """Images per slice for each stage on a CPU: the most (a power of two) whose output fits the cache.

    Measured on resnet50 at 224 px (2-core EPYC, 32 MiB L3, channels_last, ms per image at
    batch 1/4/8/16/32): the stem and layer1 run at 0.8/0.8/1.0/2.6/3.2 and 4.0/3.9/4.4/11.1/11.1,
    falling off a cliff once their large outputs (3.2 MB an image) stop fitting; layer4 runs at
    10.4/5.6/4.4/3.9/3.7, faster in large batches that share the reading of its weights. One
    batch size for all stages gets at best 21.6 ms an image (batch 8) and 34.3 at batch 32; a
    size per stage gets 20.0. Sizing by three quarters of the cache lands on those sizes.
    """
    budget = cache_bytes * 3 // 4
    sizes: dict[str, int] = {}
    for name in backbone.run_order:
        channels, stride = backbone.stage_peaks[name]  # e.g. ResNet's stem: conv1's output, before the max pool
        per_image = channels * -(-height // stride) * -(-width // stride) * element_size
        size = 1
        while size * 2 * per_image <= budget:
            size *= 2
        sizes[name] = size
    return sizes


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to reuse freed blocks instead of returning them to the kernel.

    Each batch allocates and frees the same large activation buffers; by default glibc maps
    and unmaps them every time, and the page faults cost about 15% of a CPU run (measured:
    resnet50 at 224 px, 28.7 -> 33.4 images/s). With a 32 MiB mmap threshold and a 256 MiB
    trim threshold they are reused: memory stays flat, at the size of a batch's activations.
    A process-wide setting; the engines make it as their run starts (and each Ray actor in its
    process). False where not glibc.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 * 1024 * 1024)) and bool(mallopt(m_trim_threshold, 256 * 1024 * 1024))


@contextlib.contextmanager
def frozen_collector() -> Iterator[None]:
    """Python's cyclic garbage collector leaves the objects that exist now alone for a block (``gc.freeze``).

    A run's full collections otherwise walk every object of the process (torch's modules, the
    planned images) again and again: 2.5 s of a 42 s loop of 262,144 images into pooled shards
    (host_ceiling.py on 2 vCPUs), 0.27 s frozen; the DataLoader's forked workers also leave those
    objects' pages shared. Freed objects are still freed (reference counting); cyclic garbage among
    them waits for the block's end. Left as it is where the caller froze objects itself.
    """
    import gc

    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def warm_up_cuda(device: torch.device, dtype: torch.dtype) -> threading.Thread | None:
    """Start CUDA on ``device`` in a thread of its own: its context, and cuDNN's libraries through
    a small convolution in ``dtype``, while the caller imports torchvision and builds the model (one
    image on a GPU otherwise pays it after that work: 0.3-0.4 s of context on an H200, and more).
    The model's first forward is not rehearsed here: its kernels loading in this thread beside the
    caller's imports made one image slower on that H200 (4.0-4.6 s against 3.6-3.7 s without).

    Join the thread before forking processes (DataLoader workers): a fork while it loads a library
    could leave the child a lock no thread will release. ``None`` off CUDA. Errors are left for
    the run itself to meet and report.
    """
    if device.type != "cuda":
        return None
    if device.index is None and torch.cuda.is_initialized():  # a new thread's current device is GPU 0, not the caller's
        device = torch.device("cuda", torch.cuda.current_device())
    thread = threading.Thread(target=_warm_up, args=(device, dtype), name="cuda-warm-up")
    thread.start()
    return thread


def _warm_up(device: torch.device, dtype: torch.dtype) -> None:
    import torch.nn.functional as F

    try:
        with torch.inference_mode():
            pixels = torch.zeros(1, 3, 16, 16, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
            weight = torch.zeros(8, 3, 3, 3, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
            statistics = torch.zeros(8, device=device, dtype=dtype)
            features = F.batch_norm(F.conv2d(pixels, weight, padding=1), statistics, statistics + 1)
            F.max_pool2d(F.relu(features), 3, 2, 1)
            torch.cuda.synchronize(device)
    except Exception:  # noqa: BLE001, S110 - the run meets the same problem and reports it in words
        pass


def is_out_of_memory(error: BaseException) -> bool:
    """torch's own out-of-memory error, its CPU allocator's ("not enough memory", "can't allocate memory"), or a
    CUDA library's failure to allocate (cuDNN, cuBLAS) as torch raises it."""
    text = str(error)
    return isinstance(error, torch.cuda.OutOfMemoryError) or (isinstance(error, RuntimeError) and any(
        words in text for words in ("out of memory", "not enough memory", "can't allocate memory", "ALLOC_FAILED")))


def out_of_memory(error: BaseException, device: torch.device, batch_size: int, *, saving: bool) -> InspectError:
    """A device out of memory, said in a line that names the way out (torch's own message runs to a paragraph)."""
    import re

    wanted = re.search(r"Tried to allocate ([\d.]+ [KMGT]?i?B)", str(error))
    tried = f" (it tried to allocate {wanted.group(1)})" if wanted else ""
    kept = "; the images written so far are kept, and a re-run goes on from them" if saving else ""
    return InspectError(f"out of memory on {device} with --batch-size {batch_size}{tried}: use a smaller --batch-size{kept}")
