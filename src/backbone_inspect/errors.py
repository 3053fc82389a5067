"""One exception family; the CLI turns each into a one-line message and an exit code."""

from __future__ import annotations

import re
from typing import Any

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class InspectError(Exception):
    """Base of every error backbone-inspect reports to a user."""

    exit_code: int = EXIT_FAILURE
    summary: Any = None
    """The ``RunSummary`` of the run this error ended, when a run had begun (files written by then are complete)."""


class UsageError(InspectError, ValueError):
    """A bad option value, unknown arch/stage/device or a missing input path (exit 2)."""

    exit_code = EXIT_USAGE


class WeightsError(InspectError):
    """Weights that cannot be had or do not fit the architecture (exit 1)."""


class ImageError(InspectError):
    """An input file that cannot be decoded or preprocessed (exit 1); the run goes on."""


class OutputError(InspectError):
    """An output that cannot be written (exit 1)."""

    ends_run: bool = True
    """False when only this file cannot be written (its name is too long, a folder is in its way)."""


class OutputStopped(OutputError):
    """The store takes no more images after an output error ended the run: this image is left
    for a re-run, neither saved nor failed."""


class StdoutError(InspectError):
    """Standard output cannot be written (a full disk, an I/O error; its reader gone is a broken pipe, exit 141):
    the run stops as when its reader goes away, the files in hand recorded (exit 1)."""


class RunStopped(InspectError):
    """A run stopped by SIGINT or SIGTERM (exit 128 + the signal's number); its ``summary`` says what is left."""

    def __init__(self, message: str, *, signal_number: int, summary: Any) -> None:
        super().__init__(message)
        self.exit_code = 128 + signal_number
        self.signal_number = signal_number
        self.summary = summary


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, without terminal colours; its type when it has none."""
    text = _ANSI_ESCAPE.sub("", str(getattr(error, "reason", None) or error)).strip()
    return text.splitlines()[0] if text else type(error).__name__
