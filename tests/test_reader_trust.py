"""open_features on a pt dump that is unfinished, stale or tampered with: what it lists and reads
follows the files and the manifest's last word for each image, and what it cannot trust is a
``UsageError`` naming the file, never features of other settings or a file outside the dump."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms._presets import ImageClassification

from backbone_inspect import dump_features
from backbone_inspect.errors import UsageError
from backbone_inspect.reader import open_features

from conftest import SMALL, assert_close_scaled, invoke, manifest, many_images
from shard_helpers import OPTIONS, reference_model


def test_files_an_interrupted_overwrite_left_from_other_settings_are_refused_not_mixed_in(tmp_path: Path) -> None:
    root, out = many_images(tmp_path / "in", 3), tmp_path / "out"
    dump_features(root, out, pool="avg", **OPTIONS)
    # --overwrite with a smaller crop, cut short after the first image: the others still hold crop 64.
    dump_features(root / "img000.png", out, pool="avg", overwrite=True, **{**OPTIONS, "crop": 48})
    stored = open_features(out)
    assert [image.output for image in stored.images] == ["img000.pt", "img001.pt", "img002.pt"]
    features, meta = stored[0]
    assert meta["input_size"] == (48, 48)
    with torch.no_grad():  # torchvision's preset with the new crop, its feature extractor, the mean over H×W
        x = ImageClassification(crop_size=48, resize_size=64)(Image.open(root / "img000.png").convert("RGB"))
        expected = reference_model()(x.unsqueeze(0))["layer4"][0].mean(dim=(-2, -1))
    assert_close_scaled(features["layer4"], expected)
    for read in (lambda: stored[1], lambda: stored.matrix("layer4")):
        with pytest.raises(UsageError, match=r"img001\.pt was made with other settings \(preprocessing\.crop 64 \(now 48\)\): "
                                             r"the dump is not finished, or was redone since it was opened; run its command again, then open_features again$"):
            read()
    with pytest.warns(UserWarning, match=r"^2 existing feature file\(s\) are unreadable or were made with other settings"):
        dump_features(root, out, pool="avg", **{**OPTIONS, "crop": 48})  # finished: every file now of crop 48
    assert open_features(out).matrix("layer4").shape == (3, 512)


def test_an_image_that_fails_when_computed_again_leaves_no_stale_file_behind(tmp_path: Path) -> None:
    root, out = many_images(tmp_path / "in", 2), tmp_path / "out"
    assert invoke(root, *SMALL, "--workers", "0", "--save", out).exit_code == 0
    (root / "img001.png").write_bytes(b"not an image any more")
    again = invoke(root, *SMALL, "--workers", "0", "--save", out, "--overwrite")
    assert again.exit_code == 1 and "img001.png" in again.stderr
    assert not (out / "img001.pt").exists()
    assert [image.output for image in open_features(out).images] == ["img000.pt"]
    assert manifest(out)[-1]["status"] == "error"
    third = invoke(root, *SMALL, "--workers", "0", "--save", out)  # not skipped: tried again, and fails again
    assert third.exit_code == 1 and "processed 0, skipped 1, failed 1" in third.stderr


def test_a_later_error_line_takes_an_image_back_even_where_its_file_remains(tmp_path: Path) -> None:
    root, out = many_images(tmp_path / "in", 2), tmp_path / "out"
    dump_features(root, out, **OPTIONS)
    with (out / "manifest.jsonl").open("a", encoding="utf-8") as lines:
        lines.write(json.dumps({"image": str(root / "img000.png"), "output": "img000.pt", "status": "error", "error": "x"}) + "\n")
    assert [image.output for image in open_features(out).images] == ["img001.pt"]


@pytest.mark.parametrize("output", ["/tmp/elsewhere.pt", "../elsewhere.pt", "sub/../../elsewhere.pt", "./img000.pt", "img000.pt/"])
def test_a_manifest_naming_a_file_outside_the_dump_is_refused(tmp_path: Path, output: str) -> None:
    root, out = many_images(tmp_path / "in", 2), tmp_path / "out"
    dump_features(root, out, **OPTIONS)
    (tmp_path / "elsewhere.pt").write_bytes((out / "img000.pt").read_bytes())
    with (out / "manifest.jsonl").open("a", encoding="utf-8") as lines:
        lines.write(json.dumps({"image": "x.png", "output": output, "status": "ok"}) + "\n")
    with pytest.raises(UsageError, match=rf"manifest\.jsonl line 3: output {json.dumps(output)} is not a file inside "):
        open_features(out)


def test_feature_files_without_their_manifest_are_an_error_not_an_empty_dump(tmp_path: Path) -> None:
    root, out = many_images(tmp_path / "in", 2), tmp_path / "out"
    dump_features(root, out, **OPTIONS)
    (out / "manifest.jsonl").unlink()
    with pytest.raises(UsageError, match=r"has feature files but no manifest\.jsonl, which lists them"):
        open_features(out)


def test_a_truncated_feature_file_is_an_error_naming_it(tmp_path: Path) -> None:
    root, out = many_images(tmp_path / "in", 2), tmp_path / "out"
    dump_features(root, out, **OPTIONS)
    whole = (out / "img001.pt").read_bytes()
    (out / "img001.pt").write_bytes(whole[:1000])
    stored = open_features(out)
    assert stored[0][1]["output"] == "img000.pt"
    with pytest.raises(UsageError, match=rf"^{out / 'img001.pt'} is not a whole feature file \(.+\): run the dump again to replace it$"):
        stored[1]
    with pytest.warns(UserWarning, match=r"unreadable or were made with other settings \(e\.g\. img001\.pt\)"):
        dump_features(root, out, **OPTIONS)  # the resume finds it incomplete and writes it again
    assert open_features(out)[1][0]["layer4"].shape == (512, 2, 2)


NOT_A_MAP = "its layer4 is not a [C, H, W] tensor of float32"


@pytest.mark.parametrize(("edit", "problem"), [
    (lambda saved: saved["features"].pop("layer4"), "its stages are not layer1, layer4"),
    (lambda saved: saved["features"].update(layer4=torch.zeros(3)), NOT_A_MAP),
    (lambda saved: saved["features"].update(layer4=saved["features"]["layer4"].half()), NOT_A_MAP),
    # Read back as if whole before: a tensor without data, a sparse one, an empty one.
    (lambda saved: saved["features"].update(layer4=torch.empty(512, 2, 2, device="meta")), NOT_A_MAP),
    (lambda saved: saved["features"].update(layer4=saved["features"]["layer4"].to_sparse()), NOT_A_MAP),
    (lambda saved: saved["features"].update(layer4=torch.zeros(512, 0, 2)), NOT_A_MAP),
    (lambda saved: saved["meta"].pop("input_size"), "its input_size None is not [H, W]"),
    (lambda saved: saved["meta"].update(input_size=7), "its input_size 7 is not [H, W]"),
    (lambda saved: saved["meta"].update(input_size="64x64"), "its input_size '64x64' is not [H, W]"),
])
def test_a_feature_file_edited_to_hold_other_features_is_an_error_and_is_redone(tmp_path: Path, edit, problem) -> None:
    root, out = many_images(tmp_path / "in", 2), tmp_path / "out"
    dump_features(root, out, **OPTIONS)
    saved = torch.load(out / "img001.pt", weights_only=True)
    edit(saved)
    torch.save(saved, out / "img001.pt")
    with pytest.raises(UsageError, match=rf"^{out / 'img001.pt'} is not a whole feature file \({re.escape(problem)}\)"):
        open_features(out)[1]
    with pytest.warns(UserWarning, match=r"unreadable or were made with other settings \(e\.g\. img001\.pt\)"):
        dump_features(root, out, **OPTIONS)  # the resume finds it is not what these settings make, and writes it again
    features, meta = open_features(out)[1]
    assert features["layer4"].shape == (512, 2, 2) and features["layer4"].layout == torch.strided and meta["input_size"] == (64, 64)


def test_a_pooled_file_of_other_channels_is_named_by_matrix_never_broadcast(tmp_path: Path) -> None:
    root, out = many_images(tmp_path / "in", 3), tmp_path / "out"
    dump_features(root, out, pool="avg", **OPTIONS)
    saved = torch.load(out / "img001.pt", weights_only=True)
    saved["features"]["layer4"] = saved["features"]["layer4"][:10].clone()
    torch.save(saved, out / "img001.pt")
    with pytest.raises(UsageError, match=rf"^{out / 'img001.pt'} holds layer4 of 10 channels, not 512 as the dump's first image"):
        open_features(out).matrix("layer4")


def test_a_manifest_line_without_its_image_is_passed_over_by_the_reader_and_the_command(tmp_path: Path) -> None:
    """A bare KeyError before, from the reader and from the command's check of images named alone."""
    root, out = many_images(tmp_path / "in", 2), tmp_path / "out"
    dump_features(root, out, **OPTIONS)
    lines = (out / "manifest.jsonl").read_text().splitlines()
    record = json.loads(lines[1])
    del record["image"]
    (out / "manifest.jsonl").write_text("\n".join([lines[0], json.dumps(record)]) + "\n")
    assert [image.output for image in open_features(out).images] == ["img000.pt"]
    again = invoke(root / "img001.png", *SMALL, "--layers", "1,4", "--workers", "0", "--save", out, "--overwrite")
    assert again.exit_code == 0, again.stderr
    assert [image.output for image in open_features(out).images] == ["img000.pt", "img001.pt"]


