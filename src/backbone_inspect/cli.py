"""The command line: parse the options, build the run with the library, render, exit code.

Nothing here opens manifests, writes feature files or decides what to skip: ``run.py`` does.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperCommand

from . import __version__
from .cli_options import (
    Arch, BatchSize, Categories, ChannelsLast, Compile, Crop, Debug, Decode, Describe, Device, DryRun, Dtype, Engine,
    FromList, Images, InputSize, JsonLines, Layers, Overwrite, RayActorCpus, RayActors, RayAddress, Resize,
    Format, Pool, Save, SaveDtype, Seed, ShardSize, ShardOption, Summary, Topk, Viz, VizChannels, Weights, Workers,
)
from .errors import EXIT_FAILURE, EXIT_OK, InspectError, StdoutError, UsageError
from .screen import error_line, stdout_errors, warning_line, warnings_as_lines

if TYPE_CHECKING:
    from .config import FeatureConfig
    from .engine import Engine as EngineType
    from .inputs import InputPlan
    from .outcomes import RunSummary
    from .run import Pictures
    from .store import FeatureStore

PROG_NAME = "backbone-inspect"
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE


class OneLineErrorCommand(TyperCommand):
    """Typer's command, with parse errors as one ``Error:`` line and our exit codes."""

    def main(  # type: ignore[override]
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            with warnings_as_lines():
                code = super().main(
                    args=args, prog_name=prog_name or PROG_NAME, complete_var=complete_var, standalone_mode=False, **extra
                )
        except typer.TyperException as error:  # Click's usage errors (exit 2) and file errors
            error_line(error.format_message())
            code = error.exit_code
        except StdoutError as error:
            error_line(str(error))
            code = error.exit_code
        except typer.Abort:
            code = EXIT_FAILURE
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else EXIT_OK)

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        # Only here, where --help and --version write stdout: an OSError the command lets out (--debug) is its own.
        with stdout_errors():
            return super().make_context(*args, **kwargs)


app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)


def _show_version(value: bool) -> None:
    if value:
        print(f"{PROG_NAME} {__version__}")
        raise typer.Exit(EXIT_OK)


Version = Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True, metavar="", help="Show the version.")]


@app.command(cls=OneLineErrorCommand)
def inspect(
    ctx: typer.Context, images: Images = None, layers: Layers = "2,3,4", arch: Arch = "resnet50", weights: Weights = "none",
    seed: Seed = 0, describe: Describe = False, input_size: InputSize = "224", from_list: FromList = None,
    resize: Resize = None, crop: Crop = None, json_lines: JsonLines = False, summary: Summary = False,
    save: Save = None, save_dtype: SaveDtype = "float32", output_format: Format = "pt", shard_size: ShardSize = "auto",
    pool: Pool = "none", overwrite: Overwrite = False, shard: ShardOption = None,
    dry_run: DryRun = False, device: Device = "auto", dtype: Dtype = "float32", channels_last: ChannelsLast = None,
    compile_model: Compile = False, batch_size: BatchSize = 32, workers: Workers = None, decode: Decode = "cpu", viz: Viz = None,
    viz_channels: VizChannels = 16, topk: Topk = None, categories: Categories = None, engine: Engine = "local",
    ray_address: RayAddress = None, ray_actors: RayActors = None, ray_actor_cpus: RayActorCpus = None,
    debug: Debug = False, version: Version = False,
) -> int:
    """Shapes, strides and statistics of a CNN backbone's stages (torchvision's families, timm's models); feature dumps with --save."""
    try:
        if describe:
            if images or from_list is not None:
                raise UsageError("--describe takes no images: it describes --arch for --input-size")
            _check_describe_options(ctx)
            with stdout_errors():
                return _describe(arch, input_size, json_lines)
        if input_size != "224":
            raise UsageError(f"--input-size {input_size} is for --describe: images are sized by --resize and --crop")
        saving = save is not None
        _check_needed([("--format", output_format != "pt", "--save DIR", saving), ("--shard-size", shard_size != "auto", "--save DIR", saving),
                       ("--pool", pool != "none", "--save DIR", saving), ("--save-dtype", save_dtype != "float32", "--save DIR", saving),
                       ("--overwrite", overwrite, "--save DIR", saving), ("--viz-channels", viz_channels != 16, "--viz DIR", viz is not None),
                       ("--categories", categories is not None, "--topk K", topk is not None)])
        from .config import feature_config
        from .inputs import plan_inputs
        from .options import output_folder
        from .run import Pictures, make_engine, make_store

        config = feature_config(
            arch=arch, layers=layers, weights=weights, seed=seed, resize=resize, crop=crop, dtype=dtype,
            save_dtype=save_dtype, channels_last=channels_last, compile=compile_model, topk=_classes_wanted(topk),
            categories=categories, device=device, pool=pool, decode=decode,
        )
        save_folder = output_folder("--save", save) if save is not None else None
        pictures = Pictures(output_folder("--viz", viz), viz_channels) if viz is not None else None
        inputs = plan_inputs(images or [], from_list=from_list, shard=shard, check_collisions=save is not None or viz is not None,
                             outputs=(save_folder, pictures and pictures.folder), advise_srun=engine != "ray")
        tables = inputs.named_files and save is None and not summary and not json_lines
        if topk and not (tables or json_lines):
            raise UsageError('--topk gives classes per image: with a folder, --save or --summary, add --json (each line then has "top")')
        runner = make_engine(engine, batch_size=batch_size, workers=workers, ray_address=ray_address,
                             ray_actors=ray_actors, ray_actor_cpus=ray_actor_cpus)
        store = make_store(save_folder, config, format=output_format, shard=inputs.shard, shard_size=shard_size) if save_folder else None
        return _run(config, inputs, runner, store=store, overwrite=overwrite, dry_run=dry_run, pictures=pictures,
                    json_lines=json_lines, tables=tables)
    except InspectError as error:
        error_line(str(error))
        return error.exit_code
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, as a process killed by SIGPIPE would.
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except Exception as error:
        if debug:
            raise
        error_line(f"{type(error).__name__}: {error} (run with --debug for the traceback)")
        return EXIT_FAILURE


