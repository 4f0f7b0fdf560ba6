"""Frame selection of finished ablation runs on a larger, fresh held-out SynthUS set.

`llava-ultra ablate` measures selection on its own val + test reports (a few dozen informative
ones at 300 reports). This script re-measures every finished checkpoint of an ablation folder on a
new SynthUS set drawn with another data seed (reports no run trained on), so the selection rates
get tight confidence intervals. Per row: the selector's valid-frame rate pooled over seeds with a
95% bootstrap CI over reports, random choice, the lift, the teacher's argmax rate for each teacher
definition, and the within-report AUC of the selector's scores.

Run: python benchmarks/selection_heldout.py --ablation runs/ablate --reports 400 --seed 1 [--hard]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from llava_ultra.data.synth import generate
from llava_ultra.eval.metrics import bootstrap_ci
from llava_ultra.eval.synthus import TEACHER_VARIANTS, frame_diagnostics, selection_reports
from llava_ultra.model.checkpoint import load_checkpoint
from llava_ultra.recipes.quickstart import quickstart_synth


def informative(d: dict) -> bool:
    return len(d["valid"]) > 1 and any(d["valid"]) and not all(d["valid"])


def within_report_auc(diag: list[dict], key: str = "scores") -> float | None:
    """P(score of a valid frame > score of an invalid frame of the same report), ties half."""
    wins = total = 0.0
    for d in diag:
        if key not in d or not informative(d):
            continue
        s, v = np.asarray(d[key]), np.asarray(d["valid"], bool)
        diff = s[v][:, None] - s[~v][None, :]
        wins += float((diff > 0).sum() + 0.5 * (diff == 0).sum())
        total += diff.size
    return wins / total if total else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ablation", type=Path, required=True, help="an `llava-ultra ablate --out` folder")
    ap.add_argument("--reports", type=int, default=400)
    ap.add_argument("--seed", type=int, default=1, help="data seed of the fresh set (the ablation uses 0)")
    ap.add_argument("--hard", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    runs = sorted(p for p in (args.ablation / "runs").iterdir() if (p / "stage2").is_dir())
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp), quickstart_synth(args.reports, args.seed, args.hard))
        reports = selection_reports(Path(tmp), ("train", "val", "test"))
        for run in runs:
            row, seed = run.name.rsplit("-seed", 1)
            model, tok = load_checkpoint(run / "stage2")
            diag = frame_diagnostics(
                model, tok, reports, Path(tmp), with_teacher=model.config.selector.mode != "none"
            )
            out.setdefault(row, {})[seed] = diag
            print(f"{run.name}: done ({time.perf_counter() - t0:.0f}s)", flush=True)
    table = {}
    for row, by_seed in out.items():
        seeds = sorted(by_seed)
        info = [i for i, d in enumerate(by_seed[seeds[0]]) if informative(d)]
        hits = np.array(
            [
                [np.mean([by_seed[s][i]["valid"][j] for j in by_seed[s][i]["selected"]]) for i in info]
                for s in seeds
            ]
        )
        per_report = 100 * hits.mean(0)
        chance = np.array([100 * np.mean(by_seed[seeds[0]][i]["valid"]) for i in info])
        entry = {
            "n": len(info),
            "seeds": seeds,
            "selector": float(per_report.mean()),
            "selector_ci": list(bootstrap_ci(per_report.tolist(), n=2000)),
            "selector_per_seed": [float(100 * h.mean()) for h in hits],
            "random": float(chance.mean()),
            "lift_ci": list(bootstrap_ci((per_report - chance).tolist(), n=2000)),
            "score_auc": [within_report_auc(by_seed[s]) for s in seeds],
        }
        for name in TEACHER_VARIANTS:
            rates = []
            for s in seeds:
                picks = [
                    by_seed[s][i]["valid"][int(np.argmax(by_seed[s][i][name]))]
                    for i in info
                    if name in by_seed[s][i]
                ]
                if picks:
                    rates.append(100 * float(np.mean(picks)))
            if rates:
                entry[name] = {"mean": float(np.mean(rates)), "per_seed": rates}
        table[row] = entry
    print(
        f"fresh SynthUS {'hard' if args.hard else 'default'} set: {args.reports} reports, data seed {args.seed}"
    )
    print(
        f"{'row':12} {'n':>4} {'selector [95% CI]':>24} {'random':>7} {'lift [95% CI]':>22} {'teacher(findings,mass)':>23} score AUC"
    )
    for row, e in table.items():
        lift = e["selector"] - e["random"]
        teacher = e.get("teacher_findings_mass", {}).get("mean")
        print(
            f"{row:12} {e['n']:4d} {e['selector']:6.1f} [{e['selector_ci'][0]:.1f}, {e['selector_ci'][1]:.1f}]"
            f" {e['random']:7.1f} {lift:+6.1f} [{e['lift_ci'][0]:+.1f}, {e['lift_ci'][1]:+.1f}]"
            f" {'-' if teacher is None else f'{teacher:.1f}':>23} {e['score_auc']}"
        )
    if args.json:
        payload = {"ablation": str(args.ablation), "reports": args.reports, "seed": args.seed, "hard": args.hard,
                   "table": table, "seconds": time.perf_counter() - t0}  # fmt: skip
        args.json.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
