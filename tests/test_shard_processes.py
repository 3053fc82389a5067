"""--format shards in processes of its own: a signal mid-run, a full disk, and Ray actors writing shards. Marked slow."""

from __future__ import annotations

import resource
import signal
import subprocess
import time
from pathlib import Path

import pytest

from backbone_inspect.reader import open_features

from conftest import SMALL, assert_close_scaled, command, manifest, many_images
from ray_helpers import RAY_MISSING, RAY_OPTIONS, run_command
from shard_helpers import shard_files, shard_rows

pytestmark = pytest.mark.slow

HEAVIER = ["--arch", "resnet34", "--resize", "128", "--crop", "128", "--device", "cpu", "--layers", "1,4"]
"""Slow enough per image (about 20 images/s on 2 CPUs) that a signal lands mid-run."""


def wait_for_a_shard(out: Path, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None and not shard_files(out):
        time.sleep(0.02)


def assert_manifest_is_the_shards(out: Path) -> dict[str, dict]:
    """Every ok line names a committed shard and its row there; every image of the shards has its ok line."""
    rows = shard_rows(out)  # each shard loads with plain safetensors, and no image is in two
    ok = [line for line in manifest(out) if line["status"] == "ok"]
    assert sorted(line["output"] for line in ok) == sorted(rows)
    for line in ok:
        assert (line["shard"], line["row"], line["image"]) == (rows[line["output"]]["shard"], rows[line["output"]]["row"],
                                                               rows[line["output"]]["image"])
    assert not [path for path in out.rglob("*") if path.name.endswith(".tmp")], "no temporary file left behind"
    return rows


def test_an_interrupted_dump_keeps_whole_shards_and_resumes_to_the_same_features(tmp_path: Path) -> None:
    root, out, whole = many_images(tmp_path / "in", 40), tmp_path / "out", tmp_path / "whole"
    args = [*HEAVIER, "--format", "shards", "--shard-size", "4", "--batch-size", "2", "--workers", "1"]
    process = subprocess.Popen(command(root, "--save", out, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_a_shard(out, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "; stopped by SIGINT" in stderr
    first = assert_manifest_is_the_shards(out)
    assert 4 <= len(first) < 40, "stopped mid-run, with at least the first shard"
    first_shards = {path.name for path in shard_files(out)}
    rerun = subprocess.run(command(root, "--save", out, *args), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"processed {40 - len(first)}, skipped {len(first)}, failed 0" in rerun.stderr
    assert first_shards <= {path.name for path in shard_files(out)}, "committed shards are kept"
    resumed = assert_manifest_is_the_shards(out)
    uninterrupted = subprocess.run(command(root, "--save", whole, *args), capture_output=True, text=True, timeout=300)
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    expected = shard_rows(whole)
    assert sorted(resumed) == sorted(expected) == [f"img{index:03d}.pt" for index in range(40)]
    for output, row in expected.items():
        assert resumed[output]["image"] == row["image"]
        for stage, tensor in row["features"].items():
            assert_close_scaled(resumed[output]["features"][stage], tensor)


def test_a_shard_that_cannot_be_written_fails_each_of_its_images(tmp_path: Path) -> None:
    root, out = many_images(tmp_path / "in", 6), tmp_path / "out"

    def small_files_only() -> None:  # a 4-image shard of layer1 maps is 256 KiB: over the limit, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    args = command(root, "--save", out, *SMALL, "--layers", "1", "--workers", "0", "--format", "shards", "--shard-size", "4", "--batch-size", "2")
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, preexec_fn=small_files_only)
    assert result.returncode == 1, result.stderr
    assert "File too large" in result.stderr and "Traceback" not in result.stderr
    rows = assert_manifest_is_the_shards(out)
    lines = manifest(out)
    failed = [line["output"] for line in lines if line["status"] == "error"]
    assert len(failed) >= 4 and not set(failed) & set(rows), "each image of the failed shard is an error, none is in a shard"
    # The full disk ends the run: images not reached by then are left for a re-run, not lost.
    left = 6 - len(lines)
    assert len({line["output"] for line in lines}) == len(lines) and left >= 0
    assert f"processed {len(rows)}, skipped 0, failed {len(failed)}" in result.stderr
    assert (f"{left} left" in result.stderr) if left else "left" not in result.stderr
    shards = len({line["error"] for line in lines if line["status"] == "error"})  # each names its shard
    assert f"({len(failed)} image(s) in {shards} shard(s) not saved: run again once it is fixed)" in result.stderr


def test_ray_actors_write_shards_that_read_back_like_the_local_engines(tmp_path: Path, mixed: Path) -> None:  # noqa: F811
    pytest.importorskip("ray", reason=RAY_MISSING)
    shards = ["--format", "shards", "--shard-size", "3"]
    local = run_command("photos", "--save", "local", *RAY_OPTIONS, *shards, cwd=tmp_path)
    on_ray = run_command("photos", "--save", "ray", *RAY_OPTIONS, *shards, "--engine", "ray", "--ray-actors", "2",
                         "--ray-actor-cpus", "0.5", cwd=tmp_path)
    assert local.returncode == 1, local.stderr
    assert on_ray.returncode == 1, on_ray.stderr
    assert "processed 7, skipped 0, failed 3" in on_ray.stderr
    here, there = open_features(tmp_path / "local"), open_features(tmp_path / "ray")
    assert len(there) == len(here) == 7 and there.format == "shards"
    assert [(i.image, i.output, i.input_size) for i in there.images] == [(i.image, i.output, i.input_size) for i in here.images]
    for index in range(7):
        (ours, meta), (theirs, their_meta) = here[index], there[index]
        assert meta == their_meta and ours.keys() == theirs.keys() == {"layer1", "layer4"}
        for stage, tensor in ours.items():
            assert_close_scaled(theirs[stage], tensor)
    rows = assert_manifest_is_the_shards(tmp_path / "ray")
    assert max(row["row"] for row in rows.values()) <= 2, "at most --shard-size images per shard"
    errors = sorted(Path(line["image"]).name for line in manifest(tmp_path / "ray") if line["status"] == "error")
    assert errors == ["corrupt.jpg", "empty.png", "truncated.png"]
    again = run_command("photos", "--save", "ray", *RAY_OPTIONS, *shards, "--engine", "ray", "--ray-actors", "2",
                        "--ray-actor-cpus", "0.5", cwd=tmp_path)
    assert "processed 0, skipped 7, failed 3" in again.stderr, again.stderr
    assert shard_rows(tmp_path / "ray").keys() == rows.keys()


def test_a_stopped_ray_dump_records_every_shard_its_actors_committed(tmp_path: Path) -> None:
    pytest.importorskip("ray", reason=RAY_MISSING)
    import os

    root, out = many_images(tmp_path / "in", 40), tmp_path / "out"
    args = [*HEAVIER, "--format", "shards", "--shard-size", "4", "--batch-size", "2", "--engine", "ray", "--ray-actors", "1",
            "--ray-actor-cpus", "0.5"]
    process = subprocess.Popen(command(root, "--save", out, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "RAY_ADDRESS": "", "PYTHONWARNINGS": "ignore"})
    wait_for_a_shard(out, process, seconds=180)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=180)
    assert process.returncode == 130, stderr
    rows = shard_rows(out)
    recorded = {line["output"]: line for line in manifest(out) if line["status"] in ("ok", "skipped")}
    assert 4 <= len(rows) < 40 and sorted(recorded) == sorted(rows), "each image of a committed shard is in the manifest"
    assert all((line["shard"], line["row"]) == (rows[output]["shard"], rows[output]["row"]) for output, line in recorded.items())
    assert f"processed {len(rows)}, skipped 0, failed 0" in stderr and len(open_features(out)) == len(rows)
    assert not [path for path in out.rglob("*") if path.name.endswith(".tmp")], "no temporary file left behind"
