"""The run loop's own ceiling: the command with the model, decoding and statistics replaced by
precomputed tensors, so that only this process's Python work (and, with --save, the writing) is left.

Not a test: a diagnostic. If the command on a GPU stays far below the device's ceilings while this
ceiling is far above them, the run loop's Python is not what holds it back.

    .venv/bin/python benchmarks/host_ceiling.py                     # statistics only, 8192 images
    .venv/bin/python benchmarks/host_ceiling.py --save shards       # + shards of layer4 in float16
    .venv/bin/python benchmarks/host_ceiling.py --save pt --images 4096
    PYTHONPATH=src python benchmarks/host_ceiling.py --device cuda   # the maps on the GPU: pinned copies, events, overlap

What is replaced (in this process only): ``local_engine.decoded_batches`` yields batches of zeros
(batch 256, 3x224x224) for files that hold one byte; ``Extractor.forward`` returns the same
precomputed resnet50 layer4 maps ([256, 2048, 7, 7], float16); ``stat_columns`` returns precomputed
columns. With ``--device cuda`` the maps and columns are on the GPU and the batches in pinned memory,
as a real run has them, so the copies to the host, their events and the overlapped batches are the
command's own too. Everything else is the command's own: planning the inputs, launching and collecting each
batch, building the results, the writer threads, the store, the screen.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from backbone_inspect import extractor, local_engine  # noqa: E402
from backbone_inspect.images import DecodedBatch, SizeGroup  # noqa: E402


def replace_the_work(batch: int, device: str) -> None:
    pixels = torch.zeros(batch, 3, 224, 224, dtype=torch.uint8)
    if device == "cuda":
        pixels = pixels.pin_memory()
    maps = torch.rand(batch, 2048, 7, 7).half().to(device)
    columns = torch.rand(batch, 5, dtype=torch.float64).to(device)

    def batches(images, _extractor, *, batch_size, workers):
        for start in range(0, len(images), batch_size):
            part = list(images[start : start + batch_size])
            group = SizeGroup(tuple(range(len(part))), pixels[: len(part)])
            yield part, DecodedBatch(tuple(range(start, start + len(part))), (group,), {})

    local_engine.decoded_batches = batches
    extractor.Extractor.forward = lambda self, images: OrderedDict(layer4=maps[: len(images)])
    extractor.stat_columns = lambda value: columns[: len(value)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--save", choices=["pt", "shards"], default=None, help="also save layer4 in float16 in this format")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the precomputed maps are")
    args = parser.parse_args()
    replace_the_work(args.batch_size, args.device)
    from typer.testing import CliRunner

    from backbone_inspect.cli import app

    with tempfile.TemporaryDirectory(prefix="host-ceiling-") as work:
        images = Path(work) / "images"
        images.mkdir()
        for index in range(args.images):
            (images / f"img{index:06d}.jpg").write_bytes(b"x")
        options = [str(images), "--arch", "resnet50", "--layers", "4", "--device", args.device, "--dtype", "float32",
                   "--batch-size", str(args.batch_size), "--workers", "0"]
        if args.save:
            options += ["--save", str(Path(work) / "out"), "--format", args.save, "--save-dtype", "float16"]
        result = CliRunner().invoke(app, options)
    print(f"{args.device}, exit {result.exit_code}: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ''}")


if __name__ == "__main__":
    main()