def test_an_error_in_one_manifest_does_not_take_back_what_another_run_saved(tmp_path: Path) -> None:
    root, out = many_images(tmp_path / "in", 2), tmp_path / "out"
    good = (root / "img001.png").read_bytes()
    (root / "img001.png").write_bytes(b"broken for now")
    dump_features(root, out, shard="0/1", **OPTIONS)  # manifest.shard-0-of-1.jsonl: img001 an error
    (root / "img001.png").write_bytes(good)
    dump_features(root, out, **OPTIONS)  # manifest.jsonl: img001 saved (the manifests have no order between them)
    assert [line["status"] for line in manifest(out, "manifest.shard-0-of-1.jsonl")] == ["ok", "error"]
    assert [image.output for image in open_features(out).images] == ["img000.pt", "img001.pt"]


DEEP_JSON = "[" * 100_000 + "]" * 100_000
"""JSON nested deeper than Python's decoder recurses: a RecursionError, not a ValueError."""


@pytest.mark.parametrize(("settings", "problem"), [
    (DEEP_JSON, r"cannot read .+backbone-inspect\.json \(maximum recursion depth exceeded.*\)"),
    ('{"layers": "layer4", "format": "pt"}', r'backbone-inspect\.json names no stages \("layers": "layer4", not a list of stage names\)'),
    ('{"layers": 4}', r'backbone-inspect\.json names no stages \("layers": 4, not a list of stage names\)'),
    ('{"layers": ["layer4"], "format": "zip"}', r'backbone-inspect\.json has "format": "zip", not one of pt, shards'),
    ('{"layers": ["layer4"], "save_dtype": "int8"}', r'backbone-inspect\.json has "save_dtype": "int8", not one of float32, float16, bfloat16'),
])
def test_a_settings_file_unlike_any_a_run_writes_is_an_error_naming_it(tmp_path: Path, settings: str, problem: str) -> None:
    root, out = many_images(tmp_path / "in", 2), tmp_path / "out"
    dump_features(root, out, **OPTIONS)
    (out / "backbone-inspect.json").write_text(settings)
    with pytest.raises(UsageError, match=rf"^{re.escape(str(out))} is not a dump of backbone-inspect: .*{problem}$"):
        open_features(out)


