"""Planning a run without running it: the configuration, the inputs and their shards, the engine."""

from __future__ import annotations

import hashlib
import os
import pickle
import warnings
from pathlib import Path

import pytest

from backbone_inspect.config import feature_config
from backbone_inspect.run import make_engine
from backbone_inspect.errors import UsageError
from backbone_inspect.inputs import plan_inputs
from backbone_inspect.shards import Shard, SlurmWithoutSrunWarning, local_processes_from_env

from conftest import SAMPLES, SMALL, SMALL_OPTIONS, invoke, noise_image


def test_the_configuration_is_resolved_once_frozen_and_picklable(tmp_path: Path) -> None:
    categories = tmp_path / "classes.txt"
    categories.write_text("\n".join(f"class {i}" for i in range(1000)) + "\n")
    config = feature_config(arch="resnet18", layers="C5,1,layer1", resize="none", crop=64, topk=3,
                            categories=categories, dtype="bfloat16", device="CPU")
    assert config.stages == ("layer1", "layer4")
    assert (config.preprocessing.resize, config.preprocessing.crop) == (None, 64)
    assert config.weights.kind == "none" and config.device == "cpu" and len(config.categories) == 1000
    assert pickle.loads(pickle.dumps(config)) == config
    with pytest.raises(AttributeError):
        config.arch = "resnet50"  # type: ignore[misc]
    assert config.settings()["seed"] == 0
    checkpoint = tmp_path / "any.pth"
    checkpoint.write_bytes(b"any bytes: the settings name a checkpoint by its path and a digest of its content")
    settings = feature_config(**SMALL_OPTIONS, weights=checkpoint).settings()
    assert settings["seed"] is None and settings["weights"] == str(checkpoint)
    assert settings["weights_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert config.settings()["weights_sha256"] is None


def test_named_weights_are_planned_as_plain_values_with_their_own_preprocessing() -> None:
    config = feature_config(arch="resnet50", weights="DEFAULT")
    assert (config.weights.kind, config.weights.label) == ("named", "IMAGENET1K_V2")
    assert config.preprocessing.resize == 232 and config.preprocessing.crop == 224
    assert pickle.loads(pickle.dumps(config)) == config


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"arch": "vgg16"}, "unknown arch 'vgg16'"),
        ({"layers": "5"}, "invalid stage 5"),
        ({"resize": 0}, "invalid --resize 0"),
        ({"resize": 32, "crop": 64}, "--crop 64 is larger than --resize 32"),
        ({"dtype": "int8"}, "invalid --dtype 'int8'"),
        ({"device": "tpu"}, "invalid --device 'tpu'"),
        ({"topk": -1}, "--topk -1"),
        ({"weights": "IMAGENET1K_V9"}, "--weights 'IMAGENET1K_V9' does not exist for resnet50"),
    ],
)
def test_bad_options_are_usage_errors_naming_the_option(options: dict, message: str) -> None:
    with pytest.raises(UsageError) as error:
        feature_config(**options)
    assert message in str(error.value)


def test_inputs_are_found_sorted_and_sharded_into_disjoint_slices(tmp_path: Path, photos: Path) -> None:
    whole = plan_inputs(photos, shard_from_environment=False)
    assert [image.output for image in whole.found] == ["a/cat.pt", "b/cat.pt", "b/deep/dog.pt", "top.pt"]
    assert whole.selected == whole.found and whole.shard is None and not whole.named_files
    slices = [plan_inputs([photos], shard=f"{k}/3").selected for k in range(3)]
    assert sorted(image.path for part in slices for image in part) == sorted(image.path for image in whole.found)
    assert sum(len(part) for part in slices) == len(whole.found)
    assert plan_inputs(photos, shard=Shard(1, 3)).selected == slices[1]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"RANK": "1", "WORLD_SIZE": "2"}, Shard(1, 2)),
        ({"SLURM_PROCID": "2", "SLURM_STEP_NUM_TASKS": "3", "SLURM_NTASKS": "3"}, Shard(2, 3)),
        ({"RANK": "0", "WORLD_SIZE": "1"}, None),
        # srun -E (--preserve-env) in a job of 4 tasks: SLURM_NTASKS stays the job's, the step's is 2.
        ({"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "4"}, Shard(1, 2)),
        # The shell of salloc -n 4's interactive step (srun --interactive --preserve-env --pty): one task.
        ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "4"}, None),
        # srun torchrun: torchrun's rank, not the srun task's.
        ({"RANK": "3", "WORLD_SIZE": "4", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1"}, Shard(3, 4)),
    ],
)
def test_torchrun_and_slurm_give_the_shard_unless_told_otherwise(photos: Path, monkeypatch, env: dict, expected) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # each started by its launcher: nothing to advise
        assert plan_inputs(photos).shard == expected
    assert plan_inputs(photos, shard="0/4").shard == Shard(0, 4), "an explicit shard wins"
    assert plan_inputs(photos, shard_from_environment=False).shard is None


