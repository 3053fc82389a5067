"""The command line: parse, call the library, render, exit code. No tensor math here."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

from . import __version__
from .errors import EXIT_FAILURE, EXIT_OK, InspectError, UsageError
from .images import FoundImage, check_output_collisions, find_images, planned_input_size, read_path_list
from .options import check_device_spec, check_dtype, parse_input_size, parse_size, read_categories
from .shards import RankGroup, Shard, launched_by_torchrun, local_rank_from_env, parse_shard, shard_from_env
from .stages import ARCHS, STAGES, check_arch, parse_layers
from .stats import SummaryAccumulator

PROG_NAME = "backbone-inspect"
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE


def warning_line(message: str) -> None:
    print(f"Warning: {message}", file=sys.stderr, flush=True)


def error_line(message: str) -> None:
    """Every error reaches the user as one line on stderr."""
    text = " ".join(str(message).split())
    print(f"Error: {text}", file=sys.stderr, flush=True)


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
            code = super().main(
                args=args,
                prog_name=prog_name or PROG_NAME,
                complete_var=complete_var,
                standalone_mode=False,
                **extra,
            )
        except typer.TyperException as error:  # Click's usage errors (exit 2) and file errors
            error_line(error.format_message())
            code = error.exit_code
        except typer.Abort:
            code = EXIT_FAILURE
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else EXIT_OK)


app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _show_version(value: bool) -> None:
    if value:
        print(f"{PROG_NAME} {__version__}")
        raise typer.Exit(EXIT_OK)


@app.command(cls=OneLineErrorCommand)
def inspect(
    images: Annotated[
        list[str] | None,
        typer.Argument(
            help="Image files (JPEG, PNG, WebP, BMP, TIFF, GIF) and folders (searched recursively).",
            metavar="IMAGE_OR_FOLDER",
            show_default=False,
        ),
    ] = None,
    layers: Annotated[
        str,
        typer.Option(
            "--layers",
            "-l",
            help=f"Stages, comma-separated, by index or name: {', '.join(f'{i}={n}' for i, n in enumerate(STAGES))}.",
        ),
    ] = "2,3,4",
    arch: Annotated[str, typer.Option("--arch", "-a", help=f"One of: {', '.join(ARCHS)}.")] = "resnet50",
    weights: Annotated[
        str,
        typer.Option(
            "--weights",
            "-w",
            help="none (random, from --seed), a torchvision weights name (DEFAULT, IMAGENET1K_V1, "
            "IMAGENET1K_V2) or a checkpoint path.",
        ),
    ] = "none",
    seed: Annotated[int, typer.Option(help="Seed of the random initialisation (--weights none).")] = 0,
    resize: Annotated[
        str | None,
        typer.Option(
            help="Resize the shorter side to N px, or 'none'. \\[default: 256, or the weights' own]",
            show_default=False,
        ),
    ] = None,
    crop: Annotated[
        str | None,
        typer.Option(
            help="Centre-crop N×N px, or 'none'. \\[default: 224, or the weights' own]", show_default=False
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.")] = "auto",
    json_lines: Annotated[bool, typer.Option("--json", help="Print one JSON object per image, nothing else.")] = False,
    save: Annotated[
        Path | None,
        typer.Option(
            help="Save a .pt per image under DIR (mirroring folder inputs), with DIR/manifest.jsonl.",
            metavar="DIR",
            file_okay=False,
            show_default=False,
        ),
    ] = None,
    from_list: Annotated[
        Path | None,
        typer.Option(
            help="Also read inputs from FILE, one path per line (blank lines and # comments ignored).",
            metavar="FILE",
            show_default=False,
        ),
    ] = None,
    save_dtype: Annotated[
        str, typer.Option(help="dtype of the saved tensors: float32, float16 or bfloat16.")
    ] = "float32",
    dtype: Annotated[
        str, typer.Option(help="Compute dtype: float32, bfloat16 (fast on CPUs with AVX-512 BF16/AMX) or float16 (CUDA).")
    ] = "float32",
    channels_last: Annotated[
        bool | None,
        typer.Option(
            "--channels-last/--no-channels-last",
            help="Run in channels_last memory format. \\[default: on for cpu and cuda, where it is faster]",
            show_default=False,
        ),
    ] = None,
    compile_model: Annotated[
        bool, typer.Option("--compile", help="torch.compile the extractor (slow start, faster steady state).")
    ] = False,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Images per forward pass (on a CPU each stage runs them in cache-sized slices).")
    ] = 32,
    workers: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Processes decoding images beside the forward pass; 0: in-process. \\[default: CPU count - 1, at most 8]",
            show_default=False,
        ),
    ] = None,
    engine: Annotated[
        str, typer.Option(help="local, or ray: the dump on a Ray cluster (pip install 'backbone-inspect[ray]').")
    ] = "local",
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="With --engine ray: the cluster to join (e.g. auto, or HOST:6379). \\[default: this machine's, or a new local one]",
            metavar="ADDRESS",
            show_default=False,
        ),
    ] = None,
    ray_actors: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="With --engine ray: models run in parallel. \\[default: one per GPU of the cluster, else 1]",
            metavar="N",
            show_default=False,
        ),
    ] = None,
    ray_actor_cpus: Annotated[
        float, typer.Option(min=0.01, help="With --engine ray: CPUs each model reserves (on CPUs: its threads, rounded up).")
    ] = 1.0,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Recompute images whose .pt exists (default: skip them).")
    ] = False,
    shard: Annotated[
        str | None,
        typer.Option(
            help="Process only slice K of N (0-based) of the sorted inputs. \\[default: from torchrun or Slurm]",
            metavar="K/N",
            show_default=False,
        ),
    ] = None,
    viz: Annotated[
        Path | None,
        typer.Option(
            help="Draw PNGs per image and stage under DIR: the most active channels, and a heatmap over the input.",
            metavar="DIR",
            file_okay=False,
            show_default=False,
        ),
    ] = None,
    viz_channels: Annotated[int, typer.Option(min=1, help="Channels in each --viz grid.")] = 16,
    topk: Annotated[
        int | None,
        typer.Option(min=1, help="Also show the K most probable classes (named weights, or --categories).", metavar="K", show_default=False),
    ] = None,
    categories: Annotated[
        str | None,
        typer.Option(help="Class names for --topk, one per line in the classifier's order.", metavar="FILE", show_default=False),
    ] = None,
    describe: Annotated[
        bool, typer.Option("--describe", help="Describe every stage of --arch for --input-size, without images or weights.")
    ] = False,
    input_size: Annotated[str, typer.Option(help="Input size for --describe: N or HxW.")] = "224",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what would be done and skipped, estimate the disk size; run nothing.")
    ] = False,
    summary: Annotated[
        bool, typer.Option("--summary", help="One table per stage over all images, even for a few image files.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of unexpected errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Show the version.")
    ] = False,
) -> int:
    """Shapes, strides and statistics of a torchvision ResNet's stages; feature dumps with --save."""
    try:
        if describe:
            if images or from_list is not None:
                raise UsageError("--describe takes no images: it describes --arch for --input-size")
            return _describe(check_arch(arch), parse_input_size(input_size), json_lines)
        return _run(
            RunOptions(
                inputs=list(images or []),
                from_list=from_list,
                layers=parse_layers(layers),
                arch=check_arch(arch),
                weights=weights,
                seed=seed,
                resize=parse_size("--resize", resize),
                crop=parse_size("--crop", crop),
                device=check_device_spec(device),
                json_lines=json_lines,
                save=save,
                save_dtype=check_dtype("--save-dtype", save_dtype),
                dtype=check_dtype("--dtype", dtype),
                channels_last=channels_last,
                compile=compile_model,
                viz=viz,
                viz_channels=viz_channels,
                topk=topk or 0,
                categories=read_categories(categories) if categories is not None else None,
                batch_size=batch_size,
                workers=default_workers() if workers is None else workers,
                overwrite=overwrite,
                shard=parse_shard(shard) if shard is not None else None,
                dry_run=dry_run,
                summary=summary,
                ray=_ray_plan(engine, ray_address, ray_actors, ray_actor_cpus),
            )
        )
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


