"""Every declared family replays torchvision's own model: stages, head, early stop, shapes, describe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor

from backbone_inspect import Backbone, feature_info
from backbone_inspect.families import ARCHS, FAMILIES, family_of
from backbone_inspect.stages import stage_names

from conftest import assert_close_scaled, imagenet_normalised, invoke, seeded_model

SMALLEST = [family.archs[0] for family in FAMILIES] + ["regnet_y_400mf", "swin_v2_t"]
"""The first builder of every family (the smallest), and the second layout inside RegNet and Swin."""


def side(arch: str) -> int:
    fixed = family_of(arch).fixed_input
    return fixed or 64


def model_and_input(arch: str, batch: int = 2) -> tuple[torch.nn.Module, torch.Tensor]:
    model = seeded_model(arch, seed=3)
    return model, torch.randn(batch, 3, side(arch), side(arch), generator=torch.Generator().manual_seed(1))


def as_nchw(arch: str, value: torch.Tensor) -> torch.Tensor:
    return value.permute(0, 3, 1, 2) if family_of(arch).channels_last_outputs else value


@pytest.mark.parametrize("arch", SMALLEST)
def test_every_stage_equals_create_feature_extractor_and_the_head_gives_the_models_logits(arch: str) -> None:
    family, names = family_of(arch), stage_names(arch)
    model, x = model_and_input(arch)
    reference = create_feature_extractor(model, {path: name for path, name in zip(family.stage_steps, names)})
    backbone = Backbone(arch, (0, 1, 2, 3, 4), model=model, head=True).eval()
    with torch.no_grad():
        expected, features, logits = reference(x), backbone(x), model(x)
        classified = backbone.classify(features[names[-1]])
    assert list(features) == list(names)
    for name in names:
        assert features[name].shape[1] == backbone.channels[name]
        assert_close_scaled(features[name], as_nchw(arch, expected[name]), rtol=1e-6)
    assert_close_scaled(classified, logits, rtol=1e-6)
    assert backbone.classes == logits.shape[1]


def built_without_weights(arch: str) -> tuple[torch.nn.Module, torch.device]:
    """torchvision's model on the meta device, or on the CPU where its builder reads tensor values (RegNet)."""
    try:
        with torch.device("meta"):
            return torchvision.models.get_model(arch).eval(), torch.device("meta")
    except NotImplementedError:
        return torchvision.models.get_model(arch).eval(), torch.device("cpu")


def step_outputs(arch: str, size: int | None = None) -> tuple[dict[str, tuple[int, int, int]], int, torch.nn.Module]:
    """Each step's output (C, H, W) in the model's own forward, seen through forward hooks; the side used; the model."""
    family = family_of(arch)
    model, device = built_without_weights(arch)
    size = size or family.fixed_input or (224 if device.type == "meta" else 64)  # a real forward on the CPU: small
    seen: dict[str, tuple[int, int, int]] = {}
    for path in family.steps:
        def record(module, inputs, output, path=path) -> None:
            seen[path] = tuple(as_nchw(arch, output).shape[1:])

        model.get_submodule(path).register_forward_hook(record)
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size, device=device))
    return seen, size, model