def test_a_slurm_batch_script_of_several_tasks_takes_every_image_and_says_to_use_srun(photos: Path, monkeypatch) -> None:
    """What slurmstepd gives a batch script of ``--ntasks 4`` (src/common/env.c): SLURM_PROCID=0 and
    SLURM_NTASKS=4 in its one process; srun adds SLURM_STEP_NUM_TASKS to each task it starts."""
    monkeypatch.setenv("SLURM_PROCID", "0"), monkeypatch.setenv("SLURM_NTASKS", "4")
    with pytest.warns(SlurmWithoutSrunWarning, match=r"^this Slurm job has 4 tasks \(SLURM_NTASKS\) but this process was not "
                      r"started by srun, so it takes every image itself; to split them between 4 processes, start the command with srun$"):
        planned = plan_inputs(photos)
    assert planned.shard is None and planned.selected == plan_inputs(photos, shard_from_environment=False).found
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")  # under srun
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plan_inputs(photos).shard == Shard(0, 4)


def test_a_slurm_batch_script_without_srun_is_one_warning_line_and_the_whole_input(tmp_path: Path, chelsea: Path, monkeypatch) -> None:
    monkeypatch.setenv("SLURM_PROCID", "0"), monkeypatch.setenv("SLURM_NTASKS", "2")
    result = invoke(chelsea, SAMPLES / "astronaut.png", "--save", tmp_path / "out", "--json", *SMALL)
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == 2
    warning, summary = result.stderr.splitlines()
    assert warning == ("Warning: this Slurm job has 2 tasks (SLURM_NTASKS) but this process was not started by srun, so it "
                       "takes every image itself; to split them between 2 processes, start the command with srun")
    assert summary.startswith("processed 2, skipped 0, failed 0")


