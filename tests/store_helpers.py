"""Helpers of the output store tests: stores of the small test settings, results with known tensors,
and whether a folder's filesystem takes one sync for a group of files."""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import torch

from backbone_inspect.config import feature_config
from backbone_inspect.disk_sync import group_sync_descriptor
from backbone_inspect.pt_store import PtFileStore
from backbone_inspect.results import ImageResult
from backbone_inspect.shards import Shard
from backbone_inspect.stats import stage_stats

from conftest import SMALL_OPTIONS


def fake_result(image: str, seed: int = 0) -> ImageResult:
    """A result as the extractor makes it, with known tensors."""
    generator = torch.Generator().manual_seed(seed)
    maps = OrderedDict((name, torch.rand(8, 4, 4, generator=generator)) for name in ("layer2", "layer4"))
    stats = tuple(stage_stats(name, value, (64, 64)) for name, value in maps.items())
    return ImageResult(image, (64, 64), maps, stats, seconds=0.01)


def store_for(folder: Path, shard: Shard | None = None, **options: object) -> PtFileStore:
    return PtFileStore(folder, feature_config(**{**SMALL_OPTIONS, "layers": "2,4", **options}), shard=shard)


def opened(store: PtFileStore, *, overwrite: bool = False) -> PtFileStore:
    """Claimed, opened and closed: what a run does with its store around the images."""
    store.claim(overwrite=overwrite)
    store.open()
    store.close()
    return store


SYNCFS_TYPES = {"ext2", "ext3", "ext4", "xfs", "btrfs"}


def mount_type(path: Path) -> str:
    """The filesystem type of the mount holding ``path``, from /proc/self/mountinfo (longest mount point)."""
    best, kind = "", ""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        point = fields[4].replace("\\040", " ")
        separator = fields.index("-")
        if str(path.resolve()).startswith(point.rstrip("/") + "/") and len(point) >= len(best):
            best, kind = point, fields[separator + 1]
    return kind


def kernel_at_least(major: int, minor: int) -> bool:
    release = os.uname().release.split("-")[0].split(".")
    return (int(release[0]), int(release[1])) >= (major, minor)


def groups_sync_here(folder: Path) -> bool:
    descriptor = group_sync_descriptor(folder)
    if descriptor is not None:
        os.close(descriptor)
    return descriptor is not None
