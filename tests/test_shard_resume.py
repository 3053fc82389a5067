"""--format shards over what earlier runs (and hands) left in the folder: skipped lines that say
where each image is, copies of shards, and things with a shard's name that are not shards."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

from backbone_inspect import dump_features
from backbone_inspect.errors import OutputError, UsageError
from backbone_inspect.reader import open_features

from conftest import assert_close_scaled, invoke, manifest, many_images
from shard_helpers import ARGS, OPTIONS, outputs, reference, shard_files, shard_rows


def test_a_resume_records_where_each_skipped_image_is(tmp_path: Path) -> None:
    root, out = many_images(tmp_path / "in", 5), tmp_path / "out"
    dump_features(root, out, format="shards", shard_size=2, **OPTIONS)
    (out / "manifest.jsonl").write_text("")  # the ok lines lost: the shards still say where each image is
    again = dump_features(root, out, format="shards", shard_size=2, **OPTIONS)
    assert (again.processed, again.skipped) == (0, 5)
    rows = shard_rows(out)
    assert {line["output"]: (line["status"], line["shard"], line["row"]) for line in manifest(out)} == {
        output: ("skipped", row["shard"], row["row"]) for output, row in rows.items()}


def test_a_copied_shard_is_removed_and_no_image_stays_in_two(tmp_path: Path) -> None:
    root, out = many_images(tmp_path / "in", 4), tmp_path / "out"
    dump_features(root, out, format="shards", shard_size=3, **OPTIONS)
    first, second = shard_files(out)
    shutil.copy(first, first.with_name(first.name.replace("-00000.", "-99999.")))  # the same images again, sorted last
    again = dump_features(root, out, format="shards", shard_size=3, **OPTIONS)
    assert (again.processed, again.skipped) == (0, 4)
    assert shard_files(out) == [first, second], "the copy is removed once the run opens"
    assert sorted(shard_rows(out)) == outputs(4)  # shard_rows fails on an output in two shards


def test_a_folder_or_a_link_with_a_shards_name_is_left_alone(tmp_path: Path) -> None:
    root, out = many_images(tmp_path / "in", 3), tmp_path / "out"
    dump_features(root, out, format="shards", shard_size=2, **OPTIONS)
    (out / "shards" / "x.safetensors").mkdir()
    (out / "shards" / "y.safetensors").symlink_to(shard_files(out)[0])
    again = dump_features(root, out, format="shards", shard_size=2, **OPTIONS)
    assert (again.processed, again.skipped, again.failed) == (0, 3, 0)
    assert (out / "shards" / "x.safetensors").is_dir() and (out / "shards" / "y.safetensors").is_symlink()
    stored = open_features(out)
    assert [image.output for image in stored.images] == outputs(3)
    assert all(not image.file.startswith("shards/y.") for image in stored.images)
    for index, image in enumerate(stored.images):
        assert_close_scaled(stored[index][0]["layer4"], reference(root / Path(image.image).name)["layer4"])


def test_overwriting_part_of_a_shard_moves_the_rest_and_their_lines_follow(tmp_path: Path) -> None:
    root, out = many_images(tmp_path / "in", 4), tmp_path / "out"
    dump_features(root, out, format="shards", shard_size=4, **OPTIONS)
    again = dump_features([root / "img000.png", root / "img001.png"], out, format="shards", overwrite=True, **OPTIONS)
    assert (again.processed, again.skipped) == (2, 0)
    rows = shard_rows(out)
    assert sorted(rows) == outputs(4) and len(shard_files(out)) == 2, "the others moved to a shard of their own"
    latest = {line["output"]: (line["shard"], line["row"]) for line in manifest(out) if line["status"] == "ok"}
    assert latest == {output: (row["shard"], row["row"]) for output, row in rows.items()}
    for output, row in rows.items():
        assert_close_scaled(row["features"]["layer4"], reference(root / output.replace(".pt", ".png"))["layer4"])


def test_a_shard_that_cannot_be_read_is_an_error_and_is_kept(tmp_path: Path, monkeypatch) -> None:
    root, out = many_images(tmp_path / "in", 2), tmp_path / "out"
    dump_features(root, out, format="shards", **OPTIONS)
    (shard,) = shard_files(out)

    def unreadable(path: Path):
        raise OSError(errno.EIO, "Input/output error", str(path))

    monkeypatch.setattr("backbone_inspect.shard_files.read_shard_metadata", unreadable)
    with pytest.raises(OutputError, match=f"cannot read {shard}: Input/output error"):
        dump_features(root, out, format="shards", **OPTIONS)
    assert shard_files(out) == [shard], "a shard that could not be read may be good: it is never removed"


def test_another_slices_shards_are_read_never_changed(tmp_path: Path) -> None:
    root, out = many_images(tmp_path / "in", 4), tmp_path / "out"
    dump_features(root, out, format="shards", **OPTIONS)  # one "all-" shard of every image
    (whole,) = shard_files(out)
    half = dump_features(root, out, format="shards", shard="0/2", **OPTIONS)
    assert (half.processed, half.skipped) == (0, 2), "images in another slice's shard are done"
    with pytest.raises(UsageError, match=f"--overwrite: {whole} belongs to another slice of the inputs and holds img000.pt"):
        dump_features(root, out, format="shards", shard="0/2", overwrite=True, **OPTIONS)
    assert shard_files(out) == [whole] and sorted(shard_rows(out)) == outputs(4)


def test_writers_wait_for_the_disk_instead_of_holding_more_shards(tmp_path: Path, monkeypatch) -> None:
    import time
    from collections import OrderedDict
    from concurrent.futures import ThreadPoolExecutor

    import torch

    import backbone_inspect.shard_store as shard_store
    from backbone_inspect.config import feature_config
    from backbone_inspect.results import ImageResult
    from backbone_inspect.inputs import FoundImage

    config = feature_config(**{key: value for key, value in OPTIONS.items() if key != "workers"})
    store = shard_store.ShardStore(tmp_path / "out", config, shard_size=2)
    store.claim(overwrite=False)
    store.open()
    held, slow_write = [], shard_store.write_shard

    def slow_disk(*args, **kwargs):
        held.append(len(store._uncommitted))  # shards in memory: being filled, waiting or being written
        time.sleep(0.05)
        return slow_write(*args, **kwargs)

    monkeypatch.setattr(shard_store, "write_shard", slow_disk)
    maps = OrderedDict(layer1=torch.rand(8, 4, 4), layer4=torch.rand(16, 2, 2))

    def write(index: int) -> None:
        store.write(FoundImage(f"i{index}.png", f"i{index}.pt"), ImageResult(f"i{index}.png", (64, 64), maps, (), 0.0))

    with ThreadPoolExecutor(4) as writers:
        list(writers.map(write, range(40)))
    store.close()
    assert len(shard_files(tmp_path / "out")) == 20 and sorted(shard_rows(tmp_path / "out")) == sorted(f"i{i}.pt" for i in range(40))
    assert max(held) <= shard_store.COMMITS_IN_FLIGHT + 1, f"at most two full shards and one being filled: {max(held)}"


def rewrite_header(path: Path, change) -> None:
    """The shard's header changed by ``change``, its data kept: the file's size still agrees with the header."""
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    change(header, header["__metadata__"])
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + size :])


TAMPERINGS = {
    "shape": lambda header, meta: header["layer4"].update(shape=[2, 512, 2, 1]),
    "dtype": lambda header, meta: header["layer4"].update(dtype="F16"),
    "offsets": lambda header, meta: header["layer4"].update(data_offsets=[header["layer4"]["data_offsets"][0] + 4,
                                                                          header["layer4"]["data_offsets"][1] + 4]),
    # Equal to the right integers in Python, refused by safetensors: re-runs never replaced such a shard.
    "offsets as floats": lambda header, meta: header["layer4"].update(data_offsets=[float(o) for o in header["layer4"]["data_offsets"]]),
    "an offset as false": lambda header, meta: header[min((k for k in header if k != "__metadata__"),
                                                          key=lambda k: header[k]["data_offsets"][0])]["data_offsets"].__setitem__(0, False),
    "more images than rows": lambda header, meta: meta.update(images=json_list(3, "x.png"), outputs=json_list(3, "x.pt"),
                                                              input_sizes=json_list(3, [64, 64])),
    "a size that is no size": lambda header, meta: meta.update(input_sizes='[["a", 1], [224]]'),
    "a stage missing": lambda header, meta: meta.update(settings=meta["settings"].replace('"layer4"', '"layer4", "layer3"')),
    # What safetensors itself refuses to open, or rows unlike the settings' [C, H, W] maps in the saved dtype:
    "a metadata value that is no string": lambda header, meta: meta.update(extra=5),
    "another dtype in as many bytes": lambda header, meta: header["layer4"].update(dtype="F16", shape=[2, 512, 2, 4]),
    "rows of another rank": lambda header, meta: header["layer4"].update(shape=[2, 2048]),
    "a tensor per row, of another rank": lambda header, meta: split_rows(header, "layer4", [2048]),
    "an image twice": lambda header, meta: meta.update(outputs=json.dumps([json.loads(meta["outputs"])[0]] * 2)),
    "a name outside the folder": lambda header, meta: meta.update(outputs=json.dumps(["../../x.pt", json.loads(meta["outputs"])[1]])),
}


def split_rows(header: dict, stage: str, shape: list[int]) -> None:
    """A stacked stage of two rows stored instead as ``<stage>.0`` and ``<stage>.1`` of ``shape``, the same bytes."""
    entry = header.pop(stage)
    start, end = entry["data_offsets"]
    for row, offsets in enumerate(([start, (start + end) // 2], [(start + end) // 2, end])):
        header[f"{stage}.{row}"] = {"dtype": entry["dtype"], "shape": shape, "data_offsets": offsets}


def json_list(count: int, item: object) -> str:
    return json.dumps([item] * count)


@pytest.mark.parametrize("tampering", TAMPERINGS)
def test_a_shard_whose_header_disagrees_with_its_data_is_not_whole_refused_and_redone(tmp_path: Path, tampering: str) -> None:
    root, out = many_images(tmp_path / "in", 4), tmp_path / "out"
    dump_features(root, out, format="shards", shard_size=2, **OPTIONS)
    first = shard_files(out)[0]
    rewrite_header(first, TAMPERINGS[tampering])
    with pytest.raises(UsageError, match=f"{first.name} is not a whole shard: run the dump again to replace it"):
        open_features(out)
    again = dump_features(root, out, format="shards", shard_size=2, **OPTIONS)
    assert (again.processed, again.skipped) == (2, 2), "the tampered shard's images are computed again"
    assert first not in shard_files(out) and sorted(shard_rows(out)) == outputs(4)


def test_a_shard_that_fails_on_a_full_disk_counts_none_of_its_images_saved_even_when_the_manifest_fails_too(
        tmp_path: Path, monkeypatch) -> None:
    """The shard and then each of its error lines refused by a full disk: the summary said 1 of its 3 images processed."""
    from backbone_inspect import shard_store, store

    def full(*args, **kwargs):
        raise OutputError("cannot write it: No space left on device")

    root, out = many_images(tmp_path / "in", 3), tmp_path / "out"
    monkeypatch.setattr(shard_store, "write_shard", full)
    monkeypatch.setattr(store.FolderStore, "record", full)
    result = invoke(root, *ARGS, "--save", out, "--format", "shards", "--shard-size", "3", "--batch-size", "1")
    assert result.exit_code == 1
    assert "processed 0, skipped 0, failed 3 in " in result.stderr and ", 0 B written" in result.stderr, result.stderr
    assert result.stderr.splitlines()[-1] == ("Error: cannot write it: No space left on device "
                                              "(3 image(s) in 1 shard(s) not saved: run again once it is fixed)")
    assert not shard_files(out) and not (out / "manifest.jsonl").read_text()


def test_shards_another_slice_made_before_an_overwrite_of_other_settings_are_refused_not_passed_over(tmp_path: Path) -> None:
    """Slice 0 redone with --overwrite and a smaller crop, slice 1 not yet: the reader listed slice 0's images alone,
    a dump cut short read as a smaller whole one (a slice's run removes only its own shards of other settings)."""
    root, out = many_images(tmp_path / "in", 4), tmp_path / "out"
    for slice_ in ("0/2", "1/2"):
        dump_features(root, out, format="shards", shard=slice_, **OPTIONS)
    dump_features(root, out, format="shards", shard="0/2", overwrite=True, **{**OPTIONS, "crop": 48})
    stale = [path for path in shard_files(out) if path.name.startswith("1of2-")]
    assert len(stale) == 1
    with pytest.raises(UsageError, match=rf"^{stale[0]} was made with other settings \(preprocessing\.crop 64 \(now 48\)\): the dump "
                                         r"is not finished, or was redone since; run its command again, then open_features again$"):
        open_features(out)
    with pytest.warns(UserWarning):
        dump_features(root, out, format="shards", shard="1/2", **{**OPTIONS, "crop": 48})
    stored = open_features(out)
    assert [image.output for image in stored.images] == outputs(4) and {image.input_size for image in stored.images} == {(48, 48)}


def test_a_shard_spoilt_after_the_dump_was_opened_is_an_error_naming_it(tmp_path: Path) -> None:
    """It was safetensors' own SafetensorError, naming no file."""
    root, out = many_images(tmp_path / "in", 2), tmp_path / "out"
    dump_features(root, out, format="shards", **OPTIONS)
    stored = open_features(out)
    (path,) = shard_files(out)
    path.write_bytes(b"\x10" + bytes(7) + b"{not json}     ")
    with pytest.raises(UsageError, match=rf"^{path} is not a whole shard \(.+\): run the dump again to replace it$"):
        stored[0]


@pytest.mark.parametrize(("before", "after"), [(["0/2", "1/2"], [None]), ([None], ["0/2", "1/2"]), (["0/2", "1/2"], ["0/3", "1/3", "2/3"])],
                         ids=["sliced, then whole", "whole, then sliced", "in two, then in three"])
def test_a_finished_overwrite_of_other_settings_and_slicing_leaves_no_shard_of_the_old_settings(tmp_path: Path, before, after) -> None:
    """Another slicing's shards of other settings were never removed (no run of their slicing came again): the reader
    refused the finished dump for good."""
    root, out = many_images(tmp_path / "in", 6), tmp_path / "out"
    for slice_ in before:
        dump_features(root, out, format="shards", shard=slice_, **OPTIONS)
    for slice_ in after:
        dump_features(root, out, format="shards", shard=slice_, overwrite=True, **{**OPTIONS, "crop": 48})
    assert {json.loads(read_metadata(path)["settings"])["preprocessing"]["crop"] for path in shard_files(out)} == {48}
    stored = open_features(out)
    assert [image.output for image in stored.images] == outputs(6) and {image.input_size for image in stored.images} == {(48, 48)}
    again = [dump_features(root, out, format="shards", shard=slice_, **{**OPTIONS, "crop": 48}) for slice_ in after]
    assert [(summary.processed, summary.skipped) for summary in again] == [(0, 6 // len(after))] * len(after)


def test_an_overwrite_removes_another_slicings_old_shards_once_none_of_its_inputs_waits_on_them(tmp_path: Path) -> None:
    """An image deleted between the runs kept its old slice's shard waiting for it for good: the finished
    dump was refused, and no run but one of the old slicing removed that shard."""
    root, out = many_images(tmp_path / "in", 6), tmp_path / "out"
    for slice_ in ("0/3", "1/3", "2/3"):
        dump_features(root, out, format="shards", shard=slice_, **OPTIONS)
    (root / "img005.png").unlink()
    dump_features(root, out, format="shards", overwrite=True, **{**OPTIONS, "crop": 48})
    assert {json.loads(read_metadata(path)["settings"])["preprocessing"]["crop"] for path in shard_files(out)} == {48}
    assert [image.output for image in open_features(out).images] == outputs(5)


def read_metadata(path: Path) -> dict:
    """A shard's metadata, read with plain safetensors."""
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


@pytest.mark.parametrize("reading", ["resume", "reader"])
def test_a_shard_removed_by_another_run_after_it_was_listed_is_passed_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                           reading: str) -> None:
    """A run of another slicing removes stale shards while this one reads the headers it listed: the
    vanished one is no error (a resume computes its images again; the reader lists the others)."""
    from backbone_inspect import shard_files as module

    root, out = many_images(tmp_path / "in", 3), tmp_path / "out"
    dump_features(root, out, format="shards", shard_size=1, **OPTIONS)
    victim = shard_files(out)[1]
    gone = [output for output, row in shard_rows(out).items() if row["shard"].endswith(victim.name)]
    real = module.read_shard_metadata

    def removed_meanwhile(path: Path) -> object:
        if path == victim:
            path.unlink()
        return real(path)

    monkeypatch.setattr(module, "read_shard_metadata", removed_meanwhile)
    if reading == "resume":
        again = dump_features(root, out, format="shards", shard_size=1, **OPTIONS)
        assert (again.processed, again.skipped, again.failed) == (1, 2, 0)
        assert sorted(shard_rows(out)) == outputs(3)
    else:
        assert [image.output for image in open_features(out).images] == [name for name in outputs(3) if name not in gone]
