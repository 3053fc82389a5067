"""Helpers of the --format shards tests: the reference features and the shards read back with plain safetensors."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.transforms import functional as F
from torchvision.transforms._presets import ImageClassification

from conftest import SMALL, SMALL_OPTIONS, assert_close_scaled, seeded_model

STAGES = ("layer1", "layer4")
OPTIONS = {**SMALL_OPTIONS, "layers": "1,4", "workers": 0}
"""``dump_features`` keywords of these tests: resnet18 on 64×64, two stages, decoding in-process."""
ARGS = [*SMALL, "--layers", "1,4", "--workers", "0"]
"""The same, as command-line options."""
POOLS = {"none": lambda maps: maps, "avg": lambda maps: maps.mean(dim=(-2, -1)), "max": lambda maps: maps.amax(dim=(-2, -1))}
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@functools.lru_cache(maxsize=1)
def reference_model() -> torch.nn.Module:
    return create_feature_extractor(seeded_model("resnet18"), {stage: stage for stage in STAGES})


@functools.lru_cache(maxsize=64)
def reference(path: str | Path, *, pool: str = "none", native: bool = False) -> dict[str, torch.Tensor]:
    """One image's features the way a user would get them without this tool: PIL, torchvision's
    preset (or, ``native``, the pixels as they are), its feature extractor, then mean/max over H×W.
    Cached: every test's images have paths of their own."""
    image = Image.open(path).convert("RGB")
    if native:
        x = F.normalize(F.pil_to_tensor(image).float() / 255, IMAGENET_MEAN, IMAGENET_STD)
    else:
        x = ImageClassification(crop_size=64, resize_size=64)(image)
    with torch.no_grad():
        maps = reference_model()(x.unsqueeze(0))
    return {stage: POOLS[pool](maps[stage][0]) for stage in STAGES}


def shard_files(folder: Path) -> list[Path]:
    return sorted((folder / "shards").glob("[!.]*.safetensors"))


def shard_rows(folder: Path) -> dict[str, dict]:
    """Every image in the folder's shards, read with plain safetensors: output → its image, shard,
    row, input size and features. Fails if an output is in two shards."""
    found: dict[str, dict] = {}
    for path in shard_files(folder):
        tensors = load_file(path)
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        images, outputs, sizes = (json.loads(metadata[key]) for key in ("images", "outputs", "input_sizes"))
        assert metadata["format"] == "backbone-inspect.shards/1" and len(images) == len(outputs) == len(sizes)
        assert json.loads(metadata["settings"])["format"] == "shards"
        stages = {name.split(".")[0] for name in tensors}
        for row, output in enumerate(outputs):
            assert output not in found, f"{output} is in {found.get(output, {}).get('shard')} and {path.name}"
            maps = {stage: tensors[stage][row] if stage in tensors else tensors[f"{stage}.{row}"] for stage in stages}
            found[output] = {"image": images[row], "shard": f"shards/{path.name}", "row": row,
                             "input_size": tuple(sizes[row]), "features": maps}
    return found


def assert_like_reference(rows: dict[str, dict], *, pool: str = "none", native: bool = False) -> None:
    for output, row in rows.items():
        expected = reference(row["image"], pool=pool, native=native)
        assert row["features"].keys() == expected.keys(), output
        for stage, tensor in expected.items():
            assert_close_scaled(row["features"][stage], tensor)


def outputs(count: int) -> list[str]:
    return [f"img{index:03d}.pt" for index in range(count)]
