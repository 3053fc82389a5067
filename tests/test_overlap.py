"""Overlapped batches (the default on CUDA): the next batch is launched before this one's results
are built. Forced on here, on the CPU, it must dump exactly what batch-by-batch running dumps."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import torch

from backbone_inspect.config import feature_config
from backbone_inspect.engine import RunCallbacks
from backbone_inspect.errors import InspectError
from backbone_inspect.extractor import Extractor
from backbone_inspect.inputs import plan_inputs
from backbone_inspect.local_engine import LocalEngine
from backbone_inspect.reader import open_features
from backbone_inspect.run import execute_run, make_store, plan_run
from backbone_inspect.signals import StopRequest

from conftest import SMALL, SMALL_OPTIONS, invoke, manifest, many_images, noise_image
from shard_helpers import reference


def mixed_images(root: Path) -> Path:
    """Seven images of three sizes in a row that mixes them, and an unreadable file among them."""
    for index, size in enumerate([(64, 64), (80, 64), (64, 64), (96, 72), (64, 64), (80, 64), (64, 64)]):
        noise_image(root / f"img{index:03d}.png", size, seed=index)
    (root / "img003b.png").write_bytes(b"not an image")
    return root


def dump(root: Path, out: Path, *, overlap: bool, format: str = "pt", stop: StopRequest | None = None,
         on_outcome=None, batch_size: int = 3, **options) -> object:
    config = feature_config(**{**SMALL_OPTIONS, "layers": "1,4", "resize": "none", "crop": "none", **options})
    store = make_store(out, config, format=format, shard_size=3 if format == "shards" else None)
    plan = plan_run(config, plan_inputs(root, outputs=(out,)), LocalEngine(batch_size=batch_size, workers=0, overlap=overlap), store)
    callbacks = RunCallbacks(on_outcome=on_outcome) if on_outcome is not None else RunCallbacks()
    return execute_run(plan, callbacks=callbacks, stop=stop)


def stored(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    dumped = open_features(out)
    return {image.image: dumped[index][0] for index, image in enumerate(dumped.images)}


@pytest.mark.parametrize("format", ["pt", "shards"])
def test_overlapped_batches_dump_exactly_what_batch_by_batch_running_dumps(tmp_path: Path, format: str) -> None:
    root = mixed_images(tmp_path / "in")
    summaries = {overlap: dump(root, tmp_path / str(overlap), overlap=overlap, format=format) for overlap in (False, True)}
    assert summaries[True].processed == summaries[False].processed == 7 and summaries[True].failed == 1
    lines = {overlap: manifest(tmp_path / str(overlap)) for overlap in (False, True)}
    # (Shards record their images as each shard commits, in the background: compare them as sets.)
    assert sorted((line["image"], line["status"]) for line in lines[True]) == sorted((line["image"], line["status"]) for line in lines[False])
    overlapped, one_by_one = stored(tmp_path / "True"), stored(tmp_path / "False")
    assert overlapped.keys() == one_by_one.keys() and len(overlapped) == 7
    for image, features in overlapped.items():
        assert all(torch.equal(features[stage], one_by_one[image][stage]) for stage in ("layer1", "layer4"))
    image = str(root / "img003.png")  # 96×72, a batch of its own size: against the model itself
    expected = reference(image, native=True)
    assert all(torch.allclose(overlapped[image][stage], expected[stage], rtol=1e-4, atol=1e-4) for stage in expected)


def test_a_stop_still_writes_the_batch_already_launched_and_a_rerun_finishes(tmp_path: Path, monkeypatch) -> None:
    # The first report may wait until 2 x writer_threads() (up to 4) slices are pending: with a slow
    # disk the stop comes with the 9th batch of one image at the latest (and the 10th is in flight),
    # so with 12 it lands mid-run on any machine.
    root, out = many_images(tmp_path / "in", 12), tmp_path / "out"
    launched = []
    launch_group = Extractor.launch_group

    def counted(self, names, group):
        launched.extend(names)
        return launch_group(self, names, group)

    monkeypatch.setattr(Extractor, "launch_group", counted)
    stop = StopRequest()

    def stop_at_the_first(outcome, result) -> None:
        stop.signal_number = 2  # as SIGINT would

    first = dump(root, out, overlap=True, stop=stop, on_outcome=stop_at_the_first, batch_size=1)
    written = {line["output"] for line in manifest(out) if line["status"] == "ok"}
    assert 2 <= first.processed < 12 and first.processed == len(written) == len(list(out.glob("*.pt")))
    # Every batch launched was written, the one on the device when the stop came too: none was lost.
    assert len(launched) == first.processed
    assert all(torch.load(out / name, weights_only=True)["features"] for name in written)
    rest = dump(root, out, overlap=True, batch_size=1)
    assert rest.skipped == first.processed and rest.processed + rest.skipped == 12
    straight = tmp_path / "straight"
    dump(root, straight, overlap=False, batch_size=1)
    resumed, expected = stored(out), stored(straight)
    assert resumed.keys() == expected.keys()
    assert all(torch.equal(resumed[image][stage], expected[image][stage]) for image in expected for stage in expected[image])


def test_each_result_carries_the_time_of_its_own_groups_forward(tmp_path: Path) -> None:
    root = mixed_images(tmp_path / "in")
    seen = []
    config = feature_config(**{**SMALL_OPTIONS, "layers": "4", "resize": "none", "crop": "none"})
    plan = plan_run(config, plan_inputs(root), LocalEngine(batch_size=3, workers=0, overlap=True))
    execute_run(plan, callbacks=RunCallbacks(on_outcome=lambda outcome, result: seen.append(result)))
    results = [result for result in seen if result is not None]
    assert len(results) == 7 and all(0 < result.seconds < 60 for result in results)
    # Batches of 3: [64, 80×64, 64] [96×72, unreadable, 64] [80×64, 64]: one group of two, five alone.
    assert sorted(result.group_size for result in results) == [1, 1, 1, 1, 1, 2, 2]


@pytest.mark.parametrize("overlap", [False, True])
def test_a_failing_launch_still_writes_every_batch_computed_before_it(tmp_path: Path, monkeypatch, overlap: bool) -> None:
    root, out = many_images(tmp_path / "in", 6), tmp_path / "out"
    launch_group, launches = Extractor.launch_group, []

    def out_of_memory_at_the_fourth(self, names, group):
        launches.append(names)
        if len(launches) == 4:
            raise RuntimeError("CUDA out of memory (simulated)")
        return launch_group(self, names, group)

    monkeypatch.setattr(Extractor, "launch_group", out_of_memory_at_the_fourth)
    with pytest.raises(InspectError, match=r"^out of memory on cpu with --batch-size 1: use a smaller --batch-size; the images "):
        dump(root, out, overlap=overlap, batch_size=1)
    written = [line["output"] for line in manifest(out) if line["status"] == "ok"]
    assert written == ["img000.pt", "img001.pt", "img002.pt"] and len(list(out.glob("*.pt"))) == 3


OUT_OF_MEMORY = [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
                                             "79.19 GiB of which 1.06 GiB is free.\nOf the allocated memory ..."),
                 RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED")]


def out_of_memory_at_the_third(monkeypatch, error: Exception) -> None:
    launch_group, launches = Extractor.launch_group, []

    def failing(self, names, group):
        launches.append(names)
        if len(launches) == 3:
            raise error
        return launch_group(self, names, group)

    monkeypatch.setattr(Extractor, "launch_group", failing)


@pytest.mark.parametrize("error", OUT_OF_MEMORY, ids=["torch", "cudnn"])
def test_a_device_out_of_memory_is_one_line_naming_the_way_out(tmp_path: Path, monkeypatch, error: Exception) -> None:
    out_of_memory_at_the_third(monkeypatch, error)
    result = invoke(many_images(tmp_path / "in", 6), *SMALL, "--batch-size", "2", "--workers", "0")
    tried = " (it tried to allocate 2.00 GiB)" if isinstance(error, torch.cuda.OutOfMemoryError) else ""
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == f"Error: out of memory on cpu with --batch-size 2{tried}: use a smaller --batch-size"


def test_a_device_out_of_memory_in_a_dump_keeps_what_was_written(tmp_path: Path, monkeypatch) -> None:
    root, out = many_images(tmp_path / "in", 6), tmp_path / "out"
    launch_group = Extractor.launch_group
    out_of_memory_at_the_third(monkeypatch, OUT_OF_MEMORY[0])
    result = invoke(root, *SMALL, "--batch-size", "2", "--workers", "0", "--save", out)
    assert result.exit_code == 1
    assert result.stderr == ("Error: out of memory on cpu with --batch-size 2 (it tried to allocate 2.00 GiB): use a smaller "
                             "--batch-size; the images written so far are kept, and a re-run goes on from them\n")
    assert [line["output"] for line in manifest(out) if line["status"] == "ok"] == ["img000.pt", "img001.pt", "img002.pt", "img003.pt"]
    monkeypatch.setattr(Extractor, "launch_group", launch_group)
    again = invoke(root, *SMALL, "--batch-size", "2", "--save", out)
    assert again.exit_code == 0 and "processed 2, skipped 4" in again.stderr, again.stderr


@pytest.mark.parametrize(("overlap", "most_alive"), [(False, 0), (True, 1)])
def test_a_batchs_maps_leave_the_device_once_it_is_collected(tmp_path: Path, monkeypatch, overlap: bool, most_alive: int) -> None:
    launch_group, groups, alive_at_launch = Extractor.launch_group, [], []

    def tracked(self, names, group):
        gc.collect()
        alive_at_launch.append(sum(ref() is not None for ref in groups))
        launched = launch_group(self, names, group)
        groups.append(weakref.ref(launched))
        return launched

    monkeypatch.setattr(Extractor, "launch_group", tracked)
    dump(many_images(tmp_path / "in", 6), tmp_path / "out", overlap=overlap, batch_size=1)
    assert len(alive_at_launch) == 6 and max(alive_at_launch) == most_alive
