"""--format shards: safetensors shards read back with plain safetensors, against torchvision's own features."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from backbone_inspect import dump_features
from backbone_inspect.reader import open_features

from conftest import assert_close_scaled, invoke, manifest, many_images, noise_image
from shard_helpers import STAGES, OPTIONS, ARGS, reference, shard_files, shard_rows, assert_like_reference, outputs


def test_each_ok_line_names_its_committed_shard_and_row_and_a_rerun_skips_all(tmp_path: Path) -> None:
    root, out = many_images(tmp_path / "in", 5), tmp_path / "out"
    result = invoke(root, "--save", out, "--format", "shards", "--shard-size", "2", *ARGS)
    assert result.exit_code == 0, result.output
    rows, lines = shard_rows(out), manifest(out)
    assert sorted(rows) == sorted(line["output"] for line in lines) == outputs(5)
    for line in lines:
        row = rows[line["output"]]
        assert line["status"] == "ok" and (out / line["shard"]).is_file()
        assert (line["shard"], line["row"], line["image"]) == (row["shard"], row["row"], row["image"])
        assert line["shapes"] == {"layer1": [64, 16, 16], "layer4": [512, 2, 2]}, "the full maps' shapes"
    assert_like_reference(rows)
    before = {path: path.stat().st_mtime_ns for path in shard_files(out)}
    again = invoke(root, "--save", out, "--format", "shards", "--shard-size", "2", *ARGS)
    assert again.exit_code == 0 and "processed 0, skipped 5, failed 0" in again.stderr
    assert {line["output"]: line["status"] for line in manifest(out)[5:]} == dict.fromkeys(outputs(5), "skipped")
    assert {path: path.stat().st_mtime_ns for path in shard_files(out)} == before
    assert not list(out.rglob("*.tmp"))


@pytest.mark.parametrize("batch_size", [1, 3, 32])
def test_shard_size_cuts_files_of_that_many_rows_whatever_the_batches(tmp_path: Path, batch_size: int) -> None:
    out = tmp_path / "out"
    summary = dump_features(many_images(tmp_path / "in", 5), out, format="shards", shard_size=2, **OPTIONS,
                            batch_size=batch_size)
    tensors = [load_file(path) for path in shard_files(out)]
    assert summary.processed == 5 and summary.bytes_written == sum(t.nbytes for shard in tensors for t in shard.values())
    assert [path.name.split("-")[0] for path in shard_files(out)] == ["all"] * 3
    assert [[list(t.shape) for t in shard.values()] for shard in tensors] == [
        [[2, 64, 16, 16], [2, 512, 2, 2]], [[2, 64, 16, 16], [2, 512, 2, 2]], [[1, 64, 16, 16], [1, 512, 2, 2]]]
    assert sorted(shard_rows(out)) == outputs(5)


def test_resume_computes_only_the_rest_and_no_image_is_in_two_shards(tmp_path: Path) -> None:
    root, out = many_images(tmp_path / "in", 5), tmp_path / "out"
    first = dump_features([root / "img001.png", root / "img003.png"], out, format="shards", **OPTIONS)
    assert (first.processed, first.skipped) == (2, 0)
    before = {path: path.stat().st_mtime_ns for path in shard_files(out)}
    rest = dump_features(root, out, format="shards", **OPTIONS)
    assert (rest.processed, rest.skipped, rest.failed) == (3, 2, 0)
    rows = shard_rows(out)
    assert sorted(rows) == outputs(5)
    assert {path: path.stat().st_mtime_ns for path in shard_files(out) if path in before} == before
    assert {output for output, row in rows.items() if out / row["shard"] not in before} == {"img000.pt", "img002.pt", "img004.pt"}
    assert {line["output"]: line["status"] for line in manifest(out)[2:]} == {
        "img000.pt": "ok", "img001.pt": "skipped", "img002.pt": "ok", "img003.pt": "skipped", "img004.pt": "ok"}
    assert_like_reference(rows)


def test_a_deleted_shard_is_computed_again_and_only_it(tmp_path: Path) -> None:
    root, out = many_images(tmp_path / "in", 5), tmp_path / "out"
    dump_features(root, out, format="shards", shard_size=2, **OPTIONS)
    lost = shard_files(out)[0]
    held = set(json.loads(safe_open(str(lost), framework="pt").metadata()["outputs"]))
    lost.unlink()
    again = dump_features(root, out, format="shards", shard_size=2, **OPTIONS)
    assert (again.processed, again.skipped) == (2, 3)
    assert {line["output"] for line in manifest(out)[5:] if line["status"] == "ok"} == held
    rows = shard_rows(out)
    assert sorted(rows) == outputs(5)
    assert_like_reference({output: rows[output] for output in held})


@pytest.mark.parametrize("pool", ["none", "avg"])
def test_images_of_other_sizes_are_stored_one_tensor_each_unless_pooled(tmp_path: Path, pool: str) -> None:
    root, out = tmp_path / "in", tmp_path / "out"
    sizes = [(64, 48), (48, 64), (64, 48), (80, 80)]  # (W, H)
    for index, size in enumerate(sizes):
        noise_image(root / f"img{index:03d}.png", size, seed=index)
    dump_features(root, out, format="shards", pool=pool, **{**OPTIONS, "resize": "none", "crop": "none"}, batch_size=4)
    [path] = shard_files(out)
    tensors = load_file(path)
    if pool == "none":
        assert set(tensors) == {f"{stage}.{row}" for stage in STAGES for row in range(4)}
    else:
        assert {name: list(value.shape) for name, value in tensors.items()} == {"layer1": [4, 64], "layer4": [4, 512]}
    rows = shard_rows(out)
    assert {output: row["input_size"] for output, row in rows.items()} == {
        f"img{index:03d}.pt": (height, width) for index, (width, height) in enumerate(sizes)}
    assert_like_reference(rows, pool=pool, native=True)
    stored = open_features(out)
    for index, (width, height) in enumerate(sizes):
        maps, meta = stored[index]
        assert meta["input_size"] == (height, width) and meta["output"] == f"img{index:03d}.pt"
        for stage, tensor in reference(root / f"img{index:03d}.png", pool=pool, native=True).items():
            assert_close_scaled(maps[stage], tensor)
    if pool == "none":
        assert list(stored[3][0]["layer1"].shape) == [64, 20, 20]


def test_a_corrupt_image_is_an_error_line_and_the_others_are_in_shards(tmp_path: Path) -> None:
    root, out = many_images(tmp_path / "in", 4), tmp_path / "out"
    (root / "img002.png").write_bytes(b"not a png at all")
    result = invoke(root, "--save", out, "--format", "shards", "--shard-size", "2", "--pool", "avg", *ARGS)
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and str(root / "img002.png") in errors[0]
    lines = {line["output"]: line for line in manifest(out)}
    assert lines["img002.pt"]["status"] == "error" and "shard" not in lines["img002.pt"]
    rows = shard_rows(out)
    assert sorted(rows) == sorted(o for o, line in lines.items() if line["status"] == "ok") == ["img000.pt", "img001.pt", "img003.pt"]
    assert_like_reference(rows, pool="avg")
    stored = open_features(out)
    assert [image.output for image in stored.images] == ["img000.pt", "img001.pt", "img003.pt"]
    assert_close_scaled(stored.matrix("layer4")[2], reference(root / "img003.png", pool="avg")["layer4"])


def test_dry_run_estimates_each_format_and_pooling_and_the_shards_estimate_holds(tmp_path: Path) -> None:
    root = many_images(tmp_path / "in", 4)
    kinds = {"pt": [], "shards": ["--format", "shards"], "pooled": ["--format", "shards", "--pool", "avg"]}
    plans = {}
    for name, args in kinds.items():
        dry = invoke(root, "--save", tmp_path / name, "--dry-run", "--json", *args, *ARGS)
        assert dry.exit_code == 0, dry.output
        plans[name] = json.loads(dry.stdout)
        assert not (tmp_path / name).exists(), "a dry run writes nothing"
    assert [(plan["format"], plan["pool"], plan["to_do"]) for plan in plans.values()] == [
        ("pt", "none", 4), ("shards", "none", 4), ("shards", "avg", 4)]
    assert plans["pooled"]["estimated_bytes"] * 20 < plans["shards"]["estimated_bytes"] < plans["pt"]["estimated_bytes"]
    for name in ("shards", "pooled"):
        assert invoke(root, "--save", tmp_path / name, *kinds[name], *ARGS).exit_code == 0
        written = sum(path.stat().st_size for path in shard_files(tmp_path / name))
        assert plans[name]["estimated_bytes"] == pytest.approx(written, rel=0.1), name


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--save", "{out}", "--format", "nope"], "--format nope: expected one of pt, shards"),
        (["--save", "{out}", "--pool", "nope"], "--pool nope: expected one of none, avg, max"),
        (["--save", "{out}", "--format", "shards", "--shard-size", "0"],
         "--shard-size '0': expected auto or a number of images per shard, 1..16384"),
        (["--save", "{out}", "--shard-size", "4"], "--shard-size needs --format shards"),
        (["--format", "shards"], "--format needs --save DIR"),
        (["--pool", "avg"], "--pool needs --save DIR"),
        (["--shard-size", "4"], "--shard-size needs --save DIR"),
        (["--save-dtype", "float16"], "--save-dtype needs --save DIR"),
        (["--overwrite"], "--overwrite needs --save DIR"),
        (["--viz-channels", "4"], "--viz-channels needs --viz DIR"),
        (["--categories", "{out}"], "--categories needs --topk K"),
        (["--save", "{out}", "--viz", "{viz}", "--pool", "max"],
         "--viz draws the full feature maps: leave out --pool, or draw a few images in a run of their own"),
    ],
    ids=["format", "pool", "shard-size 0", "shard-size with pt", "format without save", "pool without save",
         "shard-size without save", "save-dtype without save", "overwrite without save", "viz-channels without viz",
         "categories without topk", "viz with pool"],
)
def test_usage_errors_are_one_line_and_exit_2_before_any_work(tmp_path: Path, options: list[str], message: str) -> None:
    root = many_images(tmp_path / "in", 1)
    out, viz = tmp_path / "out", tmp_path / "viz"
    result = invoke(root, *[option.format(out=out, viz=viz) for option in options], *ARGS)
    assert result.exit_code == 2
    assert result.stderr == f"Error: {message}\n" and result.stdout == ""
    assert not out.exists() and not viz.exists()


@pytest.mark.parametrize(("made", "asked"), [("pt", "shards"), ("shards", "pt")])
def test_a_folder_of_one_format_refuses_the_other_even_with_overwrite(tmp_path: Path, made: str, asked: str) -> None:
    root, out = many_images(tmp_path / "in", 2), tmp_path / "out"
    assert invoke(root, "--save", out, "--format", made, *ARGS).exit_code == 0
    files_before = sorted(path.relative_to(out) for path in out.rglob("*"))
    lines_before = (out / "manifest.jsonl").read_text()
    for overwrite in ([], ["--overwrite"]):  # replacing would leave the old format's files: each image twice
        refused = invoke(root, "--save", out, "--format", asked, *overwrite, *ARGS)
        assert refused.exit_code == 2
        assert refused.stderr == (f"Error: {out} holds --format {made} features (now --format {asked}), which even "
                                  "--overwrite does not mix: give this format another --save folder, or empty this one first\n")
        assert sorted(path.relative_to(out) for path in out.rglob("*")) == files_before
        assert (out / "manifest.jsonl").read_text() == lines_before
    other = tmp_path / "other"
    assert invoke(root, "--save", other, "--format", asked, *ARGS).exit_code == 0
    stored = open_features(other)
    assert stored.format == asked and [image.output for image in stored.images] == outputs(2)
    for index in range(2):
        assert_close_scaled(stored[index][0]["layer4"], reference(root / f"img{index:03d}.png")["layer4"])


def test_overwriting_some_images_keeps_the_others_of_their_shards(tmp_path: Path) -> None:
    root, out = many_images(tmp_path / "in", 4), tmp_path / "out"
    dump_features(root, out, format="shards", shard_size=2, **OPTIONS)
    again = dump_features([root / "img000.png"], out, format="shards", shard_size=2, overwrite=True, **OPTIONS)
    assert again.processed == 1
    rows = shard_rows(out)
    assert sorted(rows) == outputs(4), "img001.pt shared img000.pt's shard: it must not be lost with it"
    latest = {line["output"]: line for line in manifest(out) if line["status"] == "ok"}
    assert {output: (line["shard"], line["row"]) for output, line in latest.items()} == {
        output: (row["shard"], row["row"]) for output, row in rows.items()}
    assert [image.output for image in open_features(out).images] == outputs(4)


def test_the_run_s_seconds_include_committing_its_last_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The images/s a run reports is for images on the disk: the commits still under way when the
    model's last batch is done (the last shard, and those the background committers hold) count."""
    import time

    from backbone_inspect import shard_store

    commit_seconds, write_shard = 1.5, shard_store.write_shard

    def slow_write(*args, **kwargs):
        time.sleep(commit_seconds)
        return write_shard(*args, **kwargs)

    monkeypatch.setattr(shard_store, "write_shard", slow_write)
    started = time.perf_counter()
    summary = dump_features(many_images(tmp_path / "in", 3), tmp_path / "out", format="shards", shard_size=8, **OPTIONS)
    assert summary.processed == 3 and len(shard_files(tmp_path / "out")) == 1
    assert commit_seconds <= summary.seconds <= time.perf_counter() - started