def test_a_ray_driver_in_a_slurm_batch_script_is_not_told_to_use_srun(tmp_path: Path, chelsea: Path, monkeypatch) -> None:
    """Ray's recipe for Slurm: one task per node (SLURM_NTASKS = the nodes), ``ray start`` on each
    by srun, and the driver, one process for the whole cluster, in the batch script itself."""
    monkeypatch.setenv("SLURM_PROCID", "0"), monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setattr("backbone_inspect.ray_engine.check_ray_installed", lambda: None)  # the same with Ray or without
    result = invoke(chelsea, "--save", tmp_path / "out", "--engine", "ray", "--viz", tmp_path / "viz", *SMALL)
    assert result.exit_code == 2 and result.stderr.splitlines() == [
        "Error: --viz works with the local engine only: draw pictures of a few images without --engine ray"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [image.path for image in plan_inputs(chelsea, advise_srun=False).selected] == [str(chelsea)]


@pytest.mark.parametrize(("env", "processes"), [
    ({"SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": "1"}, 2),
    ({"SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": "3"}, 1),
    ({"SLURM_STEP_TASKS_PER_NODE": "4", "SLURM_NODEID": "0", "SLURM_NTASKS_PER_NODE": "8"}, 4),  # the step's, not the job's
    ({"SLURM_NTASKS_PER_NODE": "8"}, 8),
    ({"SLURM_STEP_TASKS_PER_NODE": "4(x", "SLURM_NODEID": "0"}, 1),
    ({"SLURM_STEP_TASKS_PER_NODE": "4", "SLURM_NODEID": "1"}, 1),
    ({"LOCAL_WORLD_SIZE": "3", "SLURM_STEP_TASKS_PER_NODE": "4", "SLURM_NODEID": "0"}, 3),
])
def test_the_processes_on_this_node_are_those_srun_started_here(env: dict, processes: int) -> None:
    assert local_processes_from_env(env) == processes


def test_srun_tasks_on_one_node_share_its_cores_between_their_workers(monkeypatch) -> None:
    """Eight tasks, four a node, not bound to cores: each decodes with a quarter of the node's 16, less one for its own threads."""
    from backbone_inspect.local_engine import LocalEngine

    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(16)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_NODEID": "1"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert LocalEngine(workers=None).workers_for("cuda") == 16 // 4 - 1


def test_colliding_outputs_missing_paths_and_empty_inputs_are_refused(tmp_path: Path, photos: Path) -> None:
    with pytest.raises(UsageError, match=r"inputs would overwrite each other's output: .*a/cat.jpg, .*b/cat.PNG -> cat.pt"):
        plan_inputs([photos / "a" / "cat.jpg", photos / "b" / "cat.PNG"])
    named = plan_inputs([photos / "a" / "cat.jpg", photos / "b" / "cat.PNG"], check_collisions=False)
    assert named.named_files and len(named.found) == 2
    with pytest.raises(UsageError, match="no such file or directory"):
        plan_inputs([tmp_path / "missing.jpg"])
    (tmp_path / "loop.jpg").symlink_to(tmp_path / "loop.jpg")
    (tmp_path / "broken.jpg").symlink_to(tmp_path / "missing.jpg")
    for link in ("loop.jpg", "broken.jpg"):
        with pytest.raises(UsageError, match=f"{link}: a symbolic link that leads nowhere \\(broken, or a loop\\)$"):
            plan_inputs([tmp_path / link])
    with pytest.raises(UsageError, match="no inputs"):
        plan_inputs([])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no images found in"):
        plan_inputs(tmp_path / "empty")


def test_a_list_file_adds_inputs_and_the_same_file_is_taken_once(tmp_path: Path, photos: Path) -> None:
    extra = noise_image(tmp_path / "extra.png")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# comment\n\n{extra}\n{photos / 'top.png'}\n")
    plan = plan_inputs(photos / "top.png", from_list=listing)
    assert [image.path for image in plan.found] == sorted([str(extra), str(photos / "top.png")])
    assert not plan.named_files


@pytest.mark.parametrize("second", ["link", "link/a", "link/top.png", "link/../photos"])
def test_a_folder_reached_through_a_link_is_taken_once(tmp_path: Path, photos: Path, second: str) -> None:
    (tmp_path / "link").symlink_to(photos)
    (photos / "alias.png").symlink_to(photos / "top.png")  # a link to a file stays a file of its own
    plan = plan_inputs([photos, tmp_path / second])
    assert [image.output for image in plan.found] == ["a/cat.pt", "alias.pt", "b/cat.pt", "b/deep/dog.pt", "top.pt"]
    assert all(Path(image.path).parent.is_relative_to(photos) for image in plan.found)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"name": "spark"}, "--engine spark: expected one of local, ray"),
        ({"ray_address": "auto"}, "--ray-address needs --engine ray"),
        ({"ray_actors": 2}, "--ray-actors needs --engine ray"),
        ({"ray_actor_cpus": 0.5}, "--ray-actor-cpus needs --engine ray"),
        ({"ray_actor_cpus": 1.0}, "--ray-actor-cpus needs --engine ray"),  # the default's value, given
        ({"batch_size": 0}, "--batch-size 0"),
        ({"workers": -1}, "--workers -1"),
        ({"name": "ray", "workers": 3}, "--workers is for the local engine: with --engine ray, Ray schedules the decoding itself"),
    ],
)
def test_engine_options_are_checked_when_the_engine_is_made(options: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        make_engine(**options)


def test_the_local_engine_keeps_its_options() -> None:
    engine = make_engine("local", batch_size=4, workers=0)
    assert (engine.batch_size, engine.workers, engine.supports_pictures) == (4, 0, True)
    assert make_engine().workers is None  # the default for the device the model lands on: see test_precision


@pytest.mark.parametrize(("spec", "local_rank", "expected"), [
    ("cuda", 3, "cuda:1"), ("auto", 3, "cuda:1"), ("cuda", 0, "cuda:0"), ("cuda:0", 1, "cuda:0"), ("cuda:1", None, "cuda:1"),
    ("cuda", None, "cuda"), ("cpu", 1, "cpu"),
])
def test_each_torchrun_process_gets_its_own_gpu_unless_one_is_named(monkeypatch, spec: str, local_rank: int | None,
                                                                     expected: str) -> None:
    """Plain ``cuda`` under torchrun put every process of a node on GPU 0 (two GPUs here, as torch would report them)."""
    import torch

    from backbone_inspect.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device(spec, local_rank=local_rank) == torch.device(expected)


@pytest.mark.parametrize("option", ["--save", "--viz"])
def test_an_output_folder_that_is_a_dangling_link_is_a_usage_error_naming_the_link(tmp_path: Path, chelsea: Path, option: str) -> None:
    """It was 'cannot write to output folder …: File exists', exit 1."""
    (tmp_path / "out").symlink_to(tmp_path / "gone" / "feats")
    for given in (tmp_path / "out", f"{tmp_path / 'out'}/", tmp_path / "out" / "sub"):
        result = invoke(chelsea, option, given, "--arch", "resnet18", "--device", "cpu")
        assert (result.exit_code, result.stderr) == (2, f"Error: {option} {given}: {tmp_path / 'out'} is a symbolic link to "
                                                        f"{tmp_path / 'gone' / 'feats'}, which does not exist\n")
    assert not (tmp_path / "gone").exists()


@pytest.mark.parametrize("output_format", ["pt", "shards"])
def test_an_image_named_alone_that_a_folder_run_saved_under_another_name_is_a_warning(tmp_path: Path, output_format: str) -> None:
    """A file named alone is saved as <stem>.pt: redoing one image of a folder's dump that way put it there twice, unsaid."""
    root, out = tmp_path / "photos", tmp_path / "out"
    noise_image(root / "a" / "cat.png")
    noise_image(root / "dog.png")
    options = [*SMALL, "--workers", "0", "--save", out, "--format", output_format]
    first = invoke(root, *options)
    assert first.exit_code == 0 and "Warning" not in first.stderr
    again = invoke(root / "a" / "cat.png", root / "dog.png", *options, "--overwrite")
    assert again.exit_code == 0
    assert [line for line in again.stderr.splitlines() if line.startswith("Warning")] == [
        f"Warning: 1 image(s) named here are already in {out} under another name (e.g. {root / 'a' / 'cat.png'} as a/cat.pt); "
        "this run saves them again as cat.pt, by their name alone: to redo them in place, give their folder as the earlier run did"]
    folder_again = invoke(root, *options, "--overwrite")
    assert folder_again.exit_code == 0 and "Warning" not in folder_again.stderr


def test_an_image_named_alone_saved_under_its_own_name_too_is_no_warning(tmp_path: Path) -> None:
    """A link to it in the folder gave the same file a second name there: that first name was taken as the only one."""
    root, out = tmp_path / "photos", tmp_path / "out"
    noise_image(root / "x.png")
    (root / "a.png").symlink_to(root / "x.png")
    options = [*SMALL, "--workers", "0", "--save", out]
    assert invoke(root, *options).exit_code == 0
    again = invoke(root / "x.png", *options, "--overwrite")
    assert again.exit_code == 0 and "Warning" not in again.stderr, again.stderr
