"""The shard files of ``--format shards``: their layout, writing one, reading their headers and rows.

The folder holds ``backbone-inspect.json`` (the settings, ``"format": "shards"``),
``manifest*.jsonl`` (an ``ok`` line names its ``shard`` and ``row``, written only once that
shard is committed) and ``shards/<slice>-<writer>-<n>.safetensors``. In a shard, each stage is
one tensor ``[N, C, H, W]`` (``[N, C]`` pooled) when its images' shapes agree, else one tensor
``<stage>.<row>`` per image; its metadata (strings) says ``format``, ``version``, ``settings``
(JSON) and, in row order, ``images``, ``outputs`` and ``input_sizes`` (JSON lists).
``<slice>`` is ``all`` or ``KofN`` (``--shard``); ``<writer>`` is unique to each writing process
(a run, a Ray actor), so parallel writers never write the same file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from .files import atomic_write, names_a_file_inside, output_error

if TYPE_CHECKING:
    import torch

    from .inputs import FoundImage

SHARD_FOLDER = "shards"
SHARD_FORMAT = "backbone-inspect.shards/1"
HEADER_BYTES_PER_IMAGE = 200
"""About what one image adds to a shard's header (its path, output and size in the metadata)."""
HEADER_BYTES_PER_SHARD = 1024
"""About what a shard's header holds besides its images: the settings, the tensors' entries."""
MAX_HEADER_BYTES = 100_000_000
"""The largest header safetensors reads: a shard with a larger one is not whole."""
HEADER_BUDGET_BYTES = MAX_HEADER_BYTES // 2
"""A shard is committed once its images' header bytes reach this (long non-ASCII paths: 7 bytes a character)."""


@dataclass
class FillingShard:
    """A shard being filled, in memory until it is committed."""

    name: str
    """Relative to the folder: ``shards/<file>``."""
    capacity: int
    images: list[FoundImage] = field(default_factory=list)
    input_sizes: list[tuple[int, int]] = field(default_factory=list)
    features: list[dict[str, torch.Tensor]] = field(default_factory=list)
    header_bytes: int = 0
    """At least what its images add to the header (``image_header_bytes``)."""

    def add(self, image: FoundImage, input_size: tuple[int, int], features: dict[str, torch.Tensor]) -> bool:
        """``image`` taken as the next row; ``True`` once the shard is full (its capacity, or its header's budget)."""
        self.images.append(image)
        self.input_sizes.append(input_size)
        self.features.append(features)
        self.header_bytes += image_header_bytes(image, len(features))
        return len(self.images) >= self.capacity or self.header_bytes >= HEADER_BUDGET_BYTES


def image_header_bytes(image: FoundImage, stages: int) -> int:
    """At least what ``image`` adds to its shard's header: its path and output, JSON in JSON strings as
    ``write_shard`` escapes them, its size, and one tensor entry a stage (rows of unequal shapes)."""
    return len(json.dumps(json.dumps(image.path))) + len(json.dumps(json.dumps(image.output))) + 24 + 128 * stages


def committed_shards(folder: Path) -> list[Path]:
    """The shard files of a folder, sorted by name: regular files only (temporary files are hidden;
    a folder or a link with a shard's name is not a shard, and is never removed)."""
    return sorted(path for path in (folder / SHARD_FOLDER).glob("[!.]*.safetensors") if path.is_file() and not path.is_symlink())


def readable_shards(folder: Path, error: type[Exception]) -> Iterator[tuple[Path, dict[str, Any] | None]]:
    """Each committed shard of ``folder`` with its metadata (``read_shard_metadata``), passing over one that
    another run removed (a stale shard) since it was listed; one that cannot be read raises ``error``."""
    for path in committed_shards(folder):
        try:
            metadata = shard_metadata(path, error)
        except FileNotFoundError:
            continue
        yield path, metadata


def shard_metadata(path: Path, error: type[Exception]) -> dict[str, Any] | None:
    """``read_shard_metadata``, where a shard that is there but cannot be read raises ``error`` naming it."""
    try:
        return read_shard_metadata(path)
    except FileNotFoundError:
        raise
    except OSError as failure:
        raise error(f"cannot read {path}: {failure.strerror or failure}") from failure


