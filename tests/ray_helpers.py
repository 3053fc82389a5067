"""Helpers of the Ray engine tests: the command in its own process, the options they share."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from conftest import SMALL, command


RAY_MISSING = "--engine ray needs the [ray] extra: pip install -e '.[dev,ray]'"
RAY_OPTIONS = [*SMALL, "--layers", "1,4", "--batch-size", "3"]
"""The small test settings, two stages, batches of 3."""


def run_command(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The real command in its own process: Ray's workers and sockets stay out of the test process."""
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        command(*args), cwd=cwd, env=env, capture_output=True, text=True, timeout=240
    )
