from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import SMALL, assert_close_scaled, features, invoke, manifest, noise_image

def test_folders_mirror_their_layout_and_the_manifest_lists_each_image(tmp_path: Path, photos: Path) -> None:
    out = tmp_path / "out"
    result = invoke(photos, "--save", out, "--layers", "1,4", *SMALL)
    assert result.exit_code == 0, result.output
    saved = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.pt"))
    assert saved == ["a/cat.pt", "b/cat.pt", "b/deep/dog.pt", "top.pt"]
    lines = manifest(out)
    assert [line["image"] for line in lines] == [
        str(photos / "a" / "cat.jpg"),
        str(photos / "b" / "cat.PNG"),
        str(photos / "b" / "deep" / "dog.webp"),
        str(photos / "top.png"),
    ]
    for line in lines:
        assert line["status"] == "ok"
        tensors = features(out / line["output"])
        assert line["shapes"] == {name: list(t.shape) for name, t in tensors.items()}
        assert line["shapes"] == {"layer1": [64, 16, 16], "layer4": [512, 2, 2]}


def test_from_list_reads_paths_skipping_blanks_and_comments(tmp_path: Path, photos: Path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text(f"# my images\n\n{photos / 'top.png'}\n   \n{photos / 'b'}\n")
    out = tmp_path / "out"
    result = invoke("--from-list", listing, "--save", out, *SMALL)
    assert result.exit_code == 0, result.output
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.pt")) == ["cat.pt", "deep/dog.pt", "top.pt"]
    listing.write_text(listing.read_text() + "# gone since\nmissing.jpg\n")  # the third path, on the seventh line
    missing = invoke("--from-list", listing, "--save", out, *SMALL)
    assert (missing.exit_code, missing.stderr) == (2, f"Error: missing.jpg: no such file or directory (line 7 of --from-list {listing})\n")


def test_colliding_outputs_and_empty_inputs_exit_2_before_any_work(tmp_path: Path, photos: Path) -> None:
    out = tmp_path / "out"
    clash = invoke(photos / "a", photos / "b", "--save", out, *SMALL)
    assert clash.exit_code == 2
    assert clash.stderr == (
        f"Error: inputs would overwrite each other's output: {photos / 'a' / 'cat.jpg'}, {photos / 'b' / 'cat.PNG'} -> cat.pt\n"
    )
    assert not out.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    none_found = invoke(empty, "--save", out, *SMALL)
    assert none_found.exit_code == 2 and none_found.stderr == f"Error: no images found in {empty}\n"


def test_resume_skips_finished_images_and_overwrite_recomputes(tmp_path: Path, photos: Path) -> None:
    out = tmp_path / "out"
    assert invoke(photos, "--save", out, *SMALL).exit_code == 0
    (out / "b" / "cat.pt").unlink()
    before = (out / "top.pt").stat().st_mtime_ns
    again = invoke(photos, "--save", out, *SMALL)
    assert again.exit_code == 0
    assert "processed 1, skipped 3, failed 0" in again.stderr
    second_run = manifest(out)[4:]
    assert {(line["output"], line["status"]) for line in second_run} == {
        ("a/cat.pt", "skipped"), ("b/deep/dog.pt", "skipped"), ("top.pt", "skipped"), ("b/cat.pt", "ok")
    }
    assert (out / "top.pt").stat().st_mtime_ns == before
    forced = invoke(photos, "--save", out, "--overwrite", *SMALL)
    assert forced.exit_code == 0 and "processed 4, skipped 0" in forced.stderr
    assert (out / "top.pt").stat().st_mtime_ns != before


@pytest.mark.parametrize(
    ("change", "difference"),
    [
        (["--arch", "resnet34"], 'arch "resnet18" (now "resnet34")'),
        (["--layers", "2"], 'layers ["layer2", "layer3", "layer4"] (now ["layer2"])'),
        (["--crop", "48"], "preprocessing"),
        (["--save-dtype", "float16"], 'save_dtype "float32" (now "float16")'),
        (["--seed", "3"], "seed 0 (now 3)"),
    ],
)
def test_resuming_with_other_settings_exits_2_naming_the_difference(tmp_path: Path, photos: Path, change, difference) -> None:
    out = tmp_path / "out"
    assert invoke(photos / "a", "--save", out, *SMALL).exit_code == 0
    lines_before = (out / "manifest.jsonl").read_text()
    args = dict(zip(SMALL[::2], SMALL[1::2])) | dict(zip(change[::2], change[1::2]))
    flat = [item for pair in args.items() for item in pair]
    result = invoke(photos, "--save", out, *flat)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"Error: {out} holds features made with other settings: ")
    assert difference in result.stderr and "--overwrite" in result.stderr
    assert (out / "manifest.jsonl").read_text() == lines_before
    assert invoke(photos, "--save", out, "--overwrite", *flat).exit_code == 0


