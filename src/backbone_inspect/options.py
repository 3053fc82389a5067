"""Parsing of option values that needs no torch, so usage errors are instant."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import UsageError

_DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def parse_size(option: str, value: int | str | None) -> int | None | str:
    """``--resize``/``--crop``: a positive int, ``none``, or ``None`` when not given (use the weights')."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    text = str(value).strip().lower()
    if text == "none":
        return "none"
    if text.isascii() and text.isdigit() and int(text) > 0:
        return int(text)
    raise UsageError(f"invalid {option} {value!r}: expected a positive number of pixels or 'none'")


def check_positive(option: str, value: int) -> None:
    """``UsageError`` unless ``value`` is a whole number of at least 1 (``--batch-size``, ``--ray-actors``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{option} {value!r}: expected a positive whole number")


def check_device_spec(spec: str) -> str:
    text = str(spec).strip().lower()
    if not _DEVICE_PATTERN.match(text):
        raise UsageError(f"invalid --device {spec!r}: expected auto, cpu, cuda, cuda:N or mps")
    return text


COMPUTE_DTYPES: tuple[str, ...] = ("float32", "tf32", "float16", "bfloat16")
"""``--dtype``: ``tf32`` is float32 storage with CUDA's TF32 convolutions and matmuls."""
SAVE_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")


def check_dtype(option: str, name: str) -> str:
    """``--dtype`` (one of ``COMPUTE_DTYPES``) and ``--save-dtype`` (one of ``SAVE_DTYPES``)."""
    names = COMPUTE_DTYPES if option == "--dtype" else SAVE_DTYPES
    if name not in names:
        raise UsageError(f"invalid {option} {name!r}: expected {', '.join(names)}")
    return name


def parse_input_size(text: str) -> tuple[int, int]:
    """``--input-size``: ``N`` (square) or ``HxW``."""
    parts = text.lower().replace("×", "x").split("x")
    if 1 <= len(parts) <= 2 and all(part.strip().isascii() and part.strip().isdigit() and int(part) > 0 for part in parts):
        height, width = (int(parts[0]), int(parts[-1]))
        return (height, width)
    raise UsageError(f"invalid --input-size {text!r}: expected N or HxW in pixels, e.g. 224 or 480x640")


def output_folder(option: str, value: str | os.PathLike[str]) -> Path:
    """``--save``/``--viz``: a folder to write into, existing or not; never empty, never a file."""
    if not isinstance(value, (str, os.PathLike)):
        raise UsageError(f"{option} {value!r}: expected the path of a folder")
    text = os.fspath(value)
    if not text.strip():
        raise UsageError(f"{option} is empty: give a folder to write into")
    if "\0" in text:
        raise UsageError(f"{option} {text!r}: a path cannot hold a NUL character")
    if os.path.exists(text) and not os.path.isdir(text):
        raise UsageError(f"{option} {text}: a file, not a folder")
    for part in (Path(text), *Path(text).parents):  # os.makedirs says "File exists" of a dangling link on the way
        if os.path.islink(part) and not os.path.exists(part):
            raise UsageError(f"{option} {text}: {part} is a symbolic link to {os.readlink(part)}, which does not exist")
    return Path(text)


SEED_RANGE = range(-(2**63), 2**64)
"""What ``torch.manual_seed`` takes."""


def check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed not in SEED_RANGE:
        raise UsageError(f"invalid --seed {seed!r}: expected a whole number from -2**63 to 2**64 - 1")
    return seed


TEXT_FILE_LIMIT = 64 * 1024 * 1024
"""The largest list or names file read: a device such as /dev/zero never ends."""


def read_text_file(option: str, path: str | os.PathLike[str]) -> str:
    """A small regular text file (``UsageError`` otherwise): ``--from-list``, ``--categories``."""
    try:
        if not os.path.isfile(path) and os.path.exists(path):
            raise UsageError(f"{option} {os.fspath(path)}: not a regular file")
        if os.path.getsize(path) > TEXT_FILE_LIMIT:
            raise UsageError(f"{option} {os.fspath(path)}: over {TEXT_FILE_LIMIT // 2**20} MiB, not a list")
        return Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"{option} {os.fspath(path)}: cannot read it ({_read_failure(error)})") from error


