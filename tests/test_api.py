"""The Python API against the command: the same files, the same manifest, the same errors."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.transforms._presets import ImageClassification

import backbone_inspect
from backbone_inspect import FeatureStore, RunCallbacks, dump_features, execute_run, inspect_images, plan_run
from backbone_inspect.config import feature_config
from backbone_inspect.run import make_engine
from backbone_inspect.errors import RunStopped, UsageError
from backbone_inspect.images import load_rgb
from backbone_inspect.inputs import plan_inputs
from backbone_inspect.store import ResumeSplit, Stored

from conftest import SMALL, SMALL_OPTIONS, assert_close_scaled, features, invoke, manifest, many_images, seeded_model


def feature_files(folder: Path) -> list[str]:
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*.pt"))


def test_dump_features_writes_what_the_command_writes(tmp_path: Path, photos: Path) -> None:
    (photos / "b" / "broken.jpg").write_bytes(b"not a jpeg")
    command = invoke(photos, "--save", tmp_path / "cli", "--layers", "1,4", *SMALL)
    assert command.exit_code == 1, command.output
    summary = dump_features(photos, tmp_path / "api", layers=(1, 4), **SMALL_OPTIONS)
    assert (summary.processed, summary.skipped, summary.failed) == (4, 0, 1)
    assert summary.bytes_written == sum(p.stat().st_size for p in (tmp_path / "api").rglob("*.pt")) and summary.seconds > 0
    assert [stage.name for stage in summary.stages] == ["layer1", "layer4"] and summary.stages[0].images == 4
    assert feature_files(tmp_path / "api") == feature_files(tmp_path / "cli") == ["a/cat.pt", "b/cat.pt", "b/deep/dog.pt", "top.pt"]
    for name in feature_files(tmp_path / "cli"):
        here, there = (torch.load(tmp_path / side / name, weights_only=True) for side in ("cli", "api"))
        assert here["meta"] == there["meta"]
        for stage, tensor in here["features"].items():
            assert torch.equal(there["features"][stage], tensor), (name, stage)
    assert manifest(tmp_path / "api") == manifest(tmp_path / "cli")
    for side in ("cli", "api"):
        assert json.loads((tmp_path / side / "backbone-inspect.json").read_text())["layers"] == ["layer1", "layer4"]


def test_dump_features_resumes_and_refuses_other_settings_with_exceptions(tmp_path: Path, photos: Path) -> None:
    out = tmp_path / "out"
    dump_features([photos / "a", photos / "top.png"], out, **SMALL_OPTIONS, workers=0)
    again = dump_features([photos / "a", photos / "top.png"], out, **SMALL_OPTIONS, workers=0)
    assert (again.processed, again.skipped, again.failed, again.bytes_written) == (0, 2, 0, 0)
    with pytest.raises(UsageError, match=r"preprocessing\.crop 64 \(now 48\)"):
        dump_features(photos / "a", out, **{**SMALL_OPTIONS, "crop": 48})
    for options, message in ((dict(batch_size=0), "--batch-size 0"), (dict(layers="9"), "invalid stage 9"),
                             (dict(engine="spark"), "--engine spark"),
                             (dict(on_outcome=3), r"^on_outcome 3: expected a function taking each image's Outcome, or None$"),
                             (dict(viz_channels=4), r"^--viz-channels needs --viz DIR$")):
        with pytest.raises(UsageError, match=message):
            dump_features(photos, tmp_path / "never", **{**SMALL_OPTIONS, **options})
    with pytest.raises(UsageError, match=r"^inputs of type Tensor: expected a path, or a list of paths, of image files or folders$"):
        dump_features(torch.zeros(2, 3, 8, 8), tmp_path / "never", **SMALL_OPTIONS)
    with pytest.raises(UsageError, match=r"^--save '.*never\\x00x': a path cannot hold a NUL character$"):
        dump_features(photos, f"{tmp_path / 'never'}\0x", **SMALL_OPTIONS)
    with pytest.raises(UsageError, match=r"^--categories needs --topk K$"):
        inspect_images(photos, categories=["a"], **SMALL_OPTIONS)  # as the command refuses it
    assert not (tmp_path / "never").exists()


def test_a_signal_stops_dump_features_cleanly_and_a_second_call_finishes(tmp_path: Path) -> None:
    # The first report may wait until 2 x writer_threads() (up to 4) slices are pending: with a slow
    # disk it comes with the 9th batch of one image at the latest, so 12 stop mid-run on any machine.
    root = many_images(tmp_path / "many", 12)
    out = tmp_path / "out"
    handler_before = signal.getsignal(signal.SIGINT)

    interrupted = []

    def interrupt_after_the_first(outcome) -> None:
        if outcome.status == "ok" and not interrupted:  # several files are in flight: others may be done too
            interrupted.append(outcome)
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(RunStopped) as stopped:
        dump_features(root, out, **SMALL_OPTIONS, batch_size=1, workers=0, on_outcome=interrupt_after_the_first)
    assert stopped.value.exit_code == 130 and "stopped by SIGINT" in str(stopped.value)
    done = stopped.value.summary
    assert 1 <= done.processed < 12 and done.left == 12 - done.processed
    assert len(list(out.glob("*.pt"))) == done.processed and not list(out.glob(".*tmp"))
    assert signal.getsignal(signal.SIGINT) is handler_before, "the caller's handler is back"
    rest = dump_features(root, out, **SMALL_OPTIONS, batch_size=1, workers=0)
    assert (rest.processed, rest.skipped) == (12 - done.processed, done.processed)


def test_inspect_images_gives_statistics_and_features_of_the_models_own_forward(tmp_path: Path, chelsea: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"")
    found = inspect_images([chelsea, broken], layers="stem,C5", features=True, **SMALL_OPTIONS)
    assert [result.image for result in found.results] == [str(chelsea)]
    assert [(f.image, f.error) for f in found.failures] == [(str(broken), f"{broken}: empty file")]
    assert (found.summary.processed, found.summary.failed) == (1, 1) and found.model.arch == "resnet18"
    x = ImageClassification(crop_size=64, resize_size=64)(load_rgb(chelsea)).unsqueeze(0)
    with torch.no_grad():
        expected = create_feature_extractor(seeded_model("resnet18"), {"maxpool": "stem", "layer4": "layer4"})(x)
    result = found.results[0]
    assert list(result.features) == ["stem", "layer4"] and [s.name for s in result.stats] == ["stem", "layer4"]
    for stats in result.stats:
        assert_close_scaled(result.features[stats.name], expected[stats.name][0])
        assert stats.mean == pytest.approx(expected[stats.name].mean().item(), rel=1e-4)
        assert stats.max == pytest.approx(expected[stats.name].max().item(), rel=1e-4)
    lean = inspect_images(chelsea, layers="4", **SMALL_OPTIONS)
    assert dict(lean.results[0].features) == {} and lean.results[0].pixels is None
    assert lean.results[0].stats[0].mean == pytest.approx(expected["layer4"].mean().item(), rel=1e-4)


class MemoryStore(FeatureStore):
    """A store of this test's own, through the interface alone: what a new kind of store needs."""

    location = "memory"

    def __init__(self) -> None:
        self.features: dict[str, dict[str, torch.Tensor]] = {}
        self.records: list[str] = []
        self.events: list[str] = []

    def claim(self, *, overwrite: bool, record: bool = True) -> None:
        self.events.append("claim")

    def split_done(self, images, *, overwrite: bool) -> ResumeSplit:
        return ResumeSplit(tuple(i for i in images if i.output not in self.features), (), ())

    def open(self) -> None:
        self.events.append("open")

    def write(self, image, result) -> Stored:
        self.features[image.output] = {name: value.clone() for name, value in result.features.items()}
        return Stored(0)

    def record(self, outcome) -> None:
        self.records.append(f"{outcome.output} {outcome.status}")

    def close(self) -> None:
        self.events.append("close")

    def estimate_bytes(self, input_sizes) -> int:
        return 0