def _run(config: FeatureConfig, inputs: InputPlan, runner: EngineType, *, store: FeatureStore | None, overwrite: bool,
         dry_run: bool, pictures: Pictures | None, json_lines: bool, tables: bool) -> int:
    from .run import estimate_run, execute_run, plan_run, redo_warning
    from .screen import Screen, View, show_estimate
    from .shards import RankGroup, launched_by_torchrun
    from .signals import stop_on_signals

    rank_group = RankGroup() if launched_by_torchrun() else None
    plan = plan_run(config, inputs, runner, store, pictures=pictures, overwrite=overwrite, dry_run=dry_run)
    if plan.redo:
        warning_line(redo_warning(plan.redo))
    if dry_run:
        with stdout_errors():
            show_estimate(estimate_run(plan), json_lines=json_lines)
        return EXIT_OK
    screen = Screen(View(json_lines=json_lines, per_image_tables=tables), total=len(plan.todo))
    try:
        with stop_on_signals(ignore_after_stop=True) as stop:
            summary = execute_run(plan, callbacks=screen.callbacks(), stop=stop)
    finally:
        screen.stop_progress()
    screen.finish(summary, summary_line=store is not None or len(inputs.found) > 1, saving=store is not None)
    code = _exit_code(summary)
    return rank_group.agree_on_exit_code(code) if rank_group is not None else code


def _classes_wanted(topk: int | None) -> int:
    """``--topk K``: 0 (the library's "off") when not given; given, K must be at least 1."""
    if topk is not None and topk < 1:
        raise UsageError(f"--topk {topk}: expected a positive number of classes")
    return topk or 0


def _exit_code(summary: RunSummary) -> int:
    if summary.stopped_by is not None:
        return 128 + int(summary.stopped_by)
    return EXIT_FAILURE if summary.failed or summary.output_error else EXIT_OK


def _describe(arch: str, input_size_text: str, json_lines: bool) -> int:
    from .anatomy import describe_stages
    from .options import parse_input_size
    from .render import describe_record, render_description, stride_warning
    from .screen import stdout_console
    from .stages import check_arch

    arch, input_size = check_arch(arch), parse_input_size(input_size_text)
    stages = describe_stages(arch, input_size)
    deepest = stages[-1]
    if any(size % deepest.stride for size in input_size):
        warning_line(stride_warning(input_size, deepest.name, deepest.stride))
    if json_lines:
        print(json.dumps(describe_record(arch, input_size, stages)))
    else:
        render_description(stdout_console(), arch, input_size, stages)
    return EXIT_OK


DESCRIBE_OPTIONS = frozenset({"describe", "arch", "input_size", "json_lines", "debug", "version", "images", "from_list"})
"""What ``--describe`` reads (the images are refused with their own message): any other option would change nothing."""


def _check_describe_options(ctx: typer.Context) -> None:
    """``UsageError`` for an option given with ``--describe`` that it ignores (no image, weights or device is used)."""
    for parameter in ctx.command.params:
        source = ctx.get_parameter_source(parameter.name) if parameter.name else None
        if parameter.name not in DESCRIBE_OPTIONS and source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP"):
            raise UsageError(f"{'/'.join(parameter.opts[:1] + parameter.secondary_opts)} does nothing with --describe, which describes --arch for --input-size "
                             "without weights or images: leave it out")


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (e.g. a test runner)
        pass


def _open_closed_standard_streams() -> None:
    """A standard stream its caller closed (``2>&-``) reads and writes /dev/null instead: Python leaves
    ``sys.stderr`` None (every message would go to stdout, amid the JSON lines), and the next file
    opened would take its descriptor (C libraries' complaints on fd 2 would land in a feature file)."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
        except OSError:
            devnull = os.open(os.devnull, os.O_RDWR)  # the lowest free descriptor: this one
            if devnull != fd:
                os.dup2(devnull, fd)
                os.close(devnull)
            stream = _ClosedStdout() if name == "stdout" else open(fd, mode, buffering=1, closefd=False, errors="backslashreplace")
            setattr(sys, name, stream)


class _ClosedStdout(io.TextIOBase):
    """stdout its caller closed (``>&-``): output asked for and lost is an error, as writing a closed descriptor is."""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        raise OSError(errno.EBADF, "Bad file descriptor (stdout is closed)")


def _check_needed(options: list[tuple[str, bool, str, bool]]) -> None:
    """``UsageError`` for the first option given without the one it works with: it would change nothing."""
    for name, given, needed, needed_given in options:
        if given and not needed_given:
            raise UsageError(f"{name} needs {needed}")


def main() -> None:
    _open_closed_standard_streams()
    for stream in (sys.stdout, sys.stderr):  # a terminal that is not UTF-8 (LANG=C): '×' shown as \xd7, not a crash
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")
    app(prog_name=PROG_NAME)
