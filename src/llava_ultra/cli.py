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


@app.command()
@_friendly
def instruct(
    reports: Annotated[Path, typer.Option(help="A .jsonl/.csv reports file or a folder of them.")],
    out: Annotated[Path, typer.Option(help="Output folder for {stage1,stage2,eval}.<split>.json.")],
    language: Annotated[str, typer.Option(help="Which reports to use: zh, en or both.")] = "both",
    site_cue: Annotated[str, typer.Option(help="Name the site in questions: with, without or both.")] = "both",
    seed: Annotated[int, typer.Option(help="Random seed; same seed gives identical files.")] = 0,
    generator: Annotated[str, typer.Option(help="Stage-2 conversation generator (template).")] = "template",
) -> None:
    """Turn reports into LLaVA-style instruction data: stage-1 captions, stage-2 conversations, eval QA."""
    from .data.instruct import run_instruct

    summary = run_instruct(
        reports, out, language=language, site_cue=site_cue, seed=seed, generator=generator
    )
    typer.echo(summary.render())


@app.command()
@_friendly
def validate(
    data: Annotated[Path, typer.Argument(help="A .jsonl/.csv reports file or a folder of them.")],
    max_bad_fraction: Annotated[
        float, typer.Option(help="Largest tolerated fraction of bad reports (0 = any problem fails).")
    ] = 0.0,
    all_problems: Annotated[
        bool, typer.Option("--all", help="List every problem, not the first 20 per kind.")
    ] = False,
    decode: Annotated[
        bool, typer.Option(help="Fully decode every image (--no-decode: existence only).")
    ] = True,
) -> None:
    """Check reports parse, ids are unique, and every image exists and decodes; exit 1 above the threshold."""
    from .data.reports import validate_dataset

    summary = validate_dataset(data, max_bad_fraction=max_bad_fraction, decode=decode)
    typer.echo(summary.render(max_listed=None if all_problems else 20))
    if not summary.ok:
        sys.exit(1)


@app.command("ingest-dicom")
@_friendly
def ingest_dicom(
    inputs: Annotated[list[Path], typer.Argument(help="DICOM files or folders (searched recursively).")],
    out: Annotated[
        Path, typer.Option(help="Output folder for PNG frames, report skeletons and the de-id log.")
    ],
    site: Annotated[str, typer.Option(help="Examination site of these studies, e.g. thyroid.")],
    language: Annotated[str, typer.Option(help="Language the reports will be written in: zh or en.")] = "zh",
    banner_rows: Annotated[
        int | None, typer.Option(help="Blank this many top rows of every frame (0 disables).")
    ] = None,
    banner_fraction: Annotated[
        float | None, typer.Option(help="Blank this fraction of the top rows (default 0.1).")
    ] = None,
    every: Annotated[int, typer.Option(help="Keep every N-th frame of a cine loop.")] = 1,
    max_frames: Annotated[int | None, typer.Option(help="Keep at most N frames per file.")] = None,
    write_dicom: Annotated[bool, typer.Option(help="Also write de-identified DICOM copies.")] = False,
    salt: Annotated[
        str, typer.Option(help="Secret mixed into hashed UIDs/pseudonyms (set it for release).")
    ] = "",
) -> None:
    """Convert ultrasound DICOM (single-frame or cine) to de-identified PNG frames + report skeletons."""
    from .data.dicom import IngestOptions
    from .data.dicom import ingest_dicom as run_ingest

    opts = IngestOptions(
        site=site,
        language=language,
        banner_rows=banner_rows,
        banner_fraction=banner_fraction,
        every=every,
        max_frames=max_frames,
        write_dicom=write_dicom,
        salt=salt,
    )
    summary = run_ingest(inputs, out, opts)
    typer.echo(summary.render())
    if not summary.ok:
        sys.exit(1)


@app.command()
@_friendly
def scrub(
    src: Annotated[Path, typer.Argument(help="Input reports file (.jsonl or .csv).")],
    dst: Annotated[Path, typer.Argument(help="Output reports file (.jsonl or .csv).")],
) -> None:
    """Remove names, ID/phone/record numbers, birth dates and e-mails from report text."""
    from .data.scrub import scrub_file

    summary = scrub_file(src, dst)
    typer.echo(summary.render())
    if not summary.ok:
        sys.exit(1)
