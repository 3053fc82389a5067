"""Throughput of backbone-inspect against the model's own forward pass and the usual alternatives.

Not a test: run it by hand, on an otherwise idle machine, and copy its table into BENCHMARKS.md.

    .venv/bin/python benchmarks/bench.py                      # resnet18 and resnet50, float32 and bfloat16
    .venv/bin/python benchmarks/bench.py --archs resnet50 --dtypes float32 --images 48

All variants run on the same generated JPEGs (320x240, preprocessed to 224x224) in one process,
except the end-to-end command, which runs as a subprocess. Variants:

  ceiling       the model's own modules, conv1 .. layer4, on ready normalised tensors (batch,
                channels_last when faster, inference_mode): what extraction cannot beat
  replay        backbone_inspect.Backbone(layers=2,3,4) on the same tensors
  fx            torchvision create_feature_extractor(layer2, layer3, layer4), same tensors
  hooks         forward hooks on layer2..4 of the full model (forward runs to fc), same tensors
  command       `backbone-inspect DIR --layers 2,3,4 --save OUT`: decoding, forward, stats and
                writing, per image with start-up excluded: (time for 3N images - time for N) / 2N
  naive         what a user would write: per image PIL -> torchvision transforms ->
                create_feature_extractor (batch 1, float32, contiguous) -> torch.save
  timm          timm features_only=True, out_indices=(2, 3, 4), same tensors (with the [bench] extra)

The early-stop check (resnet50 float32; alone with --early-stop-only) compares, for the
command, the per-image time of --layers 1 over --layers 4 with the model's own forward to
layer1 over its forward to layer4.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from backbone_inspect import Backbone

STAGES = ("layer2", "layer3", "layer4")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_images(folder: Path, count: int, size: tuple[int, int] = (320, 240)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    paths = []
    for index in range(count):
        small = torch.randint(0, 256, (1, 3, 8, 8), generator=generator).float()
        big = nn.functional.interpolate(small, size=(size[1], size[0]), mode="bilinear")[0]
        array = big.clamp(0, 255).byte().permute(1, 2, 0).contiguous().numpy()
        path = folder / f"img{index:05d}.jpg"
        Image.fromarray(array).save(path, quality=90)
        paths.append(path)
    return paths


def ready_tensors(paths: list[Path]) -> torch.Tensor:
    transform = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.transforms()
    return torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])


def forward_to(model: nn.Module, stage: str) -> nn.Sequential:
    """The model's own modules in order, conv1 .. ``stage``."""
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    return nn.Sequential(*[getattr(model, n) for n in names[: names.index(stage) + 1]])


def images_per_second(run: Callable[[torch.Tensor], object], data: torch.Tensor, batch: int) -> float:
    """One pass over ``data`` in batches, after one warm-up batch."""
    with torch.inference_mode():
        run(data[:batch])
        start = time.perf_counter()
        for offset in range(0, len(data), batch):
            run(data[offset : offset + batch])
    return len(data) / (time.perf_counter() - start)


def best_rates(variants: dict[str, tuple[Callable[[torch.Tensor], object], torch.Tensor, int]], rounds: int) -> dict[str, float]:
    """Each variant's best rate over ``rounds``, measured round-robin so that drifts hit all alike."""
    best = dict.fromkeys(variants, 0.0)
    for _ in range(rounds):
        for name, (run, data, batch) in variants.items():
            best[name] = max(best[name], images_per_second(run, data, batch))
    return best


def prepare(module: nn.Module, dtype: torch.dtype, channels_last: bool) -> nn.Module:
    module = module.eval().to(dtype=dtype)
    return module.to(memory_format=torch.channels_last) if channels_last else module