def test_a_store_of_another_kind_plugs_into_the_same_run(tmp_path: Path, photos: Path) -> None:
    config = feature_config(**SMALL_OPTIONS, layers="2,4")
    store = MemoryStore()
    seen: list[str] = []
    plan = plan_run(config, plan_inputs(photos), make_engine(batch_size=3, workers=0), store)
    summary = execute_run(plan, callbacks=RunCallbacks(on_outcome=lambda outcome, _: seen.append(outcome.output)))
    assert store.events == ["claim", "open", "close"] and summary.processed == 4
    assert store.records == [f"{output} ok" for output in seen] == [f"{o} ok" for o in ("a/cat.pt", "b/cat.pt", "b/deep/dog.pt", "top.pt")]
    dump_features(photos, tmp_path / "files", layers="2,4", **SMALL_OPTIONS)
    for output, maps in store.features.items():
        on_disk = features(tmp_path / "files" / output)
        assert maps.keys() == on_disk.keys()
        for name in maps:  # batches of 3 against 32: the same numbers up to float noise
            assert_close_scaled(maps[name], on_disk[name])


def test_the_public_names_are_importable_from_the_package() -> None:
    for name in backbone_inspect.__all__:
        assert getattr(backbone_inspect, name) is not None, name


@pytest.mark.parametrize("pool", ["none", "avg"])
@pytest.mark.parametrize("channels_last", [True, False])
def test_inspect_images_features_are_ordinary_tensors_a_head_can_train_on(chelsea: Path, pool: str, channels_last: bool) -> None:
    found = inspect_images(chelsea, layers=4, features=True, pool=pool, channels_last=channels_last, **SMALL_OPTIONS)
    layer4 = found.results[0].features["layer4"]
    x = ImageClassification(crop_size=64, resize_size=64)(load_rgb(chelsea)).unsqueeze(0)
    with torch.no_grad():
        expected = create_feature_extractor(seeded_model("resnet18"), {"layer4": "layer4"})(x)["layer4"][0]
    assert_close_scaled(layer4, expected if pool == "none" else expected.mean(dim=(-2, -1)))
    assert not layer4.is_inference()
    head = torch.nn.Linear(layer4.shape[0], 2)
    head(layer4.flatten(1).T if pool == "none" else layer4).sum().backward()  # autograd saves the features
    assert head.weight.grad is not None
    layer4 /= layer4.norm()  # in place, as a user normalises
    assert layer4.norm().item() == pytest.approx(1.0, rel=1e-5)
