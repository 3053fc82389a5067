"""Preprocessing of decoded uint8 tensors on any device, as ``images.preprocess`` does it with Pillow:
EXIF orientation, the antialiased resize of the shorter side, the centre crop, the same size checks.

torchvision's own EXIF handling (``decode_jpeg(apply_exif_orientation=True)``) is C++ for the
CPU decoder only; the mapping here is Pillow's ``ImageOps.exif_transpose``, on tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .images import Preprocessing, check_sizes

if TYPE_CHECKING:
    import torch


def apply_orientation(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Upright pixels for an EXIF orientation, as Pillow's ``ImageOps.exif_transpose`` gives (on [..., H, W])."""
    import torch

    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-2, -1)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:  # Pillow's TRANSPOSE
        return image.transpose(-2, -1)
    if orientation == 6:  # ROTATE_270: a quarter turn clockwise
        return torch.rot90(image, -1, dims=(-2, -1))
    if orientation == 7:  # TRANSVERSE
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:  # ROTATE_90: a quarter turn anticlockwise
        return torch.rot90(image, 1, dims=(-2, -1))
    return image


def preprocess_on_device(image: torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    """``images.preprocess`` for a uint8 [3, H, W] tensor on any device, with the same checks and messages.

    The resize runs in float32 and is rounded back to uint8, on every device: CUDA has no
    antialiased uint8 kernel (torchvision converts the same way there), and a CPU test of this
    function then computes what the GPU does. A shrink too steep for CUDA's kernel (``cuda_resizes``)
    is resized on the CPU.
    """
    from torchvision.transforms.v2 import functional as F

    height, width = check_sizes(int(image.shape[-2]), int(image.shape[-1]), preprocessing)
    if preprocessing.resize is not None:
        image = _resized(image, (height, width), preprocessing.interpolation)
    if preprocessing.crop is not None:
        image = F.center_crop(image, [preprocessing.crop])
    return image


def _resized(image: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """The antialiased resize in float32, rounded back to uint8; on the CPU where CUDA's kernel refuses the scale."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    source = image
    if image.device.type == "cuda" and not cuda_resizes(tuple(image.shape[-2:]), size, interpolation,
                                                        shared_memory_per_block(image.device)):
        source = image.cpu()
    resized = F.resize(source.float(), list(size), interpolation=InterpolationMode(interpolation), antialias=True)
    return resized.round_().clamp_(0, 255).to(image.dtype).to(image.device, non_blocking=True)


ANTIALIAS_SUPPORT = {"bilinear": 1.0, "bicubic": 2.0}
"""Each antialiased filter's half-width, in input pixels at scale 1 (torch's ``size / 2``)."""


def cuda_resizes(source: tuple[int, ...], size: tuple[int, int], interpolation: str, shared_memory: int = 48 * 1024) -> bool:
    """Whether torch's antialiased CUDA kernel takes this float32 resize of [H, W] ``source`` to ``size``.

    The kernel keeps a block's filter weights in shared memory, one row of 32 threads at least, and
    refuses a scale whose filter does not fit ("Too much shared memory required"): about a 94x
    shrink bilinear, 47x bicubic, in 48 KiB. Checked as its launcher checks
    (``upsample_gen2d_aa_out_cuda_template`` in ATen's UpSampleBilinear2d.cu).
    """
    support = ANTIALIAS_SUPPORT.get(interpolation)
    if support is None:  # nearest: no antialiased kernel
        return True
    taps_h, taps_w = (1 + 2 * math.ceil(support * max(before / after, 1.0)) for before, after in zip(source, size))
    return 32 * taps_w + 33 * taps_h <= shared_memory // 4


def shared_memory_per_block(device: torch.device) -> int:
    """The shared memory a CUDA kernel's block may use on ``device`` without opting in (48 KiB on NVIDIA's GPUs)."""
    import torch

    return int(getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block", 48 * 1024))


RESIZED_ON_EVERY_DEVICE = ("nearest", "nearest-exact", "bilinear", "bicubic")
"""Interpolations every supported torch resizes tensors with on the CPU and CUDA alike (torch 2.4
and 2.14 checked): not probed, since a probe on a GPU starts CUDA ahead of ``warm_up_cuda``."""


def resizes_tensors_with(interpolation: str, device: torch.device) -> bool:
    """Whether this torch and torchvision resize tensors on ``device`` with ``interpolation``: never
    box or hamming (only PIL images); lanczos only in newer releases (not torchvision 0.19), and
    there on the CPU alone (torch has no CUDA kernel for it). ``--decode gpu`` refuses the others."""
    if interpolation in RESIZED_ON_EVERY_DEVICE:
        return True
    import torch
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    try:
        F.resize(torch.zeros(3, 2, 2, device=device), [1, 1], interpolation=InterpolationMode(interpolation), antialias=True)
    except (NotImplementedError, ValueError, AssertionError):  # a torch and torchvision that disagree on it assert
        return False
    return True


RESIZE_PIXELS = 2**26
"""The most input pixels resized in one call (about 0.8 GB in float32): a size group larger than
that is resized in slices."""


def preprocess_same_size(images: Sequence[torch.Tensor], preprocessing: Preprocessing) -> list[torch.Tensor]:
    """``preprocess_on_device`` for uint8 [3, H, W] images of one size, a few calls for all of them.

    Per image, the launches and torchvision's dispatch cost about 0.1 ms of the interpreter's
    time, which at thousands of images a second starves the forward pass; stacked, a batch of
    photos of a few sizes takes a few calls. Raises ``ImageError`` (the same for all: one size).
    """
    import torch

    height, width = images[0].shape[-2:]
    step = max(1, RESIZE_PIXELS // (int(height) * int(width)))
    done: list[torch.Tensor] = []
    for start in range(0, len(images), step):
        done.extend(preprocess_on_device(torch.stack(list(images[start : start + step])), preprocessing).unbind())
    return done
