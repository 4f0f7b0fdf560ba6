"""Command-line interface: one function per command; each parses arguments and dispatches.

No logic lives here. Heavy imports (torch, transformers) happen inside the commands so that
`llava-ultra --help` is instant. A `LlavaUltraError` is printed as a one-line message and exits
with status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated

import typer

from .errors import LlavaUltraError

app = typer.Typer(
    name="llava-ultra",
    help="Build, train, evaluate and serve a medical vision-language assistant (LLaVA-Ultra).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _friendly(fn):
    """Turn user-facing errors into a clean message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LlavaUltraError as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            sys.exit(2)

    return wrapper


# --------------------------------------------------------------------------------------- data


@app.command()
@_friendly
def synth(
    out: Annotated[Path, typer.Option(help="Output folder for the SynthUS dataset.")],
    reports: Annotated[int, typer.Option(help="Number of reports to generate.")] = 1000,
    seed: Annotated[int, typer.Option(help="Random seed; same seed gives identical bytes.")] = 0,
    k_min: Annotated[int, typer.Option(help="Fewest frames per report.")] = 1,
    k_max: Annotated[int, typer.Option(help="Most frames per report.")] = 8,
    image_size: Annotated[int, typer.Option(help="Frame width and height in pixels.")] = 224,
    hard: Annotated[bool, typer.Option(help="Lower contrast, smaller findings, more invalid frames.")] = False,
    workers: Annotated[int, typer.Option(help="Worker processes (output is identical for any count).")] = 1,
) -> None:
    """Generate SynthUS, a synthetic multi-frame ultrasound report dataset."""
    from .data.synth import SynthConfig, generate

    cfg = SynthConfig(
        reports=reports, seed=seed, k_min=k_min, k_max=k_max, image_size=image_size, hard=hard
    )
    summary = generate(out, cfg, workers=workers)
    typer.echo(summary.render())
