from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
import torchvision

from backbone_inspect import feature_info
from backbone_inspect import Backbone
from backbone_inspect.anatomy import describe_stages
from backbone_inspect.stages import STAGES, parse_layers

from conftest import SMALL, invoke


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("C2,C5", ("layer1", "layer4")),
        ("res3,res4", ("layer2", "layer3")),
        ("stage1,stage4,stem", ("stem", "layer1", "layer4")),
        ("c3,RES5,Stage2", ("layer2", "layer4")),
    ],
)
def test_fpn_detectron_and_hugging_face_aliases(spec: str, expected: tuple[str, ...]) -> None:
    assert parse_layers(spec) == expected


def receptive_field_by_gradient(arch: str, stage: str, size: int) -> int:
    """The extent of input pixels the centre output position depends on, found by backpropagation.

    All weights positive, max pooling swapped for average pooling of the same geometry and the
    input positive: every path counts, as the theoretical receptive field assumes. float64, so
    that the long thin paths to the field's edge do not underflow to zero.
    """
    model = torchvision.models.get_model(arch).eval().double()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(0.01)
    model.maxpool = torch.nn.AvgPool2d(3, 2, 1)
    backbone = Backbone(arch, (stage,), model=model).eval()
    x = torch.ones(1, 3, size, size, dtype=torch.float64, requires_grad=True)
    out = backbone(x)[stage]
    out[0, :, out.shape[2] // 2, out.shape[3] // 2].sum().backward()
    rows = (x.grad[0].abs().sum(dim=(0, 2)) > 0).nonzero()
    return int(rows.max() - rows.min() + 1)


@pytest.mark.parametrize(("arch", "stage", "size"), [("resnet18", "layer2", 160), ("resnet18", "layer3", 320), ("resnet50", "layer3", 384)])
def test_receptive_field_equals_what_backpropagation_reaches(arch: str, stage: str, size: int) -> None:
    described = {d.name: d for d in describe_stages(arch, (size, size))}
    assert described[stage].receptive_field == receptive_field_by_gradient(arch, stage, size)


@pytest.mark.parametrize("arch", ["resnet18", "resnext50_32x4d"])
def test_describe_matches_a_real_forward_and_parameter_count(arch: str) -> None:
    size = (96, 160)
    described = describe_stages(arch, size)
    model = torchvision.models.get_model(arch).eval()
    with torch.no_grad():
        features = Backbone(arch, STAGES, model=model)(torch.zeros(1, 3, *size))
    assert [d.name for d in described] == list(STAGES)
    for stage in described:
        assert (stage.channels, *stage.output_size) == tuple(features[stage.name].shape[1:])
        assert stage.bytes_per_image(4) == features[stage.name][0].numel() * 4
    total = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("fc."))
    assert described[-1].parameters == total
    assert [(i.name, i.channels, i.stride) for i in feature_info(arch)] == [(d.name, d.channels, d.stride) for d in described]


def test_describe_command_needs_no_image_and_warns_on_odd_sizes() -> None:
    result = invoke("--describe", "--arch", "resnet50", "--json")
    assert result.exit_code == 0 and result.stderr == ""
    record = json.loads(result.stdout)
    layer4 = record["stages"][-1]
    assert record["input_size"] == [224, 224]
    assert layer4 == {"name": "layer4", "aliases": ["C5", "res5", "stage4"], "channels": 2048, "stride": 32,
                      "output_size": [7, 7], "receptive_field": 427, "parameters": 23508032,
                      "bytes_float32": 2048 * 49 * 4, "bytes_float16": 2048 * 49 * 2}
    odd = invoke("--describe", "--arch", "resnet18", "--input-size", "100x150")
    assert odd.exit_code == 0
    assert odd.stderr.startswith("Warning: input 100×150 is not divisible by layer4's stride 32")
    assert "4×5" in odd.stdout and "C5 res5 stage4" in odd.stdout
    assert invoke("--describe", "--input-size", "0").exit_code == 2
    assert invoke("--describe", "x.jpg").stderr == "Error: --describe takes no images: it describes --arch for --input-size\n"


@pytest.mark.parametrize(("options", "named"), [
    (["--save", "out"], "--save"), (["--pool", "avg"], "--pool"), (["--weights", "DEFAULT"], "--weights"),
    (["--layers", "4"], "--layers"), (["--dtype", "float16"], "--dtype"), (["--batch-size", "32"], "--batch-size"),
])
def test_describe_refuses_options_it_would_ignore(tmp_path: Path, options: list[str], named: str) -> None:
    result = invoke("--describe", "--arch", "resnet18", *options)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == (f"Error: {named} does nothing with --describe, which describes --arch for --input-size "
                             "without weights or images: leave it out\n")
    assert not (tmp_path / "out").exists() and not Path("out").exists()


@pytest.mark.cuda_by_default
def test_runs_warn_once_when_the_input_is_not_divisible(chelsea: Path) -> None:
    result = invoke(chelsea, "--arch", "resnet18", "--resize", "100", "--crop", "100")
    assert result.exit_code == 0
    assert result.stderr.count("Warning: input 100×100 is not divisible by layer4's stride 32") == 1


