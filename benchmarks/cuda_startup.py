"""Where a one-image run's time goes, phase by phase, on a device: imports, CUDA's start, the model, the forward.

    PYTHONPATH=src python benchmarks/cuda_startup.py --device cuda

Each phase is timed once, in the order the command meets them (the command itself is timed by
gpu_bench.py); a second forward shows what the first one paid for lazy loading.
"""

from __future__ import annotations

import argparse
import time

START = time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--image", default="sample_images/chelsea.jpg")
    args = parser.parse_args()
    phases: list[tuple[str, float]] = []

    def mark(name: str) -> None:
        phases.append((name, time.perf_counter()))

    import torch
    import torchvision  # noqa: F401

    mark("import torch, torchvision")
    from backbone_inspect.config import feature_config
    from backbone_inspect.extractor import Extractor

    mark("import backbone_inspect")
    if args.device.startswith("cuda"):
        torch.zeros(1, device=args.device)
        torch.cuda.synchronize()
    mark(f"start {args.device} (context)")
    extractor = Extractor(feature_config(arch="resnet50", layers=(4,), device=args.device), device=args.device)
    mark("build resnet50 (random init) and move it")
    pixels = extractor.load(args.image)[None]
    mark("decode and preprocess the image")
    for name in ("first forward", "second forward (same shape)", "third forward (same shape)"):
        extractor.forward(pixels)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        mark(name)
    previous = START
    for name, at in phases:
        print(f"{name:45s} {1000 * (at - previous):8.1f} ms")
        previous = at
    print(f"{'total':45s} {1000 * (previous - START):8.1f} ms")


if __name__ == "__main__":
    main()