def read_shard_metadata(path: Path) -> dict[str, Any] | None:
    """A committed shard's metadata, its JSON values decoded, and ``tensors`` (name → dtype, shape,
    offsets); ``None`` when the file is read and is not a whole shard of this format. A file that
    cannot be read (EIO, EACCES, a stale NFS handle) is ``OSError``: it may be a good shard."""
    with open(path, "rb") as handle:
        header_bytes, file_size = handle.read(8), os.fstat(handle.fileno()).st_size
        size = int.from_bytes(header_bytes, "little")
        raw = handle.read(size) if 0 < size <= MAX_HEADER_BYTES else b""
    return _parse_header(raw, size, file_size)


def _parse_header(raw: bytes, size: int, file_size: int) -> dict[str, Any] | None:
    """The decoded header of a shard whose first bytes are ``raw``, or ``None`` when it is not one."""
    try:
        header = json.loads(raw) if raw else None
        tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
        end = max((entry["data_offsets"][1] for entry in tensors.values()), default=0)
        metadata = header["__metadata__"]
        if file_size != 8 + size + end or metadata["format"] != SHARD_FORMAT:
            return None
        if not all(isinstance(value, str) for value in metadata.values()):  # safetensors refuses other metadata
            return None
        decoded = {key: json.loads(metadata[key]) for key in ("settings", "images", "outputs", "input_sizes")}
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError):
        return None
    rows = [decoded[key] for key in ("images", "outputs", "input_sizes")]
    if not isinstance(decoded["settings"], dict) or not all(isinstance(value, list) for value in rows):
        return None
    if len({len(value) for value in rows}) != 1 or not all(isinstance(name, str) for name in decoded["images"] + decoded["outputs"]):
        return None
    if len(set(decoded["outputs"])) != len(decoded["outputs"]) or not all(map(names_a_file_inside, decoded["outputs"])):
        return None  # an image twice in one shard, or a name no run gives
    if not all(_is_size(size) for size in decoded["input_sizes"]) or not _tensors_hold_rows(tensors, decoded):
        return None
    return {**decoded, "version": metadata.get("version"), "tensors": tensors}


ELEMENT_BYTES = {"F32": 4, "F16": 2, "BF16": 2}


def _is_size(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(type(side) is int and side > 0 for side in value)


def _tensors_hold_rows(tensors: Mapping[str, Any], decoded: Mapping[str, Any]) -> bool:
    """Whether the tensors are laid out end to end, each as large as its dtype and shape say (what
    safetensors itself checks on reading), and hold every stage of the settings for every row."""
    try:
        return _laid_out_end_to_end(tensors) and _every_stage_for_every_row(tensors, decoded)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):  # an entry of another structure
        return False


def _laid_out_end_to_end(tensors: Mapping[str, Any]) -> bool:
    offset = 0
    for entry in sorted(tensors.values(), key=lambda entry: entry["data_offsets"][0]):
        shape, (start, end) = entry["shape"], entry["data_offsets"]
        if not (isinstance(shape, list) and all(type(side) is int and side >= 0 for side in shape)):
            return False
        if type(start) is not int or type(end) is not int:  # 0.0 and False equal 0, but safetensors refuses them
            return False
        if start != offset or end - start != math.prod(shape) * ELEMENT_BYTES.get(entry["dtype"], -1):
            return False
        offset = end
    return True


def _every_stage_for_every_row(tensors: Mapping[str, Any], decoded: Mapping[str, Any]) -> bool:
    """Whether each stage of the settings is there for every row, in the saved dtype, each row [C, H, W]
    (pooled: [C]): stacked as one tensor, or one tensor per row where the rows' shapes differ."""
    settings, images = decoded["settings"], len(decoded["images"])
    dtype = SAFETENSORS_DTYPES.get(settings.get("save_dtype", "float32"))
    row_dims = 1 if settings.get("pool", "none") != "none" else 3
    for stage in settings.get("layers", []):
        stacked = tensors.get(stage)
        rows = [stacked] if stacked is not None else [tensors.get(f"{stage}.{row}") for row in range(images)]
        if stacked is not None and stacked["shape"][:1] != [images]:
            return False
        dims = row_dims + (stacked is not None)
        if not all(entry is not None and entry["dtype"] == dtype and len(entry["shape"]) == dims for entry in rows):
            return False
    return True


