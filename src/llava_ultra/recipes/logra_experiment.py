"""`llava-ultra logra-experiment`: does the LoGra-Med alignment loss make the tiny model data-efficient?

Trains the tiny preset on a fraction (default 10% and 100%) of the SynthUS training data, with and
without the alignment loss (`train.align_weight`), over several seeds, and writes a table of
EM / F1 / BLEU (strict mode, x100, over the site, findings and diagnosis test questions) and the
rate at which the selector sends a valid frame to the LLM, to DIR/results.md and DIR/results.json,
both headed by the `llava-ultra logra-experiment ...` command line that reproduces them.

Notable choices:
- Everything but the arm is shared: data are made once (quickstart's SynthUS settings, data seed 0);
  a fraction keeps that share of the training *reports* (both stages' samples of a kept report),
  drawn once with data seed 0, so every seed and arm of a fraction trains on the same samples.
  Seeds vary only `train.seed` (init, shuffling, head init, Gumbel noise).
- Step counts are the same for every fraction (the 10% runs see each sample more often): compute
  is matched, data are not, which is the data-efficiency question.
- Scoring, CIs and the frame-selection measure are `llava-ultra ablate`'s (`eval/synthus.py`):
  cells are mean +- sd over seeds with a 95% bootstrap CI over questions of the seed-averaged score;
  the alignment effect is the paired difference (aligned - plain) over the same questions.
"""

from __future__ import annotations

import json
import random
import shlex
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..eval.synthus import paired_delta, summarise
from .quickstart import QuickstartOptions, quickstart_config, quickstart_synth

ARMS = {"plain": 0.0, "logra": 1.0}
"""Arm name -> train.align_weight (LoGra-Med uses 1.0)."""


@dataclass
class LograOptions:
    out: Path
    """Folder for data, runs, results.md and results.json."""
    fractions: Sequence[float] = (0.1, 1.0)
    """Shares of the training reports, e.g. 0.1,1."""
    seeds: Sequence[int] = (0, 1)
    """Training seeds, e.g. 0,1,2."""
    reports: int = 300
    """SynthUS reports to generate."""
    steps1: int | None = 40
    """Stage-1 optimiser steps (every fraction)."""
    steps2: int | None = 100
    """Stage-2 optimiser steps (every fraction)."""
    eval_samples: int = 120
    """Test questions to evaluate."""
    config: Path | None = None
    """Training preset (default configs/tiny.yaml)."""
    overrides: list[str] = field(default_factory=list)
    """Extra dotted overrides applied to every run (e.g. train.align.solver=ipfp)."""
    n_boot: int = 1000
    """Bootstrap resamples of the confidence intervals."""
    encoders: str = "pretrained"
    """'pretrained' (cached SynthUS-pretrained tiny encoders), 'random', or a pretrain-encoders folder."""


def check_options(opts: LograOptions) -> None:
    """Raise ConfigError for settings that cannot run, naming the fix."""
    bad = [f for f in opts.fractions if not 0 < f <= 1]
    if bad or not opts.fractions:
        raise ConfigError(f"fractions {list(opts.fractions)} must lie in (0, 1]; e.g. --fractions 0.1,1")
    if not opts.seeds:
        raise ConfigError("no seeds given; pass e.g. --seeds 0,1")


def command_line(opts: LograOptions) -> str:
    """The `llava-ultra logra-experiment ...` line that runs these options (every option spelled out).

    Settings the command has no flag for (`config`, `n_boot`, `steps1/steps2=None`) are appended as a
    shell comment naming them, so the line stays runnable and never hides a difference.
    """
    default = LograOptions(out=opts.out)
    args = [
        "llava-ultra",
        "logra-experiment",
        "--out",
        str(opts.out),
        "--fractions",
        ",".join(f"{f:g}" for f in opts.fractions),
        "--seeds",
        ",".join(str(s) for s in opts.seeds),
        "--reports",
        str(opts.reports),
    ]
    extra = []
    for flag, value in (("--steps1", opts.steps1), ("--steps2", opts.steps2)):
        if value is None:
            extra.append(f"{flag[2:]}=None")
        else:
            args += [flag, str(value)]
    args += ["--eval-samples", str(opts.eval_samples), "--encoders", str(opts.encoders), *opts.overrides]
    if opts.config is not None:
        extra.append(f"config={opts.config}")
    if opts.n_boot != default.n_boot:
        extra.append(f"n_boot={opts.n_boot}")
    line = shlex.join(args)
    return line + (f"  # not on the command line: {', '.join(extra)}" if extra else "")


