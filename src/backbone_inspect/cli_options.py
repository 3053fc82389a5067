"""The command's options: names, help and panels (``--help`` groups them by purpose). Torch-free."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .families import FAMILIES

MODEL = "Model"
INPUTS = "Inputs and preprocessing"
OUTPUT = "Output"
DUMP = "Dumps (--save)"
SPEED = "Speed"
PICTURES = "Pictures and classes"
CLUSTER = "Ray cluster (--engine ray)"


def _option(*names: str, panel: str, help: str, **extra: object) -> typer.models.OptionInfo:
    return typer.Option(*names, help=help, rich_help_panel=panel, **extra)  # type: ignore[arg-type]


Images = Annotated[
    list[str] | None,
    typer.Argument(
        help="Image files (JPEG, PNG, WebP, BMP, TIFF, GIF) and folders (searched recursively).",
        metavar="IMAGE_OR_FOLDER",  # typer adds the "..." of a list
        show_default=False,
    ),
]
Layers = Annotated[str, _option("--layers", "-l", panel=MODEL, metavar="LIST", help=(
    "Stages, comma-separated, the same on every arch: 0=stem, 1-4 = the stride-4, 8, 16, 32 outputs "
    "(ResNet's layer1-layer4, other families' stage1-stage4); or aliases C2-C5, module paths (--describe lists them)."))]
Arch = Annotated[str, _option("--arch", "-a", panel=MODEL, metavar="NAME", help=(
    f"One of torchvision's {sum(len(family.archs) for family in FAMILIES)} builders of "
    f"{', '.join(dict.fromkeys(family.title for family in FAMILIES))} (resnet50, convnext_tiny, regnet_y_400mf, "
    "efficientnet_b0, mobilenet_v3_large, swin_t, maxvit_t ...; the README's Archs lists them all), "
    "or timm:<model name> with timm installed."))]
Weights = Annotated[str, _option("--weights", "-w", panel=MODEL, metavar="WEIGHTS", help=(
    "none (random, from --seed), a torchvision weights name (DEFAULT, IMAGENET1K_V1, IMAGENET1K_V2) "
    "or a checkpoint path."))]
Seed = Annotated[int, _option("--seed", panel=MODEL, metavar="INT", help="Seed of the random initialisation (--weights none).")]
Describe = Annotated[bool, _option("--describe", panel=MODEL, metavar="", help=(
    "Describe every stage of --arch for --input-size, without images or weights."))]
InputSize = Annotated[str, _option("--input-size", panel=MODEL, metavar="N|HxW", help="Input size for --describe: N or HxW.")]

FromList = Annotated[Path | None, _option("--from-list", panel=INPUTS, metavar="FILE", show_default=False, help=(
    "Also read inputs from FILE, one path per line (blank lines and # comments ignored)."))]
Resize = Annotated[str | None, _option("--resize", panel=INPUTS, metavar="N|none", show_default=False, help=(
    "Resize the shorter side to N px, or 'none'. \\[default: 256, or the weights' own]"))]
Crop = Annotated[str | None, _option("--crop", panel=INPUTS, metavar="N|none", show_default=False, help=(
    "Centre-crop N×N px, or 'none'. \\[default: 224, or the weights' own]"))]

JsonLines = Annotated[bool, _option("--json", panel=OUTPUT, metavar="", help="Print one JSON object per image, nothing else.")]
Summary = Annotated[bool, _option("--summary", panel=OUTPUT, metavar="", help=(
    "One table per stage over all images, even for a few image files."))]
Save = Annotated[str | None, _option("--save", panel=OUTPUT, metavar="DIR", show_default=False, help=(
    "Save features under DIR (a .pt per image, or --format shards), with DIR/manifest.jsonl."))]
Format = Annotated[str, _option("--format", panel=OUTPUT, metavar="pt|shards", help=(
    "pt: a .pt per image (mirroring folder inputs); shards: safetensors files of many images each."))]
ShardSize = Annotated[str, _option("--shard-size", panel=OUTPUT, metavar="N|auto", help=(
    "Images per shard file (--format shards); auto: files of about 256 MiB."))]
Pool = Annotated[str, _option("--pool", panel=OUTPUT, metavar="none|avg|max", help=(
    "Save each stage as one vector of its channels (global average or max); the table still describes the full maps."))]
SaveDtype = Annotated[str, _option("--save-dtype", panel=OUTPUT, metavar="DTYPE", help=(
    "dtype of the saved tensors: float32, float16 or bfloat16."))]

Overwrite = Annotated[bool, _option("--overwrite", panel=DUMP, metavar="", help=(
    "Recompute images already saved (their .pt files, or their rows of shards), and accept a folder made with other settings."))]
ShardOption = Annotated[str | None, _option("--shard", panel=DUMP, metavar="K/N", show_default=False, help=(
    "Process only slice K of N (0-based) of the sorted inputs. \\[default: from torchrun or Slurm]"))]
DryRun = Annotated[bool, _option("--dry-run", panel=DUMP, metavar="", help=(
    "Count what would be done and skipped, estimate the disk size; run nothing."))]

Device = Annotated[str, _option("--device", panel=SPEED, metavar="DEVICE", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.")]
Dtype = Annotated[str, _option("--dtype", panel=SPEED, metavar="DTYPE", help=(
    "Compute dtype: float32 (true float32 on every device), tf32 (CUDA: float32 with TF32 convolutions, faster), "
    "float16 (CUDA) or bfloat16 (CUDA, and CPUs with AVX-512 BF16/AMX); a warning where the CPU emulates it."))]
ChannelsLast = Annotated[bool | None, _option("--channels-last/--no-channels-last", panel=SPEED, metavar="", show_default=False, help=(
    "Run in channels_last memory format. \\[default: on for cpu and cuda, where it is faster]"))]
Compile = Annotated[bool, _option("--compile", panel=SPEED, metavar="", help=(
    "torch.compile the extractor (slow start, faster steady state)."))]
Decode = Annotated[str, _option("--decode", panel=SPEED, metavar="cpu|gpu", help=(
    "Where JPEGs are decoded and resized: cpu (Pillow, in the workers) or gpu (nvJPEG on the CUDA device; "
    "other formats on the CPU)."))]
BatchSize = Annotated[int, _option("--batch-size", panel=SPEED, metavar="N", help=(
    "Images per forward pass (on a CPU each stage runs them in cache-sized slices)."))]
Workers = Annotated[int | None, _option("--workers", panel=SPEED, metavar="N", show_default=False, help=(
    "Processes decoding images beside the forward pass; 0: in-process. \\[default: on CUDA every core but two (one below 8 cores), "
    "else CPU count - 1, at most 8]"))]

Viz = Annotated[str | None, _option("--viz", panel=PICTURES, metavar="DIR", show_default=False, help=(
    "Draw PNGs per image and stage under DIR: the most active channels, and a heatmap over the input."))]
VizChannels = Annotated[int, _option("--viz-channels", panel=PICTURES, metavar="K", help="Channels in each --viz grid.")]
Topk = Annotated[int | None, _option("--topk", panel=PICTURES, metavar="K", show_default=False, help=(
    "Also show the K most probable classes (named weights, or --categories)."))]
Categories = Annotated[str | None, _option("--categories", panel=PICTURES, metavar="FILE", show_default=False, help=(
    "Class names for --topk, one per line in the classifier's order."))]

Engine = Annotated[str, _option("--engine", panel=CLUSTER, metavar="NAME", help=(
    "local, or ray: the dump on a Ray cluster (pip install 'backbone-inspect\\[ray]')."))]
RayAddress = Annotated[str | None, _option("--ray-address", panel=CLUSTER, metavar="ADDRESS", show_default=False, help=(
    "The cluster to join (e.g. auto, or HOST:6379). \\[default: this machine's, or a new local one]"))]
RayActors = Annotated[int | None, _option("--ray-actors", panel=CLUSTER, metavar="N", show_default=False, help=(
    "Models run in parallel. \\[default: one per GPU of the cluster, else 1]"))]
RayActorCpus = Annotated[float | None, _option("--ray-actor-cpus", panel=CLUSTER, metavar="CPUS", show_default=False, help=(
    "CPUs each model reserves (on CPUs: its threads, rounded up). \\[default: 1]"))]

Debug = Annotated[bool, typer.Option("--debug", metavar="", help="Show tracebacks of unexpected errors.")]
