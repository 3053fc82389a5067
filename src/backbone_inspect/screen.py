"""What the command shows while a run goes: the header, per-image tables or JSON lines, warnings,
errors, the progress bar, and the summary at the end. Rendering only: the run does the work."""

from __future__ import annotations

import contextlib
import json
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .engine import RunCallbacks
from .errors import StdoutError
from .render import printable

if TYPE_CHECKING:
    from rich.console import Console

    from .engine import ModelInfo
    from .results import ImageResult
    from .outcomes import Outcome, RunSummary
    from .run import DumpEstimate


def warning_line(message: str) -> None:
    print(f"Warning: {printable(message)}", file=sys.stderr, flush=True)


def error_line(message: str) -> None:
    """Every error reaches the user as one line on stderr, safe for a terminal."""
    print(f"Error: {printable(message)}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def warnings_as_lines() -> Iterator[None]:
    """Python warnings (the library's own, and torch's or Pillow's) as one ``Warning:`` line each, once."""
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        # For developers, not users, as Python's own default has it: torchvision 0.29 deprecates its
        # image decoders (--decode gpu) on every call; Python 3.12 deprecates every fork of a process
        # with threads (DataLoader workers, which touch none of the threads' locks).
        for category in (ResourceWarning, DeprecationWarning, PendingDeprecationWarning):
            warnings.simplefilter("ignore", category)
        warnings.showwarning = lambda message, *_, **__: warning_line(str(message))
        yield


@contextlib.contextmanager
def stdout_errors() -> Iterator[None]:
    """Writing stdout fails as ``StdoutError``, named (its reader gone stays a ``BrokenPipeError``: exit 141)."""
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as error:
        raise StdoutError(f"cannot write to stdout: {error.strerror or error}") from error


def stdout_console() -> Console:
    from rich.console import Console

    class PipeAwareConsole(Console):
        def on_broken_pipe(self) -> None:
            raise BrokenPipeError  # rich would exit 1 on its own; the command stops as SIGPIPE would (141)

    # Piped output gets a fixed width wide enough for every table, rather than rich's 80.
    # No emoji codes: a file or checkpoint named :smile:.jpg is shown by its name, not as a face.
    return PipeAwareConsole(highlight=False, emoji=False, width=None if sys.stdout.isatty() else 140)


@dataclass(frozen=True)
class View:
    """How results are shown: JSON Lines, a table per image, or per-stage summaries at the end."""

    json_lines: bool
    per_image_tables: bool


class Screen:
    """Renders one run from its callbacks; ``finish`` prints the summaries once it is over."""

    def __init__(self, view: View, total: int) -> None:
        from .render import Progress

        self.view = view
        self.console = stdout_console()
        self.model: ModelInfo | None = None
        self._stride_warned = False
        self._nonfinite_warned = False
        self._progress = Progress(total) if sys.stderr.isatty() and not view.per_image_tables else None

    def callbacks(self) -> RunCallbacks:
        return RunCallbacks(on_start=self.on_start, on_outcome=self.on_outcome)

    def on_start(self, model: ModelInfo) -> None:
        from .render import render_model_header

        self.model = model
        if not self.view.json_lines:
            with stdout_errors():
                render_model_header(self.console, model)

    def on_outcome(self, outcome: Outcome, result: ImageResult | None) -> None:
        if outcome.status == "error":
            (self._progress.error_line if self._progress is not None else error_line)(str(outcome.error))
        if result is not None:
            with stdout_errors():
                self._show(result)
        if self._progress is not None:
            self._progress.advance(outcome.status == "error")

    def _show(self, result: ImageResult) -> None:
        from .render import json_record, render_image_table, stride_warning

        assert self.model is not None
        deepest = result.stats[-1].name
        stride = self.model.strides[deepest]
        if not self._stride_warned and any(size % stride for size in result.input_size):
            self._stride_warned = True
            warning_line(stride_warning(result.input_size, deepest, stride))
        broken = [stats for stats in result.stats if stats.nonfinite]
        if broken and not self._nonfinite_warned:
            self._nonfinite_warned = True
            warning_line(
                f"{result.image}: {broken[0].name} has {broken[0].nonfinite} NaN or infinite values (broken weights?); "
                "their statistics are NaN here and null in JSON"
            )
        if self.view.json_lines:
            sys.stdout.write(json.dumps(json_record(self.model, result), allow_nan=False) + "\n")
            sys.stdout.flush()
        elif self.view.per_image_tables:
            render_image_table(self.console, result)

    def stop_progress(self) -> None:
        if self._progress is not None:
            self._progress.stop()

    def finish(self, summary: RunSummary, *, summary_line: bool, saving: bool) -> None:
        """The per-stage tables (unless shown per image), the run's summary line, and its output error."""
        from .render import render_stage_summaries, run_summary_line

        if not self.view.json_lines and not self.view.per_image_tables:
            with stdout_errors():
                render_stage_summaries(self.console, summary.stages)
        if summary_line or summary.stopped_by is not None:
            print(run_summary_line(summary, saving=saving), file=sys.stderr, flush=True)
        if summary.output_error is not None and not summary.output_error_shown:
            error_line(summary.output_error)


def show_estimate(estimate: DumpEstimate, *, json_lines: bool) -> None:
    """A dry run's counts and size, as a sentence or one JSON line."""
    from .render import human_bytes

    if json_lines:
        print(json.dumps({"to_do": estimate.to_do, "to_skip": estimate.to_skip, "unreadable": estimate.unreadable,
                          "estimated_bytes": estimate.estimated_bytes, "format": estimate.format, "pool": estimate.pool,
                          "save_dtype": estimate.save_dtype}))
        return
    images = f"{estimate.to_do} image{'' if estimate.to_do == 1 else 's'}"
    pooled = f", {estimate.pool}-pooled" if estimate.pool != "none" else ""
    saved = (
        "no features to save (no --save DIR)" if estimate.format is None else
        f"{estimate.to_skip} to skip (already in {estimate.location}); "
        f"about {human_bytes(estimate.estimated_bytes)} to write as {estimate.save_dtype}{pooled} ({estimate.format})"
    )
    stdout_console().print(
        f"dry run: {images} to do ({estimate.unreadable} of them unreadable from their header, so they will fail), {saved}",
        soft_wrap=True,
    )
