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

TEMPLATE_HELP = (
    "Conversation template: vicuna_v1, mistral_instruct or plain. Default: the checkpoint's recorded "
    "model.template (converted LLaVA-Med v1.5: mistral_instruct; LLaVA v1.5: vicuna_v1); a stage-1 "
    "'plain' checkpoint is prompted in its LLM family's chat format (Mistral: mistral_instruct, "
    "else vicuna_v1), because plain drops the question - pass --template plain to force it."
)

FINDINGS_VOCAB_HELP = (
    "JSON/YAML file adding terms (finding synonyms, sides, location parts, negations) to the findings "
    "vocabulary of the hallucination metrics; see docs/metrics.md."
)
SIZE_TOL_HELP = "Hallucination size error: a dimension off by more than max(this many cm, rel x true size)."

app = typer.Typer(
    name="llava-ultra",
    help="Build, train, evaluate and serve a medical vision-language assistant (LLaVA-Ultra).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


EncodersOption = Annotated[
    str,
    typer.Option(
        help="'pretrained' (SynthUS-pretrained tiny encoders, built once and cached), 'random' "
        "(random-init), or a folder from `llava-ultra pretrain-encoders`."
    ),
]
"""--encoders of quickstart, ablate and logra-experiment (recipes/encoders.resolve_encoders)."""


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
    hard: Annotated[
        bool, typer.Option(help="Lower contrast, smaller findings, more invalid frames.")
    ] = False,
    workers: Annotated[int, typer.Option(help="Worker processes (output is identical for any count).")] = 1,
) -> None:
    """Generate SynthUS, a synthetic multi-frame ultrasound report dataset."""
    from .data.synth import SynthConfig, generate

    cfg = SynthConfig(reports=reports, seed=seed, k_min=k_min, k_max=k_max, image_size=image_size, hard=hard)
    summary = generate(out, cfg, workers=workers)
    typer.echo(summary.render())


