"""The evaluation runner: load a checkpoint and a dataset, generate every answer, save, score.

What this file owns: `run_eval` (the `llava-ultra eval` command), `rescore` (`llava-ultra
score`), prompt building, batching and data-parallel sharding, the prediction record format,
and the run folder layout:

    RUN_DIR/predictions.jsonl   one LLaVA-Med answer record per sample, in ground-truth order
    RUN_DIR/run.json            model, data spec, decoding settings, prompt template, counts, timing
    RUN_DIR/scores.json         metrics.score output + CIs + subsets + confusion + selection + hallucination
    RUN_DIR/per_sample.jsonl    per-sample metrics with subset values (for error analysis)
    RUN_DIR/report.md, RUN_DIR/plots/*.png

Notable choices:
- Prompts are rendered exactly as training renders them: `collate.to_messages` collapses the k
  frame placeholders into one, then `tokenizer.render_prompt` applies the conversation template:
  the checkpoint's recorded `model.config.template` unless the settings name one
  (`tokenizer.default_template`; a stage-1 'plain' checkpoint gets its LLM family's chat format).
  run.json records the template used and where it came from.
- Greedy decoding by default (temperature 0); sampling is seeded per batch (seed + batch number),
  so results do not depend on how batches are spread over processes.
- Batches are formed over the whole dataset in order first, then whole batches are dealt to
  ranks (contiguous blocks or strided). Every sample is generated in the same batch, with the
  same neighbours and padding, whatever the number of processes: a 2-process run writes the
  same predictions file as a 1-process run, byte for byte.
- Data parallel through accelerate's `PartialState` (torch.distributed, gloo on CPU), so
  `torchrun` and `accelerate launch` both work. Rank 0 first clears shards a crashed run left
  behind; each rank writes `shards/rankNNN-of-MMM.jsonl`; after a barrier rank 0 merges them in
  the original order, checks every sample is present, deletes the shards folder and scores.
  The run folder must be on a file system all ranks share.
- A sample whose images cannot be read gets an empty prediction with an `error` field: it is
  scored as 0 and counted, never dropped (dropping would make runs incomparable). A malformed
  ground-truth record is an error naming its file and record, unless `max_bad_fraction`
  (`--max-bad-fraction`) allows it: then it is skipped, counted and listed in run.json;
  re-scoring reads the ground truth with the same reader, so both sides skip the same records.
- `answer_id` is a hash of (model id, question id, answer), not a random uuid, so identical runs
  give identical files.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..config import TEMPLATES
from ..errors import ConfigError, DataError
from . import llava_med_files
from .llava_med_files import read_text_file
from .report import score_run, write_scores

PREDICTIONS_NAME = "predictions.jsonl"
RUN_NAME = "run.json"
SHARDS_DIR = "shards"
SHARD_STRATEGIES = ("contiguous", "strided")


@dataclass
class EvalSettings:
    """How to generate and score; every field is recorded in run.json."""

    mode: str = "strict"
    """Metric mode: 'strict' or 'llava-med' (see docs/metrics.md)."""
    metric_tokenizer: str | None = None
    """Override the mode's metric tokenizer for all languages: 'whitespace', 'jieba' or 'char'."""
    closed_variant: str = "run_eval@b9a98a7"
    """llava-med mode only: the closed-question rule, named by the LLaVA-Med file and commit it
    reproduces ('run_eval@b9a98a7' = v1.0.0, 'run_eval@ad758b6', 'run_eval_batch@ad758b6')."""
    candidates: str | None = None
    """llava-med mode only: LLaVA-Med candidate file ({"0": [answers]}) for open accuracy;
    None = the open reference answers of the scored set."""
    batch_size: int = 8
    """Samples per generate call."""
    max_new_tokens: int = 128
    """Longest answer in tokens."""
    temperature: float = 0.0
    """0 = greedy (default); > 0 samples with this temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass (sampling only)."""
    seed: int = 0
    """Sampling seed (batch b uses seed + b) and bootstrap seed."""
    template: str | None = None
    """Conversation template the prompt is rendered with; None = the checkpoint's recorded
    `model.config.template` ('plain' stage-1 checkpoints: their LLM family's chat format)."""
    system: str | None = None
    """System prompt; None = the template's default."""
    stop: tuple[str, ...] = ()
    """Extra stop strings (EOS always stops)."""
    shard: str = "contiguous"
    """How batches are dealt to ranks: 'contiguous' blocks or 'strided'."""
    limit: int | None = None
    """Evaluate only the first N samples (quick checks); re-score with the same limit."""
    max_bad_fraction: float = 0.0
    """Largest fraction of malformed ground-truth records that may be skipped (counted, listed in
    run.json); 0 = any malformed record is an error naming its file and record."""
    bootstrap: int = 1000
    """Bootstrap resamples for the 95% CIs (0 = no intervals)."""
    device: str | None = None
    """'cpu', 'cuda', ... ; None = accelerate's choice (the rank's GPU when there is one)."""
    dtype: str | None = None
    """Weight dtype override ('float32', 'bfloat16', ...); None = the checkpoint's ('auto')."""
    plots: bool = True
    """Draw the PNG plots."""
    findings_vocab: str | None = None
    """JSON/YAML file adding terms to the findings vocabulary of the hallucination metrics
    (`eval.findings.load_vocabulary`); None = the built-in vocabulary."""
    size_tolerance_cm: float = 0.1
    """Hallucination size error: a dimension is wrong when off by more than
    max(size_tolerance_cm, size_tolerance_rel x true size)."""
    size_tolerance_rel: float = 0.2
    """Relative part of the size tolerance (see size_tolerance_cm)."""

    def __post_init__(self) -> None:
        from .metrics import MODES, TOKENIZERS, check_closed_variant

        check_closed_variant(self.closed_variant)
        if self.mode != "llava-med" and self.candidates is not None:
            raise ConfigError("eval candidates (open accuracy) apply to --mode llava-med only")
        choices = {
            "mode": (self.mode, MODES),
            "shard": (self.shard, SHARD_STRATEGIES),
            "template": (self.template, TEMPLATES),
        }
        for name, (value, allowed) in choices.items():
            if value not in allowed and not (name == "template" and value is None):
                raise ConfigError(f"eval {name}={value!r} is not one of: {', '.join(allowed)}")
        if self.metric_tokenizer is not None and self.metric_tokenizer not in TOKENIZERS:
            raise ConfigError(
                f"eval metric tokenizer {self.metric_tokenizer!r} is not one of: {', '.join(TOKENIZERS)}"
            )
        for name in ("batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"eval {name}={getattr(self, name)} must be >= 1")
        if self.temperature < 0:
            raise ConfigError(f"eval temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"eval top_p={self.top_p} must be in (0, 1]")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"eval limit={self.limit} must be >= 1 (or unset for all samples)")
        if self.bootstrap < 0:
            raise ConfigError(f"eval bootstrap={self.bootstrap} must be >= 0 (0 = no intervals)")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError(
                f"eval max_bad_fraction={self.max_bad_fraction} must be in [0, 1] (0 = no malformed records)"
            )
        if self.size_tolerance_cm < 0 or self.size_tolerance_rel < 0:
            raise ConfigError(
                f"eval size tolerance {self.size_tolerance_cm} cm / {self.size_tolerance_rel}: both must be >= 0"
            )
        self.stop = tuple(self.stop)

    def hallucination(self) -> dict[str, Any]:
        """The vocabulary and size tolerance `report.score_run` takes for the hallucination metrics."""
        from .findings import load_vocabulary
        from .hallucination import Tolerance

        return {
            "vocab": load_vocabulary(self.findings_vocab),
            "vocab_name": self.findings_vocab or "built-in",
            "tolerance": Tolerance(self.size_tolerance_cm, self.size_tolerance_rel),
        }

    def decoding(self) -> dict[str, Any]:
        """The decoding settings as recorded in run.json and named in the report."""
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "max_new_tokens": self.max_new_tokens,
            "batch_size": self.batch_size,
            "template": self.template,
            "system": self.system,
            "stop": list(self.stop),
        }


# ----------------------------------------------------------------------------------- data


def resolve_spec(spec: str) -> str:
    """A dataset spec for `medvqa.load_dataset`; a bare path to a .json file means `ultra:PATH`."""
    from ..data.medvqa import READERS

    scheme, sep, _ = spec.partition(":")
    if sep and scheme.strip().lower() in READERS:
        return spec
    if Path(spec).suffix == ".json" and Path(spec).is_file():
        return f"ultra:{spec}"
    return spec


def load_ground_truth(
    spec: str, check_images: bool = False, max_bad_fraction: float = 0.0
) -> tuple[list[dict[str, Any]], list[Any]]:
    """Eval samples (instruct format, absolute image paths) of a dataset spec, and the skipped
    malformed records. Raises DataError when nothing usable is left, or when more than
    `max_bad_fraction` of the records are malformed (0: any malformed record)."""
    from ..data.medvqa import load_dataset_lenient, to_eval_sample

    samples, bad = load_dataset_lenient(resolve_spec(spec), check_images=check_images)
    first = f"; first problem: {bad[0].where}: {bad[0].reason}" if bad else ""
    if not samples:
        raise DataError(f"dataset {spec!r} has no usable samples ({len(bad)} malformed records){first}")
    fraction = len(bad) / (len(bad) + len(samples))
    if fraction > max_bad_fraction:
        needed = math.ceil(fraction * 100) / 100  # the smallest whole percent that allows these
        raise DataError(
            f"dataset {spec!r} has {len(bad)} malformed of {len(bad) + len(samples)} records "
            f"({fraction:.1%}, allowed {max_bad_fraction:.1%}){first}; fix the record(s), or pass "
            f"--max-bad-fraction {needed:g} to skip them (counted and listed in run.json)"
        )
    return [to_eval_sample(s) for s in samples], bad


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """Prediction records from a JSONL file (or a run folder holding predictions.jsonl)."""
    path = Path(path)
    if path.is_dir():
        path = path / PREDICTIONS_NAME
    if not path.is_file():
        raise DataError(f"predictions file {path} not found; pass predictions.jsonl from `llava-ultra eval`")
    records = []
    for line_no, line in enumerate(read_text_file(path, "predictions file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}:{line_no}: not valid JSON ({exc.msg}); fix or regenerate the line"
            ) from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(rec).__name__}")
        records.append(rec)
    return records


# ------------------------------------------------------------------------------ prompts, batches


def question_of(sample: dict[str, Any], image_token: str) -> str:
    """The question text without image placeholders (LLaVA-Med's `prompt` field)."""
    from ..data.collate import to_messages

    return to_messages(sample, image_token)[0]["content"].replace(image_token, "").strip()


def render_eval_prompt(sample: dict[str, Any], template: str, system: str | None, image_token: str) -> str:
    """The model input for the sample's first question, rendered as in training."""
    from ..data.collate import to_messages
    from ..model.tokenizer import render_prompt

    return render_prompt(to_messages(sample, image_token)[:1], template, system, image_token)


def plan_batches(n: int, batch_size: int) -> list[list[int]]:
    """Sample indices 0..n-1 cut into consecutive batches of `batch_size` (the last may be short)."""
    return [list(range(a, min(a + batch_size, n))) for a in range(0, n, batch_size)]


def shard_batches(n_batches: int, rank: int, world: int, strategy: str = "contiguous") -> list[int]:
    """The batch numbers rank `rank` of `world` runs: near-equal contiguous blocks, or every
    world-th batch starting at `rank` ('strided'). Together the ranks cover each batch once."""
    if strategy not in SHARD_STRATEGIES:
        raise ConfigError(f"unknown shard strategy {strategy!r}; use one of: {', '.join(SHARD_STRATEGIES)}")
    if not 0 <= rank < world:
        raise ConfigError(f"rank {rank} is outside 0..{world - 1}")
    if strategy == "strided":
        return list(range(rank, n_batches, world))
    base, extra = divmod(n_batches, world)
    start = rank * base + min(rank, extra)
    return list(range(start, start + base + (rank < extra)))


def answer_id(model_id: str, question_id: str, text: str) -> str:
    """A deterministic 22-character id for an answer (LLaVA-Med uses a random shortuuid)."""
    return hashlib.sha1(f"{model_id}\0{question_id}\0{text}".encode()).hexdigest()[:22]


def _load_images(paths: Sequence[str]) -> list[Any]:
    from PIL import Image

    images = []
    for p in paths:
        try:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        except FileNotFoundError:
            raise DataError(f"image {p} does not exist; restore it or fix the sample's image path") from None
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"image {p} cannot be decoded ({exc}); replace the file") from None
    return images


