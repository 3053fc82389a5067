"""The output store on its own: claiming a folder, resuming, atomic writes, the manifest."""

from __future__ import annotations

import json
import os
import pickle
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from backbone_inspect.config import feature_config
from backbone_inspect.errors import OutputError, UsageError
from backbone_inspect.results import ImageResult
from backbone_inspect.inputs import FoundImage
from backbone_inspect.outcomes import Outcome
from backbone_inspect.shards import Shard
from backbone_inspect.store import SETTINGS_FILE

from conftest import SAMPLES, SMALL, SMALL_OPTIONS, invoke, manifest
from store_helpers import fake_result, opened, store_for


def test_claim_records_the_settings_and_refuses_a_folder_of_other_settings(tmp_path: Path) -> None:
    folder = tmp_path / "feats"
    claimed = store_for(folder)
    claimed.claim(overwrite=False)
    assert not (folder / SETTINGS_FILE).exists(), "settings are recorded once the run has its model"
    claimed.open()
    claimed.close()
    saved = json.loads((folder / SETTINGS_FILE).read_text())
    assert saved == {**feature_config(**SMALL_OPTIONS, layers="2,4").settings(), "format": "pt"}
    assert saved["layers"] == ["layer2", "layer4"] and saved["preprocessing"]["crop"] == 64
    store_for(folder).claim(overwrite=False)  # the same settings: resuming is fine
    with pytest.raises(UsageError, match=r"holds features made with other settings: preprocessing\.crop 64 \(now 48\)"):
        store_for(folder, crop=48).claim(overwrite=False)
    with pytest.raises(UsageError, match=r'save_dtype "float32" \(now "float16"\)'):
        store_for(folder, save_dtype="float16").claim(overwrite=False)
    opened(store_for(folder, crop=48), overwrite=True)
    assert json.loads((folder / SETTINGS_FILE).read_text())["preprocessing"]["crop"] == 48


def test_a_dry_run_claim_creates_nothing_and_an_unwritable_folder_is_one_output_error(tmp_path: Path) -> None:
    store_for(tmp_path / "dry").claim(overwrite=False, record=False)
    assert not (tmp_path / "dry").exists()
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(OutputError, match=f"cannot write to output folder {tmp_path / 'file' / 'feats'}"):
        store_for(tmp_path / "file" / "feats").claim(overwrite=False)


def test_written_files_hold_the_features_in_the_save_dtype_and_the_settings(tmp_path: Path) -> None:
    store = store_for(tmp_path, save_dtype="bfloat16")
    result = fake_result("photos/a/cat.jpg")
    written = store.write(FoundImage("photos/a/cat.jpg", "a/cat.pt"), result)
    path = tmp_path / "a" / "cat.pt"
    assert written.bytes_written == path.stat().st_size and written.shard is None
    saved = torch.load(path, weights_only=True)
    assert list(saved["features"]) == ["layer2", "layer4"]
    for name, tensor in saved["features"].items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, result.features[name].to(torch.bfloat16))
    assert saved["meta"]["image"] == "photos/a/cat.jpg" and saved["meta"]["input_size"] == [64, 64]
    assert {key: saved["meta"][key] for key in store.settings} == store.settings
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["cat.pt"], "no temporary file left"


