"""What the command shows of an image: its heading names the file as it is."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from conftest import SAMPLES, SMALL, invoke


def test_a_long_image_name_heads_its_table_on_one_line(tmp_path: Path) -> None:
    long = tmp_path / ("a_long_name_of_a_photo_of_a_cat_" * 3 + "0001.jpg")
    shutil.copy(SAMPLES / "chelsea.jpg", long)
    result = invoke(long, *SMALL)
    assert result.exit_code == 0, result.output
    heading = next(line for line in result.stdout.splitlines() if line.startswith(str(long)))
    assert re.fullmatch(rf"{re.escape(str(long))}  input 64×64  forward \d+\.\d ms", heading)


def test_a_name_like_an_emoji_code_heads_its_table_as_it_is(tmp_path: Path) -> None:
    named = tmp_path / ":smile:.jpg"
    shutil.copy(SAMPLES / "chelsea.jpg", named)
    result = invoke(named, *SMALL)
    assert result.exit_code == 0, result.output
    assert re.search(rf"^{re.escape(str(named))}  input 64×64  forward \d+\.\d ms$", result.stdout, re.MULTILINE), result.stdout

