"""Scoring throughput of eval/metrics.py on synthetic Chinese and English Med-VQA answers.

For each language it builds `--n` (default 100k) prediction/reference pairs from ultrasound
report templates (about 40% closed yes/no questions, predictions that copy, paraphrase, cut or
pad the reference), then times `metrics.score()` in both modes against a baseline measured in
the same run: a bare loop that whitespace-splits both strings and counts shared tokens. Caches
are cleared before every timed run, so each one pays for its own normalisation and jieba
start-up. Prints JSON and rewrites the `metrics` section of docs/performance.md (only the text
between `<!-- metrics:begin -->` and `<!-- metrics:end -->`; the file is created if missing).

    python benchmarks/metric_throughput.py            # 100k pairs per language
    python benchmarks/metric_throughput.py --n 2000 --no-write
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import re
import sys
import time
from pathlib import Path

from llava_ultra.eval import metrics
from llava_ultra.sites import FINDING_TYPES, SITES

BEGIN, END = "<!-- metrics:begin -->", "<!-- metrics:end -->"
ROOT = Path(__file__).resolve().parents[1]

EN_SIDES = ["left", "right", "upper", "lower", "middle"]
ZH_SIDES = ["左侧", "右侧", "左叶", "右叶", "上极", "下极"]
ZH_EXTRAS = [
    "边界清",
    "形态规则",
    "边界不清",
    "后方回声增强",
    "伴声影",
    "CDFI：未见明显血流信号",
    "TI-RADS 3类",
]
EN_EXTRAS = [
    "well defined",
    "regular shape",
    "posterior acoustic enhancement",
    "no internal flow",
    "TI-RADS 3",
]


def _en_pair(rng: random.Random) -> tuple[str, str, str]:
    if rng.random() < 0.4:
        ref = rng.choice(["yes", "no"])
        finding = rng.choice(list(FINDING_TYPES.values()))[1]
        pred = rng.choice(
            [
                ref,
                f"{ref.capitalize()}.",
                f"Yes, there is a {finding}.",
                "No obvious abnormality.",
                "No, it is normal.",
            ]
        )
        return pred, ref, "CLOSED"
    site = rng.choice(list(SITES.values()))[1]
    finding = rng.choice(list(FINDING_TYPES.values()))[1]
    size = f"{rng.uniform(0.3, 5.0):.1f}"
    ref = f"a {size} cm {finding} in the {rng.choice(EN_SIDES)} {site}"
    r = rng.random()
    if r < 0.3:
        pred = ref
    elif r < 0.6:
        pred = f"There is a {finding} in the {rng.choice(EN_SIDES)} {site}, {rng.choice(EN_EXTRAS)}."
    elif r < 0.8:
        pred = " ".join(rng.sample(ref.split(), k=max(1, len(ref.split()) // 2)))
    else:
        pred = f"{ref}, {rng.choice(EN_EXTRAS)}, {rng.choice(EN_EXTRAS)}. Follow-up is recommended."
    return pred, ref, "OPEN"


def _zh_pair(rng: random.Random) -> tuple[str, str, str]:
    if rng.random() < 0.4:
        ref = rng.choice(["是", "否"])
        finding = rng.choice(list(FINDING_TYPES.values()))[0]
        pred = rng.choice([ref, "是的，可见" + finding, "否，未见明显异常", "没有", "有"])
        return pred, ref, "CLOSED"
    site = rng.choice(list(SITES.values()))[0]
    finding = rng.choice(list(FINDING_TYPES.values()))[0]
    size = f"{rng.uniform(0.3, 5.0):.1f}"
    ref = f"{site}{rng.choice(ZH_SIDES)}{finding}，大小约{size}cm"
    r = rng.random()
    if r < 0.3:
        pred = ref
    elif r < 0.6:
        pred = f"{site}{rng.choice(ZH_SIDES)}可见{finding}，{rng.choice(ZH_EXTRAS)}"
    elif r < 0.8:
        pred = f"{site}{finding}"
    else:
        pred = f"{ref}，{rng.choice(ZH_EXTRAS)}，{rng.choice(ZH_EXTRAS)}，建议随访。"
    return pred, ref, "OPEN"


def make_pairs(language: str, n: int, seed: int) -> tuple[list[str], list[str], list[str]]:
    """`n` synthetic (prediction, reference, answer type) triples in `language`."""
    rng = random.Random(seed)
    make = _zh_pair if language == "zh" else _en_pair
    preds, refs, kinds = zip(*(make(rng) for _ in range(n)), strict=True)
    return list(preds), list(refs), list(kinds)


def _baseline(preds: list[str], refs: list[str]) -> float:
    """Trivial whitespace-split overlap loop: the floor any scorer pays to touch every pair."""
    start = time.perf_counter()
    shared = 0
    for p, r in zip(preds, refs, strict=True):
        shared += len(set(p.split()) & set(r.split()))
    return time.perf_counter() - start


def _clear_caches() -> None:
    for fn in (
        metrics.llava_med_normalize,
        metrics.normalize_strict,
        metrics.tokenize,
        metrics._jieba_tokenizer,
    ):
        fn.cache_clear()


def run(n: int, seed: int) -> dict:
    """Time every (language, mode) on `n` pairs; returns the JSON-ready result."""
    rows = []
    for language in ("en", "zh"):
        preds, refs, kinds = make_pairs(language, n, seed)
        langs = [language] * n
        base = _baseline(preds, refs)
        for mode in metrics.MODES:
            _clear_caches()
            start = time.perf_counter()
            result = metrics.score(preds, refs, kinds, langs, mode=mode)
            seconds = time.perf_counter() - start
            rows.append(
                {
                    "language": language,
                    "mode": mode,
                    "tokenizer": result["tokenizer"],
                    "pairs": n,
                    "n_open": result["n_open"],
                    "seconds": round(seconds, 3),
                    "pairs_per_s": round(n / seconds),
                    "baseline_seconds": round(base, 4),
                    "slowdown_vs_baseline": round(seconds / base, 1),
                    "f1": round(result["f1"], 2),
                    "closed_accuracy": round(result["closed_accuracy"], 2),
                }
            )
    return {
        "benchmark": "metric_throughput",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "seed": seed,
        "baseline": "whitespace split + shared-token count per pair, same pairs, same run",
        "results": rows,
    }


def markdown(report: dict) -> str:
    """The docs/performance.md section for `report`."""
    lines = [
        "## Metric scoring throughput (`benchmarks/metric_throughput.py`)",
        "",
        f"Synthetic ultrasound answers, {report['results'][0]['pairs']:,} pairs per language (about 40% closed),",
        "`metrics.score()` end to end (normalise, tokenise, all metrics, corpus sacreBLEU), cold caches.",
        f"Baseline: {report['baseline']}. Python {report['python']} on {report['machine']}, shared CPU.",
        "",
        "| language | mode | tokenizer | seconds | pairs/s | baseline s | x baseline |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['language']} | {r['mode']} | {r['tokenizer']} | {r['seconds']:.2f} | {r['pairs_per_s']:,} "
            f"| {r['baseline_seconds']:.3f} | {r['slowdown_vs_baseline']:.0f} |"
        )
    lines += [
        "",
        "Reproduce: `python benchmarks/metric_throughput.py` (add `--n 2000 --no-write` for a quick look).",
    ]
    return "\n".join(lines)


def write_section(path: Path, body: str) -> None:
    """Replace only the text between the metrics markers in `path`, creating either if missing."""
    block = f"{BEGIN}\n{body}\n{END}"
    text = path.read_text("utf-8") if path.exists() else "# Performance\n"
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, "utf-8")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="pairs per language")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "performance.md")
    parser.add_argument("--no-write", action="store_true", help="print JSON only")
    args = parser.parse_args(argv)
    report = run(args.n, args.seed)
    print(json.dumps(report, indent=2, ensure_ascii=False))
    if not args.no_write:
        write_section(args.out, markdown(report))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
