"""``--decode gpu``: JPEGs decoded in batches on the device (nvJPEG), resized and cropped there.

Two halves. In the DataLoader workers (CPU), ``JpegDataset`` only reads a JPEG's bytes and its
EXIF orientation; everything nvJPEG should not see (other formats, CMYK, files that do not end
cleanly) is decoded and preprocessed by the CPU path there, as ``--decode cpu`` would. In the
main process, ``finish_on_device`` (in a thread, a batch ahead: ``decoded_ahead``) decodes the
batch's JPEGs with one ``decode_jpeg`` call, orients, resizes and crops them on the device and
hands over the usual ``DecodedBatch``.
Everything here also runs with ``device="cpu"`` (libjpeg-turbo instead of nvJPEG): the tests do.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import ImageError
from .device_transforms import apply_orientation, preprocess_same_size
from .jpeg_files import read_jpeg
from .images import DecodedBatch, ImageDataset, LoadedImage, Preprocessing, SizeGroup, collate_batch, load_image_tensor

if TYPE_CHECKING:
    import torch

DECODE_AREA = 2**28
"""The most pixels (W×H, summed) decoded in one call: a batch of large photos is decoded in parts,
each resized before the next, so the device holds at most about 0.8 GB of full-size images."""


@dataclass(frozen=True)
class EncodedJpeg:
    """A JPEG for the device: its bytes (uint8 [N], CPU) and EXIF orientation (1..8)."""

    position: int
    """Its position in the batch."""
    path: str
    data: torch.Tensor
    orientation: int = 1
    area: int = 0
    """Width × height, from the header."""


@dataclass(frozen=True)
class FetchedImage:
    """A dataset item: a JPEG left encoded for the device (``data``), or the CPU path's result (``loaded``)."""

    index: int
    path: str
    data: torch.Tensor | None = None
    orientation: int = 1
    area: int = 0
    loaded: LoadedImage | None = None


@dataclass(frozen=True)
class EncodedBatch:
    """A batch as the workers hand it over: the JPEGs still encoded, the rest decoded on the CPU."""

    jpegs: tuple[EncodedJpeg, ...]
    decoded: DecodedBatch
    """Every image but the JPEGs: stacked by size, or an error; positions are the whole batch's."""

    @property
    def indices(self) -> tuple[int, ...]:
        return self.decoded.indices

    def pin_memory(self) -> EncodedBatch:
        """Called by the DataLoader's pin-memory thread; the JPEG bytes are read by nvJPEG on the host."""
        return EncodedBatch(self.jpegs, self.decoded.pin_memory())


class JpegDataset(ImageDataset):
    """``ImageDataset`` for ``--decode gpu``: JPEGs stay encoded, other files are decoded as usual."""

    def __getitem__(self, index: int) -> FetchedImage:  # type: ignore[override]
        path = self.paths[index]
        jpeg = read_jpeg(path)
        if jpeg is not None:
            return FetchedImage(index, path, *jpeg)
        try:
            return FetchedImage(index, path, loaded=LoadedImage(index, load_image_tensor(path, self.preprocessing)))
        except ImageError as error:
            return FetchedImage(index, path, loaded=LoadedImage(index, None, str(error)))


def collate_encoded(items: Sequence[FetchedImage]) -> EncodedBatch:
    """The workers' collate: JPEGs numbered by position, the CPU-decoded images stacked by size.

    The JPEGs' bytes are views of one tensor: the batch crosses to the main process in one block
    of shared memory rather than one per file.
    """
    import torch

    encoded = [(position, item) for position, item in enumerate(items) if item.data is not None]
    joined = torch.cat([item.data for _, item in encoded]) if encoded else torch.empty(0, dtype=torch.uint8)
    ends = itertools.accumulate(len(item.data) for _, item in encoded)  # type: ignore[arg-type]
    jpegs = tuple(
        EncodedJpeg(position, item.path, joined[end - len(item.data):end], item.orientation, item.area)
        for (position, item), end in zip(encoded, ends)
    )
    cpu_positions = [position for position, item in enumerate(items) if item.loaded is not None]
    cpu = collate_batch([items[position].loaded for position in cpu_positions])  # type: ignore[misc]
    groups = tuple(SizeGroup(tuple(cpu_positions[p] for p in group.positions), group.pixels) for group in cpu.groups)
    errors = {cpu_positions[p]: error for p, error in cpu.errors.items()}
    return EncodedBatch(jpegs, DecodedBatch(tuple(item.index for item in items), groups, errors))


