"""The command line: parse, call the library, render, exit code. No tensor math here."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

from . import __version__
from .errors import EXIT_FAILURE, EXIT_OK, ImageError, InspectError, UsageError
from .options import check_device_spec, parse_size
from .stages import ARCHS, STAGES, check_arch, parse_layers

PROG_NAME = "backbone-inspect"


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
        list[str],
        typer.Argument(help="Image files (JPEG, PNG, WebP, BMP, TIFF, GIF).", metavar="IMAGE", show_default=False),
    ],
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
        typer.Option(help="Save DIR/<image stem>.pt per image.", file_okay=False, show_default=False),
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of unexpected errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Show the version.")
    ] = False,
) -> int:
    """Shapes, strides and statistics of a torchvision ResNet's stages for each IMAGE."""
    try:
        return _run(
            images=images,
            layers=parse_layers(layers),
            arch=check_arch(arch),
            weights=weights,
            seed=seed,
            resize=parse_size("--resize", resize),
            crop=parse_size("--crop", crop),
            device=check_device_spec(device),
            json_lines=json_lines,
            save=save,
        )
    except InspectError as error:
        error_line(str(error))
        return error.exit_code
    except Exception as error:
        if debug:
            raise
        error_line(f"{type(error).__name__}: {error} (run with --debug for the traceback)")
        return EXIT_FAILURE


def _check_inputs(images: list[str]) -> None:
    for image in images:
        path = Path(image)
        if not path.exists():
            raise UsageError(f"{image}: no such file")
        if path.is_dir():
            raise UsageError(f"{image}: is a directory, expected an image file")


def _run(
    *,
    images: list[str],
    layers: tuple[str, ...],
    arch: str,
    weights: str,
    seed: int,
    resize: int | None | str,
    crop: int | None | str,
    device: str,
    json_lines: bool,
    save: Path | None,
) -> int:
    _check_inputs(images)
    from .output import output_paths

    targets = output_paths(images, save) if save is not None else {}

    from rich.console import Console

    from .output import feature_meta, json_record, render_image_table, render_model_header, save_features
    from .pipeline import Extractor, resolve_device

    extractor = Extractor(
        arch=arch,
        layers=layers,
        weights=weights,
        seed=seed,
        device=resolve_device(device),
        resize=resize,
        crop=crop,
    )
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
    if not json_lines:
        render_model_header(console, extractor)
    failures = 0
    for image in images:
        try:
            result = extractor.inspect(image)
        except ImageError as error:
            error_line(str(error))
            failures += 1
            continue
        if image in targets:
            save_features(targets[image], result.features, feature_meta(extractor, result))
        if json_lines:
            sys.stdout.write(json.dumps(json_record(extractor, result)) + "\n")
            sys.stdout.flush()
        else:
            render_image_table(console, result)
    return EXIT_FAILURE if failures else EXIT_OK


def main() -> None:
    app(prog_name=PROG_NAME)
