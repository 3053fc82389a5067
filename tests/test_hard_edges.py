"""Hostile inputs and careless use, in-process: each is one clean line and nothing lost (issue 11)."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image

from backbone_inspect.folder_lock import FolderLock

from conftest import SAMPLES, SMALL, invoke, manifest, noise_image


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("Error:")]


def test_the_runs_own_picture_folder_inside_the_inputs_is_never_an_input(tmp_path: Path) -> None:
    photos = tmp_path / "ph"
    noise_image(photos / "a.png", seed=1)
    for _ in range(2):
        result = invoke(photos, "--save", photos / "feats", "--viz", photos / "viz", "--layers", "4", *SMALL)
        assert result.exit_code == 0, result.output
    assert sorted(p.relative_to(photos / "feats").as_posix() for p in (photos / "feats").rglob("*.pt")) == ["a.pt"]
    assert sorted(p.name for p in (photos / "viz").rglob("*.png")) == ["layer4-channels.png", "layer4-heatmap.png"]


@pytest.mark.parametrize("viz", [".", ".."], ids=["the input folder", "above it"])
def test_a_picture_folder_holding_the_inputs_is_refused(tmp_path: Path, viz: str) -> None:
    photos = tmp_path / "ph"
    noise_image(photos / "a" / "b.png", seed=1)
    result = invoke(photos, "--viz", photos / viz, "--layers", "4", *SMALL)
    assert result.exit_code == 2
    assert result.stderr == (f"Error: --viz {photos / viz} holds the input folder {photos}: its pictures would be "
                             "inputs of the next run; give --viz a folder outside the inputs\n")
    assert sorted(p.name for p in tmp_path.rglob("*.png")) == ["b.png"]



def test_nan_features_give_strict_json_with_a_count_and_a_warning(tmp_path: Path, chelsea: Path) -> None:
    model = torchvision.models.resnet18()
    state = model.state_dict()
    state["layer3.0.conv1.weight"][:] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    result = invoke(chelsea, "--weights", tmp_path / "nan.pth", "--json", "--layers", "2,4", *SMALL)
    assert result.exit_code == 0

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    record = json.loads(result.stdout, parse_constant=refuse)
    layer2, layer4 = record["layers"]["layer2"], record["layers"]["layer4"]
    assert layer2["nonfinite"] == 0 and isinstance(layer2["mean"], float)
    assert layer4["nonfinite"] == 512 * 2 * 2 and layer4["mean"] is layer4["max"] is None
    assert result.stderr.startswith(f"Warning: {chelsea}: layer4 has 2048 NaN or infinite values")


def test_control_characters_and_markup_in_names_cannot_reach_the_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # short names: a long temporary folder would shorten the table's title
    hostile = Path("\x1b[2J\x1b]0;owned\x07 [red]junk.jpg")
    hostile.write_bytes(b"not an image")
    good = Path("[bold]x\x1b[31m.png")
    noise_image(good)
    result = invoke(hostile, good, *SMALL)
    assert result.exit_code == 1
    assert "\x1b" not in result.output and "\x07" not in result.output
    assert error_lines(result) == ["Error: \\x1b[2J\\x1b]0;owned\\x07 [red]junk.jpg: not an image Pillow can read"]
    assert "[bold]x\\x1b[31m.png input 64×64" in " ".join(result.stdout.split()), "the title as named, not styled"


@pytest.mark.parametrize("name", ["line\nbreak.jpg", "carriage\rreturn.jpg", "tab\there.jpg", "two  spaces.jpg"])
def test_a_name_with_line_breaks_tabs_or_runs_of_spaces_is_shown_as_it_is_on_one_line(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"not an image")
    result = invoke(tmp_path / name, *SMALL)
    assert result.exit_code == 1
    shown = str(tmp_path / name).replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    assert result.stderr.splitlines() == [f"Error: {shown}: not an image Pillow can read"]


def test_a_list_written_on_windows_works_and_a_binary_one_is_one_line(tmp_path: Path, chelsea: Path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"\xef\xbb\xbf" + f"# photos\r\n{chelsea}\r\n\r\n".encode())
    result = invoke("--from-list", listing, "--json", *SMALL)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["image"] == str(chelsea)
    listing.write_bytes(b"\0" * 3000)
    binary = invoke("--from-list", listing, *SMALL)
    assert binary.exit_code == 2
    assert binary.stderr == f"Error: --from-list {listing}: holds NUL bytes, so it is not a text file of paths, one per line\n"
    listing.write_text("root:x:0:0\n")
    missing = invoke("--from-list", listing, *SMALL)
    assert missing.stderr == f"Error: root:x:0:0: no such file or directory (line 1 of --from-list {listing})\n"


def corrupt_lzw_tiff(path: Path) -> Path:
    Image.open(SAMPLES / "chelsea.jpg").save(path, compression="tiff_lzw")
    data = bytearray(path.read_bytes())
    for index in range(2000, 30000, 7):
        data[index] = (data[index] * 31 + 7) % 256
    path.write_bytes(bytes(data))
    return path


def test_bad_files_of_every_kind_are_one_line_each(tmp_path: Path, chelsea: Path) -> None:
    folder = tmp_path / "in"
    corrupt_lzw_tiff(folder.mkdir() or folder / "lzw.tif")
    (folder / "zero.png").symlink_to("/dev/zero")
    noise_image(folder / "good.png")
    result = invoke(folder, folder / "zero.png", "--save", tmp_path / "out", "--workers", "0", *SMALL)
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert all(line.startswith(("Error: ", "processed ")) for line in lines), lines
    errors = {line["image"]: line["error"] for line in manifest(tmp_path / "out") if line["status"] == "error"}
    assert sorted(errors) == [str(folder / "lzw.tif"), str(folder / "zero.png")], "the device is taken only when named"
    assert errors[str(folder / "zero.png")] == f"{folder / 'zero.png'}: a character device, not an image file"
    assert errors[str(folder / "lzw.tif")].startswith(f"{folder / 'lzw.tif'}: cannot decode image")
    assert (tmp_path / "out" / "good.pt").is_file()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda path: pickle.dump({"a": 1}, path.open("wb"), protocol=4), "not a PyTorch checkpoint (it cannot be unpickled)"),
        (lambda path: path.write_bytes(_checkpoint_bytes()[:50000]), "truncated or corrupt: its zip archive is incomplete"),
        (lambda path: path.mkdir(), "is a folder, not a file"),
        (lambda path: path.write_bytes(b""), "the file is empty (copy or save it again)"),
    ], ids=["raw pickle", "truncated", "folder", "empty"],
)
def test_unreadable_checkpoints_are_one_line_and_claim_no_folder(tmp_path: Path, chelsea: Path, make, message: str) -> None:
    path = tmp_path / "model.pth"
    make(path)
    out = tmp_path / "out"
    result = invoke(chelsea, "--weights", path, "--save", out, *SMALL)
    assert result.exit_code == 1
    assert len(result.stderr.splitlines()) == 1 and message in result.stderr
    assert not (out / "backbone-inspect.json").exists(), "a run that never had its model records no settings"
    assert invoke(chelsea, "--save", out, *SMALL).exit_code == 0, "the corrected command is not refused"


def _checkpoint_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(torchvision.models.resnet18().state_dict(), buffer)
    return buffer.getvalue()


def test_a_settings_file_that_is_no_json_object_is_named(tmp_path: Path, chelsea: Path) -> None:
    (tmp_path / "backbone-inspect.json").write_text("[1, 2]")
    result = invoke(chelsea, "--save", tmp_path, *SMALL)
    assert result.exit_code == 2
    assert result.stderr == (
        f"Error: {tmp_path / 'backbone-inspect.json'} is not a settings file of backbone-inspect (not a JSON object): "
        "use --overwrite to replace it, or another --save folder\n"
    )


@pytest.mark.parametrize("size", [1, 17, 32])
def test_describe_takes_any_size_the_model_takes(size: int) -> None:
    result = invoke("--describe", "--arch", "resnet18", "--input-size", str(size), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["stages"][-1]["output_size"] == [1, 1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--save", ""], "Error: --save is empty: give a folder to write into"),
        (["--viz", " "], "Error: --viz is empty: give a folder to write into"),
        (["--resize", "20000", "--crop", "64"], "Error: --resize 20000: at most 4096 px (a larger input does not fit in memory)"),
        (["--workers", "100000"], "Error: --workers 100000: at most"),
        (["--seed", "99999999999999999999999"], "Error: invalid --seed 99999999999999999999999"),
    ],
)
def test_requests_that_cannot_be_right_are_usage_errors(tmp_path: Path, chelsea: Path, monkeypatch, args, message) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke(chelsea, *args, "--arch", "resnet18")
    assert result.exit_code == 2 and result.stderr.startswith(message), result.stderr
    assert list(tmp_path.iterdir()) == [], "nothing written"


@pytest.mark.parametrize(
    ("size", "options", "after"),
    [((5000, 3500), ["--resize", "none", "--crop", "none"], "3500×5000"),
     ((20000, 1), ["--resize", "64", "--crop", "64"], "64×1280000")],  # a 141-byte strip, resized to gigabytes
    ids=["native", "strip"],
)
def test_an_image_too_large_after_resizing_is_that_images_error(tmp_path: Path, size, options, after) -> None:
    Image.new("RGB", size, (90, 120, 150)).save(tmp_path / "huge.png")
    noise_image(tmp_path / "small.png")
    result = invoke(tmp_path / "huge.png", tmp_path / "small.png", *options, "--json", "--arch", "resnet18", "--device", "cpu")
    assert result.exit_code == 1
    assert error_lines(result) == [
        f"Error: {tmp_path / 'huge.png'}: image is {after} (H×W) after resizing, over the 16.8 Mpixel limit "
        "(4096×4096); use a smaller --resize"
    ]
    assert json.loads(result.stdout)["image"] == str(tmp_path / "small.png")


def test_a_second_run_into_a_held_folder_is_refused_naming_the_holder(tmp_path: Path, chelsea: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    held = FolderLock.take(out / ".manifest.jsonl.lock")
    refused = invoke(chelsea, "--save", out, *SMALL)
    assert refused.exit_code == 2
    assert refused.stderr.startswith(f"Error: {out} is being written by another run (pid {os.getpid()} on ")
    assert invoke(chelsea, "--save", out, "--shard", "0/2", *SMALL).exit_code == 0, "another shard may run beside it"
    held.release()
    assert invoke(chelsea, "--save", out, *SMALL).exit_code == 0, "a lock left by an ended run does not block"


@pytest.mark.parametrize(
    ("env", "names"),
    [({"RANK": "5", "WORLD_SIZE": "2"}, "RANK='5' and WORLD_SIZE='2'"),
     ({"SLURM_PROCID": "x", "SLURM_STEP_NUM_TASKS": "4"}, "SLURM_PROCID='x' and SLURM_STEP_NUM_TASKS='4'")],
)
def test_scheduler_variables_that_disagree_are_a_usage_error(chelsea: Path, monkeypatch, env: dict, names: str) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = invoke(chelsea, *SMALL)
    assert result.exit_code == 2 and result.stderr.startswith(f"Error: {names} do not name a rank below the number of ranks")
    assert invoke(chelsea, "--shard", "0/1", *SMALL).exit_code == 0, "an explicit --shard needs no variables"


@pytest.mark.parametrize("args", [["--resize", "²"], ["--shard", "²/3"], ["--layers", "²"], ["--input-size", "²", "--describe"]])
def test_digits_of_other_scripts_are_usage_errors(chelsea: Path, args: list[str]) -> None:
    result = invoke(*([] if "--describe" in args else [chelsea]), *args, "--arch", "resnet18")
    assert result.exit_code == 2 and result.stderr.startswith("Error: invalid") and "ValueError" not in result.stderr


def test_special_files_where_the_run_reads_or_writes_are_one_line(tmp_path: Path, chelsea: Path) -> None:
    result = invoke("--from-list", "/dev/zero", *SMALL)
    assert (result.exit_code, result.stderr) == (2, "Error: --from-list /dev/zero: not a regular file\n")
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / "manifest.jsonl")  # opened for writing, a pipe would wait for a reader for ever
    result = invoke(chelsea, "--save", out, *SMALL)
    assert (result.exit_code, result.stderr) == (1, f"Error: cannot write manifest {out / 'manifest.jsonl'}: not a regular file\n")
    (tmp_path / "precious").write_text("keep me")
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / ".manifest.jsonl.lock").symlink_to(tmp_path / "precious")
    result = invoke(chelsea, "--save", tmp_path / "linked", *SMALL)
    assert result.exit_code == 1 and result.stderr.startswith("Error: cannot lock ")
    assert (tmp_path / "precious").read_text() == "keep me"


def test_a_name_too_long_for_a_temporary_file_or_a_folder_in_the_way_fails_that_image_only(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    noise_image(folder / ("n" * 250 + ".png"))
    noise_image(folder / "cat.png")
    noise_image(folder / "dog.png")
    (tmp_path / "out" / "cat.pt").mkdir(parents=True)
    result = invoke(folder, "--save", tmp_path / "out", "--batch-size", "1", "--workers", "1", *SMALL)
    assert result.exit_code == 1
    statuses = {line["output"]: line["status"] for line in manifest(tmp_path / "out")}
    assert statuses == {"n" * 250 + ".pt": "ok", "cat.pt": "error", "dog.pt": "ok"}


def test_api_flags_are_booleans(tmp_path: Path, chelsea: Path) -> None:
    from backbone_inspect import dump_features
    from backbone_inspect.errors import UsageError

    for options in ({"overwrite": "no"}, {"compile": "no"}, {"channels_last": 1}):
        with pytest.raises(UsageError, match="expected True or False"):
            dump_features(chelsea, tmp_path / "out", arch="resnet18", **options)


def test_a_feature_file_that_would_stand_where_others_need_a_folder_is_refused_before_any_work(tmp_path: Path) -> None:
    root = tmp_path / "in"
    noise_image(root / "x.png")
    noise_image(root / "x.pt" / "y.png")
    result = invoke(root, *SMALL, "--save", tmp_path / "out")
    assert result.exit_code == 2
    assert result.stderr == (f"Error: {root / 'x.png'} and {root / 'x.pt' / 'y.png'} cannot both be saved: x.pt would be a file "
                             "and a folder; rename one of them, or use --format shards\n")
    assert not list((tmp_path / "out").rglob("*.pt"))
    shards = invoke(root, *SMALL, "--save", tmp_path / "shards", "--format", "shards")  # names only there: no clash
    assert shards.exit_code == 0 and "processed 2" in shards.stderr


def test_an_unexpected_os_error_is_its_own_not_stdout_and_its_traceback_with_debug(chelsea: Path, monkeypatch) -> None:
    import errno

    from backbone_inspect.extractor import Extractor

    def broken(self, names, group):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(Extractor, "launch_group", broken)
    result = invoke(chelsea, *SMALL)
    assert (result.exit_code, result.stderr) == (1, "Error: OSError: [Errno 5] Input/output error (run with --debug for the traceback)\n")
    debug = invoke(chelsea, "--debug", *SMALL)
    assert debug.exit_code == 1 and isinstance(debug.exception, OSError) and "stdout" not in debug.stderr