def test_bad_images_are_recorded_and_the_rest_saved(tmp_path: Path, photos: Path) -> None:
    (photos / "empty.jpg").write_bytes(b"")
    (photos / "text.png").write_text("not an image")
    good = (photos / "top.png").read_bytes()
    (photos / "truncated.png").write_bytes(good[: len(good) // 2])
    Image.new("L", (9500, 9500)).save(photos / "bomb.png")  # just over Pillow's 89.5 Mpixel limit
    assert (photos / "bomb.png").stat().st_size < 1_000_000
    out = tmp_path / "out"
    result = invoke(photos, "--save", out, "--batch-size", "3", "--workers", "1", *SMALL)
    assert result.exit_code == 1
    statuses = {Path(line["image"]).name: line for line in manifest(out)}
    assert {name for name, line in statuses.items() if line["status"] == "error"} == {
        "empty.jpg", "text.png", "truncated.png", "bomb.png"
    }
    assert "too large" in statuses["bomb.png"]["error"] and "empty file" in statuses["empty.jpg"]["error"]
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 4 and all(str(photos) in line for line in errors)
    assert sorted(p.name for p in out.rglob("*.pt")) == ["cat.pt", "cat.pt", "dog.pt", "top.pt"]


def test_unwritable_output_folder_is_one_error(tmp_path: Path, photos: Path) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    result = invoke(photos, "--save", blocker / "out", *SMALL)
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: cannot write to output folder {blocker / 'out'}: ")
    assert len(result.stderr.splitlines()) == 1


def test_mixed_sizes_with_native_resolution_batch_without_changing_numbers(tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    for index, size in enumerate([(64, 48), (48, 64), (64, 48), (80, 80), (64, 48), (48, 64)]):
        noise_image(root / f"img{index}.png", size, seed=index)
    batched, single = tmp_path / "batched", tmp_path / "single"
    native = ["--arch", "resnet18", "--resize", "none", "--crop", "none", "--layers", "1,3", "--device", "cpu"]
    assert invoke(root, "--save", batched, "--batch-size", "6", "--workers", "1", *native).exit_code == 0
    assert invoke(root, "--save", single, "--batch-size", "1", "--workers", "0", *native).exit_code == 0
    for path in sorted(single.glob("*.pt")):
        one, many = features(path), features(batched / path.name)
        for name in one:
            assert_close_scaled(many[name], one[name])
    assert list(features(batched / "img3.pt")["layer1"].shape) == [64, 20, 20]


def test_save_dtype_halves_the_files_and_sizes_match_the_tensors(tmp_path: Path, photos: Path) -> None:
    sizes = {}
    for dtype in ("float32", "float16", "bfloat16"):
        out = tmp_path / dtype
        assert invoke(photos / "a", "--save", out, "--save-dtype", dtype, *SMALL).exit_code == 0
        tensors = features(out / "cat.pt")
        assert all(t.dtype == getattr(torch, dtype) for t in tensors.values())
        own_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        sizes[dtype] = (out / "cat.pt").stat().st_size
        assert own_bytes < sizes[dtype] < own_bytes + 4096
    assert sizes["float16"] == pytest.approx(sizes["float32"] / 2, rel=0.05)
    reference = features(tmp_path / "float32" / "cat.pt")["layer4"]
    torch.testing.assert_close(features(tmp_path / "float16" / "cat.pt")["layer4"].float(), reference, rtol=2e-3, atol=2e-3)


def test_dry_run_counts_and_estimates_without_running(tmp_path: Path, photos: Path) -> None:
    out = tmp_path / "out"
    assert invoke(photos, "--save", out, *SMALL).exit_code == 0
    for output in ("b/cat.pt", "b/deep/dog.pt", "top.pt"):
        (out / output).unlink()
    dry = invoke(photos, "--save", out, "--dry-run", "--json", *SMALL)
    assert dry.exit_code == 0
    plan = json.loads(dry.stdout)
    assert plan["to_do"] == 3 and plan["to_skip"] == 1
    assert len(manifest(out)) == 4, "a dry run writes nothing"
    assert invoke(photos, "--save", out, *SMALL).exit_code == 0
    written = sum((out / line["output"]).stat().st_size for line in manifest(out)[4:] if line["status"] == "ok")
    assert plan["estimated_bytes"] == pytest.approx(written, rel=0.05)


@pytest.mark.parametrize("save", [True, False])
def test_the_summary_line_counts_the_bytes_written_only_when_saving(tmp_path: Path, photos: Path, save: bool) -> None:
    out = tmp_path / "out"
    result = invoke(photos, *(["--save", out] if save else ["--summary"]), *SMALL)
    assert result.exit_code == 0
    line = result.stderr.splitlines()[-1]
    assert line.startswith("processed 4, skipped 0, failed 0 in ")
    if save:
        files = sum(path.stat().st_size for path in out.rglob("*.pt"))
        assert line.endswith(f"images/s), {files / 1000:.1f} KB written") or line.endswith(f"images/s), {files / 1e6:.1f} MB written")
    else:
        assert line.endswith("images/s)"), line


def test_many_images_print_one_summary_per_stage_pooled_over_all(tmp_path: Path, photos: Path) -> None:
    out = tmp_path / "out"
    result = invoke(photos, "--save", out, "--layers", "2", *SMALL)
    assert result.exit_code == 0
    assert result.stdout.count("layer2") == 1 and "4 images" in result.stdout
    row = next(line for line in result.stdout.splitlines() if line.startswith("│ layer2"))
    cells = [cell.strip() for cell in row.split("│")[1:-1]]
    pooled = torch.cat([features(p)["layer2"].flatten() for p in out.rglob("*.pt")])
    assert cells[1] == "4" and cells[2] == "128×8×8"
    assert float(cells[3]) == pytest.approx(pooled.mean().item(), rel=1e-3)
    assert float(cells[4]) == pytest.approx(pooled.std().item(), rel=1e-3)
    assert float(cells[6]) == pytest.approx(pooled.max().item(), rel=1e-3)
    assert cells[7] == f"{(pooled == 0).float().mean().item():.1%}"
    json_run = invoke(photos, "--json", *SMALL)
    assert [json.loads(line)["image"] for line in json_run.stdout.splitlines()] == [
        line["image"] for line in manifest(out)
    ]


def test_shards_are_disjoint_and_cover_every_image(tmp_path: Path, photos: Path) -> None:
    out = tmp_path / "out"
    for index in range(3):
        result = invoke(photos, "--save", out, "--shard", f"{index}/3", *SMALL)
        assert result.exit_code == 0, result.output
    per_shard = [
        {line["output"] for line in manifest(out, f"manifest.shard-{i}-of-3.jsonl")} for i in range(3)
    ]
    assert sum(len(s) for s in per_shard) == 4 and set().union(*per_shard) == {
        "a/cat.pt", "b/cat.pt", "b/deep/dog.pt", "top.pt"
    }
    assert not (out / "manifest.jsonl").exists()
    for text in ("3/3", "1", "a/b", "-1/2"):
        bad = invoke(photos, "--shard", text, *SMALL)
        assert bad.exit_code == 2 and bad.stderr.startswith(f"Error: invalid --shard '{text}'")


def test_partial_overwrite_and_broken_files_are_recomputed_on_resume(tmp_path: Path, photos: Path) -> None:
    out = tmp_path / "out"
    assert invoke(photos, "--save", out, *SMALL).exit_code == 0
    # An --overwrite with crop 48 over part of the folder (b/) leaves crop-64 files elsewhere,
    # while the folder's settings now say crop 48...
    args = ["--arch", "resnet18", "--resize", "64", "--device", "cpu"]
    assert invoke(photos / "b", "--save", out / "b", "--crop", "48", "--overwrite", *args).exit_code == 0
    (out / "backbone-inspect.json").write_text((out / "b" / "backbone-inspect.json").read_text())
    (out / "top.pt").write_bytes(b"x")  # ...and a broken file stands under a final name.
    result = invoke(photos, "--save", out, "--crop", "48", *args)
    assert result.exit_code == 0, result.output
    assert "Warning: 2 existing feature file(s) are unreadable or were made with other settings" in result.stderr
    assert "processed 2, skipped 2" in result.stderr
    assert {line["output"]: line["status"] for line in manifest(out)[-4:]} == {
        "a/cat.pt": "ok", "top.pt": "ok", "b/cat.pt": "skipped", "b/deep/dog.pt": "skipped"
    }
    for path in out.rglob("*.pt"):
        assert torch.load(path, weights_only=True)["meta"]["preprocessing"]["crop"] == 48, path
    again = invoke(photos, "--save", out, "--crop", "48", *args)
    assert "processed 0, skipped 4" in again.stderr and "Warning" not in again.stderr


def test_settings_errors_name_the_nested_key_and_the_compute_dtype(tmp_path: Path, photos: Path) -> None:
    out = tmp_path / "out"
    assert invoke(photos / "a", "--save", out, *SMALL).exit_code == 0
    crop = invoke(photos / "a", "--save", out, "--arch", "resnet18", "--resize", "64", "--crop", "48")
    assert crop.exit_code == 2 and "preprocessing.crop 64 (now 48)" in crop.stderr and "resize" not in crop.stderr
    dtype = invoke(photos / "a", "--save", out, "--dtype", "bfloat16", *SMALL)
    assert dtype.exit_code == 2 and 'dtype "float32" (now "bfloat16")' in dtype.stderr


def test_crop_larger_than_resize_is_refused_before_any_work(tmp_path: Path, photos: Path) -> None:
    result = invoke(photos, "--save", tmp_path / "out", "--arch", "resnet18", "--resize", "32", "--crop", "64")
    assert result.exit_code == 2
    assert result.stderr == "Error: --crop 64 is larger than --resize 32: every image would be smaller than its crop\n"
    assert not (tmp_path / "out").exists()


def test_a_file_in_the_way_of_an_output_folder(tmp_path: Path, photos: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "b").write_text("in the way")
    result = invoke(photos, "--save", out, "--batch-size", "1", "--workers", "1", *SMALL)
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert errors and all(f"{out / 'b'} is a file, not a folder" in line for line in errors)
    written = {p.relative_to(out).as_posix() for p in out.rglob("*.pt")}
    recorded = {line["output"]: line["status"] for line in manifest(out)}
    assert {o for o, status in recorded.items() if status == "ok"} == written
    assert all(status == "error" for o, status in recorded.items() if o.startswith("b/"))


def test_dry_run_counts_unreadable_images_quietly(tmp_path: Path, photos: Path) -> None:
    Image.new("L", (9500, 9500)).save(photos / "bomb.png")
    (photos / "empty.jpg").write_bytes(b"")
    result = invoke(photos, "--save", tmp_path / "out", "--dry-run", "--json", "--arch", "resnet18", "--resize", "none", "--crop", "none")
    assert result.exit_code == 0 and result.stderr == ""
    plan = json.loads(result.stdout)
    assert plan["to_do"] == 6 and plan["unreadable"] == 2


@pytest.mark.parametrize("save", [True, False])
def test_a_dry_run_says_what_it_would_save_or_that_nothing_is_saved(tmp_path: Path, photos: Path, save: bool) -> None:
    out = tmp_path / "out"
    result = invoke(photos, *(("--save", out) if save else ()), "--dry-run", *SMALL)
    assert result.exit_code == 0 and not out.exists()
    told = result.stdout.replace("\n", " ")
    start = "dry run: 4 images to do (0 of them unreadable from their header, so they will fail), "
    if save:
        assert told.startswith(start + f"0 to skip (already in {out}); about ")
        assert told.rstrip().endswith("to write as float32 (pt)")
    else:
        assert told.rstrip() == start + "no features to save (no --save DIR)"