@dataclass
class _Context:
    model: Any
    tokenizer: Any
    model_id: str
    settings: EvalSettings


def _record(
    ctx: _Context, index: int, sample: dict[str, Any], rendered: str, text: str, n_tokens: int, **extra: Any
) -> dict[str, Any]:
    qid = str(sample["id"])
    rec = {
        "question_id": qid,
        "prompt": question_of(sample, ctx.model.config.image_token),
        "text": text,
        "answer_id": answer_id(ctx.model_id, qid, text),
        "model_id": ctx.model_id,
        "metadata": {"rendered_prompt": rendered},
        "index": index,
        "k": len(sample["images"]),
        "selected": None,
        "selection_scores": None,
        "n_new_tokens": n_tokens,
    }
    for key in ("language", "answer_type", "question_type", "site", "modality", "dataset"):
        rec[key] = sample.get(key)
    rec["reference"] = sample["conversations"][1]["value"]
    rec.update(extra)
    return rec


def predict_batch(
    ctx: _Context, samples: Sequence[dict[str, Any]], indices: Sequence[int], batch_no: int
) -> list[dict[str, Any]]:
    """Generate answers for one batch; samples whose images fail get an empty answer + `error`."""
    s = ctx.settings
    out: dict[int, dict[str, Any]] = {}
    ready: list[tuple[int, dict[str, Any], list[Any]]] = []
    prompts: dict[int, str] = {}
    for i, sample in zip(indices, samples, strict=True):
        prompts[i] = render_eval_prompt(sample, s.template, s.system, ctx.model.config.image_token)
        try:
            ready.append((i, sample, _load_images(sample["images"])))
        except DataError as exc:
            out[i] = _record(ctx, i, sample, prompts[i], "", 0, error=str(exc))
    if ready:
        batch = ctx.model.prepare_inputs(
            ctx.tokenizer, [prompts[i] for i, _, _ in ready], [imgs for _, _, imgs in ready]
        )
        sampling = s.temperature > 0
        gen = ctx.model.generate(
            **batch,
            max_new_tokens=s.max_new_tokens,
            do_sample=sampling,
            temperature=s.temperature if sampling else 1.0,
            top_p=s.top_p,
            seed=s.seed + batch_no if sampling else None,
            stop_strings=s.stop,
            tokenizer=ctx.tokenizer,
        )
        scores = gen.selection.scores
        for b, (i, sample, imgs) in enumerate(ready):
            out[i] = _record(
                ctx,
                i,
                sample,
                prompts[i],
                gen.texts[b].strip(),
                len(gen.sequences[b]),
                selected=list(gen.selection.indices[b]),
                selection_scores=None if scores is None else [float(x) for x in scores[b, : len(imgs)]],
            )
    return [out[i] for i in indices]