def _read_failure(error: OSError | UnicodeDecodeError) -> str:
    if isinstance(error, UnicodeDecodeError):
        return f"not UTF-8 text: byte {error.object[error.start]:#04x} at offset {error.start}"
    return error.strerror or str(error)


def read_categories(path: str) -> list[str]:
    """``--categories``: one class name per line, in the classifier's order; blank lines ignored."""
    if not isinstance(path, (str, os.PathLike)):
        raise UsageError(f"--categories {path!r}: expected class names, or the path of a file of them")
    lines = read_text_file("--categories", path).splitlines()
    return [line.strip() for line in lines if line.strip()]


ENGINES: tuple[str, ...] = ("local", "ray")
FORMATS: tuple[str, ...] = ("pt", "shards")
POOLINGS: tuple[str, ...] = ("none", "avg", "max")
DECODERS: tuple[str, ...] = ("cpu", "gpu")


def check_choice(option: str, value: object, choices: tuple[str, ...]) -> str:
    """One of ``choices``, exactly (``--engine``, ``--format``, ``--pool``, ``--decode``)."""
    if not isinstance(value, str) or value not in choices:
        raise UsageError(f"{option} {value}: expected one of {', '.join(choices)}")
    return value


def check_engine(name: str) -> str:
    return check_choice("--engine", name, ENGINES)


def check_shard_size(value: object) -> int | None:
    """``--shard-size``: images per shard file, or ``None`` (auto: files of about ``SHARD_TARGET_BYTES``)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    text = str(value).strip()
    if not isinstance(value, bool) and (isinstance(value, int) or (text.isascii() and text.isdigit())) and 0 < int(text) <= MAX_SHARD_IMAGES:
        return int(text)
    raise UsageError(f"--shard-size {value!r}: expected auto or a number of images per shard, 1..{MAX_SHARD_IMAGES}")


SHARD_TARGET_BYTES = 256 * 2**20
"""``--shard-size auto``: shard files of about this size (large enough for object stores, small enough to hold in memory)."""
MAX_SHARD_IMAGES = 16384
"""The most images one shard holds (pooled vectors are small: this bounds what a killed run loses)."""


def default_workers(device_type: str = "cpu", *, processes_here: int = 1) -> int:
    """Processes decoding images beside the forward pass, for a model on ``device_type``.

    On a CPU the model needs the cores: CPU count - 1, at least 1, at most 8. On a GPU decoding
    is what limits a run (H200, 16 cores, resnet50 float16: 8 workers decode 1,534 images/s, 15
    workers 3,729), so the usable cores, shared among the ``processes_here`` runs on this machine
    (torchrun's LOCAL_WORLD_SIZE) when each sees them all (a process bound to its own cores, as by
    Slurm's --cpus-per-task, uses those), less the run's own: its loop, the DataLoader's pinning
    thread and the writers, whose work grows with the rate decoded. Two from 8 cores up (shards of
    layer4 on that H200: 2,177 images/s with 15 workers, 2,915 with 14, in the same run), else one.
    """
    if device_type != "cuda":
        return max(1, min(8, (os.cpu_count() or 1) - 1))
    machine, usable = os.cpu_count() or 1, usable_cpus()
    shared = usable // max(1, processes_here) if usable >= machine else usable
    return max(1, shared - (2 if shared >= 8 else 1))


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: Slurm's --cpus-per-task, taskset), else the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def max_workers() -> int:
    """The most decoding processes a run may start: 4 per CPU (decoding waits on disks too)."""
    return 4 * (os.cpu_count() or 1)


def check_flag(option: str, value: object, *, optional: bool = False) -> bool | None:
    """A yes/no option: ``True`` or ``False`` (``None`` too when ``optional``), never a truthy string."""
    if isinstance(value, bool) or (optional and value is None):
        return value  # type: ignore[return-value]
    raise UsageError(f"{option} {value!r}: expected True or False")