def favouring_checkpoint(path: Path, favoured: int, classes: int = 1000) -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=classes)
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.zero_()
        model.fc.bias[favoured] = 5.0
        model.fc.bias[favoured + 1] = 4.0
    torch.save(model.state_dict(), path)


def test_topk_with_categories_replays_the_models_head(tmp_path: Path, chelsea: Path) -> None:
    checkpoint = tmp_path / "favours7.pth"
    favouring_checkpoint(checkpoint, 7)
    names = tmp_path / "classes.txt"
    names.write_text("\n".join(f"class{i}" for i in range(1000)) + "\n")
    result = invoke(chelsea, "--weights", checkpoint, "--topk", "3", "--categories", names, "--json", "--layers", "2", *SMALL)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert list(record["layers"]) == ["layer2"], "layer4 runs for the head but is not reported"
    top = record["top"]
    expected = torch.zeros(1000)
    expected[7], expected[8] = 5.0, 4.0
    probabilities = expected.softmax(0)
    assert [(t["index"], t["label"]) for t in top[:2]] == [(7, "class7"), (8, "class8")]
    assert top[0]["probability"] == pytest.approx(probabilities[7].item(), rel=1e-5)
    assert top[1]["probability"] == pytest.approx(probabilities[8].item(), rel=1e-5)
    table = invoke(chelsea, "--weights", checkpoint, "--topk", "2", "--categories", names, *SMALL)
    assert "top-2: class7 (7) " in table.stdout


def test_class_names_are_shown_as_text_never_as_markup_or_terminal_codes(tmp_path: Path, chelsea: Path) -> None:
    checkpoint = tmp_path / "favours7.pth"
    favouring_checkpoint(checkpoint, 7)
    names = tmp_path / "classes.txt"
    hostile = {7: "[/]", 8: "[bold red]cat\x1b[2J"}
    names.write_text("\n".join(hostile.get(i, f"class{i}") for i in range(1000)) + "\n")
    table = invoke(chelsea, "--weights", checkpoint, "--topk", "2", "--categories", names, *SMALL)
    assert table.exit_code == 0, table.stderr
    top = next(line for line in table.stdout.splitlines() if line.startswith("top-2: "))
    assert top.startswith("top-2: [/] (7) ") and ", [bold red]cat\\x1b[2J (8) " in top
    record = json.loads(invoke(chelsea, "--weights", checkpoint, "--topk", "2", "--categories", names, "--json", *SMALL).stdout)
    assert [entry["label"] for entry in record["top"]] == [hostile[7], hostile[8]], "JSON keeps the names as they are"


@pytest.mark.cuda_by_default
def test_topk_with_named_weights_uses_their_categories(tmp_path: Path, chelsea: Path, torch_home: Path) -> None:
    member = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    folder = torch_home / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    favouring_checkpoint(folder / os.path.basename(urlparse(member.url).path), 281)
    result = invoke(chelsea, "--weights", "DEFAULT", "--topk", "1", "--json", "--arch", "resnet18")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["top"][0]["label"] == member.meta["categories"][281] == "tabby"


def test_topk_errors(tmp_path: Path, chelsea: Path) -> None:
    no_names = invoke(chelsea, "--topk", "3", *SMALL)
    assert no_names.exit_code == 2
    assert no_names.stderr == "Error: --topk needs class names: use torchvision's named weights, or give --categories FILE\n"
    few = tmp_path / "few.txt"
    few.write_text("a\nb\n")
    mismatch = invoke(chelsea, "--topk", "1", "--categories", few, *SMALL)
    assert mismatch.exit_code == 2 and "--categories has 2 names, but the classifier of resnet18 has 1000 classes" in mismatch.stderr
    headless = tmp_path / "headless.pth"
    torch.save({k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}, headless)
    names = tmp_path / "names.txt"
    names.write_text("\n".join(map(str, range(1000))))
    no_head = invoke(chelsea, "--weights", headless, "--topk", "1", "--categories", names, *SMALL)
    assert no_head.exit_code == 1 and "classifier head not loaded" in no_head.stderr
    for k in ("0", "-3"):
        refused = invoke(chelsea, "--topk", k, "--categories", names, *SMALL)
        assert (refused.exit_code, refused.stderr) == (2, f"Error: --topk {k}: expected a positive number of classes\n")


def test_topk_without_per_image_output_is_refused_before_anything_is_written(tmp_path: Path, photos: Path) -> None:
    names = tmp_path / "names.txt"
    names.write_text("\n".join(map(str, range(1000))))
    for extra in (["--summary"], ["--save", tmp_path / "out"], []):
        result = invoke(photos, "--topk", "2", "--categories", names, *extra, *SMALL)
        assert result.exit_code == 2, extra
        assert result.stderr == 'Error: --topk gives classes per image: with a folder, --save or --summary, add --json (each line then has "top")\n'
    assert not (tmp_path / "out").exists()
    with_json = invoke(photos, "--topk", "2", "--categories", names, "--json", *SMALL)
    assert with_json.exit_code == 0 and all("top" in json.loads(line) for line in with_json.stdout.splitlines())
