"""`llava-ultra ablate`: the paper's Table 3 rows trained and evaluated on SynthUS, over seeds.

What this file owns: the row definitions (each a set of dotted config overrides on the tiny
preset, plus which instruction variant it trains on), running them (training through `train`,
measuring through `eval/synthus.py`), and the table.

Notable choices:
- Data are made once (`quickstart_synth`, data seed 0) and shared: every row and seed trains on
  the same SynthUS reports and is evaluated on the same test questions (the quickstart's
  `eval.test.json`: site, findings and diagnosis questions, asked with and without a site cue).
  Seeds vary only `train.seed` (init, shuffling, LoRA init): the spread is training noise.
- Rows (paper wording -> what we change):
  full model -> nothing; w/o visual enhancement -> `model.sam.enabled=false` (CLIP only, no
  fusion); w/o redundancy adaptation -> `model.selector.mode=none` with `none_strategy=random`:
  the paper says the text is then paired with an arbitrary image of the group ("such text is
  often assigned to each image"); one random frame per sample (a fresh draw per training visit,
  a content hash at eval) keeps one image per sample, so the LLM input and compute match the
  full model and only the choice differs. Extra rows: `no_ra_first` (always the first frame; on
  SynthUS the valid frames are one contiguous run, so the first frame is valid less often than a
  random one: a pessimistic baseline) and `no_ra_all` (every frame to the LLM); w/o func.b ->
  `model.selector.mode=feature` (scorer trained by the straight-through LM gradient only);
  w/o stage 2 -> the full row's own stage-1 checkpoint (stage 1 of a chained run is a fresh
  stage 1, so this costs no training; only the tokenizer saw stage-2 text too); w/o site prompt
  -> instruction data built with `site_cue=without` (no question names the site).
- Every measurement is `eval/synthus.py`'s (quickstart's questions and metrics): strict mode,
  x100, per question type, and overall over the three types' open questions. Per row: mean +- sd
  over seeds, and a 95% bootstrap CI over questions of the seed-averaged per-question score;
  `delta` vs the full row is a paired bootstrap over the same questions.
- Frame selection is measured directly on held-out reports (val + test, each report once,
  informative ones: k > 1 with valid and invalid frames) rather than through the questions, which
  ask several times about few reports. For rows that train the scorer we also record what the
  attention teacher would pick on the same reports and how peaked it is (the diagnostics behind
  docs/results.md "What we found about the selector").
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..eval.synthus import EVAL_TYPES, METRICS, paired_delta, pooled_selection, summarise
from .quickstart import QuickstartOptions, quickstart_config, quickstart_synth


@dataclass(frozen=True)
class Row:
    """One ablation variant."""

    key: str
    label: str
    overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted config overrides on top of the preset."""
    site_cue: str = "both"
    """Instruction variant it trains on ('both' = with and without a site cue, 'without')."""
    stage1_only: bool = False
    """Evaluate the stage-1 checkpoint (reusing the full row's when it ran for this seed)."""


ROWS: dict[str, Row] = {
    r.key: r
    for r in (
        Row("full", "LLaVA-Ultra full model"),
        Row("no_ve", "w/o visual enhancement (CLIP only)", {"model.sam.enabled": False}),
        Row(
            "no_ra",
            "w/o redundancy adaptation (random frame)",
            {"model.selector.mode": "none", "model.selector.none_strategy": "random"},
        ),
        Row("no_funcb", "w/o func.b (feature scoring only)", {"model.selector.mode": "feature"}),
        Row(
            "full_raw_teacher",
            "full model, raw teacher (teacher_norm=none, the pre-z-score design)",
            {"model.selector.teacher_norm": "none"},
        ),
        Row(
            "full_supervised",
            "(extra) full model + supervised selector loss on frame labels",
            {"model.selector.supervised_weight": 1.0},
        ),
        Row(
            "full_cheap",
            "full model, cheap selection (scored on CLIP, SAM on the chosen frame only)",
            {"model.selector.score_features": "clip"},
        ),
        Row(
            "full_peak",
            "full model, teacher relevance = most-attended image token (peak)",
            {"model.selector.teacher_relevance": "peak"},
        ),
        Row(
            "full_lesion",
            "(extra) full model, KD from SAM's lesion masks instead of the attention teacher",
            {"model.selector.teacher": "lesion"},
        ),
        Row("no_stage2", "w/o stage 2 tuning", {"train.stages": [1]}, stage1_only=True),
        Row("no_site", "w/o site prompt in instruction", site_cue="without"),
        Row(
            "no_ra_first",
            "w/o redundancy adaptation (first frame)",
            {"model.selector.mode": "none", "model.selector.none_strategy": "first"},
        ),
        Row(
            "no_ra_all",
            "w/o redundancy adaptation (all frames to the LLM)",
            {"model.selector.mode": "none", "model.selector.none_strategy": "all"},
        ),
    )
}
DEFAULT_ROWS = ("full", "no_ve", "no_ra", "no_funcb", "no_stage2", "no_site")