def test_a_settings_file_nested_too_deep_is_replaced_by_overwrite_and_refused_without(tmp_path: Path) -> None:
    root, out = many_images(tmp_path / "in", 2), tmp_path / "out"
    out.mkdir()
    (out / "backbone-inspect.json").write_text(DEEP_JSON)
    result = invoke(root, *SMALL, "--workers", "0", "--save", out)
    assert (result.exit_code, result.stderr) == (2, f"Error: {out / 'backbone-inspect.json'} is not a settings file of backbone-inspect "
                                                    "(not a JSON object): use --overwrite to replace it, or another --save folder\n")
    assert invoke(root, *SMALL, "--workers", "0", "--save", out, "--overwrite").exit_code == 0
    assert len(open_features(out)) == 2


def test_a_manifest_line_nested_too_deep_is_passed_over_like_any_line_that_is_not_json(tmp_path: Path) -> None:
    root, out = many_images(tmp_path / "in", 2), tmp_path / "out"
    dump_features(root, out, **OPTIONS)
    with (out / "manifest.jsonl").open("a", encoding="utf-8") as lines:
        lines.write(DEEP_JSON + "\n")
    assert [image.output for image in open_features(out).images] == ["img000.pt", "img001.pt"]


def test_a_manifest_whose_last_line_has_no_end_gets_one_before_the_runs_lines(tmp_path: Path) -> None:
    """Another tool's manifest.jsonl, or an edited one: the run's first line was glued to its last, and that image lost."""
    root, out = many_images(tmp_path / "in", 2), tmp_path / "out"
    out.mkdir()
    (out / "manifest.jsonl").write_text("id,label\n1,cat")
    assert invoke(root, *SMALL, "--workers", "0", "--save", out).exit_code == 0
    assert (out / "manifest.jsonl").read_text().splitlines()[:2] == ["id,label", "1,cat"]
    assert [image.output for image in open_features(out).images] == ["img000.pt", "img001.pt"]