def as_input(data: torch.Tensor, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    data = data.to(dtype)
    return data.contiguous(memory_format=torch.channels_last) if channels_last else data.contiguous()


def command_seconds(folder: Path, out: Path, arch: str, dtype: str, layers: str, extra: list[str]) -> float:
    """Wall time of the command; ``--no-save`` in ``extra`` runs it without --save (statistics only)."""
    save = [] if "--no-save" in extra else ["--save", str(out), "--overwrite"]
    command = [sys.executable, "-m", "backbone_inspect", str(folder), *save, "--arch", arch,
               "--layers", layers, "--dtype", dtype, *(e for e in extra if e != "--no-save")]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr)
    return time.perf_counter() - start


def command_rate(small: Path, large: Path, extra_images: int, out: Path, arch: str, dtype: str, layers: str,
                 extra: list[str], repeats: int = 2) -> float:
    """Images/s of the command with start-up excluded: the extra images over the extra time.

    Each run is timed ``repeats`` times and the fastest kept: on a shared machine a run is now
    and then several times slower than its neighbours.
    """
    seconds_small = min(command_seconds(small, out / "small", arch, dtype, layers, extra) for _ in range(repeats))
    seconds_large = min(command_seconds(large, out / "large", arch, dtype, layers, extra) for _ in range(repeats))
    return extra_images / (seconds_large - seconds_small)


