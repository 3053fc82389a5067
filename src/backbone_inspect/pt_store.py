"""The ``pt`` format: one ``.pt`` file per image, under the name its input maps to."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import OutputError, UsageError
from .files import remove_leftover_temporaries, stage_features
from .store import FolderStore, ResumeSplit, Stored, feature_bytes, settings_differences

if TYPE_CHECKING:
    from .results import ImageResult
    from .inputs import FoundImage

FILE_OVERHEAD_BYTES = 1536
"""About what torch.save adds to a feature file besides the tensor bytes (zip entries, meta)."""


def load_feature_file(path: Path) -> dict[str, Any]:
    """A ``.pt`` feature file, memory-mapped: only its small pickled part is read now, about 0.2 ms a
    file; torch's own error if it is not whole."""
    import torch

    try:
        os.fsdecode(path).encode("utf-8")
    except UnicodeEncodeError:  # a name that is not UTF-8 (bytes Linux allows): torch's mmap takes only UTF-8 names
        with open(path, "rb") as file:
            return torch.load(file, map_location="cpu", weights_only=True)
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def made_with(path: Path, settings: dict[str, Any]) -> bool:
    """Whether a feature file is complete and was made with these settings (its own meta says), and
    holds what they make (``features_problem``)."""
    try:
        saved = load_feature_file(path)
        return not settings_differences(saved["meta"], settings) and features_problem(saved, settings) is None
    except Exception:
        return False


def features_problem(saved: dict[str, Any], settings: dict[str, Any]) -> str | None:
    """Why a loaded feature file does not hold the features these settings make: each stage, in order,
    a dense CPU tensor of the saved dtype, [C] pooled or [C, H, W], none of them empty; the input's
    [H, W] in its meta; ``None`` when it does."""
    import torch

    stages, pooled = list(settings.get("layers", ())), settings.get("pool", "none") != "none"
    features, size = saved.get("features"), saved["meta"].get("input_size")
    if not isinstance(features, dict) or list(features) != stages:
        return f"its stages are not {', '.join(stages)}"
    if not (isinstance(size, list) and len(size) == 2 and all(type(side) is int and side > 0 for side in size)):
        return f"its input_size {size!r} is not [H, W]"
    dtype = getattr(torch, str(settings.get("save_dtype", "float32")), None)
    for stage, tensor in features.items():
        if not (isinstance(tensor, torch.Tensor) and tensor.layout == torch.strided and tensor.device.type == "cpu"
                and tensor.ndim == (1 if pooled else 3) and tensor.dtype == dtype and tensor.numel() > 0):
            return f"its {stage} is not a {'[C]' if pooled else '[C, H, W]'} tensor of {settings.get('save_dtype', 'float32')}"
    return None


class PtFileStore(FolderStore):
    """``folder/<output>.pt`` per image: ``{"features": {stage: tensor}, "meta": {...}}``, written atomically."""

    FORMAT = "pt"

    def split_done(self, images: Sequence[FoundImage], *, overwrite: bool, found: Sequence[FoundImage] | None = None) -> ResumeSplit:
        _check_no_file_is_a_folder(images)
        if self._lock is not None:  # this run holds the folder (not a dry run): what a killed run left of these images goes
            remove_leftover_temporaries(self.folder / image.output for image in images)
        if overwrite:
            return ResumeSplit(tuple(images), (), ())
        todo, skipped, redo = [], [], []
        for image in images:
            path = self.folder / image.output
            if not path.is_file():
                todo.append(image)
            elif made_with(path, self.settings):
                skipped.append(image)
            else:
                redo.append(image)
        return ResumeSplit(tuple(todo + redo), tuple(skipped), tuple(redo))

    def written_since(self, images: Sequence[FoundImage], started: float) -> Sequence[FoundImage]:
        """Files of these settings modified since ``started``: ``--overwrite`` leaves the old ones in
        place until each is replaced."""
        def written(image: FoundImage) -> bool:
            path = self.folder / image.output
            with contextlib.suppress(OSError):
                return path.stat().st_mtime >= started and made_with(path, self.settings)
            return False

        return [image for image in images if written(image)]

    def write(self, image: FoundImage, result: ImageResult) -> Stored:
        [stored] = self.write_all([(image, result)])
        if isinstance(stored, OutputError):
            raise stored
        return stored

    def write_all(self, items: Sequence[tuple[FoundImage, ImageResult]]) -> list[Stored | OutputError]:
        """The files written together: one sync for all where the filesystem allows (``files.stage_files``)."""
        return self.stage_all(items)()

    def stage_all(self, items: Sequence[tuple[FoundImage, ImageResult]]) -> Callable[[], list[Stored | OutputError]]:
        """The files written under temporary names now; the call returned syncs and renames them."""
        from .precision import TORCH_DTYPES

        dtype = TORCH_DTYPES[self.config.save_dtype]
        files = [(self.folder / image.output,
                  {name: value.to(dtype) for name, value in result.features.items()},
                  {"image": result.image, **self.meta, "input_size": list(result.input_size)})
                 for image, result in items]
        commit = stage_features(files)
        return lambda: [Stored(saved) if isinstance(saved, int) else saved for saved in commit()]

    def discard(self, images: Sequence[FoundImage]) -> None:
        """Images computed again (their file was stale: ``--overwrite``, other settings) whose input
        now fails lose that file: a resume and the reader trust the files."""
        for image in images:
            with contextlib.suppress(OSError):
                (self.folder / image.output).unlink()

    def estimate_bytes(self, input_sizes: Sequence[tuple[int, int]]) -> int:
        per_size = feature_bytes(self.config, input_sizes)
        return sum(per_size[size] + FILE_OVERHEAD_BYTES for size in input_sizes)


def _check_no_file_is_a_folder(images: Sequence[FoundImage]) -> None:
    """``UsageError`` before any work if one image's ``.pt`` would stand where others need a folder
    (``x.jpg`` and ``x.pt/y.jpg`` under one input folder): every run would fail on one or the other."""
    from pathlib import PurePosixPath

    # Only a folder named like an output (``*.pt``) can clash: a plain substring test first (a million names).
    suspects = [image.output for image in images if ".pt/" in image.output]
    if not suspects:
        return
    outputs = {image.output: image for image in images}
    for output in sorted({parent.as_posix() for suspect in suspects for parent in PurePosixPath(suspect).parents} & outputs.keys()):
        inside = next(image for image in images if image.output.startswith(output + "/"))
        raise UsageError(f"{outputs[output].path} and {inside.path} cannot both be saved: {output} would be a file and a "
                         "folder; rename one of them, or use --format shards")
