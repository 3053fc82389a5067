"""What a run gives: one ``Outcome`` per image (a manifest line) and a ``RunSummary`` at the end."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .shards import Shard
    from .stats import StageSummary


@dataclass(frozen=True)
class Outcome:
    """One image's result: a line of the manifest."""

    image: str
    output: str | None
    status: str
    """``ok``, ``error`` or ``skipped``."""
    error: str | None = None
    shapes: dict[str, list[int]] | None = None
    """Per stage, the shape of the full feature map (before any pooling)."""
    bytes_written: int = 0
    shard: str | None = None
    """``--format shards``: the shard file holding the features, relative to the folder."""
    row: int | None = None
    """Its row in that shard."""

    def manifest_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"image": self.image, "output": self.output, "status": self.status}
        if self.shard is not None:
            record.update(shard=self.shard, row=self.row)
        if self.error is not None:
            record["error"] = self.error
        if self.shapes is not None:
            record["shapes"] = self.shapes
        return record


@dataclass(frozen=True)
class RunSummary:
    """A whole run: what was done, skipped and failed, and why it ended."""

    processed: int = 0
    skipped: int = 0
    failed: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    stopped_by: int | None = None
    """The signal that stopped the run early (SIGINT, SIGTERM), if one did."""
    left: int = 0
    """Images not done when the run stopped."""
    output_error: str | None = None
    """Why the output could not be written, when that ended the run."""
    output_error_shown: bool = False
    """Whether the output error was already reported as an image's error."""
    stages: tuple[StageSummary, ...] = ()
    """Per stage, the statistics pooled over every image processed."""
    shard: Shard | None = None

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0


@dataclass
class RunTally:
    """An engine's running count, closed into a ``RunSummary`` at the end."""

    processed: int = 0
    failed: int = 0
    bytes_written: int = 0
    output_error: str | None = None
    output_error_shown: bool = False
    started: float = field(default_factory=time.perf_counter)

    def add(self, outcome: Outcome, output_error: str | None = None) -> None:
        """Count one image; an output error (the first is kept) ends the run. Kept here, it is shown as
        this image's error; one kept before (a manifest that cannot be written) is not, and stays to be shown."""
        if output_error is not None and self.output_error is None:
            self.output_error, self.output_error_shown = output_error, True
        if outcome.status == "ok":
            self.processed += 1
        elif outcome.status == "error":
            self.failed += 1
        self.bytes_written += outcome.bytes_written

    def summary(self, stopped_by: int | None, total: int) -> RunSummary:
        """The account of a run over ``total`` images: its time, and what is left."""
        return RunSummary(
            processed=self.processed,
            failed=self.failed,
            bytes_written=self.bytes_written,
            seconds=time.perf_counter() - self.started,
            stopped_by=stopped_by,
            left=total - self.processed - self.failed,
            output_error=self.output_error,
            output_error_shown=self.output_error_shown,
        )
