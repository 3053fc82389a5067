"""Reading a dump back: ``open_features(DIR)`` over either format, as a torch ``Dataset``.

Images are in the order of their ``output`` names (the manifest's), whatever the format, the
engine or the order they were computed in, so two dumps of the same images line up row by row.
"""

from __future__ import annotations

import json
import operator
import os
import pickle
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import UsageError, first_line
from .files import names_a_file_inside
from .options import FORMATS, POOLINGS
from .shard_files import SAFETENSORS_DTYPES, readable_shards, shard_row
from .stages import stage_name
from .pt_store import features_problem, load_feature_file
from .store import SETTINGS_BEFORE_THEY_EXISTED, SETTINGS_FILE, read_settings, settings_differences

if TYPE_CHECKING:
    from .inputs import FoundImage


@dataclass(frozen=True)
class StoredImage:
    """One image of a dump, and where its features are."""

    image: str
    """The input path, as the run was given it."""
    output: str
    """Its name in the dump (the manifest's ``output``)."""
    file: str
    """The file holding its features, relative to the folder: its ``.pt``, or its shard."""
    row: int | None = None
    """Its row in the shard (``--format shards``)."""
    input_size: tuple[int, int] | None = None
    """[H, W] after preprocessing (known up front for shards; for ``.pt`` in each item's meta)."""


class StoredFeatures(torch.utils.data.Dataset):
    """A dump, read lazily: ``len``, ``[i]`` → ``(features, meta)``, ``images``, ``matrix(stage)``.

    ``features`` maps each stage to the image's tensor ([C, H, W], or [C] pooled) in the saved
    dtype; ``meta`` is ``{"image", "output", "input_size"}``. Works in a ``DataLoader`` with
    workers: each process opens the files it reads itself, memory-mapped.
    """

    def __init__(self, folder: Path, settings: dict[str, Any], images: tuple[StoredImage, ...]) -> None:
        self.folder = folder
        self.settings = settings
        self.images = images
        self._open: dict[str, Any] = {}

    @property
    def format(self) -> str:
        return str(self.settings.get("format", SETTINGS_BEFORE_THEY_EXISTED["format"]))

    @property
    def stages(self) -> tuple[str, ...]:
        return tuple(self.settings.get("layers", ()))

    @property
    def pool(self) -> str:
        return str(self.settings.get("pool", SETTINGS_BEFORE_THEY_EXISTED["pool"]))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        try:
            index = operator.index(index)  # an int, numpy's or a 0-d tensor (what samplers give)
        except TypeError:
            raise TypeError(f"dump[{index!r}]: expected an image's position, 0 to {len(self.images) - 1} "
                            "(dump.images[i].output is its name)") from None
        if not -len(self.images) <= index < len(self.images):
            raise IndexError(f"image {index} of a dump of {len(self.images)} images")
        stored = self.images[index]
        meta = {"image": stored.image, "output": stored.output, "input_size": stored.input_size}
        if stored.row is None:
            saved = self._pt_file(stored.file)
            return dict(saved["features"]), {**meta, "input_size": tuple(saved["meta"]["input_size"])}
        shard = self._file(stored.file)
        return {stage: shard_row(shard, stage, stored.row) for stage in self.stages}, meta

    def matrix(self, stage: int | str) -> torch.Tensor:
        """Every image's pooled vector of ``stage``, as one ``[N, C]`` tensor in ``images`` order.

        Each file is read once, straight into its rows of the result.
        """
        if self.pool == "none":
            raise UsageError(f"matrix({stage!r}) needs pooled features: dump with --pool avg or --pool max")
        stage = self._canonical(stage)
        if stage not in self.stages:
            raise UsageError(f"matrix({stage!r}): the dump has {', '.join(self.stages)}")
        by_file: dict[str, list[tuple[int, int | None]]] = {}
        for position, stored in enumerate(self.images):
            by_file.setdefault(stored.file, []).append((position, stored.row))
        result: torch.Tensor | None = None
        for file, places in by_file.items():
            positions = torch.tensor([position for position, _ in places])
            if places[0][1] is None:
                values = self._pt_file(file)["features"][stage][None]
            else:
                values = self._file(file).get_tensor(stage)[torch.tensor([row for _, row in places])]
            if result is None:
                result = torch.empty(len(self.images), values.shape[-1], dtype=values.dtype)
            if values.shape[1:] != result.shape[1:]:  # a file changed since the dump: never broadcast into the others' rows
                raise UsageError(f"{self.folder / file} holds {stage} of {values.shape[-1]} channels, not {result.shape[1]} "
                                 "as the dump's first image: it is not this dump's; delete it, then run the dump again")
            result[positions] = values
        return result if result is not None else torch.empty(0, 0)

    def _canonical(self, stage: int | str) -> int | str:
        """A stage as the dump names it: ``"C5"`` or ``4`` is ``layer4`` on a ResNet, as ``--layers`` takes them."""
        if stage in self.stages:
            return stage
        try:
            return stage_name(stage, str(self.settings.get("arch")))
        except (UsageError, ImportError, TypeError, ValueError):
            return stage

    def _pt_file(self, relative: str) -> dict[str, Any]:
        """A ``.pt`` file, loaded each time (there may be millions), memory-mapped; ``UsageError`` if it
        is not whole, or was made with other settings (an interrupted ``--overwrite`` left it)."""
        path = self.folder / relative
        try:
            saved = load_feature_file(path)
            differences = settings_differences(saved["meta"], self.settings)
            problem = features_problem(saved, self.settings) if not differences else None
        except (OSError, RuntimeError, EOFError, ValueError, KeyError, IndexError, TypeError, AttributeError,
                pickle.UnpicklingError) as error:
            problem = str(error).splitlines()[0] if str(error) else type(error).__name__
        if problem is not None:
            raise UsageError(f"{path} is not a whole feature file ({problem}): run the dump again to replace it")
        if differences:
            raise UsageError(f"{path} was made with other settings ({', '.join(differences)}): the dump is not "
                             "finished, or was redone since it was opened; run its command again, then open_features again")
        return saved

    def _file(self, relative: str) -> Any:
        """A shard, opened once per process (memory-mapped)."""
        path = self.folder / relative
        if relative not in self._open:
            from safetensors import safe_open

            try:
                self._open[relative] = safe_open(str(path), framework="pt")
            except Exception as error:  # noqa: BLE001 - safetensors' own error type, or an OSError: changed since listed
                raise UsageError(f"{path} is not a whole shard ({first_line(error)}): run the dump again to replace it") from error
        return self._open[relative]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": {}}  # each DataLoader worker opens its own files


