"""The README's Python example runs as written, and prints what its comments say."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

from conftest import REPO, SAMPLES


def readme_block(heading: str) -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.cuda_by_default
def test_the_python_api_example_runs_and_prints_what_it_says(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "sample_images").symlink_to(SAMPLES)
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(readme_block("### Dump features from Python"), "README.md", "exec"), {})
    lines = printed.getvalue().splitlines()
    assert lines[0] == "5 0 0" and re.fullmatch(r"\d+\.\d MB in \d+\.\d s", lines[1])
    assert lines[2] == "0 5"
    assert lines[3] == "sample_images/chelsea.jpg (512, 7, 7) " + lines[3].split(") ")[1]
    assert lines[4].startswith("sample_images/rocket.jpg (512, 7, 7) ") and lines[4].endswith("% zeros")
    assert lines[5] == "['layer3', 'layer4']"
    assert len(list((tmp_path / "feats").glob("*.pt"))) == 5


@pytest.mark.cuda_by_default
def test_the_reader_example_trains_on_a_pooled_dump_and_prints_what_it_says(tmp_path: Path, monkeypatch) -> None:
    from safetensors.torch import load_file

    (tmp_path / "sample_images").symlink_to(SAMPLES)
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(readme_block("### Reading a dump back"), "README.md", "exec"), {"__name__": "readme"})
    assert printed.getvalue().splitlines() == [
        "5 shards avg ('layer4',)", "(5, 512) torch.float32", "['image', 'input_size', 'output']",
    ]
    (shard,) = (tmp_path / "vecs" / "shards").glob("*.safetensors")
    assert load_file(shard)["layer4"].shape == (5, 512)


def test_the_detection_recipe_runs_a_training_step_with_gradients_through_the_backbone() -> None:
    code = readme_block("### As a detection backbone")
    assert code.count('weights="DEFAULT"') == 1
    namespace: dict = {"__name__": "readme"}
    # As written but for the weights, which the tests cannot download.
    exec(compile(code.replace('weights="DEFAULT"', "weights=None"), "README.md", "exec"), namespace)
    assert set(namespace["losses"]) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    stages = namespace["body"].body
    assert stages.stage_names == ("stage2", "stage3", "stage4")
    assert all(parameter.grad is not None for parameter in stages.parameters())


def test_the_shard_sizes_the_readme_gives_are_the_stores_own(tmp_path: Path) -> None:
    from backbone_inspect import ShardStore, feature_config

    text = (REPO / "README.md").read_text(encoding="utf-8")
    for layers, key in (((2, 3, 4), "1.4 MB an image, "), ((4,), "`--layers 4`: ")):
        config = feature_config(arch="resnet50", layers=layers, save_dtype="float16")
        images = ShardStore(tmp_path / "out", config).commit_size([(224, 224)])
        assert f"{key}{images:,}" in " ".join(text.split()), (layers, images)
