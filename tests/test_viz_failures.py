"""A picture that cannot be made is that image's error: the run goes on, the manifest says so."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from backbone_inspect import viz
from backbone_inspect.batch_work import writer_threads

from conftest import SAMPLES, SMALL, invoke, manifest, noise_image


@pytest.fixture
def two(tmp_path: Path) -> Path:
    folder = tmp_path / "two"
    folder.mkdir()
    shutil.copy(SAMPLES / "chelsea.jpg", folder / "cat.jpg")
    shutil.copy(SAMPLES / "rocket.jpg", folder / "rocket.jpg")
    return folder


def pictures(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))


def test_a_file_in_the_way_of_one_images_pictures_fails_that_image_only(tmp_path: Path, two: Path) -> None:
    (tmp_path / "vz").mkdir()
    (tmp_path / "vz" / "cat").write_text("in the way")
    out = tmp_path / "sz"
    result = invoke(two, "--viz", tmp_path / "vz", "--save", out, "--layers", "1", "--batch-size", "1", *SMALL)
    assert result.exit_code == 1
    reason = f"cannot write {tmp_path / 'vz' / 'cat' / 'layer1-channels.png'}: {tmp_path / 'vz' / 'cat'} is a file, not a folder"
    assert result.stderr.splitlines()[0] == f"Error: {reason}"
    assert "processed 1, skipped 0, failed 1" in result.stderr and "left" not in result.stderr
    assert manifest(out) == [
        {"image": str(two / "cat.jpg"), "output": "cat.pt", "status": "error", "error": reason},
        {"image": str(two / "rocket.jpg"), "output": "rocket.pt", "status": "ok", "shapes": {"layer1": [64, 16, 16]}},
    ]
    assert sorted(p.name for p in out.glob("*.pt")) == ["rocket.pt"], "a failed image has no feature file"
    assert pictures(tmp_path / "vz") == ["rocket/layer1-channels.png", "rocket/layer1-heatmap.png"]
    (tmp_path / "vz" / "cat").unlink()
    again = invoke(two, "--viz", tmp_path / "vz", "--save", out, "--layers", "1", *SMALL)
    assert again.exit_code == 0, again.output
    assert "processed 1, skipped 1, failed 0" in again.stderr, "the failed image is done again"
    assert pictures(tmp_path / "vz") == ["cat/layer1-channels.png", "cat/layer1-heatmap.png",
                                         "rocket/layer1-channels.png", "rocket/layer1-heatmap.png"]


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 9 GB")])
def test_a_picture_too_big_for_the_memory_fails_that_image_only(
    tmp_path: Path, two: Path, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    drawn = viz.heatmap_overlay

    def heatmap(stage: str, feature: torch.Tensor, pixels: torch.Tensor, stride: str):
        if pixels.float().mean() < 90:  # the dark rocket (mean 65), not the cat (115)
            raise error
        return drawn(stage, feature, pixels, stride)

    monkeypatch.setattr(viz, "heatmap_overlay", heatmap)
    result = invoke(two, "--viz", tmp_path / "vz", "--layers", "1", "--workers", "0", *SMALL)
    assert result.exit_code == 1
    assert result.stderr.splitlines()[0] == f"Error: cannot draw {tmp_path / 'vz' / 'rocket' / 'layer1-heatmap.png'}: out of memory"
    assert "processed 1, skipped 0, failed 1" in result.stderr
    assert "1 image, every element pooled" in result.stdout, "the failed image is not in the statistics"
    assert pictures(tmp_path / "vz") == ["cat/layer1-channels.png", "cat/layer1-heatmap.png", "rocket/layer1-channels.png"]


@pytest.mark.parametrize("batch_size", [1, 12])
def test_a_full_disk_under_the_pictures_still_ends_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch_size: int) -> None:
    for seed in range(12):
        noise_image(tmp_path / "many" / f"{seed:02}.png", seed=seed)

    def full(path: Path, image: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(viz, "save_png", full)
    out = tmp_path / "out"
    result = invoke(tmp_path / "many", "--viz", tmp_path / "vz", "--save", out, "--layers", "1", "--batch-size", str(batch_size),
                    "--workers", "0", *SMALL)
    assert result.exit_code == 1
    assert result.stderr.splitlines()[0] == f"Error: cannot write {tmp_path / 'vz' / '00' / 'layer1-channels.png'}: No space left on device"
    failed = [line for line in manifest(out) if line["status"] == "error"]
    # As a store stops after a full disk: one error a slice at most (one batch of 12: a slice a writer thread;
    # batches of 1: each batch in flight a slice), the rest left for a re-run.
    assert 1 <= len(failed) <= (writer_threads() if batch_size == 12 else 11) and len(manifest(out)) == len(failed)
    assert f"processed 0, skipped 0, failed {len(failed)}" in result.stderr
    assert f"{12 - len(failed)} left (run again once it is fixed)" in result.stderr