def open_features(folder: str | Path) -> StoredFeatures:
    """A dump made by ``--save DIR`` (either ``--format``), to read features back.

    ``UsageError`` when ``folder`` is not such a dump.
    """
    if not isinstance(folder, (str, os.PathLike)):
        raise UsageError(f"open_features({folder!r}): expected the path of a dump's folder (a run's --save DIR)")
    folder = Path(folder)
    settings_path = folder / SETTINGS_FILE
    try:
        settings = read_settings(settings_path)
    except (OSError, ValueError, RecursionError) as error:  # RecursionError: JSON nested too deep to decode
        raise UsageError(f"{folder} is not a dump of backbone-inspect: cannot read {settings_path} ({error})") from error
    problem = _settings_problem(settings)
    if problem is not None:
        raise UsageError(f"{folder} is not a dump of backbone-inspect: {settings_path} {problem}")
    found = _shard_images(folder, settings) if settings.get("format") == "shards" else _pt_images(folder)
    images = sorted(found.values(), key=lambda stored: stored.output)
    return StoredFeatures(folder, settings, tuple(images))


def _settings_problem(settings: Any) -> str | None:
    """What makes a settings file's contents unlike any a run writes (what the reader relies on), or ``None``."""
    if not isinstance(settings, dict):
        return "is not a JSON object"
    layers = settings.get("layers")
    if not isinstance(layers, list) or not layers or not all(isinstance(stage, str) for stage in layers):
        return f"names no stages (\"layers\": {json.dumps(layers)}, not a list of stage names)"
    for key, choices in (("format", FORMATS), ("pool", POOLINGS), ("save_dtype", tuple(SAFETENSORS_DTYPES))):
        if key in settings and settings[key] not in choices:
            return f"has \"{key}\": {json.dumps(settings[key])}, not one of {', '.join(choices)}"
    return None


