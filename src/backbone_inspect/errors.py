"""One exception family; the CLI turns each into a one-line message and an exit code."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class InspectError(Exception):
    """Base of every error backbone-inspect reports to a user."""

    exit_code: int = EXIT_FAILURE


class UsageError(InspectError, ValueError):
    """A bad option value, unknown arch/stage/device or a missing input path (exit 2)."""

    exit_code = EXIT_USAGE


class WeightsError(InspectError):
    """Weights that cannot be had or do not fit the architecture (exit 1)."""


class ImageError(InspectError):
    """An input file that cannot be decoded or preprocessed (exit 1); the run goes on."""


class OutputError(InspectError):
    """An output that cannot be written (exit 1)."""