@pytest.mark.parametrize("arch", [arch for arch in ARCHS if family_of(arch).name != "regnet"] + ["regnet_x_400mf", "regnet_y_400mf"])
def test_each_builders_forward_is_its_declared_steps_then_head_with_stages_at_the_stride_changes(arch: str) -> None:
    family = family_of(arch)
    shapes, size, model = step_outputs(arch)
    declared = family.steps + family.head
    for name, child in model.named_children():  # every module the forward runs is declared, in order
        if name not in declared:
            assert [path for path in declared if path.startswith(f"{name}.")] == [f"{name}.{sub}" for sub, _ in child.named_children()], name
    seen = {path: (channels, size // height) for path, (channels, height, _) in shapes.items()}
    strides = [seen[path][1] for path in family.stage_steps]
    assert strides[1:] == [4, 8, 16, 32] and strides[0] in (2, 4)
    assert family.steps.index(family.stage_steps[0]) < family.steps.index(family.stage_steps[1])
    for path in family.stage_steps[1:4]:
        following = family.steps[family.steps.index(path) + 1]
        assert seen[following][1] > seen[path][1], f"{path} is not the last step at its stride"
    if arch not in SMALLEST:  # the rest is the same for every builder of a layout, whose steps were just checked
        return
    backbone = Backbone(arch, 4, model=model, head=True).eval()  # stage 4 is the last step before the head
    x = torch.zeros(1, 3, size, size, device=next(model.parameters()).device)
    with torch.no_grad():
        assert backbone.classify(backbone(x)[stage_names(arch)[4]]).shape == model(x).shape
    assert [(info.name, info.channels, info.stride) for info in feature_info(arch)] == [
        (name, *seen[path]) for name, path in zip(stage_names(arch), family.stage_steps)
    ]


@pytest.mark.parametrize("arch", SMALLEST)
def test_modules_past_the_deepest_stage_are_neither_held_nor_run(arch: str) -> None:
    family = family_of(arch)
    model, x = model_and_input(arch, batch=1)
    calls = {path: 0 for path in family.steps + tuple(p for p in family.head if p != "flatten")}
    for path in calls:
        model.get_submodule(path).register_forward_hook(lambda *_, path=path: calls.__setitem__(path, calls[path] + 1))
    backbone = Backbone(arch, (2,), model=model).eval()
    assert all(count == 0 for count in calls.values()), "building measures a model of its own, not the caller's"
    with torch.no_grad():
        backbone(x)
    held = family.steps_through(stage_names(arch)[2])
    assert [path for path, count in calls.items() if count] == list(held)
    assert all(key.startswith(tuple(f"{path}." for path in held)) for key in backbone.state_dict())
    assert backbone.load_state_dict(model.state_dict(), strict=False).missing_keys == []


@pytest.mark.parametrize("arch", SMALLEST)
def test_describe_lists_every_stage_with_its_aliases_and_measured_shapes(arch: str) -> None:
    size = side(arch) if family_of(arch).fixed_input else 96
    result = invoke("--describe", "--arch", arch, "--input-size", str(size), "--json")
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)["stages"]
    family, names = family_of(arch), stage_names(arch)
    shapes, _, model = step_outputs(arch, size)
    assert [row["name"] for row in rows] == list(names)
    for index, (row, path) in enumerate(zip(rows, family.stage_steps)):
        assert (row["channels"], *row["output_size"]) == shapes[path]
        assert path in row["aliases"] or path == row["name"] or not family.path_aliases
        assert index == 0 or f"C{index + 1}" in row["aliases"]
        assert (row["receptive_field"] is None) == family.attention
    body = sum(p.numel() for name, p in model.named_parameters() if not name.startswith(family.head_prefixes))
    assert rows[-1]["parameters"] == body


def test_describe_builds_the_regnets_whose_builder_cannot_run_on_the_meta_device() -> None:
    result = invoke("--describe", "--arch", "regnet_x_400mf", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["stages"][-1]["stride"] == 32


def test_receptive_field_of_a_regnet_equals_what_backpropagation_reaches() -> None:
    from backbone_inspect.anatomy import describe_stages

    model = seeded_model("regnet_x_400mf").double()
    x = torch.randn(1, 3, 160, 160, dtype=torch.float64, requires_grad=True)
    out = Backbone("regnet_x_400mf", (2,), model=model).eval()(x)["stage2"]
    out[0, :, out.shape[2] // 2, out.shape[3] // 2].sum().backward()
    rows = (x.grad[0].abs().sum(dim=(0, 2)) > 0).nonzero()
    described = {d.name: d for d in describe_stages("regnet_x_400mf", (160, 160))}
    assert described["stage2"].receptive_field == int(rows.max() - rows.min() + 1)


def test_stage_names_and_aliases_of_a_family_choose_the_same_stages() -> None:
    backbone = Backbone("convnext_tiny", "C3,features.5,stage4")
    assert backbone.stage_names == ("stage2", "stage3", "stage4")
    assert (backbone.strides["stage2"], backbone.strides["stage3"], backbone.strides["stage4"]) == (8, 16, 32)


def test_maxvit_refuses_inputs_of_another_size_with_a_usage_error(chelsea) -> None:
    result = invoke(chelsea, "--arch", "maxvit_t", "--crop", "none", "--device", "cpu")
    assert result.exit_code == 2
    assert result.stderr == "Error: --crop none: maxvit_t takes only 224×224 inputs (fixed when it is built); use --crop 224\n"


def normalised(path, size: int) -> torch.Tensor:
    from backbone_inspect.images import Preprocessing, load_image_tensor

    return imagenet_normalised(load_image_tensor(path, Preprocessing(resize=size, crop=size)).unsqueeze(0))


@pytest.mark.parametrize("arch", ["swin_t", "efficientnet_b0"])
def test_a_dump_with_topk_holds_the_models_own_features_and_classes(tmp_path, chelsea, arch: str) -> None:
    from conftest import features as saved_features

    model = seeded_model(arch, seed=4)
    torch.save(model.state_dict(), tmp_path / "model.pth")
    names = tmp_path / "classes.txt"
    names.write_text("\n".join(f"class{i}" for i in range(1000)) + "\n")
    result = invoke(chelsea, "--arch", arch, "--weights", tmp_path / "model.pth", "--layers", "1,4", "--save", tmp_path / "out",
                    "--topk", "3", "--categories", names, "--json", "--resize", "64", "--crop", "64", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    x = normalised(chelsea, 64)
    family = family_of(arch)
    with torch.no_grad():
        expected = create_feature_extractor(model, {family.stage_steps[1]: "stage1", family.stage_steps[4]: "stage4"})(x)
        top = model(x).softmax(dim=1).topk(3)
    stored = saved_features(tmp_path / "out" / "chelsea.pt")
    for stage in ("stage1", "stage4"):
        assert_close_scaled(stored[stage], as_nchw(arch, expected[stage])[0])
        assert stored[stage].is_contiguous()
    record = json.loads(result.stdout.splitlines()[0])
    assert [entry["index"] for entry in record["top"]] == top.indices[0].tolist()
    assert [entry["probability"] for entry in record["top"]] == pytest.approx(top.values[0].tolist(), rel=1e-4)


def test_named_weights_of_another_family_bring_their_preprocessing_and_classes(torch_home) -> None:
    import os
    from urllib.parse import urlparse

    from backbone_inspect.weights import build_model

    member = torchvision.models.get_model_weights("mobilenet_v3_small").DEFAULT
    folder = torch_home / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    trained = seeded_model("mobilenet_v3_small", seed=9)
    torch.save(trained.state_dict(), folder / os.path.basename(urlparse(member.url).path))
    model, loaded = build_model("mobilenet_v3_small", "DEFAULT")
    assert (loaded.kind, loaded.label, len(loaded.categories)) == ("named", member.name, 1000)
    assert (loaded.preprocessing.resize, loaded.preprocessing.crop) == (member.transforms().resize_size[0], 224)
    assert all(torch.equal(value, trained.state_dict()[key]) for key, value in model.state_dict().items())


def test_an_image_smaller_than_the_arch_takes_fails_alone(tmp_path, chelsea) -> None:
    from PIL import Image

    from conftest import manifest

    folder = tmp_path / "in"
    folder.mkdir()
    Image.open(chelsea).resize((48, 40)).save(folder / "ok.png")
    Image.open(chelsea).resize((40, 24)).save(folder / "tiny.png")
    result = invoke(folder, "--arch", "convnext_tiny", "--resize", "none", "--crop", "none", "--save", tmp_path / "out", "--device", "cpu")
    assert result.exit_code == 1
    lines = {Path(line["image"]).name: line for line in manifest(tmp_path / "out")}
    assert lines["ok.png"]["status"] == "ok" and lines["tiny.png"]["status"] == "error"
    assert lines["tiny.png"]["error"].endswith(
        "tiny.png: image is 24×40 (H×W) after preprocessing: convnext_tiny takes inputs of at least 32×32 px; use another --resize or --crop")
    planned = invoke(folder, "--arch", "convnext_tiny", "--resize", "none", "--crop", "none", "--save", tmp_path / "again",
                     "--dry-run", "--device", "cpu")
    assert planned.exit_code == 0 and "2 images to do" in planned.stdout, "the dry run plans what the run does"
    too_small = invoke("--describe", "--arch", "convnext_tiny", "--input-size", "31")
    assert too_small.exit_code == 2 and too_small.stderr == "Error: convnext_tiny takes inputs of at least 32×32 px, not 31×31\n"


@pytest.mark.parametrize(("arch", "smallest"), [("resnet18", 1), ("convnext_tiny", 32), ("swin_t", 4)])
def test_the_smallest_input_side_is_where_the_models_own_forward_starts_to_run(arch: str, smallest: int) -> None:
    from backbone_inspect.anatomy import smallest_input_side

    assert smallest_input_side(Backbone.without_weights(arch)) == smallest
    model = seeded_model(arch).eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, smallest, smallest))
        if smallest > 1:
            with pytest.raises(Exception):
                model(torch.zeros(1, 3, smallest - 1, smallest - 1))


@pytest.mark.parametrize("arch", ["swin_t", "convnext_tiny", "efficientnet_b0"])
def test_cache_sized_slices_of_a_batch_give_the_models_own_features(arch: str) -> None:
    family, names = family_of(arch), stage_names(arch)
    model, x = model_and_input(arch, batch=5)
    sizes = dict(zip(names, (1, 2, 4, 1, 2)))  # uneven, not dividing 5, shrinking again
    with torch.no_grad():
        expected = create_feature_extractor(model, dict(zip(family.stage_steps, names)))(x)
        got = Backbone(arch, (0, 1, 2, 3, 4), model=model).eval().forward_in_chunks(x, sizes)
    for name in names:
        assert_close_scaled(got[name], as_nchw(arch, expected[name]), rtol=1e-6)


def test_the_readme_and_help_name_every_family_by_its_title() -> None:
    from conftest import REPO

    archs_section = (REPO / "README.md").read_text(encoding="utf-8").split("### Archs")[1].split("\n#")[0]
    listed = {row.split("|")[1].strip() for row in archs_section.splitlines() if row.startswith("| ") and "---" not in row}
    titles = {family.title for family in FAMILIES}
    assert listed - {"", "family"} == titles
    help_text = " ".join(invoke("--help").stdout.replace("│", " ").split())  # rich wraps it in a box
    assert all(title in help_text for title in titles) and f"{len(ARCHS)} builders" in help_text
