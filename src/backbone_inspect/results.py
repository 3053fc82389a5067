"""What a forward pass gives back: each image's ``ImageResult``, built once the device is done.

``Extractor.launch_group`` queues a group's work on the device (forward, statistics, the copies
to the host) and returns an ``InFlightGroup`` at once; its ``results()`` waits for that work and
builds the results. On a GPU the next group's forward can then be queued before this group's
results are built in Python, so the device never waits for the interpreter. On a CPU the work
is done by the time ``launch_group`` returns.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .stats import StageStats, stats_from_columns


@dataclass(frozen=True)
class ClassScore:
    index: int
    label: str
    probability: float


@dataclass(frozen=True)
class ImageResult:
    """One image through the backbone: its CPU features [C, H, W] ([C] pooled; none when the
    Extractor keeps no features) and the statistics of the full maps."""

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


class ForwardClock:
    """The time of a forward pass: on CUDA between two events on the stream (read once the work is
    done, so timing never makes the host wait), elsewhere the wall time around it."""

    def __init__(self, device: torch.device) -> None:
        # On the device's own stream: under torchrun, cuda:N need not be the current device.
        cuda = device.type == "cuda"
        self._stream = torch.cuda.current_stream(device) if cuda else None
        self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if cuda else None
        if self._events is not None:
            self._events[0].record(self._stream)
        self._start, self._elapsed = time.perf_counter(), 0.0

    def stop(self) -> ForwardClock:
        if self._events is not None:
            self._events[1].record(self._stream)
        self._elapsed = time.perf_counter() - self._start
        return self

    def seconds(self) -> float:
        """The forward's time (on CUDA, waits for its end)."""
        if self._events is None:
            return self._elapsed
        self._events[1].synchronize()
        return self._events[0].elapsed_time(self._events[1]) / 1000


@dataclass(frozen=True)
class TopClasses:
    """The ``topk`` most probable classes of each image, as copies on their way to the host."""

    probabilities: torch.Tensor
    indices: torch.Tensor
    categories: Sequence[str]

    def scores(self) -> list[tuple[ClassScore, ...]]:
        return [
            tuple(ClassScore(i, self.categories[i], p) for i, p in zip(row_indices, row_values))
            for row_indices, row_values in zip(self.indices.tolist(), self.probabilities.tolist())
        ]


@dataclass(frozen=True)
class InFlightGroup:
    """One group of images of one size whose work is queued on the device; ``results()`` waits for it."""

    names: tuple[str, ...]
    input_size: tuple[int, int]
    features: OrderedDict[str, torch.Tensor]
    """The requested stages, on the device (for the shapes, and counting NaN where there are any)."""
    columns: OrderedDict[str, torch.Tensor]
    """Each stage's ``stat_columns``, on (their way to) the host."""
    kept: OrderedDict[str, torch.Tensor]
    """Each stage's batch on (its way to) the host, when features are kept."""
    clock: ForwardClock
    done: torch.cuda.Event | None
    """Recorded after the last of the group's work (CUDA); ``None``: done already."""
    top: TopClasses | None = None
    pixels: torch.Tensor | None = None

    def results(self) -> list[ImageResult]:
        """Each image's result, in order, once the device has finished the group."""
        if self.done is not None:
            self.done.synchronize()
        seconds = self.clock.seconds()
        stats = [stats_from_columns(name, self.features[name], columns.tolist(), self.input_size)
                 for name, columns in self.columns.items()]
        top = self.top.scores() if self.top is not None else [None] * len(self.names)
        return [
            ImageResult(
                image,
                self.input_size,
                OrderedDict((name, value[row]) for name, value in self.kept.items()),
                tuple(stage[row] for stage in stats),
                seconds,
                len(self.names),
                top[row],
                self.pixels[row] if self.pixels is not None else None,
            )
            for row, image in enumerate(self.names)
        ]