def decode_jpegs(datas: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """RGB uint8 [3, H, W] on ``device`` per JPEG, ``None`` where the decoder fails.

    One batched call (what makes nvJPEG fast); it fails as a whole when one file is bad, and
    then each file is decoded alone to find which.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    if not datas:
        return []
    _settle(device)
    try:
        return [_rgb_or_none(image) for image in decode_jpeg(list(datas), mode=ImageReadMode.RGB, device=device)]
    except (RuntimeError, ValueError):
        return [_decode_one(data, device) for data in datas]


def _decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    from torchvision.io import ImageReadMode, decode_jpeg

    _settle(device)
    try:
        return _rgb_or_none(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))  # one tensor: torchvision 0.19 takes a list on CUDA only
    except (RuntimeError, ValueError):
        return None


def _settle(device: torch.device) -> None:
    """Wait for the work this thread's stream has queued. nvJPEG writes its output on a stream of
    its own that does not wait for the caller's (torchvision allocates the output on the caller's
    stream, then decodes on a pool stream): memory this stream's queued kernels still use, freed
    already on the host, could otherwise be handed to nvJPEG and written while they run."""
    if device.type == "cuda":
        import torch

        torch.cuda.current_stream(device).synchronize()


def _rgb_or_none(image: torch.Tensor) -> torch.Tensor | None:
    return image if image.ndim == 3 and image.shape[0] == 3 else None


def _pillow_pixels(jpeg: EncodedJpeg, preprocessing: Preprocessing, device: torch.device) -> torch.Tensor | str:
    """A file the device could not decode, through Pillow: an error only if Pillow fails too."""
    try:
        return load_image_tensor(jpeg.path, preprocessing).to(device, non_blocking=True)
    except ImageError as error:
        return str(error)


def _upright_by_size(
    part: Sequence[EncodedJpeg], images: Sequence[torch.Tensor | None]
) -> dict[tuple[int, ...], list[tuple[EncodedJpeg, torch.Tensor]]]:
    """The decoded images of a part, turned upright, grouped by their shape (the undecoded left out)."""
    by_size: dict[tuple[int, ...], list[tuple[EncodedJpeg, torch.Tensor]]] = {}
    for jpeg, image in zip(part, images):
        if image is not None:
            upright = apply_orientation(image, jpeg.orientation)
            by_size.setdefault(tuple(upright.shape), []).append((jpeg, upright))
    return by_size


def _preprocessed_part(
    part: Sequence[EncodedJpeg], preprocessing: Preprocessing, device: torch.device
) -> dict[int, torch.Tensor | str]:
    """Each JPEG of a part by position: its pixels on the device, or the error naming its file."""
    images = decode_jpegs([jpeg.data for jpeg in part], device)
    done: dict[int, torch.Tensor | str] = {
        jpeg.position: _pillow_pixels(jpeg, preprocessing, device) for jpeg, image in zip(part, images) if image is None
    }
    for same_size in _upright_by_size(part, images).values():
        try:
            pixels = preprocess_same_size([image for _, image in same_size], preprocessing)
        except ImageError as error:
            done.update((jpeg.position, f"{jpeg.path}: {error}") for jpeg, _ in same_size)
        else:
            done.update((jpeg.position, row) for (jpeg, _), row in zip(same_size, pixels))
    return done


@dataclass(frozen=True)
class SideStream:
    """The decoding thread's own CUDA stream, and the stream of the thread that uses its batches."""

    stream: torch.cuda.Stream
    consumer: torch.cuda.Stream


def side_stream(device: torch.device) -> SideStream | None:
    """A stream for ``finish_on_device`` in another thread; call it in the thread that will use the
    batches (its current stream is the consumer). ``None`` off CUDA."""
    import torch

    if device.type != "cuda":
        return None
    return SideStream(torch.cuda.Stream(device), torch.cuda.current_stream(device))


def finish_on_device(batch: EncodedBatch, preprocessing: Preprocessing, device: torch.device | str,
                     side: SideStream | None = None) -> DecodedBatch:
    """The ``DecodedBatch`` of an ``EncodedBatch``: every image's uint8 pixels on ``device``, stacked by size.

    With ``side``, the device work is queued on its stream, finished before this returns, and the
    pixels are kept from reuse until the consumer's stream is done with them: the decoding then
    waits only for itself, never for the consumer's forward pass (see ``_settle``).
    """
    import torch

    device = torch.device(device)
    if side is None:
        return _finished(batch, preprocessing, device)
    # The device first: a stream context left for a thread's initial device 0 would set it, and
    # open a CUDA context on GPU 0 in every torchrun process.
    with torch.cuda.device(device), torch.cuda.stream(side.stream):
        decoded = _finished(batch, preprocessing, device)
    side.stream.synchronize()
    for group in decoded.groups:
        group.pixels.record_stream(side.consumer)
    return decoded


def _finished(batch: EncodedBatch, preprocessing: Preprocessing, device: torch.device) -> DecodedBatch:
    done: dict[int, torch.Tensor | str] = dict(batch.decoded.errors)
    for group in batch.decoded.groups:
        done.update(zip(group.positions, group.pixels.to(device, non_blocking=True)))
    for part in decode_parts(batch.jpegs, DECODE_AREA):
        done.update(_preprocessed_part(part, preprocessing, device))
    return collate_batch([
        LoadedImage(index, None, done[position]) if isinstance(done[position], str) else LoadedImage(index, done[position])
        for position, index in enumerate(batch.decoded.indices)
    ])


def decode_parts(jpegs: Sequence[EncodedJpeg], area: int) -> list[list[EncodedJpeg]]:
    """Consecutive parts of at most ``area`` pixels each (a larger image alone): one decode call each."""
    parts: list[list[EncodedJpeg]] = []
    total = area
    for jpeg in jpegs:
        if total + jpeg.area > area:
            parts.append([])
            total = 0
        parts[-1].append(jpeg)
        total += jpeg.area
    return parts


def decoded_ahead(
    batches: Iterator[EncodedBatch], finish: Callable[[EncodedBatch], DecodedBatch]
) -> Iterator[DecodedBatch]:
    """``finish`` each batch in a thread, one batch ahead of the caller, in order.

    The next batch's decoding (nvJPEG's host-side work, the per-image launches, any Pillow
    fallback) then overlaps this batch's forward pass, which mostly waits on the GPU with the
    GIL released. On CUDA, ``finish`` queues its device work on a stream of its own
    (``side_stream``), which it finishes before handing the batch over.
    """
    from concurrent.futures import Future, ThreadPoolExecutor

    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="device-decode") as decoder:
            ahead: Future[DecodedBatch] | None = None
            for batch in batches:
                current, ahead = ahead, decoder.submit(finish, batch)
                if current is not None:
                    yield current.result()
            if ahead is not None:
                yield ahead.result()
    finally:  # a decoding error, or the run's end: the batches' source (its worker processes) ends too
        getattr(batches, "close", lambda: None)()