@dataclass
class AblateOptions:
    out: Path
    """Folder for the shared data, the runs and results.md/json."""
    rows: Sequence[str] = DEFAULT_ROWS
    """Rows (default: the paper's six): full, no_ve, no_ra, no_funcb, no_stage2, no_site; extra:
    no_ra_first, no_ra_all, full_raw_teacher, full_supervised, full_cheap (CLIP-only scoring),
    full_peak (peak teacher reading), full_lesion (KD from SAM's lesion masks)."""
    seeds: Sequence[int] = (0, 1, 2)
    """Training seeds."""
    reports: int = 600
    """SynthUS reports (shared by all rows)."""
    steps1: int | None = None
    """Stage-1 steps (None: the preset's)."""
    steps2: int | None = None
    """Stage-2 steps (None: the preset's)."""
    eval_samples: int = 240
    """Test questions to evaluate."""
    hard: bool = False
    """Hard SynthUS: fewer valid frames, fainter findings."""
    config: Path | None = None
    """Training preset (default configs/tiny.yaml)."""
    overrides: list[str] = field(default_factory=list)
    """Extra dotted overrides applied to every row (after the row's own)."""
    n_boot: int = 1000
    """Bootstrap resamples of the confidence intervals."""
    encoders: str = "pretrained"
    """'pretrained' (cached SynthUS-pretrained tiny encoders; hard ones with --hard), 'random', or a
    `pretrain-encoders` folder."""


def check_rows(keys: Sequence[str]) -> list[str]:
    """Validated row keys ('full' first when present); unknown keys raise naming the choices."""
    unknown = [k for k in keys if k not in ROWS]
    if unknown:
        raise ConfigError(f"unknown ablation row(s) {unknown}; choose from: {', '.join(ROWS)}")
    if not keys:
        raise ConfigError(f"no rows given; choose from: {', '.join(ROWS)}")
    keys = list(dict.fromkeys(keys))
    return sorted(keys, key=lambda k: k != "full")


def row_config(
    opts: AblateOptions, row: Row, seed: int, instruct_dir: Path, run_dir: Path, encoders: Sequence[str] = ()
) -> Any:
    """The training `Config` of one row and seed: quickstart's preset + encoders + the row's overrides."""
    dotted = [f"{k}={json.dumps(v)}" for k, v in row.overrides.items()]
    qs = QuickstartOptions(
        out=opts.out,
        steps1=opts.steps1,
        steps2=opts.steps2,
        seed=seed,
        config=opts.config,
        overrides=[*dotted, "train.progress=false", *opts.overrides],
    )
    return quickstart_config(qs, instruct_dir, run_dir, list(encoders))


# ------------------------------------------------------------------------------------- running


def build_data(opts: AblateOptions, cues: set[str], echo: Callable[[str], None]) -> dict[str, Path]:
    """SynthUS + instruction data for each needed site-cue variant, shared by all rows."""
    from ..data.instruct import run_instruct
    from ..data.synth import generate

    synthus = opts.out / "synthus"
    if not (synthus / "synth_config.json").is_file():
        echo(generate(synthus, quickstart_synth(opts.reports, 0, opts.hard)).render())
    dirs = {}
    for cue in sorted(cues):
        d = opts.out / ("instruct" if cue == "both" else f"instruct-{cue}")
        if not (d / "instruct_meta.json").is_file():
            echo(run_instruct(synthus, d, seed=0, site_cue=cue).render())
        dirs[cue] = d
    return dirs


