"""One GPU session's figures: forward ceilings, accuracy per dtype, decoding ceilings, the command, the naive loop.

Not a test: run it once on a CUDA machine (< 5 minutes) and copy its table.

    PYTHONPATH=src python benchmarks/gpu_bench.py --out-json $OUT/gpu.json        # ~4.5 min on an H200
    # a dry run of every code path on a CPU (--device cpu makes the counts tiny; ~3 min on 2 CPUs;
    # what needs CUDA or options not there yet ends as notes):
    .venv/bin/python benchmarks/gpu_bench.py --device cpu --dtype float32 --out-json /tmp/gpu-dry/gpu.json

Parts, in the order they run (the most wanted first; --skip 6,7 leaves parts out, 5 all of 5a-5g):

  1   forward ceiling   Backbone("resnet50", layer4), random init, batch 256, channels_last, input
                        already on the device, cudnn.benchmark on: float32 (TF32 off), tf32,
                        float16, bfloat16. Warm-up, then timed iterations with synchronize.
  2   accuracy          layer4 of 8 generated images through Extractor on the device per --dtype,
                        against the same Backbone in float64 on the CPU: ‖x − ref‖ / ‖ref‖.
  5a  command           statistics only (--layers 4) at the command's defaults (batch, workers:
                        with CUDA every core but two).
  5g  command           5a with one worker more (--workers cores - 1, the default before
                        2026-11-27): whether the two cores left to the command's own process
                        (main loop, pinning, writers) pay for themselves with statistics only too
                        (shards of layer4: 2,177 images/s with 15 workers, 2,915 with 14).
  3   CPU decode        DataLoader(ImageDataset, collate_batch, pin_memory) drained, nothing else:
                        the library's default workers for CUDA, and all (cores - 1 and cores).
  6   one image         wall time of the whole command, --device cuda against --device cpu (three
                        runs each); then CUDA runs with one change each (no warm-up thread; CUDA's
                        context retained through the driver at the process's start), and one run
                        a device under cProfile (one-image-DEVICE.txt beside --out-json).
  5b  command           statistics only with --decode gpu --batch-size 256, from all the images (12,000)
                        to each of them three times (36,000, as links): 24,000 extra images, several
                        seconds of run loop (a second of it, as before, left the rate unsettled).
  4   GPU decode        read_file + batched decode_jpeg on the device + resize 256 (antialias) +
                        centre crop 224, batches of 256 (files from the page cache).
  5c  command           --save --format shards --save-dtype float16 --layers 4.
  5d  command           the same with --layers 2,3,4 (1.4 MB an image), on fewer images, against
                        the disk's sequential write rate measured just before, over as many bytes
                        as this dump writes (a 2 GiB burst overstated the rate a 12 GB dump meets).
  7   naive loop        PIL + transforms + create_feature_extractor (batch 1, float32) + torch.save.
  5e  command           --format pt --layers 4.
  5f  command           5c and 5d with --decode gpu --batch-size 256.

Rates of the command (part 5) and of the CPU decoding (part 3) are marginal: a run on a small and
on a large set of the same images, extra images over extra seconds, so that start-up cancels out.
The command's seconds are its run loop's, from its summary line.

Time: parts are skipped with a note when the estimate of their time would pass --budget-s
(counted from this process's start); a part still running when the budget is spent is stopped.
The images are made first, in processes, before this process touches CUDA. Progress goes to
stderr; the table to stdout and, with --out-json PATH, to PATH (JSON) and PATH.md, rewritten after
every row so that a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import os
import shutil
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import store_bench  # noqa: E402  (it puts src/ on the path when the package is not installed)
from store_bench import Report, log  # noqa: E402

import torch  # noqa: E402
import torchvision  # noqa: E402


def process_started_at() -> float:
    """The perf_counter time at which this process started (from /proc; now where that cannot be read)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.perf_counter() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    return time.perf_counter()


PROCESS_START = process_started_at()  # the budget counts from here: interpreter start and imports included

# What an H200 with 16 cores did before (images/s): only for estimating a part's time, scaled by
# how fast this machine runs the command (see Bench.speed_factor).
EXPECTED_RATES = {"stats": 3700.0, "gpu-decode": 6000.0, "shards-l4": 2000.0, "shards-l234": 1000.0, "pt-l4": 900.0,
                  "cpu-decode": 3700.0, "nvjpeg": 7000.0, "naive": 80.0}
STARTUP_GUESS_S = 8.0  # a command's start-up before any was measured
GRACE_S = 5.0  # how far past the budget a running part may go before it is stopped
BYTES_PER_L234_IMAGE = 1.41e6  # resnet50 layers 2,3,4 at 224 px in float16, for the disk-space check


class PartTimeout(Exception):
    """The budget ran out while a part was running."""


# --------------------------------------------------------------------------------------------
# The session: options, image sets, results, the budget


