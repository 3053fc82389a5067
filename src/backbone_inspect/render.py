"""Rendering for the terminal: rich tables, JSON Lines records, the progress bar and summary lines."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .stats import finite_or_none

_CONTROL = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029)} | {
    ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"}


def printable(text: str) -> str:
    """One line safe for a terminal, and faithful: control characters, line breaks and tabs
    included, are shown escaped (``\\n``, ``\\x1b``) instead of acting, so a hostile file name
    reads as it is (``bad\\nname.jpg``, not a name that does not exist); spaces are kept as they are."""
    return str(text).strip("\r\n").translate(_CONTROL)


def markup_safe(text: str) -> str:
    """``printable``, with rich's markup brackets escaped: a file may be named ``[red]x.jpg``."""
    from rich.markup import escape

    return escape(printable(text))

if TYPE_CHECKING:
    from rich.console import Console

    from .stages import StageDescription
    from .engine import ModelInfo
    from .results import ImageResult
    from .outcomes import RunSummary
    from .stats import StageSummary


class Progress:
    """A rich progress bar on stderr: done/total, images/s, ETA, failures."""

    def __init__(self, total: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self._failures = 0
        self._progress = RichProgress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[failures]}"),
            console=Console(stderr=True, emoji=False),  # a file named :smile:.jpg is shown by its name
            transient=False,
        )
        self._task = self._progress.add_task("features", total=total, rate="", failures="")
        self._progress.start()

    def advance(self, failed: bool) -> None:
        self._failures += failed
        task = self._progress.tasks[0]
        speed = task.speed
        self._progress.update(
            self._task,
            advance=1,
            rate=f"{speed:.1f} images/s" if speed else "",
            failures=f"[red]{self._failures} failed[/]" if self._failures else "",
        )

    def error_line(self, message: str) -> None:
        """An ``Error:`` line above the bar, never wrapped (logs stay greppable)."""
        self._progress.console.print(f"Error: {printable(message)}", markup=False, highlight=False, soft_wrap=True)

    def stop(self) -> None:
        self._progress.stop()


def json_record(model: ModelInfo, result: ImageResult) -> dict[str, Any]:
    record = {
        "image": result.image,
        "arch": model.arch,
        "weights": model.weights.label,
        "dtype": model.dtype,
        "input_size": list(result.input_size),
        "layers": {stats.name: stats.to_dict() for stats in result.stats},
    }
    if result.top is not None:
        record["top"] = [{"index": c.index, "label": c.label, "probability": finite_or_none(c.probability)} for c in result.top]
    return record


def top_text(result: ImageResult) -> str:
    assert result.top is not None
    return f"top-{len(result.top)}: " + ", ".join(f"{printable(c.label)} ({c.index}) {c.probability:.1%}" for c in result.top)


def stride_warning(input_size: Sequence[int], stage: str, stride: int) -> str:
    height, width = input_size
    return (
        f"input {height}×{width} is not divisible by {stage}'s stride {stride}: its feature maps "
        "are rounded (up or down, as the arch's layers pad), and the measured stride differs from the nominal one"
    )


def describe_record(arch: str, input_size: Sequence[int], stages: Sequence[StageDescription]) -> dict[str, Any]:
    return {
        "arch": arch,
        "input_size": list(input_size),
        "stages": [
            {
                "name": stage.name,
                "aliases": list(stage.aliases),
                "channels": stage.channels,
                "stride": stage.stride,
                "output_size": list(stage.output_size),
                "receptive_field": stage.receptive_field,
                "parameters": stage.parameters,
                "bytes_float32": stage.bytes_per_image(4),
                "bytes_float16": stage.bytes_per_image(2),
            }
            for stage in stages
        ],
    }


def render_description(console: Console, arch: str, input_size: Sequence[int], stages: Sequence[StageDescription]) -> None:
    from rich.table import Table

    height, width = input_size
    table = Table(title=f"{arch}  input {height}×{width}  (built without weights: nothing computed)", title_justify="left")
    for column in ("stage", "aliases", "channels", "stride", "output H×W", "receptive field", "parameters", "float32/image", "float16/image"):
        table.add_column(column, justify="left" if column in ("stage", "aliases") else "right", overflow="fold")
    for stage in stages:
        table.add_row(
            stage.name,
            " ".join(stage.aliases) or "-",
            str(stage.channels),
            str(stage.stride),
            f"{stage.output_size[0]}×{stage.output_size[1]}",
            "-" if stage.receptive_field is None else str(stage.receptive_field),
            f"{stage.parameters:,}",
            human_bytes(stage.bytes_per_image(4)),
            human_bytes(stage.bytes_per_image(2)),
        )
    console.print(table)


