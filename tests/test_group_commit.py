"""Writing a group of .pt files with one sync: every file whole or absent, as with a fsync each."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backbone_inspect import files
from backbone_inspect.errors import OutputError
from backbone_inspect.inputs import FoundImage
from backbone_inspect.outcomes import Outcome
from backbone_inspect.store import Stored

from conftest import SMALL, features, invoke, manifest, many_images
from store_helpers import SYNCFS_TYPES, fake_result, groups_sync_here, kernel_at_least, mount_type, opened, store_for


@pytest.fixture
def counted_syncs(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How many fsync and syncfs calls the writes make (both still done for real)."""
    counts = {"fsync": 0, "syncfs": 0}
    real_fsync, real_syncfs = os.fsync, files.syncfs

    def fsync(descriptor: int) -> None:
        counts["fsync"] += 1
        real_fsync(descriptor)

    def syncfs(descriptor: int) -> None:
        counts["syncfs"] += 1
        real_syncfs(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(files, "syncfs", syncfs)
    return counts


@pytest.mark.skipif(not Path("/proc/self/mountinfo").exists(), reason="needs Linux's /proc/self/mountinfo")
@pytest.mark.parametrize("where", ["tmp", "/dev/shm"])
def test_a_group_is_synced_at_once_only_on_filesystems_whose_syncfs_reports_errors(tmp_path: Path, where: str) -> None:
    folder = tmp_path if where == "tmp" else Path(where)
    if not folder.is_dir():
        pytest.skip(f"{where} does not exist here")
    expected = mount_type(folder) in SYNCFS_TYPES and kernel_at_least(5, 8)
    assert groups_sync_here(folder) == expected, mount_type(folder)


def test_a_group_of_files_is_synced_once_and_each_reads_back_whole(tmp_path: Path, counted_syncs: dict[str, int]) -> None:
    store = opened(store_for(tmp_path))
    counted_syncs.update(fsync=0, syncfs=0)  # the settings file's own write aside
    items = [(FoundImage(f"{name}.jpg", f"{name}.pt"), fake_result(f"{name}.jpg", seed=seed))
             for seed, name in enumerate(["a", "sub/b", "sub/deeper/c", "d"])]
    stored = store.write_all(items)
    assert all(isinstance(place, Stored) for place in stored)
    for (image, result), place in zip(items, stored):
        path = tmp_path / image.output
        assert place.bytes_written == path.stat().st_size
        saved = features(path)
        assert list(saved) == list(result.features)
        assert all(torch.equal(saved[name], result.features[name]) for name in saved)
    assert not [p for p in tmp_path.rglob("*.tmp")], "no temporary file left"
    one_sync = groups_sync_here(tmp_path)
    # One sync for the group (and the folder's own fsync after it), or a fsync per file.
    assert counted_syncs == ({"fsync": 1, "syncfs": 1} if one_sync else {"fsync": 4, "syncfs": 0})


def test_where_the_filesystem_does_not_qualify_each_file_gets_its_fsync(
    tmp_path: Path, counted_syncs: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(files, "group_sync_descriptor", lambda folder: None)
    store = opened(store_for(tmp_path))
    counted_syncs.update(fsync=0, syncfs=0)
    stored = store.write_all([(FoundImage(f"{n}.jpg", f"{n}.pt"), fake_result(f"{n}.jpg")) for n in "abc"])
    assert [type(place) for place in stored] == [Stored] * 3
    assert counted_syncs == {"fsync": 3, "syncfs": 0}


def test_a_failed_sync_fails_the_whole_group_and_leaves_old_files_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not groups_sync_here(tmp_path):
        pytest.skip("this filesystem gets a fsync per file: no group sync to fail")
    store = opened(store_for(tmp_path))
    old = FoundImage("old.jpg", "old.pt")
    store.write(old, fake_result("old.jpg", seed=1))
    before = (tmp_path / "old.pt").read_bytes()

    def failing_syncfs(descriptor: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(files, "syncfs", failing_syncfs)
    stored = store.write_all([(FoundImage("new.jpg", "new.pt"), fake_result("new.jpg")), (old, fake_result("old.jpg", seed=2))])
    assert [str(error) for error in stored] == [f"cannot write {tmp_path / name}: Input/output error" for name in ("new.pt", "old.pt")]
    assert all(isinstance(error, OutputError) and error.ends_run for error in stored)
    assert (tmp_path / "old.pt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".manifest.jsonl.lock", "backbone-inspect.json", "manifest.jsonl", "old.pt"]


def test_writes_the_kernel_cuts_short_are_finished_and_a_failing_one_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not groups_sync_here(tmp_path):
        pytest.skip("this filesystem gets a fsync per file: a group's own writes are not used")
    store, real_write, lengths = opened(store_for(tmp_path)), os.write, []

    def short_write(descriptor: int, data: bytes) -> int:  # as write(2) may, after a signal or near a full disk
        lengths.append(len(data))
        if len(lengths) == 8:  # within the second file (each is about 3 KB: four or five writes)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(descriptor, memoryview(data)[:777])

    monkeypatch.setattr(os, "write", short_write)
    items = [(FoundImage(f"{name}.jpg", f"{name}.pt"), fake_result(f"{name}.jpg", seed=seed)) for seed, name in enumerate("abc")]
    stored = store.write_all(items)
    monkeypatch.undo()
    assert isinstance(stored[1], OutputError) and stored[1].ends_run and "No space left on device" in str(stored[1])
    for (image, result), place in [(items[0], stored[0]), (items[2], stored[2])]:
        assert isinstance(place, Stored) and place.bytes_written == (tmp_path / image.output).stat().st_size
        assert all(torch.equal(features(tmp_path / image.output)[name], value) for name, value in result.features.items())
    assert not (tmp_path / "b.pt").exists() and not list(tmp_path.glob(".*.tmp"))
    assert (tmp_path / "c.pt").stat().st_size in lengths[8:], "the third file is written after the failure, in cut writes"


def test_one_file_that_cannot_be_written_is_its_own_error_and_the_others_are_written(tmp_path: Path) -> None:
    store = opened(store_for(tmp_path))
    (tmp_path / "blocked").write_text("a file where a folder should be")
    names = ["a.pt", "blocked/b.pt", "c.pt"]
    stored = store.write_all([(FoundImage(name, name), fake_result(name)) for name in names])
    assert isinstance(stored[0], Stored) and isinstance(stored[2], Stored)
    assert isinstance(stored[1], OutputError) and not stored[1].ends_run
    assert str(stored[1]) == f"cannot write {tmp_path / 'blocked/b.pt'}: {tmp_path / 'blocked'} is a file, not a folder"
    assert (tmp_path / "a.pt").is_file() and (tmp_path / "c.pt").is_file()


def test_a_disk_full_at_the_group_sync_of_a_folder_dump_is_reported_and_loses_nothing_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not groups_sync_here(tmp_path):
        pytest.skip("this filesystem gets a fsync per file: no group sync to fail")
    images, out = many_images(tmp_path / "in", 6), tmp_path / "out"

    def disk_full(descriptor: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files, "syncfs", disk_full)
    result = invoke(images, "--save", out, "--batch-size", "8", "--workers", "0", *SMALL)
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert errors and all(line.endswith(": No space left on device") for line in errors)
    assert not list(out.rglob("*.pt")) and not list(out.rglob("*.tmp"))
    assert all(line["status"] != "ok" for line in manifest(out))
    monkeypatch.undo()
    rerun = invoke(images, "--save", out, "--batch-size", "8", "--workers", "0", *SMALL)
    assert rerun.exit_code == 0, rerun.stderr
    assert sorted(p.name for p in out.glob("*.pt")) == [f"img{index:03d}.pt" for index in range(6)]


def test_a_rerun_removes_what_a_killed_run_left_of_its_own_images_and_nothing_else(tmp_path: Path) -> None:
    images, out = many_images(tmp_path / "in", 3), tmp_path / "out"
    out.mkdir()
    left = [out / ".img001.pt.4242-17-3.tmp", out / ".img002.pt.4242-17-4.tmp"]  # as a SIGKILL leaves them
    others = [out / ".elsewhere.pt.4243-1-0.tmp", out / "notes.tmp", out / ".img001.pt.tmp"]
    for path in left + others:
        path.write_bytes(b"half a feature file")
    dry = invoke(images, "--save", out, "--dry-run", *SMALL)
    assert dry.exit_code == 0 and all(path.exists() for path in left), "a dry run removes nothing"
    result = invoke(images, "--save", out, *SMALL)
    assert result.exit_code == 0, result.stderr
    assert not any(path.exists() for path in left)
    assert all(path.exists() for path in others), "another run's files, or files not named like ours, stay"
    assert sorted(p.name for p in out.glob("*.pt")) == ["img000.pt", "img001.pt", "img002.pt"]


def test_an_interrupt_during_the_renames_leaves_no_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not groups_sync_here(tmp_path):
        pytest.skip("this filesystem gets a fsync per file: no group renames")
    real_replace, calls = os.replace, []

    def interrupted_at_the_second(source, target) -> None:
        calls.append(target)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", interrupted_at_the_second)
    writes = [(tmp_path / f"{name}.bin", lambda handle: handle.write(b"whole")) for name in "abcd"]
    with pytest.raises(KeyboardInterrupt):
        files.stage_files(writes).commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"] and (tmp_path / "a.bin").read_bytes() == b"whole"


def test_a_manifest_that_can_no_longer_be_written_is_an_output_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = store_for(tmp_path)
    store.claim(overwrite=False)
    store.open()

    def read_only(*_: object) -> int:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(store._manifest, "write", read_only)
    with pytest.raises(OutputError, match=f"^cannot write manifest {tmp_path / 'manifest.jsonl'}: Read-only file system$"):
        store.record(Outcome("a.jpg", "a.pt", "error", error="a.jpg: empty file"))
    monkeypatch.undo()
    store.close()
    assert store._lock is None


MANIFEST_ON_A_FILLING_DISK = r"""
import resource, signal, sys
from pathlib import Path
from backbone_inspect.config import feature_config
from backbone_inspect.errors import OutputError
from backbone_inspect.outcomes import Outcome
from backbone_inspect.pt_store import PtFileStore

store = PtFileStore(Path(sys.argv[1]), feature_config(arch="resnet18", device="cpu"))
store.claim(overwrite=False)
store.open()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (2000, hard))  # as a disk that is full at 2,000 bytes
refused = 0
for index in range(40):
    try:
        store.record(Outcome(f"img{index:02d}.jpg", f"img{index:02d}.pt", "error", error="x" * 60))
    except OutputError:
        refused += 1
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space comes back
store.record(Outcome("last.jpg", "last.pt", "error", error="recorded once there is room"))
store.close()
print(refused)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="needs RLIMIT_FSIZE")
def test_a_manifest_line_a_full_disk_cuts_short_is_taken_back_whole_and_never_written_later(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", MANIFEST_ON_A_FILLING_DISK, str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = (tmp_path / "manifest.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line whole
    accepted = 40 - int(done.stdout)
    assert 0 < accepted < 40
    assert [record["image"] for record in records] == [f"img{index:02d}.jpg" for index in range(accepted)] + ["last.jpg"]