def test_a_failed_write_leaves_the_old_file_whole_and_no_temporary_file(tmp_path: Path, monkeypatch) -> None:
    store = store_for(tmp_path)
    image = FoundImage("cat.jpg", "cat.pt")
    store.write(image, fake_result("cat.jpg", seed=1))
    before = (tmp_path / "cat.pt").read_bytes()

    def disk_full(*_: object, **__: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OutputError, match=f"cannot write {tmp_path / 'cat.pt'}: No space left on device"):
        store.write(image, fake_result("cat.jpg", seed=2))
    assert (tmp_path / "cat.pt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["cat.pt"]


def test_split_done_skips_files_of_these_settings_and_redoes_broken_or_foreign_ones(tmp_path: Path) -> None:
    store = store_for(tmp_path)
    images = [FoundImage(f"{name}.jpg", f"{name}.pt") for name in ("new", "done", "broken", "foreign")]
    store.write(images[1], fake_result("done.jpg"))
    (tmp_path / "broken.pt").write_bytes(b"half a file")
    store_for(tmp_path, crop=48).write(images[3], fake_result("foreign.jpg"))
    split = store.split_done(images, overwrite=False)
    assert [i.output for i in split.todo] == ["new.pt", "broken.pt", "foreign.pt"]
    assert [i.output for i in split.skipped] == ["done.pt"]
    assert [i.output for i in split.redo] == ["broken.pt", "foreign.pt"]
    everything = store.split_done(images, overwrite=True)
    assert everything.todo == tuple(images) and everything.skipped == everything.redo == ()


@pytest.mark.parametrize(("shard", "name"), [(None, "manifest.jsonl"), (Shard(1, 3), "manifest.shard-1-of-3.jsonl")])
def test_the_manifest_appends_one_line_per_outcome(tmp_path: Path, shard: Shard | None, name: str) -> None:
    store = store_for(tmp_path, shard=shard)
    outcomes = [
        Outcome("a.jpg", "a.pt", "ok", shapes={"layer4": [8, 4, 4]}),
        Outcome("b.jpg", "b.pt", "error", error="b.jpg: empty file"),
    ]
    for round_ in range(2):
        store.open()
        store.record(outcomes[round_])
        store.close()
    assert manifest(tmp_path, name) == [
        {"image": "a.jpg", "output": "a.pt", "status": "ok", "shapes": {"layer4": [8, 4, 4]}},
        {"image": "b.jpg", "output": "b.pt", "status": "error", "error": "b.jpg: empty file"},
    ]


def test_a_store_pickles_for_other_processes_without_its_manifest(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = store_for(Path("feats"))
    store.claim(overwrite=False)
    store.open()
    copy = pickle.loads(pickle.dumps(store))
    store.close()
    assert copy.folder == tmp_path / "feats" and copy.folder.is_absolute()
    monkeypatch.chdir("/")  # a worker elsewhere writes into the same folder
    copy.write(FoundImage("x.jpg", "x.pt"), fake_result("x.jpg"))
    assert (tmp_path / "feats" / "x.pt").is_file()


def test_estimated_bytes_match_the_files_written(tmp_path: Path) -> None:
    store = store_for(tmp_path)
    result = fake_result("cat.jpg")
    written = store.write(FoundImage("cat.jpg", "cat.pt"), _real_shapes(result))
    assert store.estimate_bytes([(64, 64)]) == pytest.approx(written.bytes_written, rel=0.1)
    assert store.estimate_bytes([(64, 64)] * 3) == 3 * store.estimate_bytes([(64, 64)])


def _real_shapes(result: ImageResult) -> ImageResult:
    """The result with resnet18's real shapes at 64×64: layer2 128×8×8, layer4 512×2×2."""
    maps = OrderedDict([("layer2", torch.rand(128, 8, 8)), ("layer4", torch.rand(512, 2, 2))])
    return ImageResult(result.image, result.input_size, maps, result.stats, result.seconds)


def test_a_manifest_that_cannot_be_written_is_said_once_and_each_image_still_shown(tmp_path: Path, monkeypatch) -> None:
    from backbone_inspect.store import FolderStore

    def full_manifest(self, outcome) -> None:
        raise OutputError(f"cannot write manifest {self.manifest_path}: No space left on device")

    monkeypatch.setattr(FolderStore, "record", full_manifest)
    broken = tmp_path / "in"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(b"not a jpeg")
    (broken / "b.jpg").write_bytes((SAMPLES / "chelsea.jpg").read_bytes())
    result = invoke(broken, "--save", tmp_path / "out", "--workers", "0", *SMALL)
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert errors[0].startswith(f"Error: {broken / 'a.jpg'}: ")  # the bad image is still named
    assert errors[1:] == [f"Error: cannot write manifest {tmp_path / 'out' / 'manifest.jsonl'}: No space left on device"]


@pytest.mark.parametrize("manifest_first", [True, False])
def test_the_output_error_kept_is_the_first_and_shown_only_if_an_image_showed_it(manifest_first: bool) -> None:
    from backbone_inspect.outcomes import RunTally

    tally = RunTally()
    if manifest_first:
        tally.output_error = "cannot write manifest"  # kept by the engine: no image line showed it
    tally.add(Outcome("a.jpg", "a.pt", "error", error="cannot write a.pt"), "cannot write a.pt")
    assert tally.output_error == ("cannot write manifest" if manifest_first else "cannot write a.pt")
    assert tally.output_error_shown is not manifest_first


@pytest.mark.parametrize("second", [{"arch": "resnet34"}, {"format": "shards"}], ids=["settings", "format"])
def test_two_slices_claiming_a_new_folder_at_once_cannot_both_record_their_settings(tmp_path: Path, second: dict) -> None:
    from backbone_inspect.run import make_store

    folder = tmp_path / "new"
    first = make_store(folder, feature_config(**SMALL_OPTIONS), shard=Shard(0, 2))
    other = make_store(folder, feature_config(**{**SMALL_OPTIONS, "arch": second.get("arch", "resnet18")}),
                       format=second.get("format", "pt"), shard=Shard(1, 2))
    first.claim(overwrite=False)
    other.claim(overwrite=False)  # both find no settings yet: each loads its model
    first.open()
    with pytest.raises(UsageError, match="holds (features made with other settings: arch|--format pt features)"):
        other.open()
    other.close()
    first.close()
    assert json.loads((folder / SETTINGS_FILE).read_text())["arch"] == "resnet18"


def test_written_since_counts_only_files_of_these_settings_written_after_the_start(tmp_path: Path) -> None:
    import time

    store = store_for(tmp_path)
    images = [FoundImage(f"{name}.jpg", f"{name}.pt") for name in ("old", "new", "foreign", "missing")]
    store.write(images[0], fake_result("old.jpg"))
    os.utime(tmp_path / "old.pt", (time.time() - 60, time.time() - 60))  # left by an earlier run: --overwrite keeps it till replaced
    started = time.time() - 1
    store.write(images[1], fake_result("new.jpg"))
    store_for(tmp_path, crop=48).write(images[2], fake_result("foreign.jpg"))
    assert [image.output for image in store.written_since(images, started)] == ["new.pt"]