@dataclass(frozen=True)
class RunOptions:
    inputs: list[str]
    from_list: Path | None
    layers: tuple[str, ...]
    arch: str
    weights: str
    seed: int
    resize: int | None | str
    crop: int | None | str
    device: str
    json_lines: bool
    save: Path | None
    save_dtype: str
    dtype: str
    channels_last: bool | None
    compile: bool
    viz: Path | None
    viz_channels: int
    topk: int
    categories: list[str] | None
    batch_size: int
    workers: int
    overwrite: bool
    shard: Shard | None
    dry_run: bool
    summary: bool
    ray: Any = None
    """A ray_engine.RayPlan with --engine ray; None runs the local engine."""


ENGINES = ("local", "ray")


def _ray_plan(engine: str, address: str | None, actors: int | None, actor_cpus: float) -> Any:
    if engine not in ENGINES:
        raise UsageError(f"--engine {engine}: expected one of {', '.join(ENGINES)}")
    if engine != "ray":
        given = [name for name, value in (("--ray-address", address), ("--ray-actors", actors)) if value is not None]
        if given:
            raise UsageError(f"{given[0]} needs --engine ray")
        return None
    from .ray_engine import RayPlan, check_ray_installed

    check_ray_installed()
    return RayPlan(address, actors, actor_cpus)