def render_model_header(console: Console, model: ModelInfo) -> None:
    """``arch … weights … device …`` (or the engine, when the models run elsewhere), and any note on the weights."""
    weights = model.weights
    line = (
        f"[bold]arch[/] {model.arch}  [bold]weights[/] {markup_safe(weights.label)}"
        + (f" (seed {model.seed})" if weights.kind == "none" else "")
        + (f"  [bold]engine[/] {model.engine}" if model.engine else f"  [bold]device[/] {model.device}")
        + f"  [bold]dtype[/] {model.dtype}"
    )
    console.print(line, highlight=False, soft_wrap=True)  # one line: a long checkpoint path is never cut in two
    if weights.head_note:
        console.print(f"[yellow]{markup_safe(weights.head_note)}[/]", highlight=False)


def render_image_table(console: Console, result: ImageResult) -> None:
    from rich.table import Table

    from .stats import stride_text

    height, width = result.input_size
    batch = f" (batch of {result.group_size})" if result.group_size > 1 else ""
    # Its own line, never the table's title: a title wraps at the table's width, cutting a long file name in two.
    console.print(f"{markup_safe(result.image)}  input {height}×{width}  forward {result.seconds * 1000:.1f} ms{batch}",
                  highlight=False, soft_wrap=True)
    table = Table()
    table.add_column("stage", overflow="fold")
    for column in ("shape C×H×W", "stride", "dtype", "mean", "std", "min", "max", "zeros"):
        # A narrow terminal wraps a number onto two lines rather than cut it to "…".
        table.add_column(column, justify="right" if column != "dtype" else "left", overflow="fold")
    for stats in result.stats:
        table.add_row(
            stats.name,
            shape_text(stats.shape),
            stride_text(stats.stride),
            stats.dtype,
            f"{stats.mean:.4g}",
            f"{stats.std:.4g}",
            f"{stats.min:.4g}",
            f"{stats.max:.4g}",
            f"{stats.zeros:.1%}",
        )
    console.print(table)
    if result.top is not None:
        console.print(top_text(result), highlight=False, markup=False)  # names from a --categories file are text


def shape_text(shape: Sequence[int]) -> str:
    return "×".join(str(size) for size in shape)


def render_stage_summaries(console: Console, summaries: Sequence[StageSummary]) -> None:
    """One row per stage over every image: shapes, pooled statistics, zeros."""
    from rich.table import Table

    if not summaries:
        return
    count = summaries[0].images
    table = Table(title=f"{count} image{'s' if count != 1 else ''}, every element pooled", title_justify="left")
    table.add_column("stage", overflow="fold")
    for column in ("images", "shape C×H×W", "mean", "std", "min", "max", "zeros"):
        table.add_column(column, justify="right", overflow="fold")
    for summary in summaries:
        shapes = shape_text(summary.shapes[0]) + (
            f" (+{len(summary.shapes) - 1} other shape{'s' if len(summary.shapes) > 2 else ''})"
            if len(summary.shapes) > 1
            else ""
        )
        table.add_row(
            summary.name,
            str(summary.images),
            shapes,
            f"{summary.mean:.4g}",
            f"{summary.std:.4g}",
            f"{summary.min:.4g}",
            f"{summary.max:.4g}",
            f"{summary.zeros:.1%}",
        )
    console.print(table)


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def run_summary_line(summary: RunSummary, *, saving: bool = True) -> str:
    """The run's account in one line; the bytes written only when features were saved (``saving``)."""
    import signal

    shard = summary.shard
    where = f"shard {shard.index}/{shard.count}: " if shard is not None else ""
    line = (
        f"{where}processed {summary.processed}, skipped {summary.skipped}, failed {summary.failed} "
        f"in {summary.seconds:.1f} s ({summary.images_per_second:.1f} images/s)"
    )
    if saving:
        line += f", {human_bytes(summary.bytes_written)} written"
    if summary.stopped_by is not None and not summary.left:
        line += f"; stopped by {signal.Signals(summary.stopped_by).name} after the last image (nothing left)"
    elif summary.stopped_by is not None:
        line += f"; stopped by {signal.Signals(summary.stopped_by).name}, {summary.left} left (run again to finish)"
    elif summary.output_error is not None and summary.left:
        line += f"; stopped by the output error, {summary.left} left (run again once it is fixed)"
    return line
