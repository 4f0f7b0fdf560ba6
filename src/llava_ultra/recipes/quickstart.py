"""`llava-ultra quickstart` (what `make demo` runs): data -> two-stage training -> evaluation, on CPU.

Steps, each the same code path a user runs by hand:
1. SynthUS (`data/synth.py`) into OUT/synthus, small frames (128 px) to keep decoding cheap;
2. instruction data (`data/instruct.py`) into OUT/instruct;
3. the tiny preset `configs/tiny.yaml` with data paths and steps filled in, trained by
   `train.loop.train` into OUT/run (the tokenizer is a byte-level BPE built on the training text);
4. evaluation on the SynthUS test split (`eval/synthus.py`), greedy decoding, for the untrained
   model (the exact initial weights of stage 1) and the trained stage-2 checkpoint: strict-mode
   EM / F1 / BLEU (`eval.metrics.score`) on site, findings and diagnosis questions, site accuracy
   (the answer names the right site and no other), how often the selector sent a valid frame to
   the LLM against random choice (`eval.selection`), and the findings the answers invent or omit
   (`eval.hallucination`, CHAIR-i / CHAIR-s / omission);
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

from ..config import Config, apply_overrides, from_dict, load_config, to_dict
from ..errors import ConfigError


def default_config_path() -> Path:
    """`configs/tiny.yaml` of the source checkout this package runs from."""
    return Path(__file__).resolve().parents[3] / "configs" / "tiny.yaml"


@dataclass
class QuickstartOptions:
    """What quickstart does; every field has a CLI flag."""

    out: Path
    """Folder for the data, the run and the results."""
    reports: int = 300
    """SynthUS reports to generate."""
    steps1: int | None = 180
    """Stage-1 optimiser steps (None: the preset's, 240). 180 by default, so that `make demo`,
    encoder pretraining included, stays under 10 minutes on a fresh 2-core clone."""
    steps2: int | None = 540
    """Stage-2 optimiser steps (None: the preset's, 720); see steps1."""
    eval_samples: int = 240
    """At most this many test questions are evaluated (spread over the question types)."""
    seed: int = 0
    """Seed for data, init and shuffling."""
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
    if opts.steps1 is not None:
        overrides["train.stage1.max_steps"] = opts.steps1
    if opts.steps2 is not None:
        overrides["train.stage2.max_steps"] = opts.steps2
    if opts.fast:  # the smoke test wins over the step defaults
        overrides.update({"train.stage1.max_steps": 3, "train.stage2.max_steps": 3, "train.progress": False})
    cfg = load_config(path, overrides)
    extra = [*encoder_overrides, *opts.overrides]
    if extra:
        cfg = from_dict(Config, apply_overrides(to_dict(cfg), extra))
    return cfg


def quickstart_synth(reports: int, seed: int, hard: bool = False) -> Any:
    """The SynthUS settings quickstart (and `ablate`) train on: 1-6 frames per report, 128 px."""
    from ..data.synth import SynthConfig

    return SynthConfig(reports=reports, seed=seed, k_min=1, k_max=6, image_size=128, hard=hard)


# ------------------------------------------------------------------------------------- main


def run_quickstart(opts: QuickstartOptions, echo=print) -> QuickstartResult:
    """Generate data, train both stages of the tiny preset, evaluate untrained vs trained."""
    from ..data.instruct import run_instruct
    from ..data.synth import generate
    from ..eval.synthus import eval_device, generate_answers, pick_eval_samples, score_answers
    from ..model.checkpoint import load_checkpoint
    from ..model.tokenizer import load_tokenizer
    from ..train.dataset import image_root_for, read_instructions
    from ..train.loop import initial_model, train
    from .encoders import resolve_encoders

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
