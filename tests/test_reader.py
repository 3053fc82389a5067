"""open_features: a dump of either format, pooled or not, read back as the model's own features."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from backbone_inspect import dump_features
from backbone_inspect.errors import UsageError
from backbone_inspect.reader import open_features

from conftest import assert_close_scaled, many_images
from shard_helpers import OPTIONS, STAGES, outputs, reference, shard_rows

CHANNELS = {"layer1": 64, "layer4": 512}
SHAPES = {"layer1": [64, 16, 16], "layer4": [512, 2, 2]}


def dump(root: Path, out: Path, format: str, pool: str, **options) -> None:
    shards = {"shard_size": 2} if format == "shards" else {}
    summary = dump_features(root, out, format=format, pool=pool, **shards, **OPTIONS, **options)
    assert summary.failed == 0 and summary.processed > 0


def files_on_disk(out: Path, format: str) -> dict[str, dict]:
    """What the dump holds, read without the reader: plain safetensors, or torch.load of each .pt."""
    if format == "shards":
        return shard_rows(out)
    found = {}
    for path in sorted(out.rglob("*.pt")):
        saved = torch.load(path, weights_only=True)
        found[path.relative_to(out).as_posix()] = {"image": saved["meta"]["image"], "features": saved["features"],
                                                   "input_size": tuple(saved["meta"]["input_size"]), "meta": saved["meta"]}
    return found


@pytest.mark.parametrize("pool", ["none", "avg", "max"])
@pytest.mark.parametrize("format", ["pt", "shards"])
def test_a_dump_reads_back_as_torchvisions_own_features(tmp_path: Path, format: str, pool: str) -> None:
    root, out = many_images(tmp_path / "in", 3, size=(72, 72)), tmp_path / "out"
    dump(root, out, format, pool, batch_size=2)
    stored = open_features(out)
    assert (stored.format, stored.pool, stored.stages, len(stored)) == (format, pool, STAGES, 3)
    assert [image.output for image in stored.images] == outputs(3)
    on_disk = files_on_disk(out, format)
    assert sorted(on_disk) == outputs(3)
    for index, image in enumerate(stored.images):
        path = root / f"img{index:03d}.png"
        maps, meta = stored[index]
        assert meta == {"image": str(path), "output": image.output, "input_size": (64, 64)}
        assert on_disk[image.output]["image"] == str(path) and on_disk[image.output]["input_size"] == (64, 64)
        assert list(maps) == list(STAGES)
        for stage, expected in reference(path, pool=pool).items():
            assert list(maps[stage].shape) == ([CHANNELS[stage]] if pool != "none" else SHAPES[stage])
            assert_close_scaled(maps[stage], expected)
            assert torch.equal(on_disk[image.output]["features"][stage], maps[stage])
    if format == "pt":
        assert {row["meta"]["pool"] for row in on_disk.values()} == {pool}


@pytest.mark.parametrize("format", ["pt", "shards"])
def test_matrix_stacks_the_pooled_vectors_in_images_order(tmp_path: Path, format: str) -> None:
    root = many_images(tmp_path / "in", 5)
    dump(root, tmp_path / "max", format, "max", batch_size=3)
    stored = open_features(tmp_path / "max")
    on_disk = files_on_disk(tmp_path / "max", format)
    for stage in STAGES:
        matrix = stored.matrix(stage)
        assert list(matrix.shape) == [5, CHANNELS[stage]] and matrix.dtype == torch.float32
        assert torch.equal(matrix, torch.stack([stored[index][0][stage] for index in range(len(stored))]))
        assert torch.equal(matrix, torch.stack([on_disk[output]["features"][stage] for output in outputs(5)]))
        for row, image in enumerate(stored.images):
            assert_close_scaled(matrix[row], reference(image.image, pool="max")[stage])
    with pytest.raises(UsageError, match=r"matrix\('layer2'\): the dump has layer1, layer4"):
        stored.matrix("layer2")
    for alias in ("C5", "c5", 4, "4"):  # the names --layers takes
        assert torch.equal(stored.matrix(alias), stored.matrix("layer4"))


@pytest.mark.parametrize("format", ["pt", "shards"])
def test_matrix_of_full_maps_is_a_usage_error(tmp_path: Path, format: str) -> None:
    dump(many_images(tmp_path / "in", 2), tmp_path / "out", format, "none")
    stored = open_features(tmp_path / "out")
    with pytest.raises(UsageError, match=r"^matrix\('layer4'\) needs pooled features: dump with --pool avg or --pool max$"):
        stored.matrix("layer4")
    assert list(stored[1][0]["layer4"].shape) == SHAPES["layer4"]


def test_a_dataloader_with_workers_gives_the_rows_of_the_matrix(tmp_path: Path) -> None:
    root, out = many_images(tmp_path / "in", 5), tmp_path / "out"
    dump(root, out, "shards", "avg", batch_size=2)
    stored = open_features(out)
    matrices = {stage: stored.matrix(stage) for stage in STAGES}  # opens the shards in this process first
    assert len({image.file for image in stored.images}) == 3
    batches = list(DataLoader(stored, batch_size=2, num_workers=2))
    assert [len(meta["output"]) for _, meta in batches] == [2, 2, 1]
    assert [output for _, meta in batches for output in meta["output"]] == outputs(5)
    assert [image for _, meta in batches for image in meta["image"]] == [str(root / f"img{i:03d}.png") for i in range(5)]
    rows = shard_rows(out)
    for stage in STAGES:
        loaded = torch.cat([maps[stage] for maps, _ in batches])
        assert torch.equal(loaded, matrices[stage])
        assert torch.equal(loaded, torch.stack([rows[output]["features"][stage] for output in outputs(5)]))
        for index in range(5):
            assert_close_scaled(loaded[index], reference(root / f"img{index:03d}.png", pool="avg")[stage])


def test_the_reader_follows_the_shard_metadata_not_the_order_images_were_computed_in(tmp_path: Path) -> None:
    root, out = many_images(tmp_path / "in", 5), tmp_path / "out"
    dump_features([root / "img004.png", root / "img001.png"], out, format="shards", pool="avg", **OPTIONS)
    dump_features(root, out, format="shards", pool="avg", **OPTIONS)
    stored = open_features(out)
    assert [image.output for image in stored.images] == outputs(5)
    rows = shard_rows(out)
    assert len({row["shard"] for row in rows.values()}) == 2
    assert [(image.file, image.row) for image in stored.images] == [(rows[o]["shard"], rows[o]["row"]) for o in outputs(5)]
    assert [image.image for image in stored.images] == [rows[output]["image"] for output in outputs(5)]
    for row, image in enumerate(stored.images):
        assert_close_scaled(stored.matrix("layer4")[row], reference(image.image, pool="avg")["layer4"])


def test_a_folder_that_is_no_dump_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="is not a dump of backbone-inspect: cannot read"):
        open_features(tmp_path)


def test_the_slices_of_shard_k_of_n_read_back_as_one_dump(tmp_path: Path) -> None:
    root, out = many_images(tmp_path / "in", 5), tmp_path / "out"
    for index in range(2):
        dump_features(root, out, format="shards", pool="avg", shard=f"{index}/2", **OPTIONS)
    assert sorted(path.name for path in out.glob("manifest*.jsonl")) == ["manifest.shard-0-of-2.jsonl", "manifest.shard-1-of-2.jsonl"]
    rows = shard_rows(out)  # no image in both slices
    assert sorted(rows) == outputs(5) and {row["shard"].split("/")[1][:4] for row in rows.values()} == {"0of2", "1of2"}
    stored = open_features(out)
    assert [image.output for image in stored.images] == outputs(5)
    for row, image in enumerate(stored.images):
        assert image.file == rows[image.output]["shard"]
        assert_close_scaled(stored.matrix("layer1")[row], reference(image.image, pool="avg")["layer1"])


@pytest.mark.parametrize("folder", [None, 3])
def test_a_folder_that_is_no_path_is_a_usage_error_naming_it(folder: object) -> None:
    with pytest.raises(UsageError, match=rf"^open_features\({folder}\): expected the path of a dump's folder"):
        open_features(folder)


@pytest.mark.parametrize("format", ["pt", "shards"])
def test_images_are_taken_by_position_and_a_name_or_slice_is_a_type_error_saying_so(tmp_path: Path, format: str) -> None:
    root, out = many_images(tmp_path / "in", 3), tmp_path / "out"
    dump(root, out, format, "avg")
    stored, on_disk = open_features(out), files_on_disk(out, format)
    for index in (1, -1, torch.tensor(1)):
        features, meta = stored[index]
        expected = on_disk[meta["output"]]
        assert meta["output"] == stored.images[int(index)].output and expected["image"] == meta["image"]
        assert all(torch.equal(features[stage], expected["features"][stage]) for stage in STAGES)
    for index in (stored.images[0].output, slice(0, 2), 1.0):
        with pytest.raises(TypeError, match=r"^dump\[.*\]: expected an image's position, 0 to 2 \(dump.images\[i\].output is its name\)"):
            stored[index]


@pytest.mark.parametrize("format", ["pt", "shards"])
def test_a_file_name_that_is_not_utf8_reads_back_and_is_skipped_on_resume(tmp_path: Path, format: str) -> None:
    root, out = many_images(tmp_path / "in", 2, size=(72, 72)), tmp_path / "out"
    odd = root / os.fsdecode(b"bad\xff.png")  # a name Linux allows: bytes that are not UTF-8
    (root / "img001.png").rename(odd)
    dump(root, out, format, "none")
    stored = open_features(out)
    assert sorted(image.image for image in stored.images) == sorted([str(odd), str(root / "img000.png")])
    for index, image in enumerate(stored.images):
        for stage, expected in reference(image.image).items():
            assert_close_scaled(stored[index][0][stage], expected)
    again = dump_features(root, out, format=format, **({"shard_size": 2} if format == "shards" else {}), **OPTIONS)
    assert (again.processed, again.skipped) == (0, 2)