def _shard_images(folder: Path, settings: dict[str, Any]) -> dict[str, StoredImage]:
    """Every image of every committed shard of the folder's settings (headers are read, not tensors);
    an image in two shards (a copy) is read from the first, as a resume counts it."""
    found: dict[str, StoredImage] = {}
    for path, metadata in readable_shards(folder, UsageError):
        if metadata is None:
            raise UsageError(f"{path} is not a whole shard: run the dump again to replace it")
        differences = settings_differences(metadata["settings"], settings)
        if differences:  # an interrupted --overwrite of other settings left it (its slice's next run removes it)
            raise UsageError(f"{path} was made with other settings ({', '.join(differences)}): the dump is not finished, "
                             "or was redone since; run its command again, then open_features again")
        relative = path.relative_to(folder).as_posix()
        for row, (image, output, size) in enumerate(zip(metadata["images"], metadata["outputs"], metadata["input_sizes"])):
            found.setdefault(output, StoredImage(image, output, relative, row, (int(size[0]), int(size[1]))))
    return found


def _pt_images(folder: Path) -> dict[str, StoredImage]:
    """The images whose last line in a manifest says saved (``ok``, or ``skipped``: saved by an
    earlier run; a later ``error`` there takes it back) and whose file is there."""
    manifests = sorted(folder.glob("manifest*.jsonl"))
    if not manifests and next(folder.rglob("*.pt"), None) is not None:
        raise UsageError(f"{folder} has feature files but no manifest.jsonl, which lists them: run the dump again to write it")
    found: dict[str, StoredImage] = {}
    for manifest in manifests:  # the runs of several manifests (--shard K/N, then none) have no order between them
        for output, stored in _saved_in(manifest, folder).items():
            found.setdefault(output, stored)
    return {output: stored for output, stored in found.items() if (folder / stored.file).is_file()}


def _saved_in(manifest: Path, folder: Path) -> dict[str, StoredImage]:
    """The images whose last line in this manifest says saved (``UsageError`` for a pipe or device there: never read)."""
    if not manifest.is_file():
        raise UsageError(f"{manifest} is not a regular file, so not a manifest of the dump: remove it, then run the dump again")
    saved: dict[str, StoredImage] = {}
    for number, line in enumerate(manifest.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if not isinstance(record, dict) or not isinstance(record.get("output"), str) or not isinstance(record.get("image"), str):
            continue
        output = record["output"]
        if record.get("status") not in ("ok", "skipped"):
            saved.pop(output, None)
        elif names_a_file_inside(output):
            saved[output] = StoredImage(record["image"], output, output)
        else:
            raise UsageError(f"{manifest} line {number}: output {json.dumps(output)} is not a file inside {folder}")
    return saved


def warn_if_saved_under_other_names(folder: Path, images: Sequence[FoundImage]) -> None:
    """Warn where images named one by one (saved by their name alone) are the files a manifest of ``folder``
    says are saved there under another output (by an earlier run over their folder): they would be there twice.
    The manifest's paths are as given, so from the same working directory (the best guess here)."""
    names = {os.path.basename(image.path) for image in images}
    recorded: dict[str, set[str]] = {}
    for manifest in sorted(folder.glob("manifest*.jsonl")) if names else ():
        try:
            saved = _saved_in(manifest, folder)
        except (UsageError, OSError):
            continue
        for stored in saved.values():
            if os.path.basename(stored.image) in names:  # few resolved: a manifest may list millions
                recorded.setdefault(os.path.realpath(stored.image), set()).add(stored.output)
    twice = [(image, sorted(recorded[real])[0]) for image in images
             if (real := os.path.realpath(image.path)) in recorded and image.output not in recorded[real]]
    if twice:
        image, output = twice[0]
        warnings.warn(f"{len(twice)} image(s) named here are already in {folder} under another name (e.g. {image.path} "
                      f"as {output}); this run saves them again as {image.output}, by their name alone: to redo them in place, "
                      "give their folder as the earlier run did", stacklevel=2)
