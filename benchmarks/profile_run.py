"""Where the command's main thread spends its time: cProfile of whole runs, the top functions printed.

Not a test: for a GPU session, to see what keeps the command below the device's ceilings (the
main thread launches the forward passes; with --decode gpu a second thread decodes, which cProfile
does not see). Each variant runs the command under cProfile on generated 500x375 JPEGs, prints its
summary line and the functions with the most own time, and keeps the .prof files.

    PYTHONPATH=src python benchmarks/profile_run.py --out $OUT/profile            # CUDA, ~1 min
    .venv/bin/python benchmarks/profile_run.py --device cpu --dtype float32 --images 64 --batch-size 8 --out /tmp/prof
"""

from __future__ import annotations

import argparse
import io
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import store_bench  # noqa: E402  (its image maker and child environment)

VARIANTS = {
    "decode-gpu": ["--layers", "4", "--decode", "gpu", "--batch-size", "256"],
    "defaults": ["--layers", "4"],
    "shards-l4": ["--layers", "4", "--format", "shards", "--save-dtype", "float16"],
}
"""What each profiled run adds to the common options (shards-l4 also gets --save)."""


def profile_variant(name: str, images: Path, out: Path, args: argparse.Namespace) -> None:
    options = list(VARIANTS[name])
    if args.device == "cpu" and "--batch-size" in options:
        options[options.index("--batch-size") + 1] = str(args.batch_size)
    if args.device == "cpu" and "gpu" in options:
        print(f"## {name}: skipped (--decode gpu needs CUDA)\n")
        return
    save = ["--save", str(out / f"dump-{name}")] if name.startswith("shards") else []
    profile = out / f"{name}.prof"
    command = [sys.executable, "-m", "cProfile", "-o", str(profile), "-m", "backbone_inspect", str(images), *save,
               "--arch", "resnet50", "--resize", "256", "--crop", "224", "--device", args.device, "--dtype", args.dtype,
               *options]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=store_bench.child_environment(), timeout=args.timeout)
    summary = [line for line in done.stderr.splitlines() if line.startswith("processed ")]
    print(f"## {name}: exit {done.returncode} in {time.perf_counter() - start:.1f} s: {summary[-1] if summary else done.stderr[-2000:]}")
    if profile.exists():
        text = io.StringIO()
        pstats.Stats(str(profile), stream=text).sort_stats("tottime").print_stats(args.top)
        print(text.getvalue()[text.getvalue().find("ncalls") - 3:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the .prof files")
    parser.add_argument("--images", type=int, default=6144)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--batch-size", type=int, default=8, help="on a CPU, instead of --decode gpu's 256")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--timeout", type=float, default=120)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="profile-run-") as work:
        images = Path(work) / "images"
        store_bench.make_images(images, args.images, (500, 375), processes=os.cpu_count() or 1)
        for name in args.variants.split(","):
            profile_variant(name, images, args.out, args)


if __name__ == "__main__":
    main()
