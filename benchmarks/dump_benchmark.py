"""Dump throughput and peak memory of `backbone-inspect DIR --save OUT` on generated images.

Not a test: run it by hand and copy the table into the README.

    .venv/bin/python benchmarks/dump_benchmark.py --counts 50 500 --archs resnet18 resnet50

Each run is a fresh process. Throughput is the command's own figure (the run loop, start-up
and model loading excluded); wall time includes them. Peak memory is the largest resident set
of the main process and, separately, of its decoding workers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import resource, sys, json
from backbone_inspect.cli import main
sys.argv = ["backbone-inspect"] + sys.argv[1:]
try:
    main()
except SystemExit as exit:
    code = exit.code
self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
children_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
sys.stderr.write("BENCH " + json.dumps({"code": code, "self_kb": self_kb, "children_kb": children_kb}) + "\\n")
"""


def make_images(folder: Path, count: int, size: tuple[int, int] = (320, 240)) -> None:
    import torch
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for index in range(count):
        # Smooth random colour fields: realistic JPEG sizes, unlike pure noise.
        small = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8, generator=generator)
        big = torch.nn.functional.interpolate(small[None].float(), size=(size[1], size[0]), mode="bilinear")[0]
        pixels = big.clamp(0, 255).byte().permute(1, 2, 0).contiguous().numpy()
        Image.fromarray(pixels).save(folder / f"img{index:05d}.jpg", quality=90)


def run_once(images: Path, out: Path, arch: str, extra: list[str]) -> dict:
    command = [sys.executable, "-c", CHILD, str(images), "--save", str(out), "--arch", arch, *extra]
    import time

    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    bench = json.loads(next(line[6:] for line in result.stderr.splitlines() if line.startswith("BENCH ")))
    summary = next(line for line in result.stderr.splitlines() if line.startswith("processed "))
    rate = float(re.search(r"\(([\d.]+) images/s\)", summary).group(1))
    return {"wall_s": wall, "images_per_s": rate, "rss_mb": bench["self_kb"] / 1024,
            "workers_rss_mb": bench["children_kb"] / 1024, "code": bench["code"], "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[50, 500])
    parser.add_argument("--archs", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--extra", default="", help="more options for backbone-inspect, e.g. '--save-dtype float16'")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        print("| arch | images | images/s | wall s | peak RSS main MB | peak RSS worker MB |")
        print("|---|---|---|---|---|---|")
        for count in args.counts:
            images = root / f"images{count}"
            make_images(images, count)
            for arch in args.archs:
                out = root / f"out-{arch}-{count}"
                row = run_once(images, out, arch, args.extra.split())
                assert row["code"] == 0, row
                print(f"| {arch} | {count} | {row['images_per_s']:.1f} | {row['wall_s']:.1f} | "
                      f"{row['rss_mb']:.0f} | {row['workers_rss_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
