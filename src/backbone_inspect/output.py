"""Rendering (rich tables, JSON Lines) and writing feature files atomically."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from .errors import OutputError, UsageError

if TYPE_CHECKING:
    import torch
    from rich.console import Console

    from .pipeline import Extractor, ImageResult


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write through ``write`` into a temporary file beside ``path``, fsync, then rename.

    Nothing half-written is ever left under ``path``, and no temporary file is left behind.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def save_features(path: Path, features: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> int:
    """Save ``{"features": ..., "meta": ...}`` atomically; returns the bytes written."""
    import torch

    payload = {"features": dict(features), "meta": dict(meta)}
    try:
        atomic_write(path, lambda handle: torch.save(payload, handle))
        return path.stat().st_size
    except OSError as error:
        raise OutputError(f"cannot write {path}: {error.strerror or error}") from error


def feature_meta(extractor: Extractor, result: ImageResult) -> dict[str, Any]:
    from . import __version__

    return {
        "image": result.image,
        "arch": extractor.arch,
        "weights": extractor.weights.label,
        "seed": extractor.seed,
        "input_size": list(result.input_size),
        "preprocessing": extractor.preprocessing.to_dict(),
        "version": __version__,
    }


def output_paths(images: Iterable[str], save_dir: Path) -> dict[str, Path]:
    """``DIR/<stem>.pt`` per image; inputs that would share one file are a usage error."""
    targets: dict[Path, list[str]] = {}
    for image in images:
        targets.setdefault(save_dir / f"{Path(image).stem}.pt", []).append(image)
    clashes = [f"{', '.join(sources)} -> {target}" for target, sources in targets.items() if len(sources) > 1]
    if clashes:
        raise UsageError(f"inputs would overwrite each other's output: {'; '.join(clashes)}")
    return {sources[0]: target for target, sources in targets.items()}


def json_record(extractor: Extractor, result: ImageResult) -> dict[str, Any]:
    return {
        "image": result.image,
        "arch": extractor.arch,
        "weights": extractor.weights.label,
        "input_size": list(result.input_size),
        "layers": {stats.name: stats.to_dict() for stats in result.stats},
    }


def render_model_header(console: Console, extractor: Extractor) -> None:
    weights = extractor.weights
    line = (
        f"[bold]arch[/] {extractor.arch}  [bold]weights[/] {weights.label}"
        + (f" (seed {extractor.seed})" if weights.kind == "none" else "")
        + f"  [bold]device[/] {extractor.device}"
    )
    console.print(line, highlight=False)
    if weights.head_note:
        console.print(f"[yellow]{weights.head_note}[/]", highlight=False)


def render_image_table(console: Console, result: ImageResult) -> None:
    from rich.table import Table

    from .stats import stride_text

    height, width = result.input_size
    table = Table(
        title=f"{result.image}  input {height}×{width}  forward {result.seconds * 1000:.1f} ms",
        title_justify="left",
    )
    table.add_column("stage")
    for column in ("shape C×H×W", "stride", "dtype", "mean", "std", "min", "max", "zeros"):
        table.add_column(column, justify="right" if column != "dtype" else "left")
    for stats in result.stats:
        table.add_row(
            stats.name,
            "×".join(str(size) for size in stats.shape),
            stride_text(stats.stride),
            stats.dtype,
            f"{stats.mean:.4g}",
            f"{stats.std:.4g}",
            f"{stats.min:.4g}",
            f"{stats.max:.4g}",
            f"{stats.zeros:.1%}",
        )
    console.print(table)