@dataclass
class Bench:
    args: argparse.Namespace
    report: Report
    root: Path
    device: torch.device
    paths: list[Path] = field(default_factory=list)
    sets: dict[str, tuple[Path, Path]] = field(default_factory=dict)  # "main", "dump": (small set, large set) folders
    results: dict[str, Any] = field(default_factory=dict)
    startups: list[float] = field(default_factory=list)
    card: str = ""
    day: str = ""
    checks_done: set[str] = field(default_factory=set)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def elapsed(self) -> float:
        return time.perf_counter() - PROCESS_START

    def left(self) -> float:
        return self.args.budget_s - self.elapsed()

    def deadline(self) -> float:
        """perf_counter time at which in-process loops stop measuring."""
        return PROCESS_START + self.args.budget_s

    def run_timeout(self, expected_s: float | None = None) -> float:
        """A command run's limit: --run-timeout, the budget, and 3x what the run should take (a hang costs little)."""
        limit = min(self.args.run_timeout, self.left() + GRACE_S)
        if expected_s is not None:
            limit = min(limit, max(45.0, 3 * expected_s))
        return max(1.0, limit)

    def speed_factor(self) -> float:
        """This machine's command speed against an H200's (1 until part 5a has run)."""
        found = self.results.get("5a")
        return min(1.0, (found["marginal"] or found["rate"]) / EXPECTED_RATES["stats"]) if found else 1.0

    def startup_s(self) -> float:
        return sum(self.startups) / len(self.startups) if self.startups else STARTUP_GUESS_S

    def estimate(self, kind: str, images: int, fixed_s: float = 0.0) -> float:
        return fixed_s + images / (EXPECTED_RATES[kind] * self.speed_factor())

    def row(self, title: str, variant: str, rate: str, ratio: str = "", details: str = "",
            data: dict[str, Any] | None = None) -> None:
        self.report.row(f"{title} [{self.card}, {self.day}]", variant, rate, ratio, details, data)

    def check(self, key: str, line: str) -> None:
        if key not in self.checks_done:
            self.checks_done.add(key)
            self.report.check(line)


def verdict(value: float, target: float, at_most: bool = False) -> str:
    met = value <= target if at_most else value >= target
    return f"({'meets' if met else 'MISSES'} the target {'<=' if at_most else '>='} {target:g})"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def alarm(seconds: float) -> Iterator[None]:
    """PartTimeout in this (main) thread after ``seconds``; a subprocess run_command waits on is killed by it."""
    def expire(signum: int, frame: Any) -> None:
        raise PartTimeout(f"stopped after {seconds:.0f} s: the budget (--budget-s) ran out")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(0.5, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --------------------------------------------------------------------------------------------
# Part 1: the forward ceiling per compute dtype

CEILING_DTYPES: tuple[tuple[str, torch.dtype, bool], ...] = (
    ("float32 (TF32 off)", torch.float32, False), ("tf32", torch.float32, True),
    ("float16", torch.float16, False), ("bfloat16", torch.bfloat16, False),
)


def timed_rate(step: Callable[[], object], images_per_step: int, seconds: float, device: torch.device,
               deadline: float) -> tuple[float, int, float]:
    """Steps until ``seconds`` have passed (at least 2), each synchronised: images/s, steps, seconds."""
    steps, start = 0, time.perf_counter()
    while True:
        step()
        sync(device)
        steps += 1
        now = time.perf_counter()
        if (now - start >= seconds and steps >= 2) or now > deadline:
            return steps * images_per_step / (now - start), steps, now - start


def ceiling_rate(base: torch.nn.Module, dtype: torch.dtype, tf32: bool, bench: Bench) -> tuple[float, int, float]:
    from backbone_inspect.precision import cuda_math

    batch, device = bench.args.ceiling_batch, bench.device
    model = copy.deepcopy(base).to(device=device, dtype=dtype).to(memory_format=torch.channels_last)
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, 3, 224, 224, device=device, generator=generator).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    with cuda_math(tf32=tf32, autotune=True), torch.inference_mode():
        for _ in range(bench.args.warmup):  # the first autotunes cuDNN's kernels for this shape
            model(x)
        sync(device)
        return timed_rate(lambda: model(x), batch, bench.args.ceiling_seconds, device, bench.deadline())


def part_ceiling(bench: Bench) -> None:
    from backbone_inspect.backbone import Backbone

    base = Backbone("resnet50", ("layer4",), None, seed=0).eval()
    title = (f"1 forward ceiling: Backbone resnet50 to layer4 (random init), batch {bench.args.ceiling_batch}, "
             f"channels_last, input already on {bench.device.type}, cudnn.benchmark on, warm-up passes: "
             f"{bench.args.warmup}, then {bench.args.ceiling_seconds:g} s of passes, each synchronised")
    reference = None
    for name, dtype, tf32 in CEILING_DTYPES:
        rate, steps, seconds = ceiling_rate(base, dtype, tf32, bench)
        if bench.cuda:
            torch.cuda.empty_cache()  # the model and input of this dtype are gone
        reference = reference or rate
        details = f"{steps} passes in {seconds:.2f} s; TF32 {'on' if tf32 else 'off'} (cudnn and matmul)"
        details += "" if bench.cuda else " (no effect off CUDA)"
        bench.results[f"ceiling:{name}"] = rate
        bench.row(title, name, f"{rate:.0f} images/s", f"{rate / reference:.2f} (/float32)", details,
                  {"images_per_s": rate, "passes": steps, "seconds": seconds, "tf32": tf32})


# --------------------------------------------------------------------------------------------
# Part 2: accuracy of layer4 per --dtype against float64 on the CPU

ACCURACY_DTYPES = ("float32", "tf32", "float16", "bfloat16")
FLOAT32_TARGET = 1e-5


