"""Throughput of the dump on the local engine and on a local Ray cluster, on this machine.

Not a test: run it by hand on an idle machine (needs the [ray] extra) and copy the table into
the README.

    .venv/bin/python benchmarks/ray_benchmark.py --arch resnet50 --images 64

Every variant runs `backbone-inspect DIR --layers 2,3,4 --save OUT` as a subprocess on the same
generated 320x240 JPEGs. Per-image throughput has start-up (and Ray's cluster start) excluded:
the extra images over the extra time of a run on 3N images against one on N, each timed twice,
the faster kept.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench import make_images  # noqa: E402

VARIANTS = {
    "local engine (1 decode worker)": [],
    "ray, 1 actor x 1 CPU": ["--engine", "ray", "--ray-actors", "1", "--ray-actor-cpus", "1"],
    "ray, 2 actors x 0.75 CPU (1 thread each)": ["--engine", "ray", "--ray-actors", "2", "--ray-actor-cpus", "0.75"],
}


def seconds(folder: Path, out: Path, arch: str, extra: list[str]) -> float:
    command = [sys.executable, "-m", "backbone_inspect", str(folder), "--layers", "2,3,4", "--arch", arch,
               "--save", str(out), "--overwrite", *extra]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "RAY_ADDRESS": ""})
    if result.returncode != 0:
        raise RuntimeError(result.stderr)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--images", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        make_images(root / "small", args.images)
        make_images(root / "large", 3 * args.images)
        print(f"{os.cpu_count()} CPUs, {args.arch}, 224 px, float32, --save, default batch 32")
        print("| engine | images/s (start-up excluded) | start-up s |")
        print("|---|---|---|")
        for name, extra in VARIANTS.items():
            small = min(seconds(root / "small", root / "out", args.arch, extra) for _ in range(2))
            large = min(seconds(root / "large", root / "out", args.arch, extra) for _ in range(2))
            rate = 2 * args.images / (large - small)
            print(f"| {name} | {rate:.1f} | {small - args.images / rate:.1f} |", flush=True)


if __name__ == "__main__":
    main()
