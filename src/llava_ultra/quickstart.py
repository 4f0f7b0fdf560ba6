"""`llava-ultra quickstart` (what `make demo` runs): data -> two-stage training -> evaluation, on CPU.

Steps, each the same code path a user runs by hand:
1. SynthUS (`data/synth.py`) into OUT/synthus, small frames (128 px) to keep decoding cheap;
2. instruction data (`data/instruct.py`) into OUT/instruct;
3. the tiny preset `configs/tiny.yaml` with data paths and steps filled in, trained by
   `train.loop.train` into OUT/run (the tokenizer is a byte-level BPE built on the training text);
4. evaluation on the SynthUS test split, greedy decoding, for the untrained model (the exact
   initial weights of stage 1) and the trained stage-2 checkpoint: strict-mode EM / F1 / BLEU
   (`eval.metrics.score`) on site, findings and diagnosis questions, site accuracy (the answer
   names the right site and no other), and how often the selector sent a valid frame to the LLM against random choice (`eval.selection`),
   and the findings the answers invent or omit (`eval.hallucination`, CHAIR-i / CHAIR-s / omission);
5. a table, OUT/quickstart.json, and how to use the checkpoint.

`--fast` shrinks everything for a smoke test (CI). The defaults were tuned to finish in a few
minutes on a 2-core machine; figures are in README / docs/training.md.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from .config import Config, apply_overrides, from_dict, load_config, to_dict
from .errors import ConfigError
from .sites import SITES

EVAL_TYPES = ("site", "findings", "diagnosis")
MAX_NEW_TOKENS = {"site": 24, "findings": 160, "diagnosis": 48}


def default_config_path() -> Path:
    """`configs/tiny.yaml` of the source checkout this package runs from."""
    return Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


@dataclass
class QuickstartOptions:
    """What quickstart does; every field has a CLI flag."""

    out: Path
    reports: int = 300
    steps1: int | None = None
    """Stage-1 optimiser steps (None: the preset's)."""
    steps2: int | None = None
    """Stage-2 optimiser steps (None: the preset's)."""
    eval_samples: int = 240
    """At most this many test questions are evaluated (spread over the question types)."""
    seed: int = 0
    fast: bool = False
    """Tiny smoke-test setting: few reports, few steps, few questions."""
    config: Path | None = None
    """Training preset (default: configs/tiny.yaml)."""
    overrides: list[str] = field(default_factory=list)
    """Extra dotted overrides for the preset."""
    overwrite: bool = False
    """Replace an earlier quickstart in the same folder (its data, run and results) instead of refusing."""
    encoders: str = "pretrained"
    """'pretrained' (the SynthUS-pretrained tiny encoders, built once and cached), 'random' (the
    preset's random-init encoders), or a folder written by `llava-ultra pretrain-encoders`."""
    hard: bool = False
    """Hard SynthUS (fewer valid frames, fainter findings)."""
    device: str | None = None
    """Where the evaluation runs ('cpu', 'cuda', 'cuda:1'); None: the GPU when there is one."""


@dataclass
class QuickstartResult:
    out: Path
    checkpoint: Path
    untrained: dict[str, Any]
    trained: dict[str, Any]
    seconds: dict[str, float]

    def table(self) -> str:
        rows = [
            ("site accuracy (names the right site)", "site_accuracy"),
            ("site EM", "site.exact_match"),
            ("site F1", "site.f1"),
            ("findings F1", "findings.f1"),
            ("findings BLEU", "findings.bleu"),
            ("diagnosis EM", "diagnosis.exact_match"),
            ("diagnosis F1", "diagnosis.f1"),
            ("diagnosis BLEU", "diagnosis.bleu"),
            ("valid-frame selection, informative reports", "selection.rate"),
            ("  random choice on the same reports", "selection.random_rate"),
            ("invented findings, CHAIR-i (lower is better)", "hallucination.chair_i"),
            ("answers inventing a finding, CHAIR-s", "hallucination.chair_s"),
            ("omitted findings", "hallucination.omission"),
        ]

        def get(d: dict[str, Any], dotted: str) -> str:
            for part in dotted.split("."):
                d = d.get(part) if isinstance(d, dict) else None
            return "-" if d is None else f"{d:.1f}"

        width = max(len(r[0]) for r in rows)
        lines = [f"{'metric (x100, strict mode)':<{width}}  untrained    trained", "-" * (width + 22)]
        lines += [
            f"{name:<{width}}  {get(self.untrained, key):>9}  {get(self.trained, key):>9}"
            for name, key in rows
        ]
        n = self.trained.get("n", {})
        lines.append(f"questions evaluated: {', '.join(f'{k} {v}' for k, v in n.items())}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------ config


def quickstart_config(
    opts: QuickstartOptions, instruct_dir: Path, run_dir: Path, encoder_overrides: list[str] = ()
) -> Config:
    """The tiny training preset with this run's data, output folder and step counts; then the
    encoder overrides (`recipes.encoders.resolve_encoders`), then the user's overrides."""
    path = opts.config or default_config_path()
    if not path.is_file():
        raise ConfigError(
            f"training preset {path} not found; pass --config configs/tiny.yaml from a source checkout"
        )
    overrides: dict[str, Any] = {
        "data.stage1": str(instruct_dir / "stage1.train.json"),
        "data.stage2": str(instruct_dir / "stage2.train.json"),
        "train.output_dir": str(run_dir),
        "train.stages": [1, 2],
        "train.seed": opts.seed,
    }
    if opts.fast:
        overrides.update({"train.stage1.max_steps": 3, "train.stage2.max_steps": 3, "train.progress": False})
    if opts.steps1 is not None:
        overrides["train.stage1.max_steps"] = opts.steps1
    if opts.steps2 is not None:
        overrides["train.stage2.max_steps"] = opts.steps2
    cfg = load_config(path, overrides)
    extra = [*encoder_overrides, *opts.overrides]
    if extra:
        cfg = from_dict(Config, apply_overrides(to_dict(cfg), extra))
    return cfg


def eval_device() -> str:
    """'cuda' when a GPU is visible, else 'cpu' (quickstart, ablate and the LoGra experiment evaluate there)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def quickstart_synth(reports: int, seed: int, hard: bool = False) -> Any:
    """The SynthUS settings quickstart (and `ablate`) train on: 1-6 frames per report, 128 px."""
    from .data.synth import SynthConfig

    return SynthConfig(reports=reports, seed=seed, k_min=1, k_max=6, image_size=128, hard=hard)


# -------------------------------------------------------------------------------- evaluation


def pick_eval_samples(samples: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """Up to `limit` samples of the evaluated question types, interleaved so every type is covered."""
    by_type: dict[str, list[dict[str, Any]]] = {t: [] for t in EVAL_TYPES}
    for s in samples:
        if s.get("question_type") in by_type:
            by_type[s["question_type"]].append(s)
    out: list[dict[str, Any]] = []
    i = 0
    while len(out) < limit and any(i < len(v) for v in by_type.values()):
        for t in EVAL_TYPES:
            if i < len(by_type[t]) and len(out) < limit:
                out.append(by_type[t][i])
        i += 1
    return out


def names_site(text: str, site: str, language: str) -> bool:
    """True when `text` names `site` (in the sample's language) and no other site."""
    idx = 0 if language == "zh" else 1
    low = text.lower()
    hits = {key for key, names in SITES.items() if names[idx].lower() in low}
    if language == "en" and "liver" in low:
        hits.add("liver")
    return hits == {site}


def generate_answers(
    model: Any, tokenizer: Any, samples: list[dict[str, Any]], image_root: Path, batch_size: int = 16
) -> list[dict[str, Any]]:
    """Greedy answers and the selected frames for eval samples (first human turn as the prompt)."""
    from .data.collate import to_messages
    from .data.reports import resolve_image
    from .model.tokenizer import render_prompt

    model.eval()
    out = []
    order = sorted(range(len(samples)), key=lambda i: samples[i]["question_type"])
    for qtype in EVAL_TYPES:
        idx = [i for i in order if samples[i]["question_type"] == qtype]
        for start in range(0, len(idx), batch_size):
            chunk = [samples[i] for i in idx[start : start + batch_size]]
            prompts = [render_prompt(to_messages(s, model.config.image_token)[:1]) for s in chunk]
            images = []
            for s in chunk:
                frames = []
                for rel in s["images"]:
                    with Image.open(resolve_image(image_root, rel)) as im:
                        frames.append(im.convert("RGB"))
                images.append(frames)
            batch = model.prepare_inputs(tokenizer, prompts, images)
            gen = model.generate(**batch, max_new_tokens=MAX_NEW_TOKENS[qtype], tokenizer=tokenizer)
            for s, text, chosen in zip(chunk, gen.texts, gen.selection.indices, strict=True):
                out.append({"sample": s, "prediction": text.strip(), "selected": chosen})
    return out


def score_answers(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Strict-mode metrics per question type, site accuracy, frame selection vs random, and
    hallucination (`eval.hallucination`: invented / omitted findings of the answers)."""
    from .eval.hallucination import hallucination_summary
    from .eval.metrics import score
    from .eval.selection import make_case, selection_report

    result: dict[str, Any] = {"n": {}}
    for qtype in EVAL_TYPES:
        part = [r for r in rows if r["sample"]["question_type"] == qtype]
        if not part:
            continue
        result["n"][qtype] = len(part)
        result[qtype] = score(
            [r["prediction"] for r in part],
            [r["sample"]["conversations"][1]["value"] for r in part],
            [r["sample"].get("answer_type", "OPEN") for r in part],
            [r["sample"].get("language", "auto") for r in part],
            mode="strict",
        )
        if qtype == "site":
            hits = [names_site(r["prediction"], r["sample"]["site"], r["sample"]["language"]) for r in part]
            result["site_accuracy"] = 100.0 * sum(hits) / len(hits)
    cases = [
        make_case(r["sample"]["id"], r["sample"].get("valid"), r["selected"], r["sample"]["images"])
        for r in rows
        if r["selected"]
    ]
    result["hallucination"] = hallucination_summary(
        [r["sample"] for r in rows],
        [r["prediction"] for r in rows],
        n_boot=200,
        selected=[r["selected"] for r in rows],
    )
    report = selection_report(cases, n_boot=200)
    if report is not None:
        result["selection"] = report["informative"] if report["informative"]["n"] else report["all"]
        result["selection_all"] = report["all"]
    return result


# ------------------------------------------------------------------------------------- main


def run_quickstart(opts: QuickstartOptions, echo=print) -> QuickstartResult:
    """Generate data, train both stages of the tiny preset, evaluate untrained vs trained."""
    from .data.collate import image_root_for, read_instructions
    from .data.instruct import run_instruct
    from .data.synth import generate
    from .model.checkpoint import load_checkpoint
    from .model.tokenizer import load_tokenizer
    from .recipes.encoders import resolve_encoders
    from .train.loop import initial_model, train

    out = Path(opts.out)
    run_dir = out / "run"
    if run_dir.exists():
        if not opts.overwrite:
            raise ConfigError(
                f"{out} already holds a quickstart run ({run_dir}); choose a new --out, "
                "or pass --overwrite to replace it"
            )
        echo(f"--overwrite: replacing the earlier quickstart in {out}")
        for part in ("run", "synthus", "instruct"):
            shutil.rmtree(out / part, ignore_errors=True)
    seconds: dict[str, float] = {}

    t = time.perf_counter()
    reports = 36 if opts.fast else opts.reports
    synth = generate(out / "synthus", quickstart_synth(reports, opts.seed, opts.hard))
    echo(synth.render())
    instruct_dir = out / "instruct"
    echo(run_instruct(out / "synthus", instruct_dir, seed=opts.seed).render())
    seconds["data"] = time.perf_counter() - t

    t = time.perf_counter()
    enc = resolve_encoders(opts.encoders, fast=opts.fast, echo=echo)
    seconds["encoders"] = time.perf_counter() - t
    cfg = quickstart_config(opts, instruct_dir, run_dir, enc)
    t = time.perf_counter()
    train(cfg)
    seconds["train"] = time.perf_counter() - t

    t = time.perf_counter()
    eval_path = instruct_dir / "eval.test.json"
    limit = 24 if opts.fast else opts.eval_samples
    samples = pick_eval_samples(read_instructions(eval_path), limit)
    root = image_root_for(eval_path)
    tokenizer = load_tokenizer(run_dir / "stage1")
    echo(f"evaluating {len(samples)} test questions: untrained model ...")
    device = opts.device or eval_device()
    untrained = score_answers(
        generate_answers(initial_model(cfg, tokenizer, device), tokenizer, samples, root)
    )
    echo("... trained model (stage 2)")
    model, tokenizer = load_checkpoint(run_dir / "stage2", device=device)
    trained_rows = generate_answers(model, tokenizer, samples, root)
    trained = score_answers(trained_rows)
    seconds["eval"] = time.perf_counter() - t

    result = QuickstartResult(out, run_dir / "stage2", untrained, trained, seconds)
    payload = {
        "checkpoint": str(result.checkpoint),
        "encoders": encoders_summary(enc),
        "seconds": seconds,
        "untrained": untrained,
        "trained": trained,
        "examples": [
            {
                "id": r["sample"]["id"],
                "reference": r["sample"]["conversations"][1]["value"],
                "prediction": r["prediction"],
            }
            for r in trained_rows[:: max(1, len(trained_rows) // 12)]
        ],
    }
    (out / "quickstart.json").write_text(
        json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return result


def encoders_summary(overrides: list[str]) -> dict[str, Any]:
    """Which encoders a run used (from its encoder overrides) and, for pretrained ones, their quality."""
    paths = {k: json.loads(v) for k, v in (o.split("=", 1) for o in overrides) if k.endswith(".path")}
    if not paths:
        return {"kind": "random-init"}
    folder = Path(paths["model.vision.path"]).parent
    quality = folder / "encoder_quality.json"
    return {
        "kind": "pretrained",
        "folder": str(folder),
        "quality": json.loads(quality.read_text(encoding="utf-8")) if quality.is_file() else None,
    }


def usage_hint(checkpoint: Path, commands: set[str]) -> str:
    """How to use the trained checkpoint, naming only CLI commands that exist."""
    lines = ["Use the trained model:"]
    if "chat" in commands:
        lines.append(f"  llava-ultra chat {checkpoint} --image FRAME.png    # chat in the terminal")
    if "serve" in commands:
        lines.append(f"  llava-ultra serve {checkpoint}    # OpenAI-compatible API and web page")
    lines += [
        "  or from Python:",
        "    from llava_ultra.model.checkpoint import load_checkpoint",
        f"    model, tok = load_checkpoint('{checkpoint}')",
        "    batch = model.prepare_inputs(tok, [prompt_with_one_<image>], [[PIL images]])",
        "    print(model.generate(**batch, tokenizer=tok).texts[0])",
    ]
    return "\n".join(lines)