def run_ablation(opts: AblateOptions, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Train and evaluate every (row, seed); write DIR/results.md and DIR/results.json."""
    from ..eval.synthus import evaluate_folder, pick_eval_samples, selection_reports
    from ..train.dataset import image_root_for, read_instructions
    from ..train.loop import train
    from .encoders import resolve_encoders

    keys = check_rows(opts.rows)
    if not opts.seeds:
        raise ConfigError("no seeds given; pass e.g. --seeds 0 1 2")
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    dirs = build_data(opts, {ROWS[k].site_cue for k in keys}, echo)
    eval_path = dirs["both"] / "eval.test.json" if "both" in dirs else None
    if eval_path is None:  # only no-cue rows: evaluate on the shared (cue + no-cue) questions anyway
        eval_path = build_data(opts, {"both"}, echo)["both"] / "eval.test.json"
    samples = pick_eval_samples(read_instructions(eval_path), opts.eval_samples)
    root = image_root_for(eval_path)
    synthus = out / "synthus"
    reports = selection_reports(synthus)
    encoders = resolve_encoders(opts.encoders, echo=echo)

    runs: dict[str, dict[int, dict[str, Any]]] = {k: {} for k in keys}
    for seed in opts.seeds:
        for key in keys:
            row = ROWS[key]
            run_dir = out / "runs" / f"{key}-seed{seed}"
            done = run_dir / ("stage1" if row.stage1_only else "stage2")
            full_stage1 = out / "runs" / f"full-seed{seed}" / "stage1"
            if row.stage1_only and full_stage1.is_dir():
                done = full_stage1
            t = time.perf_counter()
            if not done.is_dir():
                echo(f"[{key} seed {seed}] training -> {run_dir}")
                train(row_config(opts, row, seed, dirs[row.site_cue], run_dir, encoders), overwrite=True)
            train_s = time.perf_counter() - t
            echo(f"[{key} seed {seed}] evaluating {done}")
            t = time.perf_counter()
            result = evaluate_folder(done, samples, root, reports, synthus, opts.n_boot)
            result["seconds"] = {"train": train_s, "eval": time.perf_counter() - t}
            result["checkpoint"] = str(done)
            runs[key][seed] = result
            payload = _payload(
                opts, keys, runs, len(samples), len(reports), time.perf_counter() - t0, samples
            )
            _write(out, payload)  # after every run: an interrupted ablation keeps what it measured
    return payload


def _payload(
    opts: AblateOptions,
    keys: list[str],
    runs: dict[str, dict[int, dict[str, Any]]],
    n_q: int,
    n_rep: int,
    secs: float,
    samples: Sequence[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    done = {k: v for k, v in runs.items() if v}
    return {
        "settings": {
            "rows": [k for k in keys if k in done],
            "seeds": list(opts.seeds),
            "reports": opts.reports,
            "hard": opts.hard,
            "steps1": opts.steps1,
            "steps2": opts.steps2,
            "eval_questions": n_q,
            "selection_reports": n_rep,
            "overrides": opts.overrides,
            "encoders": opts.encoders,
            "row_overrides": {k: ROWS[k].overrides | {"site_cue": ROWS[k].site_cue} for k in done},
        },
        "table": aggregate(done, opts.n_boot, samples),
        "runs": {
            k: {
                str(s): {kk: vv for kk, vv in r.items() if kk not in ("frames", "answers")}
                for s, r in v.items()
            }
            for k, v in done.items()
        },
        "answers": {k: {str(s): r.get("answers", []) for s, r in v.items()} for k, v in done.items()},
        "frames": {k: {str(s): r["frames"] for s, r in v.items()} for k, v in done.items()},
        "seconds": secs,
    }


def _write(out: Path, payload: dict[str, Any]) -> None:
    (out / "results.json").write_text(
        json.dumps(payload, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (out / "results.md").write_text(render(payload), encoding="utf-8")


def _answers_in_order(result: dict[str, Any], ids: Sequence[str]) -> list[str] | None:
    by_id = {a["id"]: a["prediction"] for a in result.get("answers") or []}
    return [by_id[i] for i in ids] if ids and all(i in by_id for i in ids) else None


def add_hallucination(table: dict[str, Any], runs: dict[str, dict[int, dict[str, Any]]],
                      samples: Sequence[dict[str, Any]], n_boot: int) -> None:  # fmt: skip
    """Invented / omitted / mis-sided / mis-sized findings per row over seeds (eval/hallucination.py),
    and the paired difference to the full row, from the answers each run kept."""
    from ..eval.hallucination import hallucination_delta, hallucination_over_seeds

    ids = [s["id"] for s in samples]
    full = runs.get("full")
    for key, by_seed in runs.items():
        seeds = sorted(by_seed)
        preds = [_answers_in_order(by_seed[s], ids) for s in seeds]
        if not preds or any(p is None for p in preds):
            continue
        entry = table[key]
        for metric, value in hallucination_over_seeds(samples, preds, n_boot=n_boot).items():
            entry["metrics"][f"hallucination.{metric}"] = value
        if full is not None and key != "full" and set(full) >= set(seeds):
            ref = [_answers_in_order(full[s], ids) for s in seeds]
            if all(r is not None for r in ref):
                for metric, d in hallucination_delta(samples, preds, ref, n_boot=n_boot).items():
                    entry["delta_vs_full"][f"hallucination.{metric}"] = d


def aggregate(
    runs: dict[str, dict[int, dict[str, Any]]], n_boot: int, samples: Sequence[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Per row: every metric summarised over seeds; delta vs the full row; selection over seeds;
    hallucination rates when the eval `samples` are given."""
    table: dict[str, Any] = {}
    full = runs.get("full")
    for key, by_seed in runs.items():
        seeds = sorted(by_seed)
        entry: dict[str, Any] = {"label": ROWS[key].label, "metrics": {}, "delta_vs_full": {}}
        for part in (*EVAL_TYPES, "overall"):
            names = by_seed[seeds[0]]["per_question"].get(part, {})
            for metric in names:
                vals = [by_seed[s]["per_question"][part][metric] for s in seeds]
                entry["metrics"][f"{part}.{metric}"] = summarise(vals, n_boot)
                if full is not None and key != "full" and set(full) >= set(seeds):
                    ref = [full[s]["per_question"][part][metric] for s in seeds]
                    entry["delta_vs_full"][f"{part}.{metric}"] = paired_delta(vals, ref, n_boot)
        for who in ("selector", "teacher"):
            rates = [by_seed[s]["selection"].get(who) for s in seeds]
            if all(r is not None and r["rate"] is not None for r in rates):
                entry[f"{who}_rate"] = _over_seeds([r["rate"] for r in rates])
                entry[f"{who}_lift"] = _over_seeds([r["lift"] for r in rates])
                entry[f"{who}_lift_ci_seed{seeds[0]}"] = rates[0]["lift_ci"]
                entry["random_rate"] = rates[0]["random_rate"]
                entry["n_informative"] = rates[0]["n"]
        variants = [by_seed[s]["selection"].get("teacher_variants") for s in seeds]
        if all(variants):
            entry["teacher_variants"] = {
                name: _over_seeds([v[name] for v in variants])
                for name in variants[0]
                if all(name in v for v in variants)
            }
        pooled = pooled_selection(by_seed, seeds, n_boot)
        if pooled is not None:
            entry["selector_pooled"] = pooled
        peaks = [by_seed[s]["selection"].get("teacher_peak_over_uniform") for s in seeds]
        if all(p is not None for p in peaks):
            entry["teacher_peak_over_uniform"] = _over_seeds(peaks)
            entry["teacher_spread"] = _over_seeds(
                [by_seed[s]["selection"]["teacher_spread_mean"] for s in seeds]
            )
            entry["teacher_mass"] = _over_seeds([by_seed[s]["selection"]["teacher_mass_mean"] for s in seeds])
        table[key] = entry
    if samples:
        add_hallucination(table, runs, samples, n_boot)
    return table


def _over_seeds(values: Sequence[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


# ------------------------------------------------------------------------------------ rendering


def _cell(s: dict[str, Any] | None, ci: bool = True) -> str:
    if not s or s.get("mean") is None or (isinstance(s["mean"], float) and math.isnan(s["mean"])):
        return "-"
    text = f"{s['mean']:.1f} ± {s['sd']:.1f}"
    if ci and s.get("ci"):
        text += f" [{s['ci'][0]:.1f}, {s['ci'][1]:.1f}]"
    return text


def _delta(d: dict[str, Any] | None) -> str:
    if not d or d.get("mean") is None:
        return "-"
    return f"{d['mean']:+.1f} [{d['ci'][0]:+.1f}, {d['ci'][1]:+.1f}]" if d.get("ci") else f"{d['mean']:+.1f}"


def render(payload: dict[str, Any]) -> str:
    """The Markdown report: main table, per-question-type table, selection table, settings."""
    st, table = payload["settings"], payload["table"]
    lines = [
        "# Ablation (paper Table 3) on SynthUS, tiny preset",
        "",
        f"SynthUS {'hard' if st['hard'] else 'default'} ({st['reports']} reports, data seed 0); "
        f"seeds {', '.join(map(str, st['seeds']))}; steps stage1/stage2: "
        f"{st['steps1'] or 'preset'}/{st['steps2'] or 'preset'}; {st['eval_questions']} test questions; "
        f"frame selection on {st['selection_reports']} held-out reports. Strict mode, x100. "
        "Cells: mean ± sd over seeds [95% bootstrap CI over questions of the seed-averaged score]; "
        "Δ: paired difference to the full model [95% CI].",
        "",
        "| variant | EM | F1 | BLEU | ΔF1 vs full | site acc. | valid frame (selector) |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in table.values():
        m = e["metrics"]
        sel = e.get("selector_rate")
        sel_txt = f"{sel['mean']:.1f} ± {sel['sd']:.1f}" if sel else "-"
        lines.append(
            f"| {e['label']} | {_cell(m.get('overall.exact_match'))} | {_cell(m.get('overall.f1'))} | "
            f"{_cell(m.get('overall.bleu'))} | {_delta(e['delta_vs_full'].get('overall.f1'))} | "
            f"{_cell(m.get('site.site_accuracy'), ci=False)} | {sel_txt} |"
        )
    lines += ["", "Per question type (mean ± sd over seeds):", ""]
    lines += [
        "| variant | " + " | ".join(f"{t} {m}" for t in EVAL_TYPES for m in ("EM", "F1", "BLEU")) + " |",
        "|---|" + "---|" * (3 * len(EVAL_TYPES)),
    ]
    for e in table.values():
        cells = [_cell(e["metrics"].get(f"{t}.{m}"), ci=False) for t in EVAL_TYPES for m in METRICS]
        lines.append(f"| {e['label']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Frame selection on informative held-out reports (k > 1, valid and invalid frames): how often "
        "the frame sent to the LLM is valid; the attention teacher's own argmax on the same reports; "
        "teacher peak = max of softmax(Norm(s_attn) / T) x k (1.0 = uniform).",
        "",
        "| variant | n | selector | selector, pooled over seeds [95% CI] | random | lift [95% CI] | teacher argmax | teacher peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in table.values():
        if "selector_rate" not in e:
            continue
        teacher = _cell(e.get("teacher_rate"), ci=False)
        peak = e.get("teacher_peak_over_uniform")
        peak_txt = f"{peak['mean']:.2f}" if peak else "-"
        pooled = e.get("selector_pooled")
        pooled_txt = lift_txt = "-"
        if pooled and pooled.get("ci"):
            pooled_txt = f"{pooled['rate']:.1f} [{pooled['ci'][0]:.1f}, {pooled['ci'][1]:.1f}]"
            lift = pooled["rate"] - pooled["random"]
            lift_txt = f"{lift:+.1f} [{pooled['lift_ci'][0]:+.1f}, {pooled['lift_ci'][1]:+.1f}]"
        lines.append(
            f"| {e['label']} | {e['n_informative']} | {_cell(e['selector_rate'], ci=False)} | {pooled_txt} | "
            f"{e['random_rate']:.1f} | {lift_txt} | {teacher} | {peak_txt} |"
        )
    if any("hallucination.chair_i" in e["metrics"] for e in table.values()):
        lines += [
            "",
            "Hallucination (eval/hallucination.py, docs/metrics.md): findings the answers invent (CHAIR-i: "
            "share of stated findings absent from the report; CHAIR-s: share of answers with one), omit, "
            "put on the wrong side or mis-size; mean ± sd over seeds [95% CI over questions]; Δ vs full.",
            "",
            "| variant | CHAIR-i | CHAIR-s | omission | wrong side | size error | ΔCHAIR-i vs full |",
            "|---|---|---|---|---|---|---|",
        ]
        for e in table.values():
            m = e["metrics"]
            lines.append(
                f"| {e['label']} | {_cell(m.get('hallucination.chair_i'))} | {_cell(m.get('hallucination.chair_s'))} | "
                f"{_cell(m.get('hallucination.omission'))} | {_cell(m.get('hallucination.wrong_side'), ci=False)} | "
                f"{_cell(m.get('hallucination.size_error'), ci=False)} | "
                f"{_delta(e['delta_vs_full'].get('hallucination.chair_i'))} |"
            )
    with_variants = [e for e in table.values() if e.get("teacher_variants")]
    if with_variants:
        names = list(with_variants[0]["teacher_variants"])
        lines += [
            "",
            "Teacher definitions on the same checkpoints (argmax picks a valid frame, %, mean ± sd over "
            "seeds): which text the teacher reads x relevance ('mass' = total attention on the image, "
            "'peak' = the most-attended image token).",
            "",
            "| variant | " + " | ".join(n.removeprefix("teacher_").replace("_", ", ") for n in names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for e in with_variants:
            cells = [_cell(e["teacher_variants"].get(n), ci=False) for n in names]
            lines.append(f"| {e['label']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Row overrides: `{json.dumps(st['row_overrides'])}`",
        f"Wall time: {payload['seconds']:.0f} s",
        "",
    ]
    return "\n".join(lines)


def merge_results(folders: Sequence[Path], out: Path, n_boot: int = 1000) -> dict[str, Any]:
    """Combine ablations run separately (e.g. one process per seed, same data and settings) into one
    results.json / results.md in `out`. Every folder must hold the same rows' settings."""
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    first = None
    secs = 0.0
    for folder in folders:
        path = Path(folder) / "results.json"
        if not path.is_file():
            raise ConfigError(f"{path} not found; run `llava-ultra ablate --out {folder}` first")
        payload = json.loads(path.read_text(encoding="utf-8"))
        st = payload["settings"]
        if first is None:
            first = st
        for key in ("reports", "hard", "steps1", "steps2", "eval_questions"):
            if st.get(key) != first.get(key):
                raise ConfigError(
                    f"{folder}: {key}={st.get(key)} differs from {first.get(key)}; merge like runs only"
                )
        for key, by_seed in payload["runs"].items():
            for seed, result in by_seed.items():
                runs.setdefault(key, {})[int(seed)] = {
                    **result,
                    "frames": payload["frames"][key][seed],
                    "answers": payload.get("answers", {}).get(key, {}).get(seed, []),
                }
        secs += payload.get("seconds", 0.0)
    keys = check_rows(list(runs))
    opts = AblateOptions(
        out=Path(out), rows=keys, seeds=sorted({s for v in runs.values() for s in v}), reports=first["reports"],
        steps1=first["steps1"], steps2=first["steps2"], hard=first["hard"], overrides=first.get("overrides", []),
        n_boot=n_boot, encoders=first.get("encoders", "pretrained"),
    )  # fmt: skip
    merged = _payload(
        opts, keys, {k: runs[k] for k in keys}, first["eval_questions"], first["selection_reports"], secs
    )
    Path(out).mkdir(parents=True, exist_ok=True)
    _write(Path(out), merged)
    return merged