@app.command()
@_friendly
def instruct(
    reports: Annotated[Path, typer.Option(help="A .jsonl/.csv reports file or a folder of them.")],
    out: Annotated[Path, typer.Option(help="Output folder for {stage1,stage2,eval}.<split>.json.")],
    language: Annotated[str, typer.Option(help="Which reports to use: zh, en or both.")] = "both",
    site_cue: Annotated[
        str, typer.Option(help="Name the site in questions: with, without or both.")
    ] = "both",
    seed: Annotated[int, typer.Option(help="Random seed; same seed gives identical files.")] = 0,
    generator: Annotated[
        str, typer.Option(help="Stage-2 conversation generator: template or llm.")
    ] = "template",
    llm_base_url: Annotated[
        str | None,
        typer.Option(
            envvar="LLAVA_ULTRA_LLM_BASE_URL", help="[llm] Endpoint, e.g. http://127.0.0.1:8000/v1."
        ),
    ] = None,
    llm_model: Annotated[
        str | None,
        typer.Option(envvar="LLAVA_ULTRA_LLM_MODEL", help="[llm] Model name (pin a dated snapshot)."),
    ] = None,
    llm_tasks: Annotated[
        str, typer.Option(help="[llm] Comma list of conversation, detailed_description, complex_reasoning.")
    ] = "conversation,detailed_description,complex_reasoning",
    llm_extended: Annotated[
        bool, typer.Option(help="[llm] Also write extended_answers (LoGra-Med extended captions).")
    ] = True,
    llm_api_key_env: Annotated[
        str, typer.Option(help="[llm] Env variables holding the API key, tried in order.")
    ] = "LLAVA_ULTRA_LLM_API_KEY,OPENAI_API_KEY",
    llm_api_version: Annotated[str | None, typer.Option(help="[llm] Azure OpenAI api-version.")] = None,
    llm_concurrency: Annotated[int, typer.Option(help="[llm] Requests in flight.")] = 4,
    llm_temperature: Annotated[float, typer.Option(help="[llm] Sampling temperature.")] = 0.7,
    llm_timeout: Annotated[float, typer.Option(help="[llm] Seconds per request.")] = 120.0,
    llm_max_attempts: Annotated[int, typer.Option(help="[llm] Tries per request.")] = 5,
    llm_json_mode: Annotated[bool, typer.Option(help="[llm] Send response_format json_object.")] = False,
    llm_cache: Annotated[
        Path | None, typer.Option(help="[llm] Reply cache (default OUT/llm_cache.sqlite3).")
    ] = None,
    llm_no_cache: Annotated[bool, typer.Option(help="[llm] Do not read or write the reply cache.")] = False,
    llm_journal: Annotated[
        Path | None, typer.Option(help="[llm] Resume journal (default OUT/llm_journal.jsonl).")
    ] = None,
    llm_dry_run: Annotated[bool, typer.Option(help="[llm] Print the requests, send nothing.")] = False,
    llm_price: Annotated[
        str | None, typer.Option(help="[llm] 'IN,OUT' USD per 1M tokens (default: built-in table).")
    ] = None,
) -> None:
    """Turn reports into LLaVA-style instruction data: stage-1 captions, stage-2 conversations, eval QA."""
    from .data.instruct import run_instruct

    options = None
    if generator == "llm":
        from .data.llm_instruct import cli_options

        options = cli_options(
            out,
            base_url=llm_base_url,
            model=llm_model,
            tasks=llm_tasks,
            extended=llm_extended,
            api_key_env=llm_api_key_env,
            api_version=llm_api_version,
            concurrency=llm_concurrency,
            temperature=llm_temperature,
            timeout=llm_timeout,
            max_attempts=llm_max_attempts,
            json_mode=llm_json_mode,
            cache=llm_cache,
            no_cache=llm_no_cache,
            journal=llm_journal,
            dry_run=llm_dry_run,
            price=llm_price,
        )
    summary = run_instruct(
        reports,
        out,
        language=language,
        site_cue=site_cue,
        seed=seed,
        generator=generator,
        generator_options=options,
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
        int | None,
        typer.Option(help="Files without usable ultrasound regions: blank this many top rows (0 disables)."),
    ] = None,
    banner_fraction: Annotated[
        float | None,
        typer.Option(help="Files without usable ultrasound regions: blank this top fraction (default 0.1)."),
    ] = None,
    mask: Annotated[
        list[str] | None,
        typer.Option(help="Also blank this pixel box x0,y0,x1,y1 (inclusive) in every frame; repeatable."),
    ] = None,
    detect_text: Annotated[
        bool, typer.Option(help="Blank burned-in text found by the detector (files without usable regions).")
    ] = True,
    allow_burned_in: Annotated[
        bool,
        typer.Option(
            help="Accept BurnedInAnnotation=YES files that have no ultrasound regions and no --mask/--banner-*."
        ),
    ] = False,
    every: Annotated[int, typer.Option(help="Keep every N-th frame of a cine loop.")] = 1,
    max_frames: Annotated[int | None, typer.Option(help="Keep at most N frames per file.")] = None,
    write_dicom: Annotated[bool, typer.Option(help="Also write de-identified DICOM copies.")] = False,
    key_file: Annotated[
        Path | None,
        typer.Option(
            help="Secret pseudonym key (HMAC) file, created on first use; default "
            "$LLAVA_ULTRA_KEY_FILE or ~/.config/llava-ultra/deid.key. Same key = same pseudonyms."
        ),
    ] = None,
    retain_dates: Annotated[
        bool, typer.Option(help="PS3.15 option: Retain Longitudinal Temporal Information with Full Dates.")
    ] = False,
) -> None:
    """Convert ultrasound DICOM (single-frame or cine) to de-identified PNG frames + report skeletons."""
    from .data.dicom import IngestOptions
    from .data.dicom import ingest_dicom as run_ingest
    from .data.pixels import parse_mask

    opts = IngestOptions(
        site=site,
        language=language,
        banner_rows=banner_rows,
        banner_fraction=banner_fraction,
        masks=tuple(parse_mask(m) for m in mask or ()),
        detect_text=detect_text,
        allow_burned_in=allow_burned_in,
        every=every,
        max_frames=max_frames,
        write_dicom=write_dicom,
        key_file=None if key_file is None else str(key_file),
        retain_dates=retain_dates,
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


# --------------------------------------------------------------------------------- evaluation


@app.command("eval")
@_friendly
def eval_cmd(
    model: Annotated[Path, typer.Option(help="Checkpoint folder (config.json, weights, tokenizer).")],
    data: Annotated[
        str,
        typer.Option(
            help="Dataset SPEC (e.g. ultra:eval.test.json, slake:/d/Slake1.0?lang=zh) or an eval JSON."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Run folder for predictions, scores, report and plots.")],
    mode: Annotated[str, typer.Option(help="Metric mode: strict or llava-med.")] = "strict",
    metric_tokenizer: Annotated[
        str | None, typer.Option(help="Override the mode's metric tokenizer: whitespace, jieba or char.")
    ] = None,
    closed_variant: Annotated[
        str,
        typer.Option(
            help="llava-med mode: closed-question rule named by the LLaVA-Med file@commit it reproduces: "
            "run_eval@b9a98a7 (v1.0.0), run_eval@ad758b6 or run_eval_batch@ad758b6."
        ),
    ] = "run_eval@b9a98a7",
    batch_size: Annotated[int, typer.Option(help="Samples per generate call.")] = 8,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer in tokens.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 = greedy (default); > 0 samples.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus mass when sampling.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Sampling and bootstrap seed.")] = 0,
    template: Annotated[str | None, typer.Option(help=TEMPLATE_HELP)] = None,
    system: Annotated[str | None, typer.Option(help="System prompt (default: the template's).")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Extra stop string (repeatable).")] = None,
    shard: Annotated[str, typer.Option(help="Multi-process sharding: contiguous or strided.")] = "contiguous",
    limit: Annotated[int | None, typer.Option(help="Only the first N samples.")] = None,
    max_bad_fraction: Annotated[
        float, typer.Option(help="Fraction of malformed ground-truth records to skip (0 = none).")
    ] = 0.0,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for 95% CIs (0 = none).")] = 1000,
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda, ... (default: the process's own device).")
    ] = None,
    dtype: Annotated[str | None, typer.Option(help="Weight dtype override, e.g. bfloat16.")] = None,
    plots: Annotated[bool, typer.Option(help="Draw PNG plots.")] = True,
    findings_vocab: Annotated[str | None, typer.Option(help=FINDINGS_VOCAB_HELP)] = None,
    size_tolerance_cm: Annotated[float, typer.Option(help=SIZE_TOL_HELP)] = 0.1,
    size_tolerance_rel: Annotated[float, typer.Option(help="Relative part of the size tolerance.")] = 0.2,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing predictions.jsonl in --out.")] = False,
) -> None:
    """Generate answers for a dataset, save every prediction, and score them (data-parallel under torchrun)."""
    from .eval.runner import EvalSettings, run_eval

    settings = EvalSettings(
        mode=mode,
        metric_tokenizer=metric_tokenizer,
        closed_variant=closed_variant,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        template=template,
        system=system,
        stop=tuple(stop or ()),
        shard=shard,
        limit=limit,
        max_bad_fraction=max_bad_fraction,
        bootstrap=bootstrap,
        device=device,
        dtype=dtype,
        plots=plots,
        findings_vocab=findings_vocab,
        size_tolerance_cm=size_tolerance_cm,
        size_tolerance_rel=size_tolerance_rel,
    )
    result = run_eval(model, data, out, settings, overwrite=overwrite)
    if result is not None:
        typer.echo(result.render())


@app.command()
@_friendly
def score(
    predictions: Annotated[Path, typer.Argument(help="predictions.jsonl (or the run folder holding it).")],
    ground_truth: Annotated[
        str,
        typer.Argument(
            help="The eval JSON, dataset SPEC, or LLaVA-Med ground-truth file (test.json; or llava-med:PATH) "
            "the predictions answer."
        ),
    ],
    mode: Annotated[str, typer.Option(help="Metric mode: strict or llava-med.")] = "strict",
    metric_tokenizer: Annotated[
        str | None, typer.Option(help="Override the mode's metric tokenizer: whitespace, jieba or char.")
    ] = None,
    closed_variant: Annotated[
        str,
        typer.Option(
            help="llava-med mode: closed-question rule named by the LLaVA-Med file@commit it reproduces: "
            "run_eval@b9a98a7 (v1.0.0), run_eval@ad758b6 or run_eval_batch@ad758b6."
        ),
    ] = "run_eval@b9a98a7",
    candidates: Annotated[
        Path | None,
        typer.Option(
            help='llava-med mode: LLaVA-Med candidate file {"0": [answers]} for open accuracy '
            "(default: the open reference answers of the scored set)."
        ),
    ] = None,
    limit: Annotated[
        int | None, typer.Option(help="Only the first N ground-truth samples (as eval --limit).")
    ] = None,
    max_bad_fraction: Annotated[
        float,
        typer.Option(
            help="Fraction of malformed ground-truth records to skip (0 = none; at least what the "
            "eval run recorded in run.json)."
        ),
    ] = 0.0,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for 95% CIs (0 = none).")] = 1000,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
    out: Annotated[
        Path | None, typer.Option(help="Write scores.json, report.md and plots to this folder.")
    ] = None,
    plots: Annotated[bool, typer.Option(help="Draw PNG plots (with --out).")] = True,
    findings_vocab: Annotated[str | None, typer.Option(help=FINDINGS_VOCAB_HELP)] = None,
    size_tolerance_cm: Annotated[float, typer.Option(help=SIZE_TOL_HELP)] = 0.1,
    size_tolerance_rel: Annotated[float, typer.Option(help="Relative part of the size tolerance.")] = 0.2,
) -> None:
    """Re-score saved predictions without the model (pairs predictions with ground truth by question id)."""
    from .eval.report import compare_table, render_compare, render_report
    from .eval.runner import EvalSettings, rescore

    settings = EvalSettings(
        mode=mode,
        metric_tokenizer=metric_tokenizer,
        closed_variant=closed_variant,
        candidates=None if candidates is None else str(candidates),
        limit=limit,
        max_bad_fraction=max_bad_fraction,
        bootstrap=bootstrap,
        seed=seed,
        plots=plots,
        findings_vocab=findings_vocab,
        size_tolerance_cm=size_tolerance_cm,
        size_tolerance_rel=size_tolerance_rel,
    )
    scores = rescore(predictions, ground_truth, settings, out)
    if out is None:
        typer.echo(render_report(scores))
    else:
        header, rows, _ = compare_table([(predictions.name, scores)])
        typer.echo(f"scores -> {out}\n" + render_compare(header, rows, []))


@app.command()
@_friendly
def compare(
    runs: Annotated[list[Path], typer.Argument(help="Run folders (or their scores.json files).")],
    subset: Annotated[
        str | None,
        typer.Option(
            help="Also one row per value of: language, modality, answer_type, question_type, site, k, dataset."
        ),
    ] = None,
    metrics: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated metric keys, e.g. exact_match,f1,closed_accuracy,chair_i,omission,wrong_side,"
            "size_error,pope_accuracy,pope_f1,pope_yes_ratio (default: the answer metrics, CHAIR-i/-s, "
            "omission, POPE F1 and yes-ratio)."
        ),
    ] = None,
    ci: Annotated[bool, typer.Option(help="Show 95% bootstrap intervals.")] = False,
    out: Annotated[Path | None, typer.Option(help="Also write the Markdown table to this file.")] = None,
) -> None:
    """One table across runs, like the paper's Table 2 (rows = runs, columns = metrics)."""
    from .eval.report import COMPARE_DEFAULT, compare_table, read_scores, render_compare

    keys = [k.strip() for k in metrics.split(",") if k.strip()] if metrics else list(COMPARE_DEFAULT)
    loaded = [(p.name if p.is_dir() else p.parent.name, read_scores(p)) for p in runs]
    text = render_compare(*compare_table(loaded, subset, keys, ci))
    typer.echo(text, nl=False)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")


@app.command()
@_friendly
def convert(
    source: Annotated[str, typer.Option("--from", help="Source format: llava, llava-med, llava-hf or sam.")],
    src: Annotated[Path, typer.Option(help="Source checkpoint folder (a SAM .pth file also works).")],
    out: Annotated[
        Path, typer.Option(help="Output folder (llava-ultra checkpoint; an HF SAM folder for sam).")
    ],
    vision_tower: Annotated[
        str | None, typer.Option(help="Local CLIP folder or hub id instead of config.json's mm_vision_tower.")
    ] = None,
    sam: Annotated[
        Path | None,
        typer.Option(help="Also add this SAM (HF folder or original .pth) as the second encoder."),
    ] = None,
    base: Annotated[
        Path | None, typer.Option(help="The LLM a LoRA or stage-1 (mm_projector.bin) output was trained on.")
    ] = None,
    template: Annotated[
        str | None, typer.Option(help="Conversation template: vicuna_v1, mistral_instruct or plain.")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override fusion.* / selector.* / dtype, e.g. selector.mode=feature."),
    ] = None,
) -> None:
    """Convert an original LLaVA / LLaVA-Med, llava-hf or SAM checkpoint into a llava-ultra folder."""
    from .model.convert import convert as run_convert

    summary = run_convert(
        source,
        src,
        out,
        vision_tower=vision_tower,
        sam=sam,
        base=base,
        template=template,
        overrides=set_ or [],
    )
    typer.echo(summary.render())


# ------------------------------------------------------------------------------------ serving


@app.command()
@_friendly
def serve(
    ckpt: Annotated[
        Path, typer.Argument(help="Checkpoint folder (save_pretrained or a training checkpoint).")
    ],
    host: Annotated[str, typer.Option(help="Interface to bind; loopback by default.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="LLAVA_ULTRA_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1/ routes."
        ),
    ] = None,
    model_name: Annotated[
        str | None, typer.Option(help="Model id clients pass (default: folder name).")
    ] = None,
    allow_remote_images: Annotated[
        bool, typer.Option(help="Fetch http(s) image URLs from --allowed-hosts (off: data: URLs only).")
    ] = False,
    allowed_hosts: Annotated[
        list[str] | None, typer.Option("--allowed-hosts", help="Host allowed for remote images ('*' = any).")
    ] = None,
    allowed_image_dir: Annotated[
        list[Path] | None, typer.Option(help="Folder whose files file:// image URLs may name.")
    ] = None,
    max_batch_size: Annotated[int, typer.Option(help="Requests decoded together (1 = one at a time).")] = 8,
    max_wait_ms: Annotated[float, typer.Option(help="How long a request waits for batch mates.")] = 5.0,
    max_images: Annotated[int, typer.Option(help="Images per request.")] = 8,
    max_image_bytes: Annotated[int, typer.Option(help="Encoded bytes per image.")] = 10 * 2**20,
    max_image_pixels: Annotated[int, typer.Option(help="Width x height per image.")] = 4096 * 4096,
    max_aspect_ratio: Annotated[float, typer.Option(help="Longer / shorter side per image.")] = 20.0,
    max_image_side: Annotated[
        int, typer.Option(help="Longer side kept; larger images are downscaled before padding.")
    ] = 2048,
    max_text_chars: Annotated[int, typer.Option(help="Characters of text per request.")] = 65536,
    max_prompt_tokens: Annotated[int, typer.Option(help="Prompt tokens, images included.")] = 4096,
    max_output_tokens: Annotated[int, typer.Option(help="Largest max_tokens a request may ask for.")] = 1024,
    max_queue: Annotated[int, typer.Option(help="Queued requests before 503s.")] = 256,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str | None, typer.Option(help="Override the checkpoint's dtype.")] = None,
    template: Annotated[str | None, typer.Option(help=TEMPLATE_HELP)] = None,
    system: Annotated[str | None, typer.Option(help="System prompt (default: the template's).")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve a checkpoint over an OpenAI-compatible API (+ a web page at /)."""
    import uvicorn

    from .serve.app import ServerSettings, create_app, uvicorn_options
    from .serve.engine import Engine, Limits, pick_device
    from .serve.images import ImagePolicy

    limits = Limits(
        max_images=max_images,
        max_image_bytes=max_image_bytes,
        max_image_pixels=max_image_pixels,
        max_aspect_ratio=max_aspect_ratio,
        max_image_side=max_image_side,
        max_text_chars=max_text_chars,
        max_prompt_tokens=max_prompt_tokens,
        max_output_tokens=max_output_tokens,
        max_queue=max_queue,
    )
    policy = ImagePolicy(
        allow_remote=allow_remote_images,
        allowed_hosts=tuple(allowed_hosts or ()),
        allowed_dirs=tuple(allowed_image_dir or ()),
    )
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        typer.secho(
            f"warning: serving on {host} without --api-key: anyone who can reach this port can use the model",
            fg=typer.colors.YELLOW,
            err=True,
        )
    engine = Engine.from_checkpoint(
        ckpt,
        device=pick_device(device),
        dtype=dtype,
        limits=limits,
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        template=template,
        system=system,
    )
    settings = ServerSettings(
        model_name=model_name or ckpt.resolve().name, api_key=api_key, image_policy=policy
    )
    typer.echo(f"serving {settings.model_name} on http://{host}:{port}/ (API under /v1)")
    with engine:
        app_ = create_app(engine, settings)
        uvicorn.run(app_, host=host, port=port, log_level=log_level, **uvicorn_options())


@app.command()
@_friendly
def chat(
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint folder.")],
    image: Annotated[
        list[Path] | None, typer.Option(help="Image for the first question (repeatable).")
    ] = None,
    max_tokens: Annotated[
        int | None, typer.Option(help="New tokens per answer (default: the limit).")
    ] = None,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    template: Annotated[str | None, typer.Option(help=TEMPLATE_HELP)] = None,
    system: Annotated[str | None, typer.Option(help="System prompt (default: the template's).")] = None,
) -> None:
    """Chat in the terminal (reads stdin; /image PATH, /reset, /exit)."""
    from .serve.chat import run_chat
    from .serve.engine import Engine, SamplingParams, pick_device

    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    with Engine.from_checkpoint(
        ckpt, device=pick_device(device), max_batch_size=1, template=template, system=system
    ) as engine:
        run_chat(engine, image or [], params, prompt="> " if sys.stdin.isatty() else "")


@app.command("check-images")
@_friendly
def check_images(
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint folder.")],
    image: Annotated[list[Path], typer.Option(help="Image(s) of one study (repeatable).")],
    question: Annotated[str, typer.Option(help="What to ask.")] = "Describe the findings. 请描述超声所见。",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    template: Annotated[str | None, typer.Option(help=TEMPLATE_HELP)] = None,
    max_tokens: Annotated[int, typer.Option(help="New tokens per answer.")] = 16,
) -> None:
    """Does the checkpoint look at its images? Replace them by noise and compare; exit 1 if nothing moves.

    Several --image options are one study: all are replaced together, then each one alone, and the
    output says how many of them the model's selector passes to the LLM."""
    from .eval.noise import check_checkpoint_images
    from .serve.engine import pick_device

    result = check_checkpoint_images(
        ckpt, image, question, template=template, device=pick_device(device), max_new_tokens=max_tokens
    )
    typer.echo(f"largest change of the first answer token's logits: {result.max_logit_diff:.4g}")
    typer.echo(f"answer with the images: {result.answer_real!r}")
    typer.echo(f"answer with noise:      {result.answer_noise!r}")
    if result.per_image_diffs:
        typer.echo(
            f"{len(image)} images of one study; the model feeds {result.images_into_llm} of them to its LLM "
            f"({result.selector}); replacing one image at a time by noise:"
        )
        for path, diff in zip(image, result.per_image_diffs, strict=True):
            typer.echo(
                f"  {path}: largest logit change {diff:.4g}" + ("" if diff > 1e-4 else " (not looked at)")
            )
    if result.image_matters:
        typer.echo(
            "OK: the output depends on the images"
            + ("" if result.answer_changed else " (same greedy answer)")
        )
    else:
        typer.echo(
            "PROBLEM: the output does not change when the images are replaced by noise; check that the "
            "projector and vision tower weights loaded (llava-ultra convert, or the stage-1 checkpoint)",
            err=True,
        )
        raise typer.Exit(1)


@app.command()
@_friendly
def predict(
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint folder.")],
    data: Annotated[Path, typer.Option(help="JSONL of requests: id, images, question or messages.")],
    out: Annotated[Path, typer.Option(help="JSONL of answers with the chosen frame.")],
    max_tokens: Annotated[
        int | None, typer.Option(help="New tokens per answer (default: the limit).")
    ] = None,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    max_batch_size: Annotated[int, typer.Option(help="Requests decoded together.")] = 8,
    max_images: Annotated[int, typer.Option(help="Images per request.")] = 8,
    max_bad_fraction: Annotated[
        float, typer.Option(help="Exit 1 when more than this fraction of lines is bad.")
    ] = 0.1,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    template: Annotated[str | None, typer.Option(help=TEMPLATE_HELP)] = None,
) -> None:
    """Offline batch inference over a JSONL of requests; bad lines are counted and skipped."""
    from .serve.engine import Engine, Limits, SamplingParams, pick_device
    from .serve.predict import run_predict

    with Engine.from_checkpoint(
        ckpt,
        device=pick_device(device),
        max_batch_size=max_batch_size,
        template=template,
        limits=Limits(max_images=max_images),
    ) as engine:
        summary = run_predict(
            engine,
            data,
            out,
            SamplingParams(max_tokens=max_tokens, temperature=temperature),
            max_bad_fraction=max_bad_fraction,
        )
    typer.echo(summary.render())
    if not summary.ok:
        sys.exit(1)


@app.command()
@_friendly
def probes(
    reports: Annotated[
        Path, typer.Option(help="SynthUS folder (from `llava-ultra synth`) or a reports .jsonl/.csv.")
    ],
    out: Annotated[Path, typer.Option(help="Probe eval JSON to write, e.g. instruct/probes.test.json.")],
    split: Annotated[str, typer.Option(help="Split of a SynthUS folder: train, val or test.")] = "test",
    language: Annotated[str, typer.Option(help="zh, en or both.")] = "both",
    seed: Annotated[int, typer.Option(help="Seed; the same seed writes the same probes.")] = 0,
    strategies: Annotated[
        str,
        typer.Option(help="Comma-separated: random, popular, adversarial (how absent findings are picked)."),
    ] = "random,popular,adversarial",
    findings_vocab: Annotated[str | None, typer.Option(help=FINDINGS_VOCAB_HELP)] = None,
) -> None:
    """POPE-style yes/no probes about present and absent findings; evaluate them with `llava-ultra eval`."""
    from .eval.findings import load_vocabulary
    from .eval.probes import run_probes

    langs = ("zh", "en") if language == "both" else (language,)
    if any(g not in ("zh", "en") for g in langs):
        raise typer.BadParameter(f"--language {language!r}: use zh, en or both")
    summary = run_probes(
        reports,
        out,
        split=split,
        languages=langs,
        seed=seed,
        strategies=[x.strip() for x in strategies.split(",") if x.strip()],
        vocab=load_vocabulary(findings_vocab),
    )
    typer.echo(summary.render())


@app.command()
@_friendly
def judge(
    pred: Annotated[
        Path, typer.Option(help="Predictions JSONL (question_id, text), LLaVA-Med answer format.")
    ],
    ref: Annotated[
        Path, typer.Option(help="References: our eval/stage-2 JSON, or JSONL with question/answer/category.")
    ],
    out: Annotated[
        Path, typer.Option(help="Folder for judge_raw.jsonl, judge_scores.json and the reply cache.")
    ],
    judge_model: Annotated[
        str, typer.Option(envvar="LLAVA_ULTRA_JUDGE_MODEL", help="Judge model; pin a dated snapshot.")
    ],
    base_url: Annotated[
        str,
        typer.Option(
            envvar="LLAVA_ULTRA_LLM_BASE_URL",
            help="OpenAI-compatible endpoint, e.g. https://api.openai.com/v1.",
        ),
    ],
    repeats: Annotated[int, typer.Option(help="Judge each item N times; the median counts.")] = 1,
    temperature: Annotated[float, typer.Option(help="Judge temperature (protocol: 0).")] = 0.0,
    max_tokens: Annotated[int, typer.Option(help="Longest judge reply.")] = 1024,
    api_key_env: Annotated[
        str, typer.Option(help="Env variables holding the API key, tried in order.")
    ] = "LLAVA_ULTRA_LLM_API_KEY,OPENAI_API_KEY",
    api_version: Annotated[str | None, typer.Option(help="Azure OpenAI api-version.")] = None,
    concurrency: Annotated[int, typer.Option(help="Requests in flight.")] = 4,
    timeout: Annotated[float, typer.Option(help="Seconds per request.")] = 120.0,
    max_attempts: Annotated[int, typer.Option(help="Tries per request (429/5xx/timeouts are retried).")] = 5,
    cache: Annotated[Path | None, typer.Option(help="Reply cache (default OUT/judge_cache.sqlite3).")] = None,
    no_cache: Annotated[bool, typer.Option(help="Do not read or write the reply cache.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Print the requests, send nothing.")] = False,
    price: Annotated[
        str | None, typer.Option(help="'IN,OUT' USD per 1M tokens (default: built-in table).")
    ] = None,
    rubric: Annotated[
        str,
        typer.Option(
            help="llava-med (helpfulness, relevance, accuracy, detail) or hallucination (faithfulness to "
            "the report: invented, mis-sided, mis-sized or denied findings; written to separate files)."
        ),
    ] = "llava-med",
) -> None:
    """Score answers with an LLM judge (LLaVA-Med protocol): relative score per category and overall."""
    from .eval.judge import CACHE_NAME, run_judge
    from .llm.client import ClientConfig, parse_price

    config = ClientConfig(
        base_url=base_url,
        model=judge_model,
        api_key_env=api_key_env,
        api_version=api_version,
        timeout=timeout,
        max_attempts=max_attempts,
        concurrency=concurrency,
        cache=None if no_cache else (cache or out / CACHE_NAME),
        dry_run=dry_run,
        temperature=temperature,
        max_tokens=max_tokens,
        price=parse_price(price),
    )
    summary = run_judge(pred, ref, out, config, repeats=repeats, rubric=rubric)
    typer.echo(summary.render())


# ----------------------------------------------------------------------------------- training


def parse_overrides(args: list[str]) -> list[str]:
    """`--a.b value`, `--a.b=value` and `a.b=value` -> ['a.b=value', ...] for `load_config`."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            key = arg[2:]
            if "=" in key:
                out.append(key)
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                out.append(f"{key}={args[i + 1]}")
                i += 1
            else:
                raise LlavaUltraError(f"override {arg} has no value; write {arg} VALUE or {arg}=VALUE")
        elif "=" in arg:
            out.append(arg)
        else:
            raise LlavaUltraError(
                f"unexpected argument {arg!r}; overrides look like --train.lr 1e-4 or train.lr=1e-4"
            )
        i += 1
    return out


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@_friendly
def train(
    ctx: typer.Context,
    config: Annotated[Path, typer.Option(help="Training YAML, e.g. configs/tiny.yaml.")],
    resume: Annotated[
        bool, typer.Option(help="Continue the run in train.output_dir from its last checkpoint.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Delete the run already in train.output_dir and start over.")
    ] = False,
) -> None:
    """Run the two-stage recipe (stage 1 alignment, stage 2 instruction tuning); overrides like --train.stage2.lr 1e-4.

    Multi-GPU: accelerate launch --config_file configs/accelerate/ddp.yaml -m llava_ultra train --config ...
    """
    from .config import load_config
    from .train.loop import train as run_train

    cfg = load_config(config, parse_overrides(list(ctx.args)))
    result = run_train(cfg, resume=resume, overwrite=overwrite)
    for stage in result.stages if result.main_process else []:
        typer.echo(
            f"stage {stage.stage}: {stage.steps} steps, {len(stage.bad)} samples skipped -> {stage.folder}"
        )


@app.command("pretrain-encoders")
@_friendly
def pretrain_encoders(
    out: Annotated[
        Path, typer.Option(help="Folder for clip/, sam/, clip_text/, checkpoints and the quality table.")
    ],
    corpus: Annotated[
        Path | None,
        typer.Option(
            help="Your frames.jsonl (or its folder): image + caption and/or mask per line (docs/data.md)."
        ),
    ] = None,
    synth_reports: Annotated[
        int, typer.Option(help="Without --corpus: build a SynthUS frame corpus from this many reports.")
    ] = 500,
    hard: Annotated[bool, typer.Option(help="SynthUS corpus in the hard setting.")] = False,
    seed: Annotated[int, typer.Option(help="Corpus and training seed.")] = 0,
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 500,
    batch_size: Annotated[int, typer.Option(help="Frames per step.")] = 64,
    lr: Annotated[float, typer.Option(help="Peak learning rate (cosine schedule with warm-up).")] = 3e-3,
    config: Annotated[
        Path | None,
        typer.Option(
            help="YAML/JSON with PretrainConfig fields (vision, sam, text, ...); flags override it."
        ),
    ] = None,
    evaluate: Annotated[
        bool, typer.Option(help="Measure encoder quality against random init at the end.")
    ] = True,
    resume: Annotated[bool, typer.Option(help="Continue from the newest checkpoint in --out.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
) -> None:
    """Domain-pretrain the CLIP vision tower (contrastive, captions) and the SAM encoder (masks)."""
    import yaml

    from .data.frames import build_synth_frames
    from .data.synth import SynthConfig
    from .eval.encoders import evaluate_encoders, render_quality
    from .train.pretrain import PretrainConfig, pretrain, write_json

    base = {}
    if config is not None:
        base = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    cfg = PretrainConfig(**{**base, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed})
    if corpus is None:
        corpus = out / "corpus"
        if not (corpus / "frames.jsonl").is_file():
            synth = SynthConfig(reports=synth_reports, seed=seed, k_min=1, k_max=6, image_size=128, hard=hard)
            out.mkdir(parents=True, exist_ok=True)
            typer.echo(build_synth_frames(corpus, synth).render())
    result = pretrain(corpus, out, cfg, resume=resume, overwrite=overwrite, echo=typer.echo)
    typer.echo(f"pretrained {result.steps} steps in {result.seconds:.0f} s -> {out}/clip, {out}/sam")
    if evaluate:
        quality = evaluate_encoders(out, corpus)
        write_json(out / "encoder_quality.json", quality)
        typer.echo(render_quality(quality))
    typer.echo(
        f"use them: llava-ultra train --config configs/tiny.yaml model.vision.path={out}/clip "
        f"model.vision.inline=null model.sam.path={out}/sam model.sam.inline=null"
    )


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@_friendly
def quickstart(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="Folder for the data, the run and the results.")] = Path(
        "runs/demo"
    ),
    reports: Annotated[int, typer.Option(help="SynthUS reports to generate.")] = 300,
    steps1: Annotated[
        int | None, typer.Option(help="Stage-1 optimiser steps (default: the preset's).")
    ] = None,
    steps2: Annotated[
        int | None, typer.Option(help="Stage-2 optimiser steps (default: the preset's).")
    ] = None,
    eval_samples: Annotated[int, typer.Option(help="Test questions to evaluate.")] = 240,
    fast: Annotated[bool, typer.Option(help="Smoke test: few reports, steps and questions.")] = False,
    config: Annotated[Path | None, typer.Option(help="Training preset (default configs/tiny.yaml).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for data, init and shuffling.")] = 0,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an earlier quickstart in --out instead of refusing.")
    ] = False,
    encoders: EncodersOption = "pretrained",
    hard: Annotated[bool, typer.Option(help="Hard SynthUS: fewer valid frames, fainter findings.")] = False,
    device: Annotated[
        str | None,
        typer.Option(help="Evaluation device ('cpu', 'cuda'); default: the GPU when there is one."),
    ] = None,
) -> None:
    """Generate SynthUS, train the tiny model (stage 1 + 2) on CPU, and compare it with the untrained one."""
    from .quickstart import QuickstartOptions, run_quickstart, usage_hint

    opts = QuickstartOptions(
        out=out,
        reports=reports,
        steps1=steps1,
        steps2=steps2,
        eval_samples=eval_samples,
        fast=fast,
        config=config,
        seed=seed,
        overrides=parse_overrides(list(ctx.args)),
        overwrite=overwrite,
        encoders=encoders,
        hard=hard,
        device=device,
    )
    result = run_quickstart(opts, echo=typer.echo)
    typer.echo("")
    typer.echo(result.table())
    typer.echo(f"time: {', '.join(f'{k} {v:.0f}s' for k, v in result.seconds.items())}")
    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    typer.echo(usage_hint(result.checkpoint, commands))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@_friendly
def ablate(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="Folder for the shared data, the runs and results.md/json.")],
    seeds: Annotated[str, typer.Option(help="Training seeds, comma-separated.")] = "0,1,2",
    rows: Annotated[
        str | None,
        typer.Option(
            help="Rows, comma-separated (default: the paper's six): full, no_ve, no_ra, no_funcb, no_stage2, "
            "no_site; extra: no_ra_first, no_ra_all, full_raw_teacher, full_supervised."
        ),
    ] = None,
    reports: Annotated[int, typer.Option(help="SynthUS reports (shared by all rows).")] = 600,
    steps1: Annotated[int | None, typer.Option(help="Stage-1 steps (default: the preset's).")] = None,
    steps2: Annotated[int | None, typer.Option(help="Stage-2 steps (default: the preset's).")] = None,
    eval_samples: Annotated[int, typer.Option(help="Test questions to evaluate.")] = 240,
    hard: Annotated[bool, typer.Option(help="Hard SynthUS: fewer valid frames, fainter findings.")] = False,
    config: Annotated[Path | None, typer.Option(help="Training preset (default configs/tiny.yaml).")] = None,
    encoders: EncodersOption = "pretrained",
    merge: Annotated[
        list[Path] | None,
        typer.Option(help="Instead of training: merge the results of these ablation folders into --out."),
    ] = None,
) -> None:
    """Train and evaluate the paper's Table 3 ablation rows on SynthUS over seeds; extra args are overrides."""
    from .eval.ablate import DEFAULT_ROWS, AblateOptions, merge_results, run_ablation, split_list

    if merge:
        merge_results(merge, out)
        typer.echo((out / "results.md").read_text(encoding="utf-8"))
        return
    opts = AblateOptions(
        out=out,
        rows=split_list(rows, str) if rows else DEFAULT_ROWS,
        seeds=split_list(seeds, int),
        reports=reports,
        steps1=steps1,
        steps2=steps2,
        eval_samples=eval_samples,
        hard=hard,
        config=config,
        overrides=parse_overrides(list(ctx.args)),
        encoders=encoders,
    )
    run_ablation(opts, echo=typer.echo)
    typer.echo((out / "results.md").read_text(encoding="utf-8"))


@app.command("cache-features", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@_friendly
def cache_features(
    ctx: typer.Context,
    config: Annotated[Path, typer.Option(help="Training YAML whose model (or train.init_from) to use.")],
    out: Annotated[Path, typer.Option(help="Cache folder; train with data.feature_cache=OUT.")],
    data: Annotated[
        list[Path] | None,
        typer.Option(help="Instruction JSON (repeatable); default: the config's data.stage1/stage2."),
    ] = None,
    dtype: Annotated[str, typer.Option(help="Storage dtype: float32 (exact) or float16 (half size).")] = (
        "float32"
    ),
    batch_size: Annotated[int, typer.Option(help="Images per encoder call.")] = 32,
    shard_mb: Annotated[int, typer.Option(help="Largest shard file in MiB.")] = 1024,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing cache in --out.")] = False,
) -> None:
    """Run the frozen vision encoders once per unique image and store their outputs for training."""
    from .config import load_config
    from .errors import ConfigError
    from .train.feature_cache import build_cache, model_for_cache

    cfg = load_config(config, parse_overrides(list(ctx.args)))
    files = list(data or [p for p in (cfg.data.stage1, cfg.data.stage2) if p is not None])
    if not files:
        raise ConfigError("no instruction data: pass --data FILE or set data.stage1 / data.stage2")
    summary = build_cache(
        model_for_cache(cfg),
        files,
        out,
        image_root=cfg.data.image_root,
        dtype=dtype,
        batch_size=batch_size,
        shard_mb=shard_mb,
        overwrite=overwrite,
        log=lambda _: None,
    )
    typer.echo(summary.render())


@app.command("logra-experiment", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@_friendly
def logra_experiment(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="Folder for data, runs, results.md and results.json.")] = Path(
        "runs/logra"
    ),
    fractions: Annotated[str, typer.Option(help="Shares of the training reports, e.g. 0.1,1.")] = "0.1,1",
    seeds: Annotated[str, typer.Option(help="Training seeds, e.g. 0,1,2.")] = "0,1",
    reports: Annotated[int, typer.Option(help="SynthUS reports to generate.")] = 300,
    steps1: Annotated[int, typer.Option(help="Stage-1 optimiser steps (every fraction).")] = 40,
    steps2: Annotated[int, typer.Option(help="Stage-2 optimiser steps (every fraction).")] = 100,
    eval_samples: Annotated[int, typer.Option(help="Test questions to evaluate.")] = 120,
    encoders: EncodersOption = "pretrained",
) -> None:
    """Train the tiny preset on a fraction of SynthUS with and without the LoGra-Med loss; write the table."""
    from .eval.ablate import split_list
    from .eval.logra_experiment import LograOptions, run_experiment

    opts = LograOptions(
        out=out,
        fractions=split_list(fractions, float),
        seeds=split_list(seeds, int),
        reports=reports,
        steps1=steps1,
        steps2=steps2,
        eval_samples=eval_samples,
        overrides=parse_overrides(list(ctx.args)),
        encoders=encoders,
    )
    payload = run_experiment(opts, echo=typer.echo)
    typer.echo((Path(out) / "results.md").read_text(encoding="utf-8"))
    typer.echo(f"total {payload['settings']['seconds'] / 60:.1f} min")