def kept_rows(path: Path, metadata: dict[str, Any], stages: Sequence[str], dropped: Set[str], into: FillingShard) -> FillingShard:
    """The rows of a shard whose outputs are not ``dropped``, read into ``into`` (to write them as a shard of their own)."""
    from safetensors import safe_open

    from .inputs import FoundImage

    with safe_open(str(path), framework="pt") as shard:
        for row, (image, output, size) in enumerate(zip(metadata["images"], metadata["outputs"], metadata["input_sizes"])):
            if output not in dropped:
                into.images.append(FoundImage(image, output))
                into.input_sizes.append((int(size[0]), int(size[1])))
                into.features.append({stage: shard_row(shard, stage, row) for stage in stages})
    return into


def write_shard(folder: Path, filling: FillingShard, settings: Mapping[str, Any], version: str) -> int:
    """Write a filled shard under ``folder`` atomically (``OutputError`` when it cannot); the bytes written."""
    metadata = {
        "format": SHARD_FORMAT, "version": version, "settings": json.dumps(settings),
        "images": json.dumps([image.path for image in filling.images]),
        "outputs": json.dumps([image.output for image in filling.images]),
        "input_sizes": json.dumps([list(size) for size in filling.input_sizes]),
    }
    return save_safetensors(folder / filling.name, shard_tensors(filling.features), metadata)


def shard_row(shard: Any, stage: str, row: int) -> torch.Tensor:
    """One image's features of ``stage`` from an open shard (``safe_open``): a row of the stacked
    tensor, or the image's own tensor where the shard's shapes differ."""
    if stage in shard.keys():
        return shard.get_slice(stage)[row : row + 1][0]  # safetensors 0.4.0 takes slices, not an index
    return shard.get_tensor(f"{stage}.{row}")


def shard_tensors(rows: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """Each stage as one stacked tensor where the rows' shapes agree, else ``<stage>.<row>`` per image."""
    tensors: dict[str, torch.Tensor | list[torch.Tensor]] = {}
    for stage in rows[0]:
        values = [row[stage] for row in rows]
        if len({tuple(value.shape) for value in values}) == 1:
            tensors[stage] = values
        else:
            tensors.update((f"{stage}.{index}", value) for index, value in enumerate(values))
    return tensors


SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def save_safetensors(path: Path, tensors: Mapping[str, torch.Tensor | Sequence[torch.Tensor]], metadata: Mapping[str, str]) -> int:
    """Write a safetensors file atomically, straight from the tensors' memory; the bytes written.

    A list of equal-shape rows is stored as one tensor ``[len, *shape]`` without being stacked
    in memory first. ``OutputError`` (``ends_run`` as for ``files.stage_features``) when it cannot.
    """
    import torch

    # Each entry as its rows and stored shape: a tensor is one row of its own shape.
    entries = {name: ([value], list(value.shape)) if isinstance(value, torch.Tensor) else (list(value), [len(value), *value[0].shape])
               for name, value in tensors.items()}
    layout, offset = {}, 0
    for name, (rows, shape) in entries.items():
        size = sum(row.nbytes for row in rows)
        dtype = SAFETENSORS_DTYPES[str(rows[0].dtype).removeprefix("torch.")]
        layout[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    header = json.dumps({"__metadata__": dict(metadata), **layout}).encode("utf-8")
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors writes it

    def write(handle: IO[bytes]) -> None:
        handle.write(len(header).to_bytes(8, "little") + header)
        for rows, _ in entries.values():
            for row in rows:
                handle.write(memoryview(row.contiguous().reshape(-1).view(torch.uint8).numpy()))

    try:
        atomic_write(path, write)
    except OSError as error:
        raise output_error(path, error) from error
    return 8 + len(header) + offset
