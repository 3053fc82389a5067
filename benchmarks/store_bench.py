"""Feature stores: the .pt writer before and after its writer threads, and the command with --format pt / shards.

Not a test: run it by hand on an otherwise idle machine and copy its table.

    .venv/bin/python benchmarks/store_bench.py                       # CPU: parts 1 and 2, ~1.5 min on 2 idle CPUs
    .venv/bin/python benchmarks/store_bench.py --images 60           # quick
    .venv/bin/python benchmarks/store_bench.py --writer-only --writer-rounds 4 --work-dir /mnt/journaled   # part 1 there
    PYTHONPATH=src python benchmarks/store_bench.py --gpu --out-json out/store.json   # CUDA: parts 1 and 3, < 5 min
    # the --gpu code paths on a CPU, tiny:
    .venv/bin/python benchmarks/store_bench.py --gpu --device cpu --dtype float32 --workers 2 --batch-size 8 \
        --images 42 --disk-gib 0.25 --files 100 --writer-rounds 1

Parts:

  1 pt writer   files/s of writing small feature files (one [2048, 7, 7] float16 tensor, resnet50
                layer4, plus the store's meta dict) without a model. "before": a copy of the old
                single-writer path (atomic_write with mkstemp + fchmod + two umask calls, stat
                afterwards; torch.save into a BytesIO), one file after another in one thread.
                "now": the local engine's own writer (local_engine._Writes) given batches of 32:
                writer_threads() threads write slices of each batch under temporary names while
                one committer thread syncs the previous slice (one syncfs where the filesystem
                qualifies) and renames its files. For comparison: the writer of b855c0e (four
                slices side by side, each thread syncing its own), and now's with a fsync per
                file (the group sync switched off).
                Each round writes a fresh folder, all removed at the end of the part (a file created
                just after a removal costs more on ext4 without a journal); best of --writer-rounds,
                the variants alternated.
  2 command     (CPU mode) `backbone-inspect` subprocesses on the same generated JPEGs: resnet50,
                resize 256, crop 224, --layers 4 --save-dtype float16, --format pt, --format shards
                and --format shards --pool avg, plus statistics only (no --save) for reference.
                images/s as the command prints it (its own run loop: start-up and model loading
                excluded); best of --rounds, the variants alternated.
  3 GPU         (--gpu) 500x375 JPEGs, `--device cuda --dtype float16 --batch-size 256 --workers 15`:
                statistics only; shards --layers 4; shards --layers 2,3,4; pt --layers 4 (float16
                saved), and the disk's sequential write rate in the folder the dumps go to. Each
                variant runs on N images and on a smaller set with the same last partial batch;
                the marginal rate (extra images over extra run-loop seconds, both from the
                command's summary lines) drops what every run pays once (DataLoader start, the
                first batch's decoding, cuDNN autotuning of each batch shape). A warm-up run comes
                first. Caveat: each DataLoader worker decodes a whole batch, so with fewer than about
                3 x workers x batch images (11520 at the defaults) a decode-bound run is quantised
                by those waves (a note says so); a GPU- or disk-bound one is not.

The images are smooth random colour fields with fine noise (about 27 KB at 320x240, 63 KB at
500x375: nearer photos' sizes and decode times than smooth fields alone).

Progress goes to stderr with timestamps; the table to stdout, and with --out-json to PATH (JSON,
rewritten after every measurement, so a run cut short keeps what it measured) and PATH.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import multiprocessing
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest.mock
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
try:
    import backbone_inspect.files
except ImportError:  # run from a checkout without installing: the package is under src/
    sys.path.insert(0, str(ROOT / "src"))
    import backbone_inspect.files

import torch

START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - START:6.1f}s] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# The machine


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def filesystem_of(path: Path) -> str:
    """``device type`` of the mount holding ``path`` (from /proc/mounts)."""
    best, answer = "", "unknown"
    resolved = str(path.resolve())
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) >= 3:
                mount = fields[1].replace("\\040", " ")
                if (resolved == mount or resolved.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                    best, answer = mount, f"{fields[2]} on {mount} ({fields[0]})"
    return answer


def cpu_times() -> list[int]:
    """The machine's CPU time counters (user nice system idle iowait irq softirq steal), from /proc/stat."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return [int(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return []