def subset_instructions(instruct: Path, out: Path, fraction: float, seed: int = 0) -> Path:
    """Copy the stage-1/2 training files keeping `fraction` of the training reports (at least one)."""
    from ..train.dataset import image_root_for, read_instructions

    out.mkdir(parents=True, exist_ok=True)
    stages = {n: read_instructions(instruct / f"stage{n}.train.json") for n in (1, 2)}
    reports = sorted({s["report_id"] for n in stages for s in stages[n]})
    keep = set(random.Random(seed).sample(reports, max(1, round(fraction * len(reports)))))
    for n, samples in stages.items():
        kept = [s for s in samples if s["report_id"] in keep]
        path = out / f"stage{n}.train.json"
        path.write_text(json.dumps(kept, ensure_ascii=False), encoding="utf-8")
    root = image_root_for(instruct / "stage1.train.json")
    meta = {"image_root": str(root.resolve()), "subset_of": str(instruct), "fraction": fraction}
    meta["reports"] = len(keep)
    (out / "instruct_meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return out


def run_config(
    opts: LograOptions, data: Path, run_dir: Path, seed: int, weight: float, encoders: Sequence[str] = ()
) -> Any:
    """The training config of one run: quickstart's preset on `data` with the arm's align weight."""
    qs = QuickstartOptions(
        out=opts.out,
        steps1=opts.steps1,
        steps2=opts.steps2,
        seed=seed,
        config=opts.config,
        overrides=[
            f"train.align_weight={weight}",
            "train.progress=false",
            "train.stage1.epochs=1000000",  # max_steps alone sets the length, for every fraction
            "train.stage2.epochs=1000000",
            *opts.overrides,
        ],
    )
    return quickstart_config(qs, data, run_dir, list(encoders))


def _final_align(run_dir: Path) -> float | None:
    """Mean alignment loss over the last 10 logged steps of stage 2 (None when it was off)."""
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    values = [r["align_loss"] for r in map(json.loads, lines) if r.get("stage") == 2 and "align_loss" in r]
    return statistics.fmean(values[-10:]) if values else None


def run_experiment(opts: LograOptions, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Train and evaluate every (fraction, arm, seed); write DIR/results.md and DIR/results.json."""
    from ..data.instruct import run_instruct
    from ..data.synth import generate
    from ..eval.synthus import evaluate_folder, pick_eval_samples, selection_reports
    from ..train.dataset import image_root_for, read_instructions
    from ..train.loop import train
    from .encoders import resolve_encoders

    check_options(opts)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    synthus, instruct = out / "synthus", out / "instruct"
    if not (synthus / "synth_config.json").is_file():
        echo(generate(synthus, quickstart_synth(opts.reports, 0)).render())
    if not (instruct / "instruct_meta.json").is_file():
        echo(run_instruct(synthus, instruct, seed=0).render())
    eval_path = instruct / "eval.test.json"
    samples = pick_eval_samples(read_instructions(eval_path), opts.eval_samples)
    root, reports = image_root_for(eval_path), selection_reports(synthus)

    encoders = resolve_encoders(opts.encoders, echo=echo)
    runs: list[dict[str, Any]] = []
    subsets = {f: subset_instructions(instruct, out / f"data-{f:g}", f) for f in opts.fractions}
    for seed in opts.seeds:  # seeds outermost: an interrupted run has whole seeds to show
        for fraction, data in subsets.items():
            for arm, weight in ARMS.items():
                run_dir = out / "runs" / f"f{fraction:g}-{arm}-s{seed}"
                done = run_dir / "result.json"
                if done.is_file():  # finished by an earlier, interrupted invocation
                    runs.append(json.loads(done.read_text(encoding="utf-8")))
                    continue
                echo(f"fraction {fraction:g}, {arm}, seed {seed}: training ...")
                t = time.perf_counter()
                train(run_config(opts, data, run_dir, seed, weight, encoders), overwrite=True)
                seconds = time.perf_counter() - t
                ev = evaluate_folder(run_dir / "stage2", samples, root, reports, synthus, opts.n_boot)
                entry = {
                    "fraction": fraction,
                    "arm": arm,
                    "seed": seed,
                    "train_seconds": seconds,
                    "final_align_loss": _final_align(run_dir),
                    "per_question": ev["per_question"],
                    "selection": ev["selection"].get("selector"),
                }
                done.write_text(json.dumps(entry), encoding="utf-8")
                runs.append(entry)
    meta = json.loads((out / f"data-{opts.fractions[0]:g}" / "instruct_meta.json").read_text())
    payload = {
        "command": command_line(opts),
        "settings": {
            "fractions": list(opts.fractions),
            "seeds": list(opts.seeds),
            "reports": opts.reports,
            "train_reports_at_100pct": round(meta["reports"] / opts.fractions[0]),
            "steps1": opts.steps1,
            "steps2": opts.steps2,
            "eval_questions": len(samples),
            "selection_reports": len(reports),
            "overrides": opts.overrides,
            "encoders": opts.encoders,
            "seconds": time.perf_counter() - t0,
        },
        "table": aggregate(runs, opts.n_boot),
        "runs": [{k: v for k, v in r.items() if k != "per_question"} for r in runs],
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    (out / "results.md").write_text(render(payload) + "\n", encoding="utf-8")
    return payload


def aggregate(runs: Sequence[dict[str, Any]], n_boot: int) -> list[dict[str, Any]]:
    """One row per (fraction, arm): overall EM/F1/BLEU over seeds, selection rate, and for the
    aligned arm the paired difference to the plain arm of the same fraction and seeds."""

    def values(fraction: float, arm: str, metric: str) -> list[list[float]]:
        chosen = sorted(
            (r for r in runs if r["fraction"] == fraction and r["arm"] == arm), key=lambda r: r["seed"]
        )
        return [r["per_question"]["overall"][metric] for r in chosen]

    rows = []
    for fraction in sorted({r["fraction"] for r in runs}):
        for arm in ARMS:
            mine = [r for r in runs if r["fraction"] == fraction and r["arm"] == arm]
            if not mine:
                continue
            row: dict[str, Any] = {"fraction": fraction, "arm": arm, "seeds": sorted(r["seed"] for r in mine)}
            for metric in ("exact_match", "f1", "bleu"):
                row[metric] = summarise(values(fraction, arm, metric), n_boot)
                if arm != "plain" and any(r["fraction"] == fraction and r["arm"] == "plain" for r in runs):
                    row[f"delta_{metric}"] = paired_delta(
                        values(fraction, arm, metric), values(fraction, "plain", metric), n_boot
                    )
            rates = [r["selection"]["rate"] for r in mine if r.get("selection")]
            row["selection"] = _spread(rates)
            first = min(mine, key=lambda r: r["seed"]).get("selection") or {}
            row["random_rate"], row["selection_ci_first_seed"] = (
                first.get("random_rate"),
                first.get("rate_ci"),
            )
            row["train_seconds"] = _spread([r["train_seconds"] for r in mine])
            aligns = [r["final_align_loss"] for r in mine if r["final_align_loss"] is not None]
            row["final_align_loss"] = _spread(aligns)
            rows.append(row)
    return rows


def _spread(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def _cell(s: dict[str, Any] | None, ci: bool = True) -> str:
    if not s or s.get("mean") is None:
        return "-"
    text = f"{s['mean']:.1f} ± {s['sd']:.1f}"
    return text + (f" [{s['ci'][0]:.1f}, {s['ci'][1]:.1f}]" if ci and s.get("ci") else "")


def _delta(d: dict[str, Any] | None) -> str:
    if not d or d.get("mean") is None:
        return "-"
    return f"{d['mean']:+.1f} [{d['ci'][0]:+.1f}, {d['ci'][1]:+.1f}]" if d.get("ci") else f"{d['mean']:+.1f}"


def render(payload: dict[str, Any]) -> str:
    """The Markdown table and settings."""
    st = payload["settings"]
    lines = [
        "# LoGra-Med data efficiency on SynthUS (tiny preset)",
        "",
        *([f"Command: `{payload['command']}`", ""] if payload.get("command") else []),
        f"SynthUS {st['reports']} reports (data seed 0, {st['train_reports_at_100pct']} training reports); "
        f"seeds {', '.join(map(str, st['seeds']))}; steps stage1/stage2 {st['steps1']}/{st['steps2']} for "
        f"every fraction; {st['eval_questions']} test questions (site, findings, diagnosis); valid-frame "
        f"rate on {st['selection_reports']} held-out reports' informative ones. Strict mode, x100. Cells: "
        f"mean ± sd over seeds [95% bootstrap CI over questions of the seed-averaged score]; Δ: paired "
        f"difference LoGra-Med - plain over the same questions [95% CI]; valid frame: mean ± sd over "
        f"seeds [95% CI over reports, first seed] (random choice).",
        "",
        "| data | arm | EM | F1 | BLEU | ΔEM | ΔF1 | ΔBLEU | valid frame (random) | align loss (end) | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["table"]:
        sel, ci = r["selection"], r.get("selection_ci_first_seed")
        sel_txt = "-"
        if sel:
            sel_txt = f"{sel['mean']:.1f} ± {sel['sd']:.1f}" + (f" [{ci[0]:.0f}, {ci[1]:.0f}]" if ci else "")
            sel_txt += f" ({r['random_rate']:.1f})"
        al = r["final_align_loss"]
        al_txt = f"{al['mean']:.2f}" if al else "-"
        lines.append(
            f"| {r['fraction']:.0%} | {r['arm']} | {_cell(r['exact_match'])} | {_cell(r['f1'])} | "
            f"{_cell(r['bleu'])} | {_delta(r.get('delta_exact_match'))} | {_delta(r.get('delta_f1'))} | "
            f"{_delta(r.get('delta_bleu'))} | {sel_txt} | {al_txt} | "
            f"{r['train_seconds']['mean']:.0f} |"
        )
    lines += ["", f"Total time {st['seconds'] / 60:.1f} min. Extra overrides: {st['overrides'] or 'none'}."]
    return "\n".join(lines)