def test_the_error_of_a_full_disk_counts_every_shard_that_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shards still being committed when the first fails fail too: the run's last word counts them all."""
    import time

    from backbone_inspect import shard_store
    from backbone_inspect.errors import OutputError

    def slow_full_disk(folder, filling, *args, **kwargs):
        time.sleep(0.3)
        raise OutputError(f"cannot write {filling.name}: No space left on device")

    monkeypatch.setattr(shard_store, "write_shard", slow_full_disk)
    with pytest.raises(OutputError) as raised:
        dump_features(many_images(tmp_path / "in", 8), tmp_path / "out", format="shards", shard_size=2, **{**OPTIONS, "batch_size": 8})
    failed = [line for line in manifest(tmp_path / "out") if line["status"] == "error"]
    shards = {line["error"] for line in failed}
    assert raised.value.summary.failed == len(failed) and len(shards) >= 2, "a second shard was in flight"
    assert str(raised.value).endswith(f"({len(failed)} image(s) in {len(shards)} shard(s) not saved: run again once it is fixed)")


def test_long_names_end_a_shard_before_its_header_passes_what_safetensors_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pooled shards hold up to 16,384 images, and non-ASCII paths cost 7 header bytes a character: the
    header, not the features, must end such a shard, or the reader (and a resume) calls it not whole."""
    from backbone_inspect import shard_files as files

    root = tmp_path / "in"
    for index in range(6):
        noise_image(root / ("中" * 40) / f"{'文' * 40}{index}.png", (40, 40), seed=index)
    monkeypatch.setattr(files, "MAX_HEADER_BYTES", 6000)  # about two images' paths, as 100 MB is 16,384 long ones
    monkeypatch.setattr(files, "HEADER_BUDGET_BYTES", 3000)
    first = dump_features(root, tmp_path / "out", format="shards", pool="avg", **OPTIONS)
    sizes = [int.from_bytes(path.read_bytes()[:8], "little") for path in shard_files(tmp_path / "out")]
    assert first.processed == 6 and len(sizes) > 1 and max(sizes) <= files.MAX_HEADER_BYTES, sizes
    dump = open_features(tmp_path / "out")
    assert len(dump) == 6
    for index, image in enumerate(dump.images):
        assert_close_scaled(dump[index][0]["layer4"].float(), reference(image.image, pool="avg")["layer4"])
    again = dump_features(root, tmp_path / "out", format="shards", pool="avg", **OPTIONS)
    assert (again.processed, again.skipped) == (0, 6), "every shard is whole: the resume keeps them all"
