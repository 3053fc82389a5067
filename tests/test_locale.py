"""A process whose locale is not UTF-8 (``LC_ALL=C`` with Python's UTF-8 mode off): file names with
non-ASCII characters are still saved, each under its own name, and the tables still print."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from backbone_inspect import open_features

from conftest import SAMPLES, SMALL, command


@pytest.mark.slow
@pytest.mark.parametrize("output_format", ["pt", "shards"])
def test_a_locale_that_is_not_utf8_saves_every_image_and_prints_the_table(tmp_path: Path, output_format: str) -> None:
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    shutil.copy(SAMPLES / "chelsea.jpg", folder / "kätze_猫.jpg")
    shutil.copy(SAMPLES / "rocket.jpg", folder / "rocket.jpg")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONIOENCODING"}
    env.update(LANG="C", LC_ALL="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0", TORCH_HOME=str(tmp_path / "th"))
    result = subprocess.run(command(folder, "--save", out, "--format", output_format, "--layers", "4", *SMALL),
                            capture_output=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert b"512\\xd72\\xd72" in result.stdout, "the table's multiplication signs, escaped for an ASCII terminal"
    stored = open_features(out)
    assert sorted(os.fsencode(Path(image.image).name) for image in stored.images) == sorted(
        os.fsencode(name) for name in ("kätze_猫.jpg", "rocket.jpg"))
    assert all(stored[index][0]["layer4"].shape == (512, 2, 2) for index in range(2))