def _engine_label(options: RunOptions) -> str | None:
    if options.ray is None:
        return None
    actors = f"{options.ray.actors} actor(s)" if options.ray.actors else "actors: one per GPU, else 1"
    return f"ray ({options.ray.address or 'local cluster'}, {actors}, device {options.device})"


def _find_inputs(options: RunOptions) -> tuple[list[FoundImage], bool]:
    """The images, and whether they were all named one by one on the command line."""
    listed = read_path_list(options.from_list) if options.from_list is not None else []
    inputs = options.inputs + listed
    if not inputs:
        raise UsageError("no inputs: give image files or folders, or --from-list FILE")
    found = find_images(inputs)
    named_files = options.from_list is None and not any(Path(given).is_dir() for given in options.inputs)
    return found, named_files


def _run(options: RunOptions) -> int:
    found, named_files = _find_inputs(options)
    if options.save is not None or options.viz is not None:
        check_output_collisions(found)
    if options.ray is not None and options.viz is not None:
        raise UsageError("--viz works with the local engine only: draw pictures of a few images without --engine ray")
    shard = options.shard or shard_from_env()
    selected = shard.take(found) if shard is not None else found
    per_image_tables = named_files and options.save is None and not options.summary and not options.json_lines

    from . import dump
    from . import output as out
    from .pipeline import Extractor, keep_freed_memory, planned_preprocessing, resolve_device
    from .weights import plan_weights

    rank_group = RankGroup() if launched_by_torchrun() else None
    preprocessing = planned_preprocessing(options.arch, options.weights, options.resize, options.crop)
    weights_label = plan_weights(options.arch, options.weights).label
    settings = dump.DumpSettings(
        arch=options.arch,
        weights=weights_label,
        seed=options.seed if weights_label == "none" else None,
        layers=options.layers,
        preprocessing=preprocessing.to_dict(),
        dtype=options.dtype,
        save_dtype=options.save_dtype,
    )
    if options.save is not None:
        dump.claim_output_dir(options.save, settings, overwrite=options.overwrite, record=not options.dry_run)
    todo, skipped, redo = dump.split_existing(selected, options.save, settings, overwrite=options.overwrite)
    if redo:
        warning_line(
            f"{len(redo)} existing feature file(s) are unreadable or were made with other settings "
            f"(e.g. {redo[0].output}); they are computed again"
        )
    console = _stdout_console()
    if options.dry_run:
        return _dry_run(console, options, todo, skipped, preprocessing)

    keep_freed_memory()
    extractor_options = {
        "arch": options.arch,
        "layers": options.layers,
        "weights": options.weights,
        "seed": options.seed,
        "resize": options.resize,
        "crop": options.crop,
        "dtype": options.dtype,
        "channels_last": options.channels_last,
        "compile": options.compile,
        "topk": options.topk,
        "categories": options.categories,
        "keep_features": options.save is not None or options.viz is not None,
    }
    if options.ray is not None:
        # The driver's copy only checks the weights and options before the cluster starts; the
        # actors hold the models, on their own devices.
        extractor = Extractor(**{**extractor_options, "compile": False}, device="cpu")
    else:
        local_rank = local_rank_from_env() if shard_from_env() else None
        extractor = Extractor(**extractor_options, device=resolve_device(options.device, local_rank=local_rank))
    if not options.json_lines:
        out.render_model_header(console, extractor, engine=_engine_label(options))
    manifest = None
    writer = None
    if options.save is not None:
        manifest = dump.Manifest(options.save / (shard.manifest_name if shard else dump.UNSHARDED_MANIFEST))
        writer = dump.FeatureWriter(options.save, options.save_dtype, out.run_meta(settings))
        for image in skipped:
            manifest.record(dump.Outcome(image.path, image.output, "skipped"))
    accumulator = SummaryAccumulator()
    deepest = extractor.stage_names[-1]
    deepest_stride = extractor.backbone.strides[deepest]
    stride_warned = False
    progress = out.Progress(len(todo)) if sys.stderr.isatty() and not per_image_tables else None
    say_error = progress.error_line if progress is not None else error_line

    def on_outcome(outcome: dump.Outcome, result: Any) -> None:
        nonlocal stride_warned
        if manifest is not None:
            manifest.record(outcome)
        if outcome.status == "error":
            say_error(str(outcome.error))
        if result is not None:
            if not stride_warned and any(size % deepest_stride for size in result.input_size):
                stride_warned = True
                warning_line(out.stride_warning(result.input_size, deepest, deepest_stride))
            if options.viz is not None:
                out.write_viz(options.viz / Path(str(outcome.output)).with_suffix(""), result, options.viz_channels)
            for stats in result.stats:
                accumulator.add(stats)
            if options.json_lines:
                sys.stdout.write(json.dumps(out.json_record(extractor, result)) + "\n")
                sys.stdout.flush()
            elif per_image_tables:
                out.render_image_table(console, result)
        if progress is not None:
            progress.advance(outcome.status == "error")

    try:
        with dump.stop_on_signals() as stop:
            if options.ray is not None:
                from .ray_engine import run_ray_dump

                result = run_ray_dump(
                    todo,
                    plan=options.ray,
                    extractor_options=extractor_options,
                    device=options.device,
                    preprocessing=extractor.preprocessing,
                    save_dir=options.save,
                    save_dtype=options.save_dtype,
                    run_meta=out.run_meta(settings),
                    on_outcome=on_outcome,
                    batch_size=options.batch_size,
                    stop=stop,
                )
            else:
                result = dump.run_dump(
                    extractor,
                    todo,
                    writer=writer,
                    on_outcome=on_outcome,
                    batch_size=options.batch_size,
                    workers=options.workers,
                    stop=stop,
                )
    finally:
        if progress is not None:
            progress.stop()
        if manifest is not None:
            manifest.close()
    result.skipped = len(skipped)
    if not options.json_lines and not per_image_tables:
        out.render_stage_summaries(console, accumulator.summaries())
    if options.save is not None or len(found) > 1 or result.stopped_by is not None:
        print(out.run_summary_line(result, shard), file=sys.stderr, flush=True)
    if result.output_error is not None and not result.output_error_shown:
        error_line(result.output_error)
    code = _exit_code(result)
    return rank_group.agree_on_exit_code(code) if rank_group is not None else code