def float64_reference(config: Any, pixels: torch.Tensor) -> torch.Tensor:
    """layer4 of the config's Backbone in float64 on the CPU, normalised as the Extractor does."""
    from backbone_inspect.backbone import Backbone

    model = Backbone(config.arch, config.stages, config.weights, seed=config.seed).eval().double()
    mean = torch.tensor(config.preprocessing.mean, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(config.preprocessing.std, dtype=torch.float64).view(1, 3, 1, 1)
    with torch.inference_mode():
        return model((pixels.double() / 255 - mean) / std)["layer4"]


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    value = value.detach().to("cpu", torch.float64)
    return float((value - reference).norm() / reference.norm())


def part_accuracy(bench: Bench) -> None:
    from backbone_inspect.config import feature_config
    from backbone_inspect.extractor import Extractor
    from backbone_inspect.images import load_image_tensor

    options = {"arch": "resnet50", "layers": "4", "resize": 256, "crop": 224}
    base = feature_config(**options)
    pixels = torch.stack([load_image_tensor(path, base.preprocessing) for path in bench.paths[:8]])
    reference = float64_reference(base, pixels)
    title = (f"2 accuracy: layer4 of {len(pixels)} generated images, Extractor(feature_config(dtype=...)) on "
             f"{bench.device.type}, ‖x − ref‖ / ‖ref‖ against the same Backbone (seed 0) in float64 on the CPU")
    for name in ACCURACY_DTYPES:
        try:
            extractor = Extractor(feature_config(**options, dtype=name), device=bench.device)
            layer4 = extractor.forward(pixels)["layer4"]  # the Extractor sets its own TF32 flags and restores them
        except Exception as error:  # noqa: BLE001 - a dtype not accepted (yet) is a note
            bench.report.note(f"2 accuracy, --dtype {name}: {type(error).__name__}: {str(error)[:400]}")
            continue
        error = relative_error(layer4, reference)
        bench.results[f"accuracy:{name}"] = error
        target = f" (target <= {FLOAT32_TARGET:g})" if name == "float32" else ""
        flags = (f"; the process's own flags meanwhile: cudnn.conv.fp32_precision={torch.backends.cudnn.conv.fp32_precision}, "
                 f"cuda.matmul.fp32_precision={torch.backends.cuda.matmul.fp32_precision}") if bench.cuda else ""
        bench.row(title, f"--dtype {name}", f"{error:.2e} relative error{target}", "",
                  f"finite: {bool(torch.isfinite(layer4).all())}{flags}", {"relative_error": error})
        del extractor, layer4
    if bench.cuda:
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# Part 3: the CPU decoding ceiling (DataLoader workers, nothing else)


def default_workers_for_cuda() -> int:
    """The library's default --workers on this machine for CUDA, however options.default_workers takes it."""
    from backbone_inspect.options import default_workers

    takes_device = bool(inspect.signature(default_workers).parameters)
    return default_workers("cuda") if takes_device else default_workers()


def drain_loader(paths: list[Path], workers: int, batch: int, pin: bool, deadline: float) -> tuple[int, float]:
    """Images decoded and seconds, from the loader's creation to its last batch (cut at ``deadline``)."""
    from backbone_inspect.images import ImageDataset, Preprocessing, collate_batch

    start, count = time.perf_counter(), 0
    loader = torch.utils.data.DataLoader(ImageDataset([str(p) for p in paths], Preprocessing()), batch_size=batch,
                                         num_workers=workers, collate_fn=collate_batch, pin_memory=pin)
    for decoded in loader:
        if decoded.errors:
            raise RuntimeError(f"decoding failed: {next(iter(decoded.errors.values()))}")
        count += sum(len(group.positions) for group in decoded.groups)
        if time.perf_counter() > deadline:
            break
    return count, time.perf_counter() - start


def decode_ceiling(bench: Bench, workers: int) -> dict[str, Any]:
    small, large = (sorted(folder.iterdir()) for folder in bench.sets["main"])
    runs = [drain_loader(paths, workers, bench.args.decode_batch, bench.cuda, bench.deadline()) for paths in (large, small)]
    (large_count, large_s), (small_count, small_s) = runs
    marginal = (large_count - small_count) / (large_s - small_s) if large_s > small_s else None
    log(f"  decode, {workers} workers: {small_count} in {small_s:.2f} s, {large_count} in {large_s:.2f} s")
    return {"workers": workers, "marginal": marginal, "plain": large_count / large_s, "images": large_count,
            "seconds": large_s, "small_images": small_count, "small_seconds": small_s,
            "cut_short": large_count < len(large) or small_count < len(small)}


def part_decode_cpu(bench: Bench) -> None:
    cores = os.cpu_count() or 1
    default = default_workers_for_cuda()
    measured = {workers: decode_ceiling(bench, workers) for workers in dict.fromkeys([max(1, cores - 1), cores, default])}
    best = max((measured[w] for w in {max(1, cores - 1), cores}), key=lambda found: found["marginal"] or 0)
    bench.results["decode:all"], bench.results["decode:default"] = best, measured[default]
    small, large = bench.sets["main"]
    title = (f"3 CPU decode ceiling: DataLoader(ImageDataset(paths, Preprocessing()) 256/224 from 500x375 JPEGs, "
             f"batch {bench.args.decode_batch}, collate_batch, pin_memory={bench.cuda}) drained, nothing else; marginal "
             f"over {len(os.listdir(small))} -> {len(os.listdir(large))} images, a fresh loader each")
    others = ", ".join(f"{w} workers {m['marginal'] or 0:.0f} marginal / {m['plain']:.0f} plain" for w, m in measured.items())
    for label, found in ((f"default for CUDA ({default} workers)", measured[default]),
                         (f"all: {best['workers']} workers (the better of {cores - 1} and {cores})", best)):
        rate = f"{found['marginal']:.0f} images/s marginal" if found["marginal"] else "marginal: n/a"
        details = (f"plain {found['plain']:.0f} images/s ({found['images']} in {found['seconds']:.2f} s, "
                   f"{found['small_images']} in {found['small_seconds']:.2f} s)" + ("; CUT SHORT" if found["cut_short"] else "")
                   + f"; measured: {others}")
        bench.row(title, label, rate, "", details, found)


# --------------------------------------------------------------------------------------------
# Part 4: the GPU decoding ceiling (nvJPEG)


def decode_resize_crop(paths: list[Path], device: torch.device) -> list[torch.Tensor]:
    """Files read here, decoded in one batched call on ``device``, resized (shorter side 256) and cropped to 224."""
    from torchvision.io import ImageReadMode, decode_jpeg, read_file
    from torchvision.transforms.v2 import functional as F

    decoded = decode_jpeg([read_file(str(path)) for path in paths], mode=ImageReadMode.RGB, device=device)
    by_size: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for image in decoded:
        by_size.setdefault(tuple(image.shape), []).append(image)
    crops = []
    for images in by_size.values():
        resized = F.resize(torch.stack(images).float(), [256], antialias=True)
        crops.append(F.center_crop(resized, [224]))
    return crops


def part_decode_gpu(bench: Bench) -> None:
    paths, batch = bench.paths, bench.args.nvjpeg_batch
    decode_resize_crop(paths[:batch], bench.device)  # warm-up: the decoder's handles and buffers
    sync(bench.device)
    count, start = 0, time.perf_counter()
    for offset in range(0, len(paths), batch):
        crops = decode_resize_crop(paths[offset : offset + batch], bench.device)
        count += sum(len(crop) for crop in crops)
        if time.perf_counter() > bench.deadline():
            break
    sync(bench.device)
    seconds = time.perf_counter() - start
    bench.results["nvjpeg"] = count / seconds
    title = (f"4 GPU decode ceiling: torchvision.io.read_file (page cache, in this thread) + decode_jpeg(list, RGB, "
             f"device={bench.device.type}) + resize 256 antialias (float32) + centre crop 224, batches of {batch}, "
             f"after 1 warm-up batch")
    details = f"{count} images in {seconds:.2f} s" + ("; CUT SHORT by the budget" if count < len(paths) else "")
    bench.row(title, f"decode_jpeg on {bench.device.type}", f"{count / seconds:.0f} images/s", "", details,
              {"images_per_s": count / seconds, "images": count, "seconds": seconds})
    if bench.cuda:
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# Part 5: the command, marginal rates


@dataclass(frozen=True)
class Variant:
    key: str
    name: str
    options: tuple[str, ...]
    kind: str
    """Its EXPECTED_RATES entry."""
    images: str = "main"
    """Which image sets: "main", "dump" (fewer, for the large dumps) or "repeated" (all the images, then each
    of them three times as links: the fast --decode gpu runs need more images than are made for a steady rate)."""

    @property
    def save(self) -> bool:
        return "--format" in self.options


SHARDS = ("--format", "shards", "--save-dtype", "float16")
WORKERS_LEAVING_ONE = max(1, (os.cpu_count() or 1) - 1)
GPU_DECODE = ("--decode", "gpu", "--batch-size", "256")
VARIANTS = {
    "5a": Variant("5a", "statistics only, defaults (--layers 4)", ("--layers", "4"), "stats"),
    "5b": Variant("5b", "statistics only --decode gpu --batch-size 256", ("--layers", "4", *GPU_DECODE), "gpu-decode", "repeated"),
    "5c": Variant("5c", "shards --layers 4", (*SHARDS, "--layers", "4"), "shards-l4"),
    "5d": Variant("5d", "shards --layers 2,3,4", (*SHARDS, "--layers", "2,3,4"), "shards-l234", "dump"),
    "5g": Variant("5g", f"statistics only --workers {WORKERS_LEAVING_ONE}", ("--layers", "4", "--workers", str(WORKERS_LEAVING_ONE)),
                  "stats"),
    "5e": Variant("5e", "pt --layers 4", ("--format", "pt", "--save-dtype", "float16", "--layers", "4"), "pt-l4", "dump"),
    "5f-c": Variant("5f-c", "shards --layers 4 --decode gpu --batch-size 256", (*SHARDS, "--layers", "4", *GPU_DECODE),
                    "shards-l4"),
    "5f-d": Variant("5f-d", "shards --layers 2,3,4 --decode gpu --batch-size 256",
                    (*SHARDS, "--layers", "2,3,4", *GPU_DECODE), "shards-l234", "dump"),
}


def set_sizes(bench: Bench, which: str) -> tuple[int, int]:
    small, large = bench.sets[which]
    return len(os.listdir(small)), len(os.listdir(large))


def estimate_variant(bench: Bench, variant: Variant) -> float:
    return bench.estimate(variant.kind, sum(set_sizes(bench, variant.images)), 2 * bench.startup_s())


def command_base(bench: Bench) -> list[str]:
    return ["--arch", "resnet50", "--resize", "256", "--crop", "224", "--device", bench.args.device,
            "--dtype", bench.args.dtype]


def run_once(bench: Bench, variant: Variant, folder: Path) -> dict[str, Any]:
    """One run of the command on ``folder``; its dump is deleted whatever happens (the disk is small)."""
    out = bench.root / f"out-{variant.key}-{folder.name}" if variant.save else None
    images = len(os.listdir(folder))
    expected = bench.estimate(variant.kind, images, bench.startup_s())
    if variant.kind == "shards-l234" and "disk" in bench.results:  # a slow disk: its rate, not the H200's
        expected = max(expected, bench.startup_s() + images * BYTES_PER_L234_IMAGE / (bench.results["disk"] * 1e6))
    timeout = bench.run_timeout(expected)
    try:
        return store_bench.run_command(folder, out, command_base(bench) + list(variant.options), timeout)
    finally:
        if out is not None:
            shutil.rmtree(out, ignore_errors=True)


def run_variant(bench: Bench, variant: Variant) -> None:
    """The large set first: a first-run cost left inside the run loop can then only lower the marginal rate."""
    small, large = bench.sets[variant.images]
    runs = {}
    for label, folder in (("large", large), ("small", small)):
        try:
            run = run_once(bench, variant, folder)
        except RuntimeError as error:  # one variant failing leaves the others' figures
            bench.report.note(f"{variant.key} {variant.name} failed: {str(error)[-900:]}")
            return
        bench.startups.append(run["wall"] - run["seconds"])
        runs[label] = run
        log(f"  {variant.key} on {run['processed']}: {run['rate']:.0f} images/s in {run['seconds']:.2f} s "
            f"(wall {run['wall']:.1f} s, {run['bytes_per_image'] / 1e6:.3f} MB/image)")
    result = store_bench.marginal_of(runs["small"], runs["large"])
    bench.results[variant.key] = result
    rate, details = store_bench.marginal_text(result, variant.save)
    title = (f"5 command {' '.join(command_base(bench))}, on 500x375 JPEGs, marginal over {result['small']['processed']} "
             f"-> {result['processed']} images (run-loop seconds from its summary line; the large set first)")
    bench.row(title, f"{variant.key} {variant.name}", rate, "", details, store_bench.marginal_data(result))


def measure_disk(bench: Bench) -> None:
    free = shutil.disk_usage(bench.root).free
    mbps, written, seconds = store_bench.disk_write_rate(bench.root / "disk", int(min(bench.args.disk_gib * 2**30, free / 4)))
    bench.results["disk"] = mbps
    bench.row(f"5 disk: sequential write in the work folder, {store_bench.DISK_CHUNK_MIB} MiB chunks, fsync at the end",
              f"{written / 2**30:.2f} GiB",
              f"{mbps:.0f} MB/s", "", f"{seconds:.1f} s; {free / 1e9:.0f} GB free", {"mb_per_s": mbps, "seconds": seconds})


def part_dump_l234(bench: Bench, key: str = "5d") -> None:
    if "disk" not in bench.results:
        try:
            measure_disk(bench)
        except OSError as error:
            bench.report.note(f"the disk's write rate could not be measured: {error}")
    run_variant(bench, VARIANTS[key])


def part_decode_gpu_dumps(bench: Bench) -> None:
    run_variant(bench, VARIANTS["5f-c"])
    if "5f-c" not in bench.results:  # it failed (noted): 5f-d would fail the same way
        return
    if bench.left() < estimate_variant(bench, VARIANTS["5f-d"]):
        bench.report.note(f"skipped 5f-d: {bench.elapsed():.0f} s gone of the {bench.args.budget_s:.0f} s budget")
        return
    part_dump_l234(bench, "5f-d")


# --------------------------------------------------------------------------------------------
# Part 6: one image, the whole command's wall time, cuda against cpu


MODULE = ("-m", "backbone_inspect")
RUN_CLI = "from backbone_inspect.cli import main; sys.argv[0] = 'backbone-inspect'; main()"
WITHOUT_WARM_UP = ("-c", "import sys, backbone_inspect.local_engine as engine; "
                   f"engine.warm_up_cuda = lambda *args, **kwargs: None; {RUN_CLI}")
EARLY_CONTEXT = ("-c", f"""import ctypes, sys, threading
def retain():  # CUDA's primary context on GPU 0 through the driver (ctypes lets go of the GIL), while torch imports
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return
    device, context = ctypes.c_int(), ctypes.c_void_p()
    if cuda.cuInit(0) == 0 and cuda.cuDeviceGet(ctypes.byref(device), 0) == 0:
        cuda.cuDevicePrimaryCtxRetain(ctypes.byref(context), device)
threading.Thread(target=retain, daemon=True).start()
{RUN_CLI}""")
ONE_IMAGE_VARIANTS = (  # (label, how, runs): where CUDA's extra time goes, one change at a time
    ("--device cuda, no warm-up thread at all", WITHOUT_WARM_UP, 2),
    ("--device cuda, its context retained through the driver at the process's start", EARLY_CONTEXT, 2),
)
ONE_IMAGE_GUESS_S = 6.0
"""A one-image run's wall with bytecode cached (an H200 with 16 cores: 3.5-4.9 s on 2026-11-27)."""


def one_image_runs(bench: Bench) -> int:
    """The processes part 6 starts: three a device, the variants', and one a device under cProfile."""
    devices = 2 if bench.cuda else 1
    return 3 * 2 + sum(runs for _, _, runs in ONE_IMAGE_VARIANTS) * bench.cuda + devices


PROFILED_FUNCTIONS = ("_extractor", "join", "launch_batch", "collect_batch", "_find_and_load")
"""Where a one-image run's main thread spends its time: the model built (CUDA's warm-up joined at its end),
the wait for the warm-up thread, the forward launched and its results collected, and imports."""


def one_image_walls(bench: Bench, device: str, how: tuple[str, ...] = MODULE, runs: int = 2) -> list[float]:
    command = [sys.executable, *how, str(bench.paths[0]), "--layers", "4", "--device", device]
    walls = []
    for _ in range(runs):
        code, stderr, wall = store_bench.run_process(command, bench.run_timeout(2 * bench.startup_s()))
        if code != 0:
            raise RuntimeError(f"exit {code}: {' '.join(command)}\n{stderr[-900:]}")
        walls.append(wall)
    return walls


def profiled_one_image(bench: Bench, device: str) -> tuple[float, dict[str, float]]:
    """One image under cProfile: its wall, the main thread's cumulative seconds in PROFILED_FUNCTIONS, and
    (with --out-json) the 40 costliest calls by cumulative time in one-image-DEVICE.txt beside it."""
    import pstats

    folder = bench.report.out_json.parent if bench.report.out_json else bench.root
    profile = folder / f"one-image-{device}.prof"
    wall = one_image_walls(bench, device, ("-m", "cProfile", "-o", str(profile), *MODULE), runs=1)[0]
    stats = pstats.Stats(str(profile))
    seconds: dict[str, float] = {}
    for (_, _, name), (_, _, _, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        if name in PROFILED_FUNCTIONS:
            seconds[name] = max(seconds.get(name, 0.0), cumulative)
    with open(folder / f"one-image-{device}.txt", "w") as text:
        pstats.Stats(str(profile), stream=text).sort_stats("cumulative").print_stats(40)
    return wall, seconds


def part_one_image(bench: Bench) -> None:
    """The target's two walls first (three runs each, the median of the last two kept); then where CUDA's
    extra time goes: runs with one change each (ONE_IMAGE_VARIANTS), and one run a device under cProfile."""
    title = ("6 one image: wall time of `backbone-inspect IMAGE --layers 4 --device D` (process start to exit), "
             "run three times, the median of the last two kept (warm file cache)")
    for device in ("cuda", "cpu"):
        try:
            walls = one_image_walls(bench, device, runs=3)
        except RuntimeError as error:
            bench.report.note(f"6 one image --device {device} failed: {str(error)[-900:]}")
            continue
        kept = statistics.median(walls[1:])
        bench.results[f"one:{device}"] = kept
        bench.row(title, f"--device {device}", f"{kept:.2f} s", "", "runs " + ", ".join(f"{wall:.2f}" for wall in walls) + " s",
                  {"walls": walls})
    for label, how, runs in ONE_IMAGE_VARIANTS if bench.cuda else ():
        try:
            walls = one_image_walls(bench, "cuda", how, runs=runs)
        except RuntimeError as error:
            bench.report.note(f"6 one image, {label}, failed: {str(error)[-900:]}")
            continue
        bench.row(title, label, f"{min(walls):.2f} s", "", "runs " + ", ".join(f"{wall:.2f}" for wall in walls) + " s (the least kept)",
                  {"walls": walls})
    for device in ("cuda", "cpu") if bench.cuda else ("cpu",):
        wall, seconds = profiled_one_image(bench, device)
        spent = ", ".join(f"{name} {value:.2f} s" for name, value in sorted(seconds.items(), key=lambda item: -item[1]))
        bench.row(title, f"--device {device} under cProfile", f"{wall:.2f} s", "", f"main thread, cumulative: {spent}",
                  {"wall": wall, "cumulative": seconds})


# --------------------------------------------------------------------------------------------
# Part 7: the naive loop


def naive_step(device: torch.device, transform: Callable[[Any], torch.Tensor], extractor: torch.nn.Module,
               path: Path, out: Path) -> None:
    from PIL import Image

    with Image.open(path) as image:
        x = transform(image.convert("RGB"))[None].to(device)
    torch.save(extractor(x)["layer4"].cpu(), out / f"{path.stem}.pt")  # the copy to the CPU waits for the GPU


def part_naive(bench: Bench) -> None:
    from torchvision import transforms as T
    from torchvision.models.feature_extraction import create_feature_extractor

    from backbone_inspect.images import IMAGENET_MEAN, IMAGENET_STD

    transform = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    model = torchvision.models.resnet50().eval().to(bench.device)
    extractor = create_feature_extractor(model, {"layer4": "layer4"})
    out = bench.root / "naive"
    out.mkdir()
    warm, paths = bench.paths[:10], bench.paths[10 : 10 + bench.args.naive_images]
    count = 0
    with torch.no_grad():
        for path in warm:
            naive_step(bench.device, transform, extractor, path, out)
        start = time.perf_counter()
        for path in paths:
            naive_step(bench.device, transform, extractor, path, out)
            count += 1
            if time.perf_counter() > bench.deadline():
                break
    seconds = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    bench.results["naive"] = count / seconds
    title = (f"7 naive loop: per image PIL open + convert RGB + Compose(Resize 256, CenterCrop 224, ToTensor, Normalize), "
             f"batch 1, create_feature_extractor(resnet50, layer4) on {bench.device.type} in float32 (torch's default "
             f"flags), torch.save of layer4 (.cpu()) per image; {len(warm)} warm-up images (an H200 did 80 images/s before)")
    bench.row(title, "naive loop", f"{count / seconds:.1f} images/s", "", f"{count} images in {seconds:.2f} s",
              {"images_per_s": count / seconds, "images": count, "seconds": seconds})


# --------------------------------------------------------------------------------------------
# The checks, added as soon as their figures exist


def check_decode(bench: Bench) -> None:
    stats, ceiling = bench.results.get("5a"), bench.results.get("decode:all")
    if stats and ceiling:
        for label, value, bound in (("marginal", stats["marginal"], ceiling["marginal"]),
                                    ("command's figure / plain", stats["rate"], ceiling["plain"])):
            if value and bound:
                bench.check(f"5a/3 {label}", f"5a statistics only at the defaults / CPU decode ceiling at all workers "
                            f"({label}): {value:.0f} / {bound:.0f} = {value / bound:.2f} {verdict(value / bound, 0.9)}")
    former = bench.results.get("5g")
    if stats and former and stats["marginal"] and former["marginal"]:
        bench.check("5a/5g", f"5a statistics only at the defaults ({default_workers_for_cuda()} workers) / 5g with "
                    f"{WORKERS_LEAVING_ONE} (the former default), marginal: {stats['marginal']:.0f} / {former['marginal']:.0f} = "
                    f"{stats['marginal'] / former['marginal']:.2f} (at least 1: the two cores left pay for themselves)")
    gpu = bench.results.get("5b")
    if gpu:
        for label, value in (("marginal", gpu["marginal"]), ("command's figure", gpu["rate"])):
            if value:
                bench.check(f"5b {label}", f"5b --decode gpu statistics only ({label}): {value:.0f} images/s "
                            f"{verdict(value, 6000)}")


def check_dump(bench: Bench, key: str, stats_key: str, ratio_of_disk: bool) -> None:
    dump, stats = bench.results.get(key), bench.results.get(stats_key)
    if not (dump and stats):
        return
    disk = bench.results.get("disk")
    for label, kind in (("marginal", "marginal"), ("command's figures", "rate")):
        value, bound = dump[kind], stats[kind]
        if not (value and bound):
            continue
        # Statistics only of layer4 for the layers 2,3,4 dumps too: no slower than of 2,3,4, so the ratio is conservative.
        text = f"{stats_key} {bound:.0f}"
        if ratio_of_disk and disk and dump["bytes_per_image"]:
            disk_images = disk * 1e6 / dump["bytes_per_image"]
            text = f"min({text}, disk {disk:.0f} MB/s / {dump['bytes_per_image'] / 1e6:.3f} MB = {disk_images:.0f})"
            bound = min(bound, disk_images)
        bench.check(f"{key} {label}", f"{key} {VARIANTS[key].name} / {text} ({label}): {value:.0f} / {bound:.0f} = "
                    f"{value / bound:.2f} {verdict(value / bound, 0.8)}")


def update_checks(bench: Bench) -> None:
    float32 = bench.results.get("accuracy:float32")
    if float32 is not None:
        bench.check("accuracy", f"2 --dtype float32 layer4 relative error {float32:.2e} {verdict(float32, FLOAT32_TARGET, True)}")
    check_decode(bench)
    for key, stats_key, disk in (("5c", "5a", False), ("5d", "5a", True), ("5f-c", "5b", False),
                                 ("5f-d", "5b", True)):
        check_dump(bench, key, stats_key, disk)
    cuda, cpu = bench.results.get("one:cuda"), bench.results.get("one:cpu")
    if cuda and cpu:
        bench.check("one", f"6 one image, whole command: --device cuda {cuda:.2f} s, --device cpu {cpu:.2f} s "
                    f"({'meets' if cuda <= cpu else 'MISSES'} the target: CUDA no slower)")
    if any(found.get("doubtful") for found in bench.results.values() if isinstance(found, dict)):
        bench.check("doubtful", "a marginal rate is doubtful (the extra images took under 0.3 s, or ran over 3x the "
                    "whole run's average): trust the command's own figures there")


# --------------------------------------------------------------------------------------------
# The parts, in the order they run


@dataclass(frozen=True)
class Part:
    key: str
    run: Callable[[Bench], None]
    estimate: Callable[[Bench], float]


def command_part(key: str) -> Part:
    return Part(key, lambda bench: run_variant(bench, VARIANTS[key]), lambda bench: estimate_variant(bench, VARIANTS[key]))


PARTS = (
    Part("1", part_ceiling, lambda bench: 4 * (bench.args.ceiling_seconds + 2.5)),
    Part("2", part_accuracy, lambda bench: 8.0),
    command_part("5a"),
    command_part("5g"),
    Part("3", part_decode_cpu, lambda bench: bench.estimate("cpu-decode", 3 * sum(set_sizes(bench, "main")), 9.0)),
    Part("6", part_one_image, lambda bench: one_image_runs(bench) * min(bench.startup_s(), ONE_IMAGE_GUESS_S)),
    command_part("5b"),
    Part("4", part_decode_gpu, lambda bench: bench.estimate("nvjpeg", len(bench.paths), 2.0)),
    command_part("5c"),
    Part("5d", part_dump_l234, lambda bench: estimate_variant(bench, VARIANTS["5d"]) + 3.0),
    Part("7", part_naive, lambda bench: 3.0 + (10 + bench.args.naive_images) / EXPECTED_RATES["naive"]),
    command_part("5e"),
    Part("5f", part_decode_gpu_dumps, lambda bench: estimate_variant(bench, VARIANTS["5f-c"])),
)


def skipped_by_option(key: str, skips: set[str]) -> bool:
    return key in skips or key.rstrip("abcdefg") in skips


def run_part(bench: Bench, part: Part) -> None:
    if skipped_by_option(part.key, bench.args.skip):
        bench.report.note(f"part {part.key} skipped (--skip)")
        return
    estimate = part.estimate(bench)
    if bench.left() < estimate:
        bench.report.note(f"part {part.key} skipped: estimated {estimate:.0f} s, {max(0.0, bench.left()):.0f} s left "
                          f"of the {bench.args.budget_s:.0f} s budget (--budget-s)")
        return
    log(f"part {part.key}: {bench.elapsed():.0f} s gone, estimated {estimate:.0f} s, {bench.left():.0f} s left")
    try:
        with alarm(bench.left() + GRACE_S):
            part.run(bench)
    except PartTimeout as error:
        bench.report.note(f"part {part.key}: {error}")
    except Exception as error:  # noqa: BLE001 - one part failing leaves the others' figures
        bench.report.note(f"part {part.key} failed: {type(error).__name__}: {error}\n"
                          f"{''.join(traceback.format_exc(limit=-3))[-900:]}")
    update_checks(bench)


# --------------------------------------------------------------------------------------------
# Set-up: images first (in processes, before CUDA), then the sets


def small_count(large: int, quantum: int = 256) -> int:
    """About a third of ``large``, ending on the same partial batch of ``quantum`` (and of 32) as ``large``."""
    whole = round(2 * large / 3 / quantum)
    return large - whole * quantum if large > 3 * quantum and whole else max(1, large // 3)


REPEATS = 3
"""How many times each image is in the "repeated" set."""


def linked_copies(paths: list[Path], folder: Path) -> Path:
    """``paths`` as hard links under ``folder``, numbered, so that an image may be there several times."""
    folder.mkdir(parents=True, exist_ok=True)
    for number, path in enumerate(paths):
        os.link(path, folder / f"{number:06d}-{path.name}")
    return folder


def make_sets(bench: Bench) -> None:
    args, root = bench.args, bench.root
    bench.paths = store_bench.make_images(root / "images", args.images, (500, 375), processes=os.cpu_count() or 1)
    room = int(shutil.disk_usage(root).free * 0.6 / BYTES_PER_L234_IMAGE)
    dump_large = min(args.dump_images, args.images, room)
    if dump_large < args.dump_images:
        bench.report.note(f"the layers 2,3,4 dumps run on {dump_large} images (not {args.dump_images}): disk space or --images")
    if args.disk_gib is None:  # the disk's rate over as many bytes as that dump writes: its sustained rate, not a burst
        args.disk_gib = dump_large * BYTES_PER_L234_IMAGE / 2**30
    bench.sets["main"] = (store_bench.linked_subset(bench.paths[: small_count(args.images)], root / "main-small"),
                          root / "images")
    repeated = [path for _ in range(REPEATS) for path in bench.paths]
    bench.sets["repeated"] = (root / "images", linked_copies(repeated, root / f"repeated-{len(repeated)}"))
    bench.sets["dump"] = tuple(store_bench.linked_subset(bench.paths[:count], root / f"dump-{count}")
                               for count in (small_count(dump_large), dump_large))  # type: ignore[assignment]


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--device", default="cuda", help="cuda (the run), or cpu (a dry run: small defaults below)")
    add("--dtype", default=None, help="--dtype of the command in part 5 (cuda: float16, cpu: float32)")
    add("--images", type=int, default=None, help="images made; the main sets are about a third of them and all (cuda: 12000, cpu: 48)")
    add("--dump-images", type=int, default=None, help="large set of parts 5d, 5e and 5f (cuda: 9000, cpu: 36)")
    add("--budget-s", type=float, default=None, help="seconds from this process's start (cuda: 280, cpu: 1500)")
    add("--run-timeout", type=float, default=100.0, help="seconds one command run may take")
    add("--work-dir", type=Path, default=None, help="where images and dumps go (default: a temporary folder)")
    add("--out-json", type=Path, default=None, help="the figures as JSON here, and the table as .md beside it")
    add("--skip", default="", help="parts to leave out, comma-separated: 1,2,3,4,5a..5g,6,7 (5: all of 5)")
    add("--keep", action="store_true", help="keep the work folder")
    add("--ceiling-batch", type=int, default=None, help="part 1 batch (cuda: 256, cpu: 4)")
    add("--ceiling-seconds", type=float, default=None, help="part 1 timed seconds per dtype (cuda: 1.5, cpu: 1)")
    add("--decode-batch", type=int, default=32, help="part 3 DataLoader batch (the command's default batch)")
    add("--nvjpeg-batch", type=int, default=256, help="part 4 batch")
    add("--naive-images", type=int, default=None, help="part 7 images after 10 warm-up (cuda: 300, cpu: 12)")
    add("--disk-gib", type=float, default=None,
        help="GiB written to measure the disk's sequential rate (cuda: what the large layers 2,3,4 dump writes, 12 GiB; cpu: 0.25)")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    defaults = {"dtype": ("float16", "float32"), "images": (12000, 48), "dump_images": (9000, 36), "budget_s": (280.0, 1500.0),
                "ceiling_batch": (256, 4), "ceiling_seconds": (1.5, 1.0), "naive_images": (300, 12), "disk_gib": (None, 0.25)}
    for name, (on_cuda, on_cpu) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, on_cuda if cuda else on_cpu)
    args.skip = {key.strip() for key in args.skip.split(",") if key.strip()}
    args.warmup = 3 if cuda else 1
    return args


def start_bench(args: argparse.Namespace, report: Report, root: Path) -> Bench:
    bench = Bench(args, report, root, torch.device(args.device))
    make_sets(bench)  # before CUDA: the image makers fork this process
    signal.signal(signal.SIGTERM, stop_on_sigterm)  # after: the image makers are ended by SIGTERM
    if bench.cuda and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available here: for a dry run use --device cpu")
    report.header["gpu"] = store_bench.gpu_name()
    bench.card = report.header["gpu"] if bench.cuda else f"CPU {store_bench.cpu_model()}"
    bench.day = str(report.header["date"])[:10]
    report.save()
    return bench


def stop_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(f"stopped by signal {signum}")  # through main's finally: the table is still written


def main() -> None:
    args = parse_arguments()
    report = Report(args.out_json)
    root = store_bench.work_folder(args.work_dir, "gpu-bench-")
    report.header = store_bench.machine_header(root, "(after the images are made)")
    report.header.update(torch=f"{torch.__version__}, torchvision {torchvision.__version__}", torchvision=torchvision.__version__)
    log(f"gpu_bench: device {args.device}, {args.images} images, budget {args.budget_s:.0f} s, work folder {root}")
    report.save()
    with store_bench.reported(report, root, args.keep, PROCESS_START):
        bench = start_bench(args, report, root)
        for part in PARTS:
            run_part(bench, part)


if __name__ == "__main__":
    main()
