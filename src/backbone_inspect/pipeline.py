"""The per-batch work: the Backbone on its device, preprocessing, normalisation and statistics.

The CLI drives it image by image; other executors can drive the same methods batch by batch.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .backbone import Backbone, along_height, stage_channels, stage_stride
from .errors import UsageError, WeightsError
from .images import LoadedImage, Preprocessing, SizeGroup, collate_batch, load_image_tensor
from .options import check_device_spec
from .stages import parse_layers
from .stats import StageStats, batch_stage_stats
from .weights import LoadedWeights, plan_weights


def resolve_device(spec: str, *, local_rank: int | None = None) -> torch.device:
    """``auto`` (cuda, then mps, then cpu), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; exit 2 if absent.

    ``local_rank``: under torchrun or Slurm, ``auto`` picks ``cuda:LOCAL_RANK``.
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
    if device.type == "mps" and not mps_available:
        raise UsageError(f"--device {spec}: MPS is not available on this machine")
    return device


TORCH_DTYPES: dict[str, torch.dtype] = {  # the names are options.DTYPE_NAMES
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def default_channels_last(device: torch.device) -> bool:
    """channels_last where measured faster: CPU (oneDNN) and CUDA (cuDNN); not MPS."""
    return device.type in ("cpu", "cuda")


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
        if digits.isdigit():
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
        if name == "stem":  # the stem's largest tensor is conv1's output, before the max pool
            channels, stride = backbone.conv1.out_channels, along_height(backbone.conv1.stride)
        else:
            channels, stride = stage_channels(backbone, name), stage_stride(backbone, name)
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
    A process-wide setting, so the CLI calls it, not the library. False where not glibc.
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


def own_copy(feature: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy with storage of its own: saving it never drags a batch's storage along."""
    return feature.to("cpu", copy=True, memory_format=torch.contiguous_format)


@dataclass(frozen=True)
class ImageResult:
    """One image through the backbone: its CPU features [C, H, W] (none when the Extractor keeps
    no features) and their statistics."""

    image: str
    input_size: tuple[int, int]
    features: OrderedDict[str, torch.Tensor]
    stats: tuple[StageStats, ...]
    seconds: float
    """Time of the forward pass of the group this image ran in."""
    group_size: int = 1
    top: tuple[ClassScore, ...] | None = None
    """The most probable classes, with ``topk``."""
    pixels: torch.Tensor | None = None
    """The preprocessed input, uint8 [3, H, W] on the CPU (what the model saw, before normalising)."""


@dataclass(frozen=True)
class ClassScore:
    index: int
    label: str
    probability: float


def planned_preprocessing(
    arch: str, weights: Any, resize: int | None | str = None, crop: int | None | str = None
) -> Preprocessing:
    """The weights' preprocessing with ``--resize``/``--crop`` applied, without loading any weights.

    ``None`` keeps the weights' own value, ``"none"`` skips the step.
    """
    overrides = {
        key: (None if value == "none" else value)
        for key, value in (("resize", resize), ("crop", crop))
        if value is not None
    }
    preprocessing = replace(plan_weights(arch, weights).preprocessing, **overrides)
    if preprocessing.resize is not None and preprocessing.crop is not None and preprocessing.crop > preprocessing.resize:
        raise UsageError(
            f"--crop {preprocessing.crop} is larger than --resize {preprocessing.resize}: every image "
            "would be smaller than its crop"
        )
    return preprocessing


class Extractor:
    """A Backbone in eval mode on a device, with the preprocessing that feeds it."""

    def __init__(
        self,
        *,
        arch: str = "resnet50",
        layers: Iterable[int | str] | str = (2, 3, 4),
        weights: Any = None,
        seed: int = 0,
        device: torch.device | str = "cpu",
        resize: int | None | str = None,
        crop: int | None | str = None,
        dtype: str = "float32",
        channels_last: bool | None = None,
        compile: bool = False,
        topk: int = 0,
        categories: Sequence[str] | None = None,
        keep_features: bool = True,
    ) -> None:
        """``resize``/``crop``: ``None`` keeps the weights' own value, ``"none"`` skips the step.

        ``dtype``: the compute dtype (statistics are computed in float32 whatever it is).
        ``channels_last``: ``None`` uses it where it is faster. ``compile``: ``torch.compile``
        the Backbone (its replay and early stop are what gets compiled). ``topk``: also the
        ``topk`` most probable classes, from the model's own avgpool -> fc on layer4, named by
        ``categories`` or the named weights' own. ``keep_features=False``: results carry
        statistics only (``features`` empty), sparing a copy of every feature map when nothing
        is saved or drawn.
        """
        self.device = torch.device(device)
        self.seed = seed
        self.dtype = TORCH_DTYPES[dtype]
        self.channels_last = default_channels_last(self.device) if channels_last is None else channels_last
        self.requested: tuple[str, ...] = parse_layers(layers)
        run_layers = self.requested + (("layer4",) if topk and "layer4" not in self.requested else ())
        self.backbone = Backbone(arch, run_layers, weights, seed=seed, head=topk > 0)
        self.backbone = self.backbone.eval().to(self.device, dtype=self.dtype)
        if self.channels_last:
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        self._run = torch.compile(self.backbone) if compile else self.backbone
        # On a CPU each stage runs in slices sized to the cache (see cache_chunk_sizes); a
        # compiled graph and a GPU's own memory hierarchy take the whole batch.
        self._cache_bytes = last_level_cache_bytes() if self.device.type == "cpu" and not compile else None
        self._chunk_plans: dict[tuple[int, int], dict[str, int]] = {}
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels
        loaded = self.backbone.weights_info
        assert loaded is not None
        self.weights: LoadedWeights = loaded
        self.topk = topk
        self.keep_features = keep_features
        self.categories = self._check_categories(categories) if topk else None
        self.preprocessing: Preprocessing = planned_preprocessing(arch, weights, resize, crop)
        shape = (1, 3, 1, 1)
        self._mean = torch.tensor(self.preprocessing.mean, device=self.device).view(shape)
        self._std = torch.tensor(self.preprocessing.std, device=self.device).view(shape)

    def _check_categories(self, categories: Sequence[str] | None) -> tuple[str, ...]:
        names = tuple(categories) if categories is not None else self.weights.categories
        if names is None:
            raise UsageError(
                "--topk needs class names: use torchvision's named weights, or give --categories FILE"
            )
        if self.weights.kind == "checkpoint" and not self.weights.head_loaded:
            raise WeightsError(f"--topk: {self.weights.head_note}; the checkpoint's classes are unknown here")
        classes = self.backbone.fc.out_features
        if len(names) != classes:
            raise UsageError(f"--categories has {len(names)} names, but the classifier of {self.arch} has {classes} classes")
        if not 0 < self.topk <= classes:
            raise UsageError(f"--topk {self.topk}: expected 1..{classes}")
        return names

    @property
    def arch(self) -> str:
        return self.backbone.arch

    @property
    def stage_names(self) -> tuple[str, ...]:
        """The stages asked for (with ``topk``, layer4 also runs, for the classifier)."""
        return self.requested

    def load(self, path: str | Path) -> torch.Tensor:
        """Decode and preprocess one file into a uint8 [3, H, W] tensor (raises ImageError)."""
        return load_image_tensor(path, self.preprocessing)

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """Features of a uint8 [N, 3, H, W] batch, on the device."""
        with torch.inference_mode():
            # uint8 travels to the device (4x less than float32) and is normalised there.
            batch = images.to(self.device, non_blocking=True).float().div_(255)
            batch = batch.sub_(self._mean).div_(self._std).to(self.dtype)
            if self.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            if self._cache_bytes is None or len(batch) == 1:
                return self._run(batch)
            return self.backbone.forward_in_chunks(batch, self._chunk_sizes(batch))

    def _chunk_sizes(self, batch: torch.Tensor) -> dict[str, int]:
        assert self._cache_bytes is not None
        height, width = batch.shape[-2:]
        if (height, width) not in self._chunk_plans:
            self._chunk_plans[(height, width)] = cache_chunk_sizes(
                self.backbone, height, width, element_size=batch.element_size(), cache_bytes=self._cache_bytes
            )
        # Capped at the batch: stages that all take the whole batch then run as one, unsliced.
        return {name: min(size, len(batch)) for name, size in self._chunk_plans[(height, width)].items()}

    def timed_forward(self, images: torch.Tensor) -> tuple[OrderedDict[str, torch.Tensor], float]:
        start = time.perf_counter()
        features = self.forward(images)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return features, time.perf_counter() - start

    def extract(self, images: Sequence[tuple[str, torch.Tensor]]) -> list[ImageResult]:
        """Features and statistics of (name, uint8 [3, H, W]) images, in order.

        Images of equal size run as one batch; different sizes run as separate batches, so
        nothing is ever padded. Features come back as CPU tensors with storage of their own.
        """
        batch = collate_batch([LoadedImage(index, pixels) for index, (_, pixels) in enumerate(images)])
        results: dict[int, ImageResult] = {}
        for group in batch.groups:
            names = [images[position][0] for position in group.positions]
            results.update(zip(group.positions, self.forward_group(names, group)))
        return [results[position] for position in range(len(images))]

    def forward_group(self, names: Sequence[str], group: SizeGroup) -> list[ImageResult]:
        """One forward pass over images of one size; statistics computed batched, on the device."""
        features, seconds = self.timed_forward(group.pixels)
        top = self._top_classes(features["layer4"]) if self.topk else [None] * len(names)
        features = OrderedDict((name, features[name]) for name in self.requested)
        stats = {name: batch_stage_stats(name, value, group.input_size) for name, value in features.items()}
        return [
            ImageResult(
                image,
                group.input_size,
                OrderedDict((name, own_copy(value[row])) for name, value in features.items() if self.keep_features),
                tuple(stats[name][row] for name in features),
                seconds,
                len(names),
                top[row],
                group.pixels[row].to("cpu"),
            )
            for row, image in enumerate(names)
        ]

    def _top_classes(self, layer4: torch.Tensor) -> list[tuple[ClassScore, ...]]:
        assert self.categories is not None
        with torch.inference_mode():
            probabilities = self.backbone.classify(layer4).float().softmax(dim=1)
            values, indices = probabilities.topk(self.topk, dim=1)
        return [
            tuple(ClassScore(i, self.categories[i], p) for i, p in zip(row_indices, row_values))
            for row_indices, row_values in zip(indices.tolist(), values.tolist())
        ]

    def inspect(self, path: str | Path) -> ImageResult:
        """One image: decode, preprocess, forward, statistics."""
        return self.extract([(str(path), self.load(path))])[0]