def steal_percent(before: list[int], after: list[int]) -> float | None:
    """Share of CPU time the hypervisor gave to others meanwhile (a noisy neighbour)."""
    if len(before) < 8 or len(after) < 8:
        return None
    total = sum(after) - sum(before)
    return round(100 * (after[7] - before[7]) / total, 1) if total > 0 else None


def git_revision() -> str:
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + (" (uncommitted changes)" if dirty.stdout.strip() else "")


def gpu_name() -> str:
    try:
        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    except Exception as error:  # noqa: BLE001 - a header field, never a reason to stop
        return f"unavailable ({error})"


# --------------------------------------------------------------------------------------------
# The report: a markdown table, and JSON rewritten after every row


class Report:
    def __init__(self, out_json: Path | None) -> None:
        self.out_json = out_json
        self.header: dict[str, Any] = {}
        self.rows: list[dict[str, Any]] = []
        self.checks: list[str] = []
        self.notes: list[str] = []

    def row(self, part: str, variant: str, rate: str, ratio: str = "", details: str = "", data: dict[str, Any] | None = None) -> None:
        self.rows.append({"part": part, "variant": variant, "rate": rate, "ratio": ratio, "details": details, "data": data or {}})
        log(f"{part} | {variant} | {rate} | {ratio} | {details}")
        self.save()

    def check(self, line: str) -> None:
        self.checks.append(line)
        log(line)
        self.save()

    def note(self, line: str) -> None:
        self.notes.append(line)
        log(f"note: {line}")
        self.save()

    def markdown(self) -> str:
        h = self.header
        lines = [
            f"machine: {h.get('cpu')}, {h.get('cpus')} CPUs ({h.get('cpus_usable')} usable), GPU: {h.get('gpu')}; "
            f"torch {h.get('torch')}, Python {h.get('python')}; {h.get('date')}; backbone-inspect {h.get('version')} "
            f"at {h.get('revision')}",
            f"work folder: {h.get('work_dir')} [{h.get('filesystem')}]; 1-minute load average {h.get('load_average_start')} "
            f"at the start, {h.get('load_average_end')} at the end; CPU steal {h.get('steal_percent')}%; "
            f"{h.get('seconds')} s in all",
            "",
            "| part | variant | rate | ratio | details |",
            "|---|---|---|---|---|",
        ]
        lines += [f"| {r['part']} | {r['variant']} | {r['rate']} | {r['ratio']} | {r['details']} |" for r in self.rows]
        if self.checks:
            lines += ["", *[f"- {line}" for line in self.checks]]
        if self.notes:
            lines += ["", *[f"note: {line}" for line in self.notes]]
        return "\n".join(lines) + "\n"

    def save(self) -> None:
        if self.out_json is None:
            return
        self.out_json.parent.mkdir(parents=True, exist_ok=True)
        table = self.markdown()
        document = {"header": self.header, "rows": self.rows, "checks": self.checks, "notes": self.notes, "table": table}
        temporary = self.out_json.with_name(self.out_json.name + ".tmp")
        temporary.write_text(json.dumps(document, indent=2) + "\n")
        os.replace(temporary, self.out_json)
        self.out_json.with_suffix(".md").write_text(table)


# --------------------------------------------------------------------------------------------
# Generated images