def _stdout_console() -> Any:
    from rich.console import Console

    # Piped output gets a fixed width wide enough for every table, rather than rich's 80.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 140)


def _describe(arch: str, input_size: tuple[int, int], json_lines: bool) -> int:
    from .backbone import describe_stages
    from .output import describe_record, render_description, stride_warning

    stages = describe_stages(arch, input_size)
    deepest = stages[-1]
    if any(size % deepest.stride for size in input_size):
        warning_line(stride_warning(input_size, deepest.name, deepest.stride))
    if json_lines:
        print(json.dumps(describe_record(arch, input_size, stages)))
    else:
        render_description(_stdout_console(), arch, input_size, stages)
    return EXIT_OK


def _exit_code(result: Any) -> int:
    if result.stopped_by is not None:
        return 128 + int(result.stopped_by)
    return EXIT_FAILURE if result.failed or result.output_error else EXIT_OK


def _dry_run(console: Any, options: RunOptions, todo: list[FoundImage], skipped: list[FoundImage], preprocessing: Any) -> int:
    from .dump import estimate_bytes
    from .output import human_bytes

    sizes = [planned_input_size(image.path, preprocessing) for image in todo]
    readable = [size for size in sizes if size is not None]
    estimate = estimate_bytes(options.arch, options.layers, readable, options.save_dtype)
    record = {
        "to_do": len(todo),
        "to_skip": len(skipped),
        "unreadable": len(sizes) - len(readable),
        "estimated_bytes": estimate if options.save else 0,
    }
    if options.json_lines:
        print(json.dumps(record))
    else:
        where = f" in {options.save}" if options.save else ""
        console.print(
            f"dry run: {len(todo)} images to do ({record['unreadable']} of them unreadable from their "
            f"header, so they will fail), {len(skipped)} to skip (already{where}); "
            f"about {human_bytes(record['estimated_bytes'])} to write as {options.save_dtype}",
        )
    return EXIT_OK


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (e.g. a test runner)
        pass


def default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 1) - 1))


def main() -> None:
    app(prog_name=PROG_NAME)
