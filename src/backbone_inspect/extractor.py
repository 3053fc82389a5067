"""The per-batch work: a Backbone on its device, normalisation, statistics and top-k classes.

Built from a ``FeatureConfig``; both engines drive the same ``launch_group`` (``forward_group``:
launched and waited for).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch

from .anatomy import input_size_problem, size_refused
from .backbone import Backbone
from .config import FeatureConfig
from .device import cache_chunk_sizes, default_channels_last, last_level_cache_bytes, resolve_device, to_channels_last
from .errors import ImageError, UsageError, WeightsError
from .images import LoadedImage, Preprocessing, SizeGroup, collate_batch, load_image_tensor
from .precision import TORCH_DTYPES, check_compute_dtype, cuda_math
from .stages import stage_names
from .results import ForwardClock, ImageResult, InFlightGroup, TopClasses
from .stats import stat_columns
from .weights import LoadedWeights


class Extractor:
    """A Backbone in eval mode on a device, with the preprocessing that feeds it.

    ``Extractor(feature_config(arch="resnet18", layers=(1, 4)), device="cpu")``. ``device``:
    a ``torch.device`` or spec; ``None`` resolves ``config.device`` (``auto``: cuda, then mps,
    then cpu). ``keep_features=False``: results carry statistics only (``features`` empty),
    sparing a copy of every feature map when nothing is saved or drawn. ``feature_dtype``: the
    dtype features are kept in (cast on the device, before the copy); ``None``: the compute dtype.
    ``keep_pixels``: whether results carry the input pixels when they were decoded on the device
    (a copy per batch, for pictures; pixels decoded on the CPU are always there); ``None``: as
    ``keep_features``.
    """

    def __init__(
        self, config: FeatureConfig, *, device: torch.device | str | None = None, keep_features: bool = True,
        feature_dtype: str | None = None, keep_pixels: bool | None = None,
    ) -> None:
        self.config = config
        self.feature_dtype = TORCH_DTYPES[feature_dtype] if feature_dtype is not None else None
        self.device = resolve_device(config.device) if device is None else torch.device(device)
        self.dtype = check_compute_dtype(config.dtype, self.device)
        self.channels_last = uses_channels_last(config, self.device)
        self.requested: tuple[str, ...] = config.stages
        self.deepest = stage_names(config.arch)[-1]
        backbone = Backbone(config.arch, run_layers(config), config.weights, seed=config.seed, head=config.topk > 0)
        self.backbone = backbone.eval().to(self.device, dtype=self.dtype)
        if self.channels_last:
            self.backbone = to_channels_last(self.backbone)
        self._run = torch.compile(self.backbone) if config.compile else self.backbone
        self._size_problems: dict[tuple[int, int], str | None] = {}
        # On a CPU each stage runs in slices sized to the cache (see cache_chunk_sizes); a
        # compiled graph and a GPU's own memory hierarchy take the whole batch.
        self._cache_bytes = last_level_cache_bytes() if self.device.type == "cpu" and not config.compile else None
        self._chunk_plans: dict[tuple[int, int], dict[str, int]] = {}
        self._shapes_run: set[tuple[int, ...]] = set()
        loaded = self.backbone.weights_info
        assert loaded is not None
        self.weights: LoadedWeights = loaded
        self.seed = config.seed
        self.topk = config.topk
        self.keep_features = keep_features
        self.keep_pixels = keep_features if keep_pixels is None else keep_pixels
        self.categories = self._check_categories(config.categories) if config.topk else None
        self.preprocessing: Preprocessing = config.preprocessing
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
        classes = self.backbone.classes
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
        """The stages asked for (with ``topk``, the stride-32 stage also runs, for the classifier)."""
        return self.requested

    def refuses(self, input_size: tuple[int, int]) -> str | None:
        """Why images of this size cannot run (smaller than the arch's smallest input), or ``None``."""
        if input_size not in self._size_problems:  # a few passes on the meta device, once per size
            self._size_problems[input_size] = input_size_problem(self.backbone, input_size)
        problem = self._size_problems[input_size]
        if problem is None:
            return None
        height, width = input_size
        return f"image is {height}×{width} (H×W) after preprocessing: {problem}; use another --resize or --crop"

    def refuses_after_failure(self, input_size: tuple[int, int]) -> str | None:
        """After a forward pass of this size failed: why, where the size is the cause (the model refuses
        it on the meta device too: timm's halonet26t at 264 px raised a bare ``AssertionError`` that ended
        the run), kept for the size as ``refuses`` keeps it; ``None`` where the size is not the cause."""
        problem = size_refused(self.backbone, input_size)
        if problem is None:
            return None
        self._size_problems[input_size] = problem
        return self.refuses(input_size)

    def load(self, path: str | Path) -> torch.Tensor:
        """Decode and preprocess one file into a uint8 [3, H, W] tensor (raises ImageError)."""
        return load_image_tensor(path, self.preprocessing)

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """Features of a uint8 [N, 3, H, W] batch, on the device."""
        with torch.inference_mode(), self._math(tuple(images.shape)):
            # uint8 travels to the device (4x less than float32) and is normalised there.
            batch = images.to(self.device, non_blocking=True).float().div_(255)
            batch = batch.sub_(self._mean).div_(self._std).to(self.dtype)
            if self.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            if self._cache_bytes is None or len(batch) == 1:
                return self._run(batch)
            return self.backbone.forward_in_chunks(batch, self._chunk_sizes(batch))

    def _math(self, shape: tuple[int, ...]) -> contextlib.AbstractContextManager[None]:
        """On CUDA: TF32 only for ``--dtype tf32``; cuDNN's autotuning from the second batch of a shape
        on (a long run of one size gets the fastest kernels, a single image never waits for the search)."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        autotune = shape in self._shapes_run
        self._shapes_run.add(shape)
        return cuda_math(tf32=self.config.dtype == "tf32", autotune=autotune)

    def _chunk_sizes(self, batch: torch.Tensor) -> dict[str, int]:
        assert self._cache_bytes is not None
        height, width = batch.shape[-2:]
        if (height, width) not in self._chunk_plans:
            self._chunk_plans[(height, width)] = cache_chunk_sizes(
                self.backbone, height, width, element_size=batch.element_size(), cache_bytes=self._cache_bytes
            )
        # Capped at the batch: stages that all take the whole batch then run as one, unsliced.
        return {name: min(size, len(batch)) for name, size in self._chunk_plans[(height, width)].items()}

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
        """One forward pass over images of one size, and its results. ``ImageError`` for a size the
        arch cannot take (``refuses``)."""
        return self.launch_group(names, group).results()

    def launch_group(self, names: Sequence[str], group: SizeGroup) -> InFlightGroup:
        """Queue one group's work on the device: the forward pass, statistics computed batched, the
        copies of what is kept to the host; nothing waits for it (see ``results``). ``ImageError`` for a
        size the arch cannot take, found before the forward pass (``refuses``) or by its failure."""
        refused = self.refuses(group.input_size)
        if refused is not None:
            raise ImageError(f"{names[0]}: {refused}")
        clock = ForwardClock(self.device)
        try:
            features = self.forward(group.pixels)
        except Exception:
            refused = self.refuses_after_failure(group.input_size)
            if refused is None:  # not the size: out of memory, a broken model... the run's own error
                raise
            raise ImageError(f"{names[0]}: {refused}") from None
        clock.stop()
        top = self._top_classes(features[self.deepest]) if self.topk else None
        features = OrderedDict((name, features[name]) for name in self.requested)
        with torch.inference_mode():
            columns = OrderedDict((name, to_host(stat_columns(value), self.device)) for name, value in features.items())
        kept = self._kept_features(features) if self.keep_features else OrderedDict()
        pixels = self._cpu_pixels(group)
        done = torch.cuda.Event() if self.device.type == "cuda" else None
        if done is not None:  # on the device's own stream, after every copy to the host
            done.record(torch.cuda.current_stream(self.device))
        return InFlightGroup(tuple(names), group.input_size, features, columns, kept, clock, done, top, pixels)

    def _cpu_pixels(self, group: SizeGroup) -> torch.Tensor | None:
        """The group's input on the CPU (each image's row is a view): pixels decoded on a GPU
        (``--decode gpu``) cross in one copy per group, and only with ``keep_pixels`` (pictures)."""
        if group.pixels.device.type == "cpu":
            return group.pixels
        return to_host(group.pixels, self.device) if self.keep_pixels else None

    def _kept_features(self, features: OrderedDict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
        """Each stage's batch on the CPU, contiguous, in one copy (each image's row is a view of it);
        pooled and cast on the device first, so only what is kept crosses to the host."""
        kept = OrderedDict()
        with torch.inference_mode():
            for name, value in features.items():
                dtype = self.feature_dtype or value.dtype
                if self.config.pool == "avg":
                    value = value.float().mean(dim=(-2, -1))
                elif self.config.pool == "max":
                    value = value.amax(dim=(-2, -1))
                # Cast and made contiguous where the features are (a GPU does it in microseconds), then one plain copy.
                kept[name] = to_host(value.to(dtype=dtype, memory_format=torch.contiguous_format), self.device)
        return kept

    def _top_classes(self, deepest: torch.Tensor) -> TopClasses:
        assert self.categories is not None
        with torch.inference_mode(), self._math(tuple(deepest.shape)):
            probabilities = self.backbone.classify(deepest).float().softmax(dim=1)
            values, indices = probabilities.topk(self.topk, dim=1)
            return TopClasses(to_host(values, self.device), to_host(indices, self.device), self.categories)

    def inspect(self, path: str | Path) -> ImageResult:
        """One image: decode, preprocess, forward, statistics."""
        return self.extract([(str(path), self.load(path))])[0]


def uses_channels_last(config: FeatureConfig, device: torch.device) -> bool:
    """``--channels-last`` as given, else the device's default (``default_channels_last``)."""
    return default_channels_last(device) if config.channels_last is None else config.channels_last


def run_layers(config: FeatureConfig) -> tuple[str, ...]:
    """The stages the replay runs: those asked for and, with ``topk``, the stride-32 stage the classifier takes."""
    deepest = stage_names(config.arch)[-1]
    return config.stages + ((deepest,) if config.topk and deepest not in config.stages else ())


def to_host(value: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU copy of ``value`` (on ``device``); from a GPU into pinned memory without waiting (several times
    faster than into pageable memory: 1.4 MB an image for resnet50's layers 2,3,4): ready once its work is done."""
    if device.type != "cuda":
        return value.to("cpu")
    host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
    return host.copy_(value, non_blocking=True)