# ------------------------------------------------------------------------------------- running


@dataclass
class EvalResult:
    """What rank 0 returns from `run_eval` (other ranks get None)."""

    out_dir: Path
    scores: dict[str, Any]
    run: dict[str, Any] = field(default_factory=dict)

    def render(self) -> str:
        from .report import compare_table, render_compare

        header, rows, _ = compare_table([(self.out_dir.name, self.scores)])
        skipped = self.run.get("bad_records", 0)
        note = f"\nskipped {skipped} malformed ground-truth record(s) (listed in run.json)" if skipped else ""
        return f"eval -> {self.out_dir}\n" + render_compare(header, rows, []) + note


def _write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    tmp.replace(path)


def _shard_path(out: Path, rank: int, world: int) -> Path:
    return out / SHARDS_DIR / f"rank{rank:03d}-of-{world:03d}.jsonl"


def merge_shards(out: Path, world: int, n: int) -> list[dict[str, Any]]:
    """Read every rank's shard, restore the original order, and check each index 0..n-1 is there once."""
    records = [rec for r in range(world) for rec in read_predictions(_shard_path(out, r, world))]
    by_index: dict[int, dict[str, Any]] = {}
    for rec in records:
        if rec["index"] in by_index:
            raise DataError(
                f"sample index {rec['index']} was predicted twice; remove {out / SHARDS_DIR} and rerun"
            )
        by_index[rec["index"]] = rec
    missing = [i for i in range(n) if i not in by_index]
    if missing or len(by_index) != n:
        raise DataError(
            f"merged shards hold {len(by_index)} of {n} predictions (first missing index {missing[:1]}); "
            f"a rank did not finish: rerun the evaluation"
        )
    return [by_index[i] for i in range(n)]