def naive_rate(paths: list[Path], model: nn.Module, out: Path) -> float:
    transform = torchvision.transforms.Compose([
        torchvision.transforms.Resize(256),
        torchvision.transforms.CenterCrop(224),
        torchvision.transforms.ToTensor(),
        torchvision.transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    extractor = create_feature_extractor(model.eval(), {s: s for s in STAGES})
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        extractor(transform(Image.open(paths[0]).convert("RGB"))[None])
        start = time.perf_counter()
        for path in paths:
            features = extractor(transform(Image.open(path).convert("RGB"))[None])
            torch.save({k: v[0] for k, v in features.items()}, out / f"{path.stem}.pt")
    return len(paths) / (time.perf_counter() - start)


def early_stop(work: nn.Module, x: torch.Tensor, command_batch: int, root: Path, arch: str, dtype_name: str, images: int) -> None:
    """Per-image time of --layers 1 over --layers 4: the command's against the model's own forward.

    The model's ratio depends on the batch (layer1's large maps fall out of cache in big
    batches), so it is given twice: at the command's default batch, and each depth at its own
    best batch (the strictest reference). A layer1-only run is short, so the command runs on
    2N and 6N images, each run timed three times, the fastest kept.
    """
    batches = (1, 2, 4, 8, 16, 32)
    rates = best_rates({(stage, b): (forward_to(work, stage), x, b) for stage in ("layer1", "layer4") for b in batches}, rounds=3)
    at_batch = rates[("layer4", command_batch)] / rates[("layer1", command_batch)]
    best = max(rates[("layer4", b)] for b in batches) / max(rates[("layer1", b)] for b in batches)
    small, large = make_images(root / "es-small", 2 * images), make_images(root / "es-large", 6 * images)
    for label, extra in (("without --save", ["--no-save"]), ("with --save", [])):
        per_image = {
            layers: 1 / command_rate(root / "es-small", root / "es-large", len(large) - len(small), root / "es-out",
                                     arch, dtype_name, layers, extra, repeats=3)
            for layers in ("1", "4")
        }
        ratio = per_image["1"] / per_image["4"]
        print(f"  early stop ({label}, default batch {command_batch}): per-image time layer1/layer4: command {ratio:.2f} "
              f"({per_image['1'] * 1e3:.1f} / {per_image['4'] * 1e3:.1f} ms); model at batch {command_batch} {at_batch:.2f} "
              f"(command {ratio / at_batch:.2f}x that), model each depth at its best batch {best:.2f} "
              f"(command {ratio / best:.2f}x that)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--images", type=int, default=64, help="N: in-process variants use N, the command N and 3N")
    parser.add_argument("--batch-size", type=int, default=32, help="the command's default batch")
    parser.add_argument("--early-stop-only", action="store_true", help="only the early-stop check (resnet50, float32)")
    args = parser.parse_args()

    from backbone_inspect.device import keep_freed_memory

    keep_freed_memory()  # as the command does: every variant gets the same allocator
    try:
        import timm
    except ImportError:
        timm = None
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, timm {'yes' if timm else 'not installed'}")
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        small_paths = make_images(root / "small", args.images)
        make_images(root / "large", 3 * args.images)
        data = ready_tensors(small_paths)
        if args.early_stop_only:
            torch.manual_seed(0)
            work = prepare(torchvision.models.get_model("resnet50"), torch.float32, channels_last=True)
            early_stop(work, as_input(data, torch.float32, True), args.batch_size, root, "resnet50", "float32", args.images)
            return
        print("| arch | compute dtype | variant | images/s | ratio to ceiling |")
        print("|---|---|---|---|---|")
        for arch in args.archs:
            torch.manual_seed(0)
            model = torchvision.models.get_model(arch).eval()
            naive_fp32 = naive_rate(small_paths, model, root / "naive")
            for dtype_name in args.dtypes:
                dtype = DTYPES[dtype_name]
                work = copy.deepcopy(model)  # prepare() converts modules in place
                settings = [(cl, batch) for cl in (False, True) for batch in (1, 4, 8, 16, 32)]
                candidates = {}
                for cl, batch in settings:
                    module = prepare(copy.deepcopy(forward_to(work, "layer4")), dtype, cl)
                    candidates[f"{cl}/{batch}"] = (module, as_input(data, dtype, cl), batch)
                searched = best_rates(candidates, rounds=1)
                best_key = max(searched, key=searched.get)
                channels_last, batch = best_key.split("/")[0] == "True", int(best_key.split("/")[1])
                x = as_input(data, dtype, channels_last)
                work = prepare(work, dtype, channels_last)
                captured: dict[str, torch.Tensor] = {}
                hooked = copy.deepcopy(work)
                for stage in STAGES:
                    getattr(hooked, stage).register_forward_hook(lambda m, i, o, s=stage: captured.__setitem__(s, o))
                variants = {
                    "ceiling": (forward_to(work, "layer4"), x, batch),
                    "replay": (Backbone(arch, STAGES, model=work), x, batch),
                    "fx": (create_feature_extractor(work, {s: s for s in STAGES}), x, batch),
                    "hooks": (hooked, x, batch),
                }
                if timm is not None:
                    timm_model = timm.create_model(arch, pretrained=False, features_only=True, out_indices=(2, 3, 4))
                    variants["timm"] = (prepare(timm_model, dtype, channels_last), x, batch)
                rates = best_rates(variants, rounds=3)
                ceiling_rate = rates["ceiling"]
                print(f"| {arch} | {dtype_name} | ceiling: {'channels_last' if channels_last else 'contiguous'}, batch {batch} "
                      f"(searched: {', '.join(f'{k}={v:.1f}' for k, v in searched.items())}) | {ceiling_rate:.1f} | 1.00 |", flush=True)

                def row(variant: str, rate: float) -> None:
                    print(f"| {arch} | {dtype_name} | {variant} | {rate:.1f} | {rate / ceiling_rate:.2f} |", flush=True)

                for name in ("replay", "fx", "hooks", "timm"):
                    if name in rates:
                        row(name, rates[name])
                command = command_rate(root / "small", root / "large", 2 * args.images, root / "out", arch, dtype_name, "2,3,4", [])
                row("command --save (default batch 32)", command)
                tuned = command_rate(root / "small", root / "large", 2 * args.images, root / "out", arch, dtype_name, "2,3,4", ["--batch-size", str(batch)])
                row(f"command --save --batch-size {batch}", tuned)
                row("naive loop (float32)", naive_fp32)
                print(f"  command vs naive float32 loop: {command / naive_fp32:.2f}x (batch {batch}: {tuned / naive_fp32:.2f}x)", flush=True)
                if arch == "resnet50" and dtype_name == "float32":
                    early_stop(work, x, args.batch_size, root, arch, dtype_name, args.images)

if __name__ == "__main__":
    main()
