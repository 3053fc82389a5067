"""--engine ray against the local engine, on a local Ray cluster (skipped without the [ray] extra)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import assert_close_scaled, features, invoke, manifest
from ray_helpers import RAY_MISSING, RAY_OPTIONS, run_command


def statuses(folder: Path) -> dict[str, tuple[str, str | None]]:
    return {line["image"]: (line["status"], line["output"]) for line in manifest(folder)}


def feature_files(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*.pt"))


def assert_same_outputs(local: Path, on_ray: Path) -> None:
    assert feature_files(on_ray) == feature_files(local)
    assert len(feature_files(on_ray)) == 7
    for name in feature_files(local):
        here = torch.load(local / name, weights_only=True)
        there = torch.load(on_ray / name, weights_only=True)
        assert here["meta"] == there["meta"]
        assert here["features"].keys() == there["features"].keys() == {"layer1", "layer4"}
        for stage, tensor in here["features"].items():
            assert_close_scaled(there["features"][stage], tensor)
    assert statuses(on_ray) == statuses(local)


@pytest.mark.slow
def test_ray_engine_writes_what_the_local_engine_writes_and_resumes(tmp_path: Path, mixed: Path) -> None:
    pytest.importorskip("ray", reason=RAY_MISSING)
    local = run_command("photos", "--save", "local", *RAY_OPTIONS, cwd=tmp_path)
    on_ray = run_command("photos", "--save", "ray", *RAY_OPTIONS, "--engine", "ray", "--ray-actors", "2", "--ray-actor-cpus", "0.5", cwd=tmp_path)
    assert local.returncode == 1, local.stderr
    assert on_ray.returncode == 1, on_ray.stderr
    for bad in ("corrupt.jpg", "empty.png", "truncated.png"):
        assert any(line.startswith("Error: ") and bad in line for line in on_ray.stderr.splitlines()), on_ray.stderr
    assert "engine ray" in on_ray.stdout and "engine" not in local.stdout
    assert "processed 7, skipped 0, failed 3" in on_ray.stderr

    assert_same_outputs(tmp_path / "local", tmp_path / "ray")
    errors = {line["image"]: line["error"] for line in manifest(tmp_path / "ray") if line["status"] == "error"}
    assert sorted(Path(image).name for image in errors) == ["corrupt.jpg", "empty.png", "truncated.png"]
    assert json.loads((tmp_path / "ray" / "backbone-inspect.json").read_text()) == json.loads(
        (tmp_path / "local" / "backbone-inspect.json").read_text()
    )

    removed = ["a/img1.pt", "b/img4.pt"]
    kept = {name: (tmp_path / "ray" / name).stat().st_mtime_ns for name in feature_files(tmp_path / "ray") if name not in removed}
    for name in removed:
        (tmp_path / "ray" / name).unlink()
    first_lines = len(manifest(tmp_path / "ray"))
    again = run_command("photos", "--save", "ray", *RAY_OPTIONS, "--engine", "ray", "--ray-actors", "2", "--ray-actor-cpus", "0.5", cwd=tmp_path)
    assert again.returncode == 1, again.stderr
    assert "processed 2, skipped 5, failed 3" in again.stderr
    rerun = {line["output"]: line["status"] for line in manifest(tmp_path / "ray")[first_lines:]}
    assert sorted(name for name, status in rerun.items() if status == "ok") == removed
    assert sorted(name for name, status in rerun.items() if status == "skipped") == sorted(kept)
    assert {name: (tmp_path / "ray" / name).stat().st_mtime_ns for name in kept} == kept
    for name in removed:
        assert_close_scaled(features(tmp_path / "ray" / name)["layer4"], features(tmp_path / "local" / name)["layer4"])
    assert not list((tmp_path / "ray").rglob("*.tmp*")), "no temporary file left behind"


def test_engine_options_are_checked_before_any_work(tmp_path: Path, mixed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = invoke(mixed, "--engine", "spark", *RAY_OPTIONS)
    assert result.exit_code == 2
    assert result.output.strip() == "Error: --engine spark: expected one of local, ray"
    result = invoke(mixed, "--ray-address", "auto", *RAY_OPTIONS)
    assert result.exit_code == 2
    assert result.output.strip() == "Error: --ray-address needs --engine ray"
    monkeypatch.setitem(sys.modules, "ray", None)  # as on a machine without the extra
    result = invoke(mixed, "--engine", "ray", "--save", tmp_path / "out", *RAY_OPTIONS)
    assert result.exit_code == 2
    assert result.output.startswith("Error: --engine ray needs Ray: pip install 'backbone-inspect[ray]'")
    assert not (tmp_path / "out").exists()


def test_pictures_are_refused_on_ray(tmp_path: Path, mixed: Path) -> None:
    pytest.importorskip("ray", reason=RAY_MISSING)
    result = invoke(mixed, "--engine", "ray", "--viz", tmp_path / "viz", *RAY_OPTIONS)
    assert result.exit_code == 2
    assert result.output.strip().startswith("Error: --viz works with the local engine only")


@pytest.mark.parametrize("cpus", ["0", "-1", "nan", "inf"])
def test_ray_actor_cpus_must_be_a_positive_finite_number(tmp_path: Path, mixed: Path, cpus: str) -> None:
    pytest.importorskip("ray", reason=RAY_MISSING)
    result = invoke(mixed, "--engine", "ray", "--ray-actor-cpus", cpus, "--save", tmp_path / "out", *RAY_OPTIONS)
    assert result.exit_code == 2
    assert result.stderr == f"Error: --ray-actor-cpus {float(cpus)!r}: expected a positive number of CPUs\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [b"not an image", b""], ids=["garbage", "empty"])
def test_ray_decoding_names_a_bad_image_as_given_like_the_local_engine(tmp_path: Path, monkeypatch, content: bytes) -> None:
    import numpy as np

    from backbone_inspect.images import ImageDataset, Preprocessing
    from backbone_inspect.ray_engine import decode_rows

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "bad.jpg").write_bytes(content)
    monkeypatch.chdir(tmp_path)
    rows = {"path": np.array(["in/bad.jpg"]), "read_path": np.array([str(tmp_path / "in" / "bad.jpg")]), "output": np.array(["bad.pt"])}
    decoded = decode_rows(rows, Preprocessing())
    assert decoded["error"].tolist() == [ImageDataset(["in/bad.jpg"], Preprocessing())[0].error]
    assert decoded["error"][0].startswith("in/bad.jpg: ")


def test_ray_engine_refuses_actors_that_leave_no_cpu_for_decoding() -> None:
    from backbone_inspect.errors import UsageError
    from backbone_inspect.ray_engine import check_room_for_decoding

    check_room_for_decoding(2, 0.75, 2)
    with pytest.raises(UsageError, match=r"--ray-actors 2 x --ray-actor-cpus 1 leave no CPU for decoding on a cluster of 2 CPUs"):
        check_room_for_decoding(2, 1.0, 2)
