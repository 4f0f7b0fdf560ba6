"""Command-line interface: one function per command, its options a dataclass, its flags generated.

Each command is a loader: it imports what it needs (inside the function, so `llava-ultra --help`
stays instant: no torch), declares its options as a dataclass (reusing the toolkit's own settings
dataclasses, flattened or as dotted sections) and returns it with the function that runs it.
`cli_args` turns the dataclass into flags, `--help` text (from the field docstrings) and a
validated instance; the syntax is the same for every command (see cli_args's docstring):
`--name VALUE`, `--name=VALUE`, `name=VALUE`, `--section.field VALUE`, `--config FILE.yaml`.

No logic lives here; registration, parsing and help are `cli_args`'s. A `LlavaUltraError` is
printed as a one-line message and exits with status 2; any other exception is a bug and keeps its
traceback.
"""

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import typer

from .cli_args import Commands, flat, positional

__all__ = ["COMMANDS", "app"]

app = typer.Typer(
    name="llava-ultra",
    help="Build, train, evaluate and serve a medical vision-language assistant (LLaVA-Ultra).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

COMMANDS = Commands(app)
command = COMMANDS.command


def options(cls: type) -> type:
    """`dataclass` for a command's options (they are never compared or hashed)."""
    return dataclass(cls)


@dataclass
class EngineOptions:
    """How serve, chat and predict load a checkpoint into `serve.engine.Engine`."""

    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
    dtype: str | None = None
    """Override the checkpoint's dtype, e.g. bfloat16."""
    template: str | None = None
    """Conversation template: vicuna_v1, mistral_instruct or plain. Default: the checkpoint's recorded
    model.template (converted LLaVA-Med v1.5: mistral_instruct; LLaVA v1.5: vicuna_v1); a stage-1
    'plain' checkpoint is prompted in its LLM family's chat format (Mistral: mistral_instruct, else
    vicuna_v1), because plain drops the question - pass --template plain to force it."""
    system: str | None = None
    """System prompt (default: the template's)."""
    max_batch_size: int = 8
    """Requests decoded together (1 = one at a time)."""
    max_wait_ms: float = 5.0
    """How long a request waits for batch mates."""

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `Engine.from_checkpoint` (the device is resolved by the caller)."""
        names = ("dtype", "template", "system", "max_batch_size", "max_wait_ms")
        return {name: getattr(self, name) for name in names}


# --------------------------------------------------------------------------------------- data


@command()
def synth():
    """Generate SynthUS, a synthetic multi-frame ultrasound report dataset."""
    from .data.synth import SynthConfig, generate

    @options
    class Options:
        out: Path
        """Output folder for the SynthUS dataset."""
        workers: int = 1
        """Worker processes (output is identical for any count)."""
        synth: SynthConfig = flat(SynthConfig)

    return Options, lambda o: typer.echo(generate(o.out, o.synth, workers=o.workers).render())


@command(env={"llm.base_url": "LLAVA_ULTRA_LLM_BASE_URL", "llm.model": "LLAVA_ULTRA_LLM_MODEL"})
def instruct():
    """Turn reports into LLaVA-style instruction data: stage-1 captions, stage-2 conversations, eval QA."""
    from .data.instruct import run_instruct
    from .data.llm_instruct import LLMInstructOptions

    @options
    class Options:
        reports: Path
        """A .jsonl/.csv reports file or a folder of them."""
        out: Path
        """Output folder for {stage1,stage2,eval}.<split>.json."""
        language: str = "both"
        """Which reports to use: zh, en or both."""
        site_cue: str = "both"
        """Name the site in questions: with, without or both."""
        seed: int = 0
        """Random seed; same seed gives identical files."""
        generator: str = "template"
        """Stage-2 conversation generator: template or llm (then the llm.* options apply)."""
        llm: LLMInstructOptions = field(default_factory=LLMInstructOptions)
        """Settings of --generator llm."""

    def run(o: Options) -> None:
        extra = o.llm.generator_options(o.out) if o.generator == "llm" else None
        summary = run_instruct(
            o.reports,
            o.out,
            language=o.language,
            site_cue=o.site_cue,
            seed=o.seed,
            generator=o.generator,
            generator_options=extra,
        )
        typer.echo(summary.render())

    return Options, run


@command(aliases={"all": "all_problems"})
def validate():
    """Check reports parse, ids are unique, and every image exists and decodes; exit 1 above the threshold."""
    from .data.reports import validate_dataset

    @options
    class Options:
        data: Path = positional()
        """A .jsonl/.csv reports file or a folder of them."""
        max_bad_fraction: float = 0.0
        """Largest tolerated fraction of bad reports (0 = any problem fails)."""
        all_problems: bool = False
        """List every problem, not the first 20 per kind."""
        decode: bool = True
        """Fully decode every image (--no-decode: existence only)."""

    def run(o: Options) -> None:
        summary = validate_dataset(o.data, max_bad_fraction=o.max_bad_fraction, decode=o.decode)
        typer.echo(summary.render(max_listed=None if o.all_problems else 20))
        if not summary.ok:
            sys.exit(1)

    return Options, run


@command("ingest-dicom", aliases={"mask": "masks"})
def ingest_dicom():
    """Convert ultrasound DICOM (single-frame or cine) to de-identified PNG frames + report skeletons."""
    from .data.dicom import IngestOptions
    from .data.dicom import ingest_dicom as run_ingest

    @options
    class Options:
        inputs: list[Path] = positional()
        """DICOM files or folders (searched recursively)."""
        out: Path = field(kw_only=True)
        """Output folder for PNG frames, report skeletons and the de-id log."""
        ingest: IngestOptions = flat(kw_only=True)

    def run(o: Options) -> None:
        summary = run_ingest(o.inputs, o.out, o.ingest)
        typer.echo(summary.render())
        if not summary.ok:
            sys.exit(1)

    return Options, run


@command()
def scrub():
    """Remove names, ID/phone/record numbers, birth dates and e-mails from report text."""
    from .data.scrub import scrub_file

    @options
    class Options:
        src: Path = positional()
        """Input reports file (.jsonl or .csv)."""
        dst: Path = positional()
        """Output reports file (.jsonl or .csv)."""

    def run(o: Options) -> None:
        summary = scrub_file(o.src, o.dst)
        typer.echo(summary.render())
        if not summary.ok:
            sys.exit(1)

    return Options, run


# --------------------------------------------------------------------------------- evaluation


@command("eval")
def eval_cmd():
    """Generate answers for a dataset, save every prediction, and score them (data-parallel under torchrun)."""
    from .eval.runner import EvalSettings, run_eval

    @options
    class Options:
        model: Path
        """Checkpoint folder (config.json, weights, tokenizer)."""
        data: str
        """Dataset SPEC (e.g. ultra:eval.test.json, slake:/d/Slake1.0?lang=zh) or an eval JSON."""
        out: Path
        """Run folder for predictions, scores, report and plots."""
        overwrite: bool = False
        """Replace an existing predictions.jsonl in --out."""
        settings: EvalSettings = flat(EvalSettings)

    def run(o: Options) -> None:
        result = run_eval(o.model, o.data, o.out, o.settings, overwrite=o.overwrite)
        if result is not None:
            typer.echo(result.render())

    return Options, run


@command()
def score():
    """Re-score saved predictions without the model (pairs predictions with ground truth by question id)."""
    from .eval.report import compare_table, render_compare, render_report
    from .eval.runner import EvalSettings, rescore

    @options
    class Options:
        predictions: Path = positional()
        """predictions.jsonl (or the run folder holding it)."""
        ground_truth: str = positional()
        """The eval JSON, dataset SPEC, or LLaVA-Med ground-truth file (test.json; or llava-med:PATH)
        the predictions answer."""
        out: Path | None = None
        """Write scores.json, report.md and plots to this folder."""
        settings: EvalSettings = flat(EvalSettings)

    def run(o: Options) -> None:
        scores = rescore(o.predictions, o.ground_truth, o.settings, o.out)
        if o.out is None:
            typer.echo(render_report(scores))
        else:
            header, rows, _ = compare_table([(o.predictions.name, scores)])
            typer.echo(f"scores -> {o.out}\n" + render_compare(header, rows, []))

    return Options, run


@command()
def compare():
    """One table across runs, like the paper's Table 2 (rows = runs, columns = metrics)."""
    from .eval.report import COMPARE_DEFAULT, compare_table, read_scores, render_compare

    @options
    class Options:
        runs: list[Path] = positional()
        """Run folders (or their scores.json files)."""
        subset: str | None = None
        """Also one row per value of: language, modality, answer_type, question_type, site, k, dataset."""
        metrics: list[str] = field(default_factory=lambda: list(COMPARE_DEFAULT))
        """Metric keys, e.g. exact_match,f1,closed_accuracy,chair_i,omission,wrong_side,size_error,
        pope_accuracy,pope_f1,pope_yes_ratio (default: the answer metrics, CHAIR-i/-s, omission,
        POPE F1 and yes-ratio)."""
        ci: bool = False
        """Show 95% bootstrap intervals."""
        out: Path | None = None
        """Also write the Markdown table to this file."""

    def run(o: Options) -> None:
        loaded = [(p.name if p.is_dir() else p.parent.name, read_scores(p)) for p in o.runs]
        text = render_compare(*compare_table(loaded, o.subset, o.metrics, o.ci))
        typer.echo(text, nl=False)
        if o.out is not None:
            o.out.parent.mkdir(parents=True, exist_ok=True)
            o.out.write_text(text, encoding="utf-8")

    return Options, run


@command(aliases={"from": "source", "set": "overrides"})
def convert():
    """Convert an original LLaVA / LLaVA-Med, llava-hf or SAM checkpoint into a llava-ultra folder."""
    from .model.convert import convert as run_convert

    @options
    class Options:
        source: str
        """Source format: llava, llava-med, llava-hf or sam."""
        src: Path
        """Source checkpoint folder (a SAM .pth file also works)."""
        out: Path
        """Output folder (llava-ultra checkpoint; an HF SAM folder for sam)."""
        vision_tower: str | None = None
        """Local CLIP folder or hub id instead of config.json's mm_vision_tower."""
        sam: Path | None = None
        """Also add this SAM (HF folder or original .pth) as the second encoder."""
        base: Path | None = None
        """The LLM a LoRA or stage-1 (mm_projector.bin) output was trained on."""
        template: str | None = None
        """Conversation template: vicuna_v1, mistral_instruct or plain."""
        overrides: list[str] = field(default_factory=list)
        """Override fusion.* / selector.* / dtype, e.g. selector.mode=feature (repeatable)."""

    def run(o: Options) -> None:
        summary = run_convert(
            o.source,
            o.src,
            o.out,
            vision_tower=o.vision_tower,
            sam=o.sam,
            base=o.base,
            template=o.template,
            overrides=o.overrides,
        )
        typer.echo(summary.render())

    return Options, run


# ------------------------------------------------------------------------------------ serving


@command(
    aliases={"allow_remote_images": "allow_remote", "allowed_image_dir": "allowed_dirs"},
    env={"api_key": "LLAVA_ULTRA_API_KEY"},
    defaults={"model_name": ""},
)
def serve():
    """Serve a checkpoint over an OpenAI-compatible API (+ a web page at /)."""
    import uvicorn

    from .serve.app import ServerSettings, create_app, uvicorn_options
    from .serve.engine import Engine, Limits, pick_device

    @options
    class Options:
        ckpt: Path = positional()
        """Checkpoint folder (save_pretrained or a training checkpoint)."""
        host: str = "127.0.0.1"
        """Interface to bind; loopback by default."""
        port: int = 8000
        """TCP port."""
        log_level: str = "info"
        """uvicorn log level."""
        engine: EngineOptions = flat(EngineOptions)
        limits: Limits = flat(Limits)
        server: ServerSettings = flat(ServerSettings)

    def run(o: Options) -> None:
        settings = replace(o.server, model_name=o.server.model_name or o.ckpt.resolve().name)
        if o.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
            typer.secho(
                f"warning: serving on {o.host} without --api-key: anyone who can reach this port can use "
                "the model",
                fg=typer.colors.YELLOW,
                err=True,
            )
        engine = Engine.from_checkpoint(
            o.ckpt, **o.engine.kwargs(), device=pick_device(o.engine.device), limits=o.limits
        )
        typer.echo(f"serving {settings.model_name} on http://{o.host}:{o.port}/ (API under /v1)")
        with engine:
            app_ = create_app(engine, settings)
            uvicorn.run(app_, host=o.host, port=o.port, log_level=o.log_level, **uvicorn_options())

    return Options, run


@command()
def chat():
    """Chat in the terminal (reads stdin; /image PATH, /reset, /exit)."""
    from .serve.chat import run_chat
    from .serve.engine import Engine, SamplingParams, pick_device

    @options
    class Options:
        ckpt: Path = positional()
        """Checkpoint folder."""
        image: list[Path] = field(default_factory=list)
        """Image for the first question (repeatable)."""
        engine: EngineOptions = flat(lambda: EngineOptions(max_batch_size=1))
        sampling: SamplingParams = flat(SamplingParams)

    def run(o: Options) -> None:
        with Engine.from_checkpoint(
            o.ckpt, **o.engine.kwargs(), device=pick_device(o.engine.device)
        ) as engine:
            run_chat(engine, o.image, o.sampling, prompt="> " if sys.stdin.isatty() else "")

    return Options, run


@command("check-images")
def check_images():
    """Does the checkpoint look at its images? Replace them by noise and compare; exit 1 if nothing moves.

    Several --image options are one study: all are replaced together, then each one alone, and the
    output says how many of them the model's selector passes to the LLM."""
    from .eval.noise import check_checkpoint_images
    from .serve.engine import pick_device

    @options
    class Options:
        ckpt: Path = positional()
        """Checkpoint folder."""
        image: list[Path] = field(kw_only=True)
        """Image(s) of one study (repeatable)."""
        question: str = "Describe the findings. 请描述超声所见。"
        """What to ask."""
        device: str = "auto"
        """auto, cpu, cuda or cuda:N."""
        template: str | None = None
        """Conversation template (default: the checkpoint's; see `llava-ultra eval --help`)."""
        max_tokens: int = 16
        """New tokens per answer."""

    def run(o: Options) -> None:
        result = check_checkpoint_images(
            o.ckpt,
            o.image,
            o.question,
            template=o.template,
            device=pick_device(o.device),
            max_new_tokens=o.max_tokens,
        )
        typer.echo(f"largest change of the first answer token's logits: {result.max_logit_diff:.4g}")
        typer.echo(f"answer with the images: {result.answer_real!r}")
        typer.echo(f"answer with noise:      {result.answer_noise!r}")
        if result.per_image_diffs:
            typer.echo(
                f"{len(o.image)} images of one study; the model feeds {result.images_into_llm} of them to "
                f"its LLM ({result.selector}); replacing one image at a time by noise:"
            )
            for path, diff in zip(o.image, result.per_image_diffs, strict=True):
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

    return Options, run


@command()
def predict():
    """Offline batch inference over a JSONL of requests; bad lines are counted and skipped."""
    from .serve.engine import Engine, Limits, SamplingParams, pick_device
    from .serve.predict import run_predict

    @options
    class Options:
        ckpt: Path = positional()
        """Checkpoint folder."""
        data: Path = field(kw_only=True)
        """JSONL of requests: id, images, question or messages."""
        out: Path = field(kw_only=True)
        """JSONL of answers with the chosen frame."""
        max_tokens: int | None = None
        """New tokens per answer (default: the limit)."""
        temperature: float = 0.0
        """0 = greedy."""
        max_images: int = 8
        """Images per request."""
        max_bad_fraction: float = 0.1
        """Exit 1 when more than this fraction of lines is bad."""
        engine: EngineOptions = flat(EngineOptions)

    def run(o: Options) -> None:
        with Engine.from_checkpoint(
            o.ckpt,
            **o.engine.kwargs(),
            device=pick_device(o.engine.device),
            limits=Limits(max_images=o.max_images),
        ) as engine:
            params = SamplingParams(max_tokens=o.max_tokens, temperature=o.temperature)
            summary = run_predict(engine, o.data, o.out, params, max_bad_fraction=o.max_bad_fraction)
        typer.echo(summary.render())
        if not summary.ok:
            sys.exit(1)

    return Options, run


@command()
def probes():
    """POPE-style yes/no probes about present and absent findings; evaluate them with `llava-ultra eval`."""
    from .errors import ConfigError
    from .eval.findings import load_vocabulary
    from .eval.probes import run_probes

    @options
    class Options:
        reports: Path
        """SynthUS folder (from `llava-ultra synth`) or a reports .jsonl/.csv."""
        out: Path
        """Probe eval JSON to write, e.g. instruct/probes.test.json."""
        split: str = "test"
        """Split of a SynthUS folder: train, val or test."""
        language: str = "both"
        """zh, en or both."""
        seed: int = 0
        """Seed; the same seed writes the same probes."""
        strategies: list[str] = field(default_factory=lambda: ["random", "popular", "adversarial"])
        """How absent findings are picked: random, popular, adversarial (comma list)."""
        findings_vocab: str | None = None
        """JSON/YAML file adding terms (finding synonyms, sides, location parts, negations) to the
        findings vocabulary of the hallucination metrics; see docs/metrics.md."""

        def __post_init__(self) -> None:
            if self.language not in ("zh", "en", "both"):
                raise ConfigError(f"--language {self.language!r}: use zh, en or both")

    def run(o: Options) -> None:
        summary = run_probes(
            o.reports,
            o.out,
            split=o.split,
            languages=("zh", "en") if o.language == "both" else (o.language,),
            seed=o.seed,
            strategies=o.strategies,
            vocab=load_vocabulary(o.findings_vocab),
        )
        typer.echo(summary.render())

    return Options, run


@command(
    aliases={"judge_model": "model"},
    env={"model": "LLAVA_ULTRA_JUDGE_MODEL", "base_url": "LLAVA_ULTRA_LLM_BASE_URL"},
    defaults={"timeout": 120.0},
)
def judge():
    """Score answers with an LLM judge (LLaVA-Med protocol): relative score per category and overall."""
    from .eval.judge import CACHE_NAME, run_judge
    from .llm.client import ClientConfig

    @options
    class Options:
        pred: Path
        """Predictions JSONL (question_id, text), LLaVA-Med answer format."""
        ref: Path
        """References: our eval/stage-2 JSON, or JSONL with question/answer/category."""
        out: Path
        """Folder for judge_raw.jsonl, judge_scores.json and the reply cache."""
        client: ClientConfig = flat()
        repeats: int = 1
        """Judge each item N times; the median counts."""
        no_cache: bool = False
        """Do not read or write the reply cache (default cache: OUT/judge_cache.sqlite3)."""
        rubric: str = "llava-med"
        """llava-med (helpfulness, relevance, accuracy, detail) or hallucination (faithfulness to the
        report: invented, mis-sided, mis-sized or denied findings; written to separate files)."""

    def run(o: Options) -> None:
        cache = None if o.no_cache else (o.client.cache or o.out / CACHE_NAME)
        config = replace(o.client, cache=cache)
        summary = run_judge(o.pred, o.ref, o.out, config, repeats=o.repeats, rubric=o.rubric)
        typer.echo(summary.render())

    return Options, run


# ----------------------------------------------------------------------------------- training


@command(training="overrides")
def train():
    """Run the two-stage recipe (stage 1 alignment, stage 2 instruction tuning); overrides like --train.stage2.lr 1e-4.

    Multi-GPU: accelerate launch --config_file configs/accelerate/ddp.yaml -m llava_ultra train --config ..."""
    from .config import load_config
    from .train.loop import train as run_train

    @options
    class Options:
        config: Path
        """Training YAML, e.g. configs/tiny.yaml."""
        resume: bool = False
        """Continue the run in train.output_dir from its last checkpoint."""
        overwrite: bool = False
        """Delete the run already in train.output_dir and start over."""
        overrides: list[str] = field(default_factory=list)
        """Dotted overrides of the training config (--train.stage2.lr 1e-4)."""

    def run(o: Options) -> None:
        result = run_train(load_config(o.config, o.overrides), resume=o.resume, overwrite=o.overwrite)
        for stage in result.stages if result.main_process else []:
            typer.echo(
                f"stage {stage.stage}: {stage.steps} steps, {len(stage.bad)} samples skipped -> {stage.folder}"
            )

    return Options, run


@command("pretrain-encoders")
def pretrain_encoders():
    """Domain-pretrain the CLIP vision tower (contrastive, captions) and the SAM encoder (masks).

    --config FILE takes a YAML of these options, e.g. the PretrainConfig sections vision, sam, text."""
    from .data.frames import build_synth_frames
    from .data.synth import SynthConfig
    from .eval.encoders import evaluate_encoders, render_quality
    from .train.pretrain import PretrainConfig, pretrain, write_json

    @options
    class Options:
        out: Path
        """Folder for clip/, sam/, clip_text/, checkpoints and the quality table."""
        corpus: Path | None = None
        """Your frames.jsonl (or its folder): image + caption and/or mask per line (docs/data.md)."""
        synth_reports: int = 500
        """Without --corpus: build a SynthUS frame corpus from this many reports (seed: --seed)."""
        hard: bool = False
        """SynthUS corpus in the hard setting."""
        evaluate: bool = True
        """Measure encoder quality against random init at the end."""
        resume: bool = False
        """Continue from the newest checkpoint in --out."""
        overwrite: bool = False
        """Replace an existing --out."""
        pretrain: PretrainConfig = flat(PretrainConfig)

    def run(o: Options) -> None:
        corpus, out = o.corpus, o.out
        if corpus is None:
            corpus = out / "corpus"
            if not (corpus / "frames.jsonl").is_file():
                seed = o.pretrain.seed
                synth = SynthConfig(
                    reports=o.synth_reports, seed=seed, k_min=1, k_max=6, image_size=128, hard=o.hard
                )
                out.mkdir(parents=True, exist_ok=True)
                typer.echo(build_synth_frames(corpus, synth).render())
        result = pretrain(corpus, out, o.pretrain, resume=o.resume, overwrite=o.overwrite, echo=typer.echo)
        typer.echo(f"pretrained {result.steps} steps in {result.seconds:.0f} s -> {out}/clip, {out}/sam")
        if o.evaluate:
            quality = evaluate_encoders(out, corpus)
            write_json(out / "encoder_quality.json", quality)
            typer.echo(render_quality(quality))
        typer.echo(
            f"use them: llava-ultra train --config configs/tiny.yaml model.vision.path={out}/clip "
            f"model.vision.inline=null model.sam.path={out}/sam model.sam.inline=null"
        )

    return Options, run


@command(training="overrides", defaults={"out": "runs/demo"})
def quickstart():
    """Generate SynthUS, train the tiny model (stage 1 + 2) on CPU, and compare it with the untrained one."""
    from .recipes.quickstart import QuickstartOptions, run_quickstart, usage_hint

    @options
    class Options:
        quickstart: QuickstartOptions = flat()

    def run(o: Options) -> None:
        result = run_quickstart(o.quickstart, echo=typer.echo)
        typer.echo("")
        typer.echo(result.table())
        typer.echo(f"time: {', '.join(f'{k} {v:.0f}s' for k, v in result.seconds.items())}")
        typer.echo(usage_hint(result.checkpoint, set(COMMANDS)))

    return Options, run


@command(training="overrides")
def ablate():
    """Train and evaluate the paper's Table 3 ablation rows on SynthUS over seeds; extra args are overrides."""
    from .recipes.ablate import AblateOptions, merge_results, run_ablation

    @options
    class Options:
        ablate: AblateOptions = flat()
        merge: list[Path] = field(default_factory=list)
        """Instead of training: merge the results of these ablation folders into --out (repeatable)."""

    def run(o: Options) -> None:
        if o.merge:
            merge_results(o.merge, o.ablate.out)
        else:
            run_ablation(o.ablate, echo=typer.echo)
        typer.echo((o.ablate.out / "results.md").read_text(encoding="utf-8"))

    return Options, run


@command("cache-features", training="overrides")
def cache_features():
    """Run the frozen vision encoders once per unique image and store their outputs for training."""
    from .config import load_config
    from .errors import ConfigError
    from .train.feature_cache import build_cache, model_for_cache

    @options
    class Options:
        config: Path
        """Training YAML whose model (or train.init_from) to use."""
        out: Path
        """Cache folder; train with data.feature_cache=OUT."""
        data: list[Path] = field(default_factory=list)
        """Instruction JSON (repeatable); default: the config's data.stage1/stage2."""
        dtype: str = "float32"
        """Storage dtype: float32 (exact) or float16 (half size)."""
        batch_size: int = 32
        """Images per encoder call."""
        shard_mb: int = 1024
        """Largest shard file in MiB."""
        overwrite: bool = False
        """Replace an existing cache in --out."""
        overrides: list[str] = field(default_factory=list)
        """Dotted overrides of the training config (--model.vision.select_layer -1)."""

    def run(o: Options) -> None:
        cfg = load_config(o.config, o.overrides)
        files = o.data or [p for p in (cfg.data.stage1, cfg.data.stage2) if p is not None]
        if not files:
            raise ConfigError("no instruction data: pass --data FILE or set data.stage1 / data.stage2")
        summary = build_cache(
            model_for_cache(cfg),
            files,
            o.out,
            image_root=cfg.data.image_root,
            dtype=o.dtype,
            batch_size=o.batch_size,
            shard_mb=o.shard_mb,
            overwrite=o.overwrite,
            log=lambda _: None,
        )
        typer.echo(summary.render())

    return Options, run


@command("logra-experiment", training="overrides", defaults={"out": "runs/logra"})
def logra_experiment():
    """Train the tiny preset on a fraction of SynthUS with and without the LoGra-Med loss; write the table."""
    from .recipes.logra_experiment import LograOptions, run_experiment

    @options
    class Options:
        logra: LograOptions = flat()

    def run(o: Options) -> None:
        payload = run_experiment(o.logra, echo=typer.echo)
        typer.echo((Path(o.logra.out) / "results.md").read_text(encoding="utf-8"))
        typer.echo(f"total {payload['settings']['seconds'] / 60:.1f} min")

    return Options, run
