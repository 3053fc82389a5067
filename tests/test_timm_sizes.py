"""A timm model and an input too small for its layers: that image fails alone, named, and the run
goes on; ``--describe`` refuses the size as a usage error. (timm's sizes are tried one by one on
the meta device: the sizes a timm model takes need not all lie above one smallest side.)"""

from __future__ import annotations

from pathlib import Path

import numpy
import pytest
import torch
from PIL import Image

from backbone_inspect.config import feature_config
from backbone_inspect.errors import ImageError
from backbone_inspect.extractor import Extractor
from conftest import assert_close_scaled, features, imagenet_normalised, invoke, manifest, noise_image

timm = pytest.importorskip("timm", reason="timm is not installed: pip install -e '.[timm]'")


def test_an_image_too_small_for_a_timm_model_fails_alone_and_the_others_are_saved(tmp_path: Path) -> None:
    images = tmp_path / "images"
    for name, side in (("a_tiny", 20), ("b_ok", 96), ("c_mid", 40)):
        noise_image(images / f"{name}.png", (side, side), seed=side)
    out = tmp_path / "out"
    result = invoke(images, "--arch", "timm:convnext_atto", "--layers", "1,4", "--resize", "none", "--crop", "none",
                    "--save", out, "--workers", "0", "--device", "cpu")
    assert result.exit_code == 1
    tiny = images / "a_tiny.png"
    assert result.stderr.splitlines()[0] == (f"Error: {tiny}: image is 20×20 (H×W) after preprocessing: "
                                             "timm:convnext_atto cannot take inputs of this size; use another --resize or --crop")
    assert sorted((line["output"], line["status"]) for line in manifest(out)) == [
        ("a_tiny.pt", "error"), ("b_ok.pt", "ok"), ("c_mid.pt", "ok")]
    torch.manual_seed(0)  # the run's weights: seed 0, timm's own initialisation
    model = timm.create_model("convnext_atto", pretrained=False).eval()
    for name in ("b_ok", "c_mid"):
        pixels = torch.from_numpy(numpy.asarray(Image.open(images / f"{name}.png"))).permute(2, 0, 1)
        with torch.no_grad():
            expected = model.forward_intermediates(imagenet_normalised(pixels[None]), indices=[0, 3], intermediates_only=True)
        saved = features(out / f"{name}.pt")
        for stage, wanted in zip(("stage1", "stage4"), expected):
            assert_close_scaled(saved[stage], wanted[0], rtol=1e-5)


@pytest.mark.parametrize(("arch", "side"), [("timm:convnext_atto", 31), ("timm:inception_v3", 64)])
def test_describe_refuses_an_input_size_too_small_for_a_timm_model(arch: str, side: int) -> None:
    if not hasattr(timm.create_model(arch.removeprefix("timm:")), "forward_intermediates"):
        pytest.skip(f"timm {timm.__version__} cannot replay {arch} (no forward_intermediates)")
    result = invoke("--describe", "--arch", arch, "--input-size", str(side))
    assert result.exit_code == 2
    assert result.stderr == f"Error: {arch} cannot take inputs of {side}×{side}; try another --input-size\n"
    assert invoke("--describe", "--arch", arch, "--input-size", str(side + 1 if side == 31 else 75)).exit_code == 0


def test_a_size_a_timm_model_refuses_above_256_px_fails_those_images_alone(tmp_path: Path) -> None:
    """Sizes from 256 px are not tried ahead; halonet26t takes multiples of 256 only, and a 264 px image
    ended the run with a bare ``Error: AssertionError:``."""
    images = tmp_path / "images"
    for name, side in (("a_odd", 264), ("b_ok", 256)):
        noise_image(images / f"{name}.png", (side, side), seed=side)
    out = tmp_path / "out"
    result = invoke(images, "--arch", "timm:halonet26t", "--layers", "4", "--resize", "none", "--crop", "none",
                    "--save", out, "--workers", "0", "--device", "cpu", "--batch-size", "1")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[0] == (f"Error: {images / 'a_odd.png'}: image is 264×264 (H×W) after preprocessing: "
                                             "timm:halonet26t cannot take inputs of this size; use another --resize or --crop")
    assert sorted((line["output"], line["status"]) for line in manifest(out)) == [("a_odd.pt", "error"), ("b_ok.pt", "ok")]
    torch.manual_seed(0)  # the run's weights: seed 0, timm's own initialisation
    model = timm.create_model("halonet26t", pretrained=False).eval()
    pixels = torch.from_numpy(numpy.array(Image.open(images / "b_ok.png"))).permute(2, 0, 1)
    with torch.no_grad():
        (expected,) = model.forward_intermediates(imagenet_normalised(pixels[None]), indices=[len(model.feature_info) - 1],
                                                  intermediates_only=True)
    assert_close_scaled(features(out / "b_ok.pt")["stage4"], expected[0], rtol=1e-5)
    extractor = Extractor(feature_config(arch="timm:halonet26t", layers=(4,), resize="none", crop="none"), device="cpu")
    with pytest.raises(ImageError, match=r"a_odd.png: image is 264×264 .*: timm:halonet26t cannot take inputs of this size"):
        extractor.inspect(images / "a_odd.png")  # the library's own path: the same error