def _write_image(job: tuple[str, int, int, int]) -> int:
    """A smooth random colour field with fine noise: JPEG sizes and decode times near photos'."""
    import numpy as np
    from PIL import Image

    path, seed, width, height = job
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), dtype=np.int16)
    noisy = (field + rng.integers(-16, 17, field.shape, dtype=np.int16)).clip(0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(path, quality=90)
    return os.path.getsize(path)


def make_images(folder: Path, count: int, size: tuple[int, int], processes: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img{index:06d}.jpg" for index in range(count)]
    jobs = [(str(path), index, *size) for index, path in enumerate(paths)]
    if processes > 1 and count >= 4 * processes:
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else None)
        with context.Pool(processes) as pool:
            sizes = list(pool.imap_unordered(_write_image, jobs, chunksize=max(1, count // (8 * processes))))
    else:
        sizes = [_write_image(job) for job in jobs]
    log(f"made {count} JPEGs {size[0]}x{size[1]} in {folder} (mean {sum(sizes) / max(1, len(sizes)) / 1e3:.0f} KB)")
    return paths


def linked_subset(paths: list[Path], folder: Path) -> Path:
    """A folder holding the first ``len(paths)`` images as hard links (copies where links fail)."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in paths:
        try:
            os.link(path, folder / path.name)
        except OSError:
            shutil.copy2(path, folder / path.name)
    return folder


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


# --------------------------------------------------------------------------------------------
# Part 1: the pt writer, before (one thread, the old atomic_write) and now (slices side by side, one sync each)


def _old_current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _old_atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """files.atomic_write as of 638e64b."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stem = path.name.encode("utf-8", "surrogateescape")[:200].decode("utf-8", "ignore")
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{stem}.", suffix=".tmp")
    try:
        os.fchmod(descriptor, 0o666 & ~_old_current_umask())
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _old_save_features(path: Path, features: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> int:
    """files.save_features as of 638e64b (its OutputError wrapping aside: nothing fails here)."""
    buffer = io.BytesIO()
    torch.save({"features": dict(features), "meta": dict(meta)}, buffer)
    _old_atomic_write(path, lambda handle: handle.write(buffer.getbuffer()))
    return path.stat().st_size


def _old_write(store: Any, image: Any, result: Any) -> int:
    """PtFileStore.write as of 638e64b."""
    from backbone_inspect.precision import TORCH_DTYPES

    dtype = TORCH_DTYPES[store.config.save_dtype]
    features = {name: value.to(dtype) for name, value in result.features.items()}
    meta = {"image": result.image, **store.meta, "input_size": list(result.input_size)}
    return _old_save_features(store.folder / image.output, features, meta)


def writer_bench(report: Report, root: Path, files: int, rounds: int) -> None:
    from backbone_inspect.config import feature_config
    from backbone_inspect.results import ImageResult
    from backbone_inspect.inputs import FoundImage
    from backbone_inspect.batch_work import finish_images, slices, writer_threads
    from backbone_inspect.local_engine import _Writes
    from backbone_inspect.signals import StopRequest
    from backbone_inspect.stats import stage_stats
    from backbone_inspect.pt_store import PtFileStore

    config = feature_config(arch="resnet50", layers="4", save_dtype="float16")
    generator = torch.Generator().manual_seed(0)
    maps = [torch.randn(2048, 7, 7, generator=generator).relu() for _ in range(8)]
    stats = [(stage_stats("layer4", value, (224, 224)),) for value in maps]
    halves = [value.half() for value in maps]  # as a float16 run hands them over: no conversion left
    items = [
        (FoundImage(f"/data/photos/img{index:06d}.jpg", f"img{index:06d}.pt"),
         ImageResult(f"/data/photos/img{index:06d}.jpg", (224, 224), OrderedDict(layer4=halves[index % 8]),
                     stats[index % 8], seconds=0.01))
        for index in range(files)
    ]

    def before(folder: Path) -> int:
        store = PtFileStore(folder, config)
        return sum(_old_write(store, image, result) for image, result in items)

    def now(folder: Path) -> int:
        store, outcomes, stop = PtFileStore(folder, config), [], StopRequest()
        writes = _Writes(store, lambda outcome, result: outcomes.append(outcome))
        for start in range(0, len(items), 32):
            writes.write(items[start : start + 32], stop)
        writes.finish()
        return sum(outcome.bytes_written for outcome in outcomes)

    def four_slices(folder: Path) -> int:  # the writer of b855c0e: four slices side by side, each committing its own
        store = PtFileStore(folder, config)
        parts = [part for start in range(0, len(items), 32) for part in slices(items[start : start + 32], 4)]
        with ThreadPoolExecutor(max_workers=4, thread_name_prefix="feature-writer") as writers:
            return sum(outcome.bytes_written for part in writers.map(finish_images, parts, [store] * len(parts))
                       for outcome, _, _ in part)

    def now_fsync_each(folder: Path) -> int:
        with unittest.mock.patch.object(backbone_inspect.files, "group_sync_descriptor", lambda folder: None):
            return now(folder)

    variants = {"before": before, "now": now, "four-slices": four_slices, "now-fsync-each": now_fsync_each}
    best = dict.fromkeys(variants, 0.0)
    written: dict[str, int] = {}
    log(f"part 1: pt writer, {files} files x {rounds} rounds per variant")
    for round_index in range(rounds):
        for name, write in variants.items():
            folder = root / f"writer-{name}-{round_index}"
            folder.mkdir(parents=True)
            start = time.perf_counter()
            written[name] = write(folder)
            seconds = time.perf_counter() - start
            count = sum(1 for path in folder.iterdir() if path.suffix == ".pt")
            if count != files or any(path.name.endswith(".tmp") for path in folder.iterdir()):
                raise RuntimeError(f"writer {name}: {count} .pt files of {files} (or temporaries left) in {folder}")
            os.sync()  # what this variant left unwritten lands now, not in the next variant's time
            best[name] = max(best[name], files / seconds)
            log(f"  round {round_index + 1} {name}: {files / seconds:.0f} files/s")
    # Removed only now: on an ext4 without a journal (as on the 2-vCPU machines) every file created
    # within 30 s of a removal first walks past the inodes just freed (ext4's recently_deleted),
    # which a dump into a folder of its own never pays.
    for folder in root.glob("writer-*"):
        shutil.rmtree(folder)
    per_file = written["now"] / files
    part = f"1 pt writer ({files} files of [2048,7,7] float16 + meta, {per_file / 1e3:.0f} KB each; best of {rounds})"
    report.row(part, "before: old atomic_write (mkstemp, fchmod, umask x2, stat), 1 thread", f"{best['before']:.0f} files/s",
               "1.00", f"{best['before'] * per_file / 1e6:.0f} MB/s", {"files_per_s": best["before"], "bytes_per_file": per_file})
    report.row(part, f"now: batches of 32 as the local engine writes them ({writer_threads()} writer thread(s), a committer)", f"{best['now']:.0f} files/s",
               f"{best['now'] / best['before']:.2f} (now/before)", f"{best['now'] * per_file / 1e6:.0f} MB/s",
               {"files_per_s": best["now"], "bytes_per_file": per_file})
    report.row(part, "(b855c0e: four slices side by side, each synced once by its own thread)", f"{best['four-slices']:.0f} files/s",
               f"{best['four-slices'] / best['before']:.2f} (/before)", f"{best['four-slices'] * per_file / 1e6:.0f} MB/s",
               {"files_per_s": best["four-slices"], "bytes_per_file": per_file})
    report.row(part, "(now with a fsync per file: what the threads alone add)", f"{best['now-fsync-each']:.0f} files/s",
               f"{best['now-fsync-each'] / best['before']:.2f} (/before)", f"{best['now-fsync-each'] * per_file / 1e6:.0f} MB/s",
               {"files_per_s": best["now-fsync-each"], "bytes_per_file": per_file})


# --------------------------------------------------------------------------------------------
# The command in subprocesses

SUMMARY = re.compile(r"processed (\d+), skipped (\d+), failed (\d+) in ([\d.]+) s \(([\d.]+) images/s\)(?:, (.+?) written)?")
"""The run's summary line; the bytes written are there only when it saved features."""


def child_environment() -> dict[str, str]:
    """The children import the same backbone_inspect as this script."""
    package_root = str(Path(backbone_inspect.__file__).resolve().parent.parent)
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [environment.get("PYTHONPATH")])])
    return environment


def run_process(command: list[str], timeout: float) -> tuple[int, str, float]:
    """Run ``command`` with stderr captured: its exit status, stderr and wall time (start to exit)."""
    start = time.perf_counter()
    # A session of its own: on a timeout the whole group goes (its decoding workers hold stderr open too).
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env=child_environment(), start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        raise RuntimeError(f"stopped after {time.perf_counter() - start:.0f} s (--run-timeout {timeout:.0f}): "
                           f"{' '.join(command)}\n{stderr[-3000:]}") from None
    except BaseException:  # Ctrl-C: the run's processes go with this one
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        raise
    return process.returncode, stderr, time.perf_counter() - start


def run_command(images: Path, out: Path | None, options: list[str], timeout: float) -> dict[str, Any]:
    """One run: the command's own figures (from its summary line), wall time, bytes in the output folder."""
    command = [sys.executable, "-m", "backbone_inspect", str(images), *(["--save", str(out)] if out else []), *options]
    returncode, stderr, wall = run_process(command, timeout)
    matches = [SUMMARY.search(line) for line in stderr.splitlines()]
    match = next((m for m in reversed(matches) if m), None)
    if returncode != 0 or match is None:
        raise RuntimeError(f"exit {returncode}: {' '.join(command)}\n{stderr[-3000:]}")
    processed, failed = int(match[1]), int(match[3])
    if failed:
        raise RuntimeError(f"{failed} images failed: {' '.join(command)}\n{stderr[-3000:]}")
    rate = float(match[5])
    on_disk = folder_bytes(out) if out is not None and out.exists() else 0
    if out is not None:
        shutil.rmtree(out, ignore_errors=True)
    return {"processed": processed, "rate": rate, "seconds": processed / rate if rate > 0 else float(match[4]),
            "written": match[6] or "nothing", "wall": wall, "bytes": on_disk, "bytes_per_image": on_disk / max(1, processed)}


def best_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return min(runs, key=lambda run: run["seconds"])


def marginal_of(low: dict[str, Any], high: dict[str, Any]) -> dict[str, Any]:
    """``high``'s run with the marginal rate over ``low``'s: extra images over extra run-loop seconds."""
    extra_seconds = high["seconds"] - low["seconds"]
    marginal = (high["processed"] - low["processed"]) / extra_seconds if extra_seconds > 0 else None
    # Against noise: the extra images must take a while, and cannot be much faster than a whole run's average.
    doubtful = marginal is None or extra_seconds < 0.3 or marginal > 3 * high["rate"]
    return {**high, "marginal": marginal, "doubtful": doubtful, "small": low}


def marginal_text(result: dict[str, Any], save: bool) -> tuple[str, str]:
    """The rate and details cells of a row for ``marginal_of``'s result."""
    high, low, marginal = result, result["small"], result["marginal"]
    rate = f"{marginal:.0f} images/s marginal" if marginal else "marginal: n/a"
    rate += " (doubtful: see details)" if result["doubtful"] else ""
    details = (f"command's figure {high['rate']:.0f} images/s ({low['rate']:.0f} on {low['processed']}); run loop "
               f"{high['seconds']:.2f} s - {low['seconds']:.2f} s = {high['seconds'] - low['seconds']:.2f} s for the extra "
               f"{high['processed'] - low['processed']}; wall {high['wall']:.1f} s")
    if save:
        details += f"; {high['bytes_per_image'] / 1e6:.3f} MB/image on disk ({high['written']} written)"
    return rate, details


def marginal_data(result: dict[str, Any]) -> dict[str, Any]:
    """The JSON figures of a row for ``marginal_of``'s result."""
    high, low = result, result["small"]
    return {"marginal": result["marginal"], "command_rate": high["rate"], "small_command_rate": low["rate"],
            "wall": high["wall"], "bytes_per_image": high["bytes_per_image"], "written": high["written"],
            "seconds": high["seconds"], "small_seconds": low["seconds"], "images": high["processed"],
            "small_images": low["processed"], "doubtful": result["doubtful"]}


def command_bench_cpu(report: Report, root: Path, images: Path, args: argparse.Namespace) -> None:
    base = ["--arch", "resnet50", "--resize", "256", "--crop", "224", "--layers", "4",
            "--device", args.device or "cpu", "--dtype", args.dtype or "float32"]
    base += ["--batch-size", str(args.batch_size)] if args.batch_size else []
    base += ["--workers", str(args.workers)] if args.workers is not None else []
    saved = ["--save-dtype", "float16"]
    variants = {
        "statistics only (no --save)": None,
        "--format pt": ["--format", "pt", *saved],
        "--format shards": ["--format", "shards", *saved],
        "--format shards --pool avg": ["--format", "shards", "--pool", "avg", *saved],
    }
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    log(f"part 2: the command on {args.images} images, {len(variants)} variants x {args.rounds} rounds")
    for round_index in range(args.rounds):
        for index, (name, extra) in enumerate(variants.items()):
            out = root / f"out-{index}-{round_index}" if extra is not None else None
            run = run_command(images, out, base + (extra or []), timeout=args.run_timeout)
            runs[name].append(run)
            log(f"  round {round_index + 1} {name}: {run['rate']:.1f} images/s (wall {run['wall']:.1f} s, {run['written']} written)")
    best = {name: best_of(found) for name, found in runs.items()}
    part = (f"2 command, CPU {args.dtype or 'float32'}, resnet50 224 px, --layers 4 --save-dtype float16, "
            f"{args.images} images (best of {args.rounds})")
    stats_rate, pt_rate = best["statistics only (no --save)"]["rate"], best["--format pt"]["rate"]
    for name, run in best.items():
        ratio = f"{run['rate'] / pt_rate:.2f} (/pt)" if "--format shards" in name else ("1.00" if name == "--format pt" else "")
        details = f"{run['rate'] / stats_rate:.2f} of statistics only; wall {run['wall']:.1f} s"
        if name != "statistics only (no --save)":
            details += f"; {run['bytes_per_image'] / 1e3:.1f} KB/image on disk ({run['written']} written)"
        report.row(part, name, f"{run['rate']:.1f} images/s", ratio, details, run)


# --------------------------------------------------------------------------------------------
# Part 3: the GPU


DISK_CHUNK_MIB = 8
"""The disk's sequential rate is measured in writes of this size. Not 64 MiB: a copy that large leaves
the CPU's caches, and on a 2-vCPU VM 64 MiB writes filled the page cache at 420 MB/s against 4,900 in
8 MiB ones (1 GiB, twice each), so the figure was that copy's and not the disk's (420-460 MB/s with
the fsync, against 1,490-1,620 in 8 MiB writes)."""


def disk_write_rate(folder: Path, total_bytes: int, chunk_bytes: int = DISK_CHUNK_MIB * 2**20) -> tuple[float, int, float]:
    """Sequential write of ``total_bytes`` in ``chunk_bytes`` chunks, fsync at the end: MB/s (1e6), bytes, seconds."""
    folder.mkdir(parents=True, exist_ok=True)
    chunk = memoryview(os.urandom(chunk_bytes))
    path = folder / "disk-rate.bin"
    written = 0
    start = time.perf_counter()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        while written < total_bytes:
            view = chunk[: min(chunk_bytes, total_bytes - written)]
            while view:
                count = os.write(descriptor, view)
                view, written = view[count:], written + count
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    seconds = time.perf_counter() - start
    path.unlink()
    return written / 1e6 / seconds, written, seconds


def gpu_bench(report: Report, root: Path, args: argparse.Namespace) -> None:
    device, dtype = args.device or "cuda", args.dtype or "float16"
    batch = args.batch_size or 256
    workers = args.workers if args.workers is not None else 15
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--gpu: CUDA is not available here (use --device cpu --dtype float32 for a dry run of this mode)")
    count = args.images
    # The smaller set ends on the same partial batch, so both runs autotune the same batch shapes;
    # it is about half the images, rounded to whole batches.
    whole = max(1, round(count / 2 / batch)) if count > batch else 0
    small_count = count - whole * batch
    if small_count <= 0 or whole == 0:
        raise SystemExit(f"--gpu: --images {count} is too few for a marginal rate at --batch-size {batch} (need > 2 batches)")
    log(f"part 3: {count} images (smaller set {small_count}), device {device}, dtype {dtype}, batch {batch}, workers {workers}")
    paths = make_images(root / "images", count, (500, 375), processes=os.cpu_count() or 1)
    report.header["gpu"] = gpu_name()  # once the image makers have forked: this process may now hold CUDA
    report.save()
    small = linked_subset(paths[:small_count], root / "images-small")
    large = root / "images"
    if count < 3 * workers * batch:
        report.note(f"{count} images are under 3 waves of workers x batch ({3 * workers * batch}): each worker decodes a "
                    "whole batch, so when decoding (not the GPU or the disk) limits a run, its rates are quantised by "
                    "those waves; the marginal rates then describe the GPU and writing more than the decoding")

    if not args.no_writer:
        writer_bench(report, root, args.files, args.writer_rounds)

    base = ["--arch", "resnet50", "--resize", "256", "--crop", "224", "--device", device, "--dtype", dtype,
            "--batch-size", str(batch), "--workers", str(workers)]
    saved = ["--save-dtype", "float16"]
    variants = [
        ("statistics only (--layers 4, no --save)", False, ["--layers", "4"]),
        ("shards --layers 4", True, ["--format", "shards", "--layers", "4", *saved]),
        ("shards --layers 2,3,4", True, ["--format", "shards", "--layers", "2,3,4", *saved]),
        ("pt --layers 4", True, ["--format", "pt", "--layers", "4", *saved]),
    ]
    log("warm-up run (page cache of the images, compiled bytecode, the driver)")
    warm = run_command(small, None, base + ["--layers", "4"], timeout=args.run_timeout)
    log(f"  warm-up: {warm['rate']:.0f} images/s, wall {warm['wall']:.1f} s")
    run_wall = warm["wall"]

    free = shutil.disk_usage(root).free
    disk_bytes = int(min(args.disk_gib * 2**30, free / 4))
    mbps: float | None = None
    try:
        mbps, disk_written, disk_seconds = disk_write_rate(root / "disk", disk_bytes)
    except OSError as error:
        report.note(f"the disk's write rate could not be measured: {error}")
    else:
        report.row("3 disk", f"sequential write, {disk_written / 2**30:.2f} GiB in {DISK_CHUNK_MIB} MiB chunks, fsync at the end",
                   f"{mbps:.0f} MB/s", "", f"{disk_seconds:.1f} s; {free / 1e9:.0f} GB free",
                   {"mb_per_s": mbps, "seconds": disk_seconds})
    if free < 12e9:
        report.note(f"only {free / 1e9:.0f} GB free in the work folder: the layers 2,3,4 dump of 4000 images takes about 6 GB")

    part = (f"3 command, {device} {dtype}, batch {batch}, workers {workers}, resnet50 224 px from 500x375, "
            f"{count} images (marginal over {small_count})")
    results: dict[str, dict[str, Any]] = {}
    for index, (name, save, options) in enumerate(variants):
        elapsed = time.perf_counter() - START
        if args.budget_s and elapsed + 2.2 * run_wall * args.rounds > args.budget_s:
            report.note(f"skipped {name}: {elapsed:.0f} s gone of the {args.budget_s:.0f} s budget (--budget-s)")
            continue
        small_runs, large_runs = [], []
        try:
            for round_index in range(args.rounds):
                for folder, found in ((small, small_runs), (large, large_runs)):
                    out = root / f"out-{index}-{round_index}-{folder.name}" if save else None
                    run = run_command(folder, out, base + options, timeout=args.run_timeout)
                    found.append(run)
                    run_wall = max(run_wall, run["wall"])
                    log(f"  {name} on {run['processed']}: {run['rate']:.0f} images/s in {run['seconds']:.2f} s "
                        f"(wall {run['wall']:.1f} s, {run['written']} written, {run['bytes_per_image'] / 1e6:.3f} MB/image)")
        except RuntimeError as error:  # one variant failing leaves the others' figures
            report.note(f"{name} failed: {error}")
            continue
        results[name] = marginal_of(best_of(small_runs), best_of(large_runs))
        rate, details = marginal_text(results[name], save)
        report.row(part, name, rate, "", details, marginal_data(results[name]))

    def rate_of(name: str, kind: str) -> float | None:
        found = results.get(name)
        if found is None:
            return None
        return found["marginal"] if kind == "marginal" else found["rate"]

    if any(found["doubtful"] for found in results.values()):
        report.note("a marginal rate is doubtful (the extra images took under 0.3 s, or ran over 3x the whole run's "
                    "average): trust the command's own figures there, or run with more --images / --rounds")

    stats_name, l4_name, l234_name, pt_name = (name for name, _, _ in variants)
    for kind in ("marginal", "command"):
        label = "marginal rates" if kind == "marginal" else "the command's own figures"
        stats_rate, l4, l234, pt = (rate_of(name, kind) for name in (stats_name, l4_name, l234_name, pt_name))
        if stats_rate and l4:
            verdict = "meets" if l4 / stats_rate >= 0.8 else "MISSES"
            report.check(f"{label}: shards layer4 / statistics only = {l4:.0f} / {stats_rate:.0f} = {l4 / stats_rate:.2f} "
                         f"({verdict} the target >= 0.8)")
        if stats_rate and l234 and l234_name in results:
            per_image = results[l234_name]["bytes_per_image"]
            disk_images = mbps * 1e6 / per_image if per_image and mbps else float("inf")
            bound = min(stats_rate, disk_images)
            limit = "statistics only" if stats_rate <= disk_images else "the disk"
            disk = (f"disk {disk_images:.0f} images/s = {mbps:.0f} MB/s / {per_image / 1e6:.3f} MB/image" if mbps
                    else "disk not measured")
            report.check(f"{label}: shards layers 2,3,4 / min(statistics only {stats_rate:.0f}, {disk}) = "
                         f"{l234:.0f} / {bound:.0f} = {l234 / bound:.2f} (bound: {limit})")
        if pt and l4:
            report.check(f"{label}: shards layer4 / pt layer4 = {l4:.0f} / {pt:.0f} = {l4 / pt:.2f}"
                         + (f"; pt layer4 / statistics only = {pt / stats_rate:.2f}" if stats_rate else ""))


# --------------------------------------------------------------------------------------------


def machine_header(root: Path, gpu: str) -> dict[str, Any]:
    """The report's header at the start: the machine, the software, the work folder."""
    return {
        "cpu": cpu_model(), "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "gpu": gpu, "torch": torch.__version__,
        "python": platform.python_version(), "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "version": backbone_inspect.__version__, "revision": git_revision(), "work_dir": str(root),
        "filesystem": filesystem_of(root), "argv": sys.argv[1:],
        "load_average_start": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def work_folder(parent: Path | None, prefix: str) -> Path:
    """A new folder for images and dumps, under ``parent`` (made if missing) or the temporary folder."""
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


@contextlib.contextmanager
def reported(report: Report, root: Path, keep: bool, start: float = START) -> Iterator[None]:
    """Around a benchmark: what stopped it noted; then the header closed (seconds since ``start``, load, CPU
    steal), the table printed and saved, and ``root`` removed unless ``keep``."""
    times_at_start = cpu_times()
    try:
        yield
    except BaseException as error:
        report.note(f"stopped by {type(error).__name__}: {str(error)[:2000]}")
        raise
    finally:
        report.header["seconds"] = round(time.perf_counter() - start, 1)
        report.header["load_average_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
        report.header["steal_percent"] = steal_percent(times_at_start, cpu_times())
        report.save()
        print(report.markdown(), flush=True)
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
        out = report.out_json
        log("done" + (f"; JSON in {out}, table in {out.with_suffix('.md')}" if out else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="part 3 (and part 1) on a CUDA machine instead of parts 1 and 2")
    parser.add_argument("--images", type=int, default=None, help="images for the command (CPU: 200, --gpu: 4000)")
    parser.add_argument("--out-json", type=Path, default=None, help="also write the figures as JSON here, and the table as .md beside it")
    parser.add_argument("--files", type=int, default=500, help="files per round of the pt writer benchmark")
    parser.add_argument("--writer-rounds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=None, help="runs of each command variant, fastest kept (CPU: 2, --gpu: 1)")
    parser.add_argument("--work-dir", type=Path, default=None, help="where images and dumps go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--no-writer", action="store_true", help="skip part 1")
    parser.add_argument("--writer-only", action="store_true", help="part 1 only (e.g. with --work-dir on another filesystem)")
    parser.add_argument("--disk-gib", type=float, default=4.0, help="--gpu: GiB written to measure the disk")
    parser.add_argument("--budget-s", type=float, default=None, help="--gpu: skip variants that would end after this many seconds (default 285)")
    parser.add_argument("--run-timeout", type=float, default=240.0, help="seconds one command run may take")
    # Overrides of the command's settings, for a dry run of --gpu on a CPU (--device cpu --dtype float32 --workers 1 ...).
    parser.add_argument("--device", default=None, help="--device of the command (CPU: cpu, --gpu: cuda)")
    parser.add_argument("--dtype", default=None, help="--dtype of the command (CPU: float32, --gpu: float16)")
    parser.add_argument("--batch-size", type=int, default=None, help="--batch-size (CPU: the command's default, --gpu: 256)")
    parser.add_argument("--workers", type=int, default=None, help="--workers (CPU: the command's default, --gpu: 15)")
    args = parser.parse_args()
    args.images = args.images or (4000 if args.gpu else 200)
    args.rounds = args.rounds or (1 if args.gpu else 2)
    if args.gpu and args.budget_s is None:
        args.budget_s = 285.0

    report = Report(args.out_json)
    root = work_folder(args.work_dir, "store-bench-")
    report.header = machine_header(root, "(after the images are made)" if args.gpu else gpu_name())
    log(f"store_bench: {'--gpu' if args.gpu else 'CPU'} mode, work folder {root}")
    report.save()
    with reported(report, root, args.keep):
        if args.gpu:
            gpu_bench(report, root, args)
        elif args.writer_only:
            writer_bench(report, root, args.files, args.writer_rounds)
        else:
            # The images first: the processes making them fork before this one has run torch threads.
            images = root / "images"
            make_images(images, args.images, (320, 240), processes=os.cpu_count() or 1)
            if not args.no_writer:
                writer_bench(report, root, args.files, args.writer_rounds)
            command_bench_cpu(report, root, images, args)


if __name__ == "__main__":
    main()