def test_a_manifest_that_is_a_pipe_is_an_error_never_read(tmp_path: Path) -> None:
    """Read for the reader, or for the warning about images named alone: a pipe there would wait for ever."""
    import os

    root, out = many_images(tmp_path / "in", 1), tmp_path / "out"
    dump_features(root, out, **OPTIONS)
    os.mkfifo(out / "manifest.shard-0-of-2.jsonl")
    with pytest.raises(UsageError, match=r"manifest\.shard-0-of-2\.jsonl is not a regular file, so not a manifest of the dump: remove it"):
        open_features(out)
    again = invoke(root / "img000.png", *SMALL, "--layers", "1,4", "--workers", "0", "--save", out)
    assert again.exit_code == 0 and "processed 0, skipped 1" in again.stderr, again.stderr


@pytest.mark.parametrize("kind", ["a pipe", "a link to a device"])
def test_a_settings_file_that_is_not_a_regular_file_is_an_error_never_read(tmp_path: Path, kind: str) -> None:
    """A pipe there waited for ever; /dev/zero was read until the memory ran out (/dev/null stands in for it
    here: were the file read again, this test would fail, not take the machine's memory)."""
    import os
    import threading

    root, out = many_images(tmp_path / "in", 1), tmp_path / "out"
    dump_features(root, out, **OPTIONS)
    (out / "backbone-inspect.json").unlink()
    if kind == "a pipe":
        os.mkfifo(out / "backbone-inspect.json")
    else:
        (out / "backbone-inspect.json").symlink_to("/dev/null")
    raised: list[BaseException] = []

    def read() -> None:
        try:
            open_features(out)
        except BaseException as error:  # noqa: BLE001 - handed to the test's thread
            raised.append(error)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=30)
    assert not reader.is_alive(), "open_features still reading"
    assert len(raised) == 1 and isinstance(raised[0], UsageError)
    assert re.fullmatch(rf"{re.escape(str(out))} is not a dump of backbone-inspect: cannot read .+backbone-inspect\.json "
                        r"\(not a regular file under a MiB\)", str(raised[0]))
