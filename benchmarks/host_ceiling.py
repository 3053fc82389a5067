"""The run loop's own ceiling: the command with the model, decoding and statistics replaced by
precomputed tensors, so that only this process's Python work (and, with --save, the writing) is left.

Not a test: a diagnostic. If the command on a GPU stays far below the device's ceilings while this
ceiling is far above them, the run loop's Python is not what holds it back.

    .venv/bin/python benchmarks/host_ceiling.py                     # statistics only, 8192 images
    .venv/bin/python benchmarks/host_ceiling.py --save shards       # + shards of layer4 in float16
    .venv/bin/python benchmarks/host_ceiling.py --save pt --images 4096
    PYTHONPATH=src python benchmarks/host_ceiling.py --device cuda   # the maps on the GPU: pinned copies, events, overlap
    .venv/bin/python benchmarks/host_ceiling.py --save shards --layers 2,3,4 --images 2048 --disk   # 1.4 MB an image,
        # against the disk's sequential write rate of as many bytes, measured first (issue 12's second target)
    .venv/bin/python benchmarks/host_ceiling.py --jpegs --workers 2 --images 2048 [--save shards]
        # real 500x375 JPEGs decoded by the command's own workers: what writing costs a decode-bound run

What is replaced (in this process only): ``local_engine.decoded_batches`` yields batches of zeros
(batch 256, 3x224x224) for files that hold one byte; ``Extractor.forward`` returns the same
precomputed resnet50 maps of the ``--layers`` asked for (layer4: [256, 2048, 7, 7], float16);
``stat_columns`` returns precomputed
columns. With ``--jpegs`` the decoding is the command's own (generated 500x375 JPEGs, ``--workers``
processes), so that a run bound by decoding, as on a GPU machine, shows what saving costs it. With ``--device cuda`` the maps and columns are on the GPU and the batches in pinned memory,
as a real run has them, so the copies to the host, their events and the overlapped batches are the
command's own too. Everything else is the command's own: planning the inputs, launching and collecting each
batch, building the results, the writer threads, the store, the screen.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from backbone_inspect import extractor, local_engine  # noqa: E402
from backbone_inspect.images import DecodedBatch, SizeGroup  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from store_bench import disk_write_rate, make_images  # noqa: E402


RESNET50_MAPS = {"layer1": (256, 56), "layer2": (512, 28), "layer3": (1024, 14), "layer4": (2048, 7)}
"""Channels and side of resnet50's stages at 224 px."""


def replace_the_work(batch: int, device: str, stages: list[str], *, decode: bool) -> None:
    pixels = torch.zeros(batch, 3, 224, 224, dtype=torch.uint8)
    if device == "cuda":
        pixels = pixels.pin_memory()
    maps = OrderedDict((stage, torch.rand(batch, RESNET50_MAPS[stage][0], RESNET50_MAPS[stage][1], RESNET50_MAPS[stage][1]).half().to(device))
                       for stage in stages)
    columns = torch.rand(batch, 5, dtype=torch.float64).to(device)

    def batches(images, _extractor, *, batch_size, workers):
        for start in range(0, len(images), batch_size):
            part = list(images[start : start + batch_size])
            group = SizeGroup(tuple(range(len(part))), pixels[: len(part)])
            yield part, DecodedBatch(tuple(range(start, start + len(part))), (group,), {})

    if not decode:
        local_engine.decoded_batches = batches
    extractor.Extractor.forward = lambda self, images: OrderedDict((stage, value[: len(images)]) for stage, value in maps.items())
    extractor.stat_columns = lambda value: columns[: len(value)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--save", choices=["pt", "shards"], default=None, help="also save the stages in float16 in this format")
    parser.add_argument("--layers", default="4", help="resnet50 stages, as the command's --layers (1-4)")
    parser.add_argument("--pool", choices=["none", "avg", "max"], default="none", help="with --save: the command's --pool")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the precomputed maps are")
    parser.add_argument("--disk", action="store_true",
                        help="with --save: first write as many bytes as the maps hold sequentially into the same filesystem")
    parser.add_argument("--work-dir", default=None, help="where the images and the dump go (default: the system's temporary "
                        "folder); /dev/shm leaves the disk out, so that only the CPU's share is left")
    parser.add_argument("--jpegs", action="store_true", help="decode generated 500x375 JPEGs in the command's own workers "
                        "(only the model and the statistics replaced)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="with --jpegs: the command's --workers")
    args = parser.parse_args()
    stages = [f"layer{number}" for number in args.layers.split(",")]
    replace_the_work(args.batch_size, args.device, stages, decode=args.jpegs)
    from typer.testing import CliRunner

    from backbone_inspect.cli import app

    with tempfile.TemporaryDirectory(prefix="host-ceiling-", dir=args.work_dir) as work:
        disk = None
        if args.save and args.disk:  # before the dump: a removal just before would slow the writes (discard)
            side = {stage: 1 if args.pool != "none" else RESNET50_MAPS[stage][1] for stage in stages}  # pooled: a vector
            image_bytes = sum(2 * RESNET50_MAPS[stage][0] * side[stage] ** 2 for stage in stages)
            disk = disk_write_rate(Path(work) / "disk", args.images * image_bytes)[0], image_bytes
        images = Path(work) / "images"
        images.mkdir()
        if args.jpegs:
            make_images(images, args.images, (500, 375), processes=os.cpu_count() or 1)
        for index in range(0 if args.jpegs else args.images):
            (images / f"img{index:06d}.jpg").write_bytes(b"x")
        options = [str(images), "--arch", "resnet50", "--layers", args.layers, "--device", args.device, "--dtype", "float32",
                   "--batch-size", str(args.batch_size), "--workers", str(args.workers if args.jpegs else 0)]
        if args.save:
            options += ["--save", str(Path(work) / "out"), "--format", args.save, "--save-dtype", "float16", "--pool", args.pool]
        result = CliRunner().invoke(app, options)
    summary = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
    print(f"{args.device}, exit {result.exit_code}: {summary}")
    rate = re.search(r"\(([\d.]+) images/s\)", summary)
    if disk is not None and rate:
        disk_rate = disk[0] * 1e6 / disk[1]
        print(f"the disk first: {disk[0]:.0f} MB/s sequentially, {disk_rate:.0f} images/s of these; "
              f"the dump: {float(rate[1]) * disk[1] / 1e6:.0f} MB/s, {float(rate[1]) / disk_rate:.2f} of the disk")


if __name__ == "__main__":
    main()