def _versions() -> dict[str, str]:
    import torch
    import transformers

    from .. import __version__

    return {"llava_ultra": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def run_eval(
    model_dir: str | Path,
    data: str,
    out_dir: str | Path,
    settings: EvalSettings | None = None,
    *,
    overwrite: bool = False,
) -> EvalResult | None:
    """Generate, save and score one evaluation; data-parallel when launched with several processes."""
    from accelerate import PartialState

    settings = settings or EvalSettings()
    out = Path(out_dir)
    if (out / PREDICTIONS_NAME).exists() and not overwrite:
        raise DataError(
            f"{out / PREDICTIONS_NAME} already exists; pass --overwrite, or choose another --out folder"
        )
    import torch

    # accelerate only sets up a CPU process group (gloo) when told to run on CPU
    on_cpu = settings.device == "cpu" or (settings.device is None and not torch.cuda.is_available())
    state = PartialState(cpu=on_cpu)
    rank, world = state.process_index, state.num_processes
    # None / 'cuda': the rank's own device (cuda:LOCAL_RANK under a launcher); else as given
    device = state.device if settings.device in (None, "cuda") else settings.device
    if state.is_main_process:  # shards left by a crashed run (maybe another process count)
        shutil.rmtree(out / SHARDS_DIR, ignore_errors=True)
    state.wait_for_everyone()
    t0 = time.perf_counter()
    ground_truth, bad = load_ground_truth(data, max_bad_fraction=settings.max_bad_fraction)
    if settings.limit is not None:
        ground_truth = ground_truth[: settings.limit]
    from ..model.checkpoint import load_for_inference  # torch only when generating; scoring stays light

    model, tokenizer = load_for_inference(model_dir, device=device, dtype=settings.dtype)
    template_source = (
        "settings" if settings.template else f"checkpoint (model.template={model.config.template})"
    )
    if settings.template is None:
        from ..model.tokenizer import model_template

        settings = replace(settings, template=model_template(model))
    ctx = _Context(model, tokenizer, Path(model_dir).resolve().name, settings)

    batches = plan_batches(len(ground_truth), settings.batch_size)
    mine = shard_batches(len(batches), rank, world, settings.shard)
    records = [
        rec for b in mine for rec in predict_batch(ctx, [ground_truth[i] for i in batches[b]], batches[b], b)
    ]
    (out / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    _write_jsonl(_shard_path(out, rank, world), records)
    t_generate = time.perf_counter() - t0
    state.wait_for_everyone()
    if not state.is_main_process:
        return None

    predictions = merge_shards(out, world, len(ground_truth))
    _write_jsonl(out / PREDICTIONS_NAME, predictions)
    shutil.rmtree(out / SHARDS_DIR)
    failed = [p["question_id"] for p in predictions if p.get("error")]
    run = {
        "model": str(Path(model_dir).resolve()),
        "model_id": ctx.model_id,
        "data": data,
        "n_samples": len(ground_truth),
        "limit": settings.limit,
        "bad_records": len(bad),
        "bad_record_list": [{"where": b.where, "reason": b.reason} for b in bad[:100]],
        "failed_samples": len(failed),
        "failed_sample_ids": failed[:100],
        "decoding": settings.decoding(),
        "template_source": template_source,
        "settings": asdict(settings),
        "processes": world,
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "generate_seconds": round(t_generate, 3),
        "samples_per_second": round(len(ground_truth) / t_generate, 3) if t_generate > 0 else None,
        "versions": _versions(),
    }
    (out / RUN_NAME).write_text(json.dumps(run, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    scores = score_and_write(predictions, ground_truth, out, settings, run)
    return EvalResult(out, scores, run)


def score_and_write(
    predictions: Sequence[dict[str, Any]],
    ground_truth: Sequence[dict[str, Any]],
    out: Path,
    settings: EvalSettings,
    run: dict[str, Any],
    allow_unpaired: bool = False,
) -> dict[str, Any]:
    """Score, draw the plots, and write scores.json / per_sample.jsonl / report.md into `out`."""
    scores, per_sample = score_run(
        predictions,
        ground_truth,
        **_score_options(settings),
        allow_unpaired=allow_unpaired,
        run=run,
        **settings.hallucination(),
    )
    if settings.plots:
        from .plots import write_plots

        scores["plots"] = write_plots(scores, out)
    write_scores(out, scores, per_sample)
    return scores


def _score_options(settings: EvalSettings) -> dict[str, Any]:
    candidates = label = None
    if settings.candidates is not None:
        candidates = llava_med_files.read_candidates(settings.candidates)
        label = f"candidate file {settings.candidates}"
    return {
        "mode": settings.mode,
        "tokenizer": settings.metric_tokenizer,
        "closed_variant": settings.closed_variant,
        "candidates": candidates,
        "candidates_label": label,
        "n_boot": settings.bootstrap,
        "seed": settings.seed,
    }


def _native_ground_truth(data: str) -> Path | None:
    """The path of a LLaVA-Med ground-truth file named by `data` ('llava-med:PATH', or a bare
    .json/.jsonl path in LLaVA-Med's format), else None."""
    scheme, sep, rest = data.partition(":")
    if sep and scheme.strip().lower() == llava_med_files.SCHEME:
        return Path(rest)
    return Path(data) if llava_med_files.looks_like_llava_med(data) else None


def rescore(
    predictions_path: str | Path,
    data: str,
    settings: EvalSettings | None = None,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Score saved predictions against a dataset spec / eval JSON / LLaVA-Med ground-truth file
    without the model. Predictions pair with ground truth by question id.

    The run description (model, decoding) comes from run.json beside the predictions when there
    is one. With `out_dir`, writes scores.json / per_sample.jsonl / report.md / plots there
    (replacing earlier scores in that folder: re-scoring a run in another mode is a normal use).
    Predictions without a ground-truth sample are left out (and counted) only when ground truth
    was cut by `limit` or malformed records were skipped; otherwise they are an error.
    """
    settings = settings or EvalSettings()
    pred_path = Path(predictions_path)
    predictions = read_predictions(pred_path)
    run_file = (pred_path if pred_path.is_dir() else pred_path.parent) / RUN_NAME
    run = json.loads(run_file.read_text(encoding="utf-8")) if run_file.is_file() else {}
    native = _native_ground_truth(data)
    if native is not None:
        ground_truth, bad = llava_med_files.read_ground_truth(native), []
    else:
        # skip at least the malformed records the eval run skipped, so both sides pair the same ones
        recorded = float(run.get("settings", {}).get("max_bad_fraction", 0.0) or 0.0)
        allowed = max(settings.max_bad_fraction, recorded)
        ground_truth, bad = load_ground_truth(data, max_bad_fraction=allowed)
    cut = settings.limit is not None and settings.limit < len(ground_truth)
    if settings.limit is not None:
        ground_truth = ground_truth[: settings.limit]
    run.update({"data": data, "rescored_from": str(pred_path), "bad_records": len(bad)})
    if native is not None:
        run["ground_truth_format"] = "LLaVA-Med (id, image, conversations, answer_type)"
    allow_unpaired = cut or bool(bad)
    if out_dir is None:
        scores, _ = score_run(
            predictions,
            ground_truth,
            **_score_options(settings),
            allow_unpaired=allow_unpaired,
            run=run,
            **settings.hallucination(),
        )
        return scores
    return score_and_write(predictions, ground_truth, Path(out_dir), settings, run, allow_unpaired)
