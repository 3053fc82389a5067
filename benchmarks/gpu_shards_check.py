"""On a CUDA machine: a dump on the GPU reads back like the same dump on the CPU, for each format and pooling.

Not a test (CI has no GPU): run it by hand there, `PYTHONPATH=src python benchmarks/gpu_shards_check.py`.
Prints one line per case with the error relative to the norm (float32 on CUDA runs convolutions
as TF32 by default, so about 1e-3 is expected there) and exits 1 if a case is off or missing.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from backbone_inspect import dump_features, open_features


def make_images(folder: Path, count: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for index in range(count):
        pixels = torch.randint(0, 256, (96 + index % 3 * 16, 128, 3), dtype=torch.uint8, generator=generator)
        Image.fromarray(pixels.numpy()).save(folder / f"img{index:03d}.png")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def main() -> int:
    root = Path(tempfile.mkdtemp())
    make_images(root / "images", 40)
    worst, failures = 0.0, []
    devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu", "cpu")
    for output_format in ("pt", "shards"):
        for pool in ("none", "avg", "max"):
            dumps = {}
            for role, device in zip(("cpu", "cuda"), devices):
                folder = root / f"{output_format}-{pool}-{role}"
                dump_features(root / "images", folder, arch="resnet18", layers="2,4", crop="none", resize=96,
                              device=device, format=output_format, pool=pool, batch_size=8, workers=2,
                              shard_size=16 if output_format == "shards" else None)
                dumps[role] = open_features(folder)
            cpu, cuda = dumps["cpu"], dumps["cuda"]
            same_images = [i.output for i in cpu.images] == [i.output for i in cuda.images] and len(cpu) == 40
            errors = [relative_error(cuda[i][0][stage], cpu[i][0][stage]) for i in range(len(cpu)) for stage in cpu.stages]
            error = max(errors)
            worst = max(worst, error)
            print(f"{output_format:6} pool {pool:4}: {len(cpu)} images, same names {same_images}, cuda vs cpu max relative error {error:.2e}")
            if not same_images or error > 5e-3:
                failures.append(f"{output_format}/{pool}")
    print("FAILED: " + ", ".join(failures) if failures else f"all cases agree (worst {worst:.2e})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
