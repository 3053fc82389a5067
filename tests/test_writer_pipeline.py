"""The local engine's writers: slices written under temporary names, each committed (one sync,
renames) by a committer thread while the writers write the next, reported in order."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

from backbone_inspect import batch_work, local_engine
from backbone_inspect.inputs import FoundImage
from backbone_inspect.outcomes import Outcome
from backbone_inspect.pt_store import PtFileStore
from backbone_inspect.results import ImageResult
from backbone_inspect.signals import StopRequest
from backbone_inspect.store import Stored

from conftest import features
from store_helpers import fake_result, groups_sync_here, opened, store_for

Items = list[tuple[FoundImage, ImageResult | str]]


def batches(count: int, size: int) -> list[Items]:
    """``count`` batches of ``size`` images, each with known features, named in order."""
    return [[(FoundImage(f"img{b}-{i}.jpg", f"img{b}-{i}.pt"), fake_result(f"img{b}-{i}.jpg", seed=b * size + i))
             for i in range(size)] for b in range(count)]


class WatchedStore(PtFileStore):
    """A pt store that says when each slice is staged and committed, and can hold either back."""

    def __init__(self, *args: object, **keywords: object) -> None:
        super().__init__(*args, **keywords)
        self.staged: list[threading.Event] = [threading.Event() for _ in range(8)]
        self.stage_gate = threading.Event()
        self.stage_gate.set()
        self.commits_waiting_for_the_next_stage = 0
        self.overlapped: list[bool] = []
        self._count = 0

    def stage_all(self, items: Sequence[tuple[FoundImage, ImageResult]]) -> Callable[[], list[Stored | object]]:
        assert self.stage_gate.wait(timeout=30)
        index, self._count = self._count, self._count + 1
        commit = super().stage_all(items)
        self.staged[index].set()

        def later() -> list[Stored | object]:
            if index < self.commits_waiting_for_the_next_stage:  # true only if the writer goes on while this commits
                self.overlapped.append(self.staged[index + 1].wait(timeout=30))
            return commit()

        return later


def watched(folder: Path) -> WatchedStore:
    store = WatchedStore(folder, store_for(folder).config)
    store.claim(overwrite=False)
    store.open()
    return store


def run_writes(store: PtFileStore, work: list[Items], *, cancel_after: int | None = None) -> list[Outcome]:
    reported: list[Outcome] = []
    writes = local_engine._Writes(store, lambda outcome, result: reported.append(outcome))
    for number, batch in enumerate(work):
        writes.write(batch, StopRequest())
        if number == cancel_after:
            writes.cancel()
            break
    return finish(writes, store, reported)


def finish(writes: local_engine._Writes, store: PtFileStore, reported: list[Outcome]) -> list[Outcome]:
    writes.finish()
    store.close()
    assert writes.failure is None
    return reported


@pytest.mark.parametrize("threads", [1, 3])
def test_every_image_is_reported_in_order_once_its_file_is_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: int) -> None:
    monkeypatch.setattr(local_engine, "writer_threads", lambda: threads)
    work = batches(4, 5)
    work[1][2] = (work[1][2][0], "img1-2.jpg: not an image")
    reported = run_writes(opened(store_for(tmp_path)), work)
    assert [outcome.image for outcome in reported] == [image.path for batch in work for image, _ in batch]
    for image, result in (item for batch in work for item in batch):
        if isinstance(result, str):
            assert not (tmp_path / image.output).exists()
            continue
        saved = features(tmp_path / image.output)
        assert all(torch.equal(saved[name], result.features[name]) for name in result.features)
    assert [outcome.status for outcome in reported].count("error") == 1
    assert not list(tmp_path.glob("*.tmp"))


def test_a_slice_is_committed_while_the_writer_writes_the_next(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not groups_sync_here(tmp_path):
        pytest.skip("this filesystem gets a fsync per file: a slice is written whole, nothing is left to commit")
    monkeypatch.setattr(local_engine, "writer_threads", lambda: 1)
    store = watched(tmp_path)
    store.commits_waiting_for_the_next_stage = 2
    reported = run_writes(store, batches(3, 4))
    assert store.overlapped == [True, True], "each commit saw the next slice written"
    assert len(reported) == 12 and all(outcome.status == "ok" for outcome in reported)


def test_a_second_ctrl_c_drops_slices_not_yet_written_and_commits_the_ones_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local_engine, "writer_threads", lambda: 1)
    store = watched(tmp_path)
    store.stage_gate.clear()  # the writer holds the first slice until the second batch is handed over
    work = batches(2, 4)
    reported: list[Outcome] = []
    writes = local_engine._Writes(store, lambda outcome, result: reported.append(outcome))
    for batch in work:
        writes.write(batch, StopRequest())
    writes.cancel()
    store.stage_gate.set()
    reported = finish(writes, store, reported)
    assert [outcome.image for outcome in reported] == [image.path for image, _ in work[0]]
    assert sorted(path.name for path in tmp_path.glob("*.pt")) == sorted(image.output for image, _ in work[0])
    assert not list(tmp_path.glob("*.tmp")), "a slice written is committed, not left as temporaries"


def test_files_staged_stand_under_no_final_name_until_their_commit(tmp_path: Path) -> None:
    store = opened(store_for(tmp_path))
    items = [(FoundImage(f"{name}.jpg", f"{name}.pt"), fake_result(f"{name}.jpg", seed=seed)) for seed, name in enumerate("abcd")]
    commit = store.stage_all(items)
    if groups_sync_here(tmp_path):
        assert not list(tmp_path.glob("*.pt")) and len(list(tmp_path.glob(".*.tmp"))) == 4
    committer = threading.Thread(target=lambda: stored.extend(commit()))
    stored: list[Stored | object] = []
    committer.start()
    committer.join(timeout=30)
    assert [place.bytes_written for place in stored] == [(tmp_path / f"{name}.pt").stat().st_size for name in "abcd"]
    assert all(torch.equal(features(tmp_path / image.output)["layer4"], result.features["layer4"]) for image, result in items)
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(("cpus", "threads"), [(1, 2), (2, 2), (11, 2), (12, 3), (16, 4), (128, 4)])
def test_writer_threads_follow_the_usable_cpus(monkeypatch: pytest.MonkeyPatch, cpus: int, threads: int) -> None:
    monkeypatch.setattr("backbone_inspect.options.usable_cpus", lambda: cpus)
    assert batch_work.writer_threads() == threads
