"""Per-report latency of adaptive frame selection vs naive multi-image input (issue 3 benchmark).

For k = 1, 4, 8 frames per report, one model size and one run:
  adaptive : encode all k frames, score them, send ONE frame's tokens into the LLM (mode 'feature')
  naive    : send every frame's tokens into the LLM (mode 'none', none_strategy 'all')
Both models share every weight (the naive one simply has no scorer), so only the data path differs.
We time greedy generation of `--new-tokens` tokens for one report, median of `--repeats` runs, and
print the prefill visual-token counts. Results are ratios naive/adaptive measured in the same run;
`--write-docs` puts the table into docs/performance.md between markers.

    python benchmarks/selection_latency.py [--preset configs/tiny.yaml] [--repeats 7] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from llava_ultra.config import apply_overrides, load_config, model_config_from_dict, to_dict
from llava_ultra.model.tokenizer import build_tiny_tokenizer
from llava_ultra.model.ultra import build_model

ROOT = Path(__file__).resolve().parents[1]
MARK = "selection"


def frames(k: int, size: int = 224, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).convert("RGB") for _ in range(k)
    ]


def build(preset: Path, mode: str, tokenizer, overrides: list[str]):
    model_cfg = load_config(preset).model
    data = to_dict(model_cfg)
    apply_overrides(
        data, [*overrides, f"selector.mode={mode}", "selector.none_strategy=all"], root=type(model_cfg)
    )
    torch.manual_seed(0)
    return build_model(model_config_from_dict(data), tokenizer).eval()


def time_report(model, tokenizer, k: int, new_tokens: int, repeats: int) -> tuple[float, int]:
    batch = model.prepare_inputs(tokenizer, ["USER: <image>\n请描述超声所见。 ASSISTANT:"], [frames(k)])
    visual = int((batch["input_ids"] == model.config.image_token_id).sum())
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        model.generate(**batch, max_new_tokens=new_tokens, eos_token_id=-1)
        if i:  # first run warms up
            times.append(time.perf_counter() - t0)
    return statistics.median(times), visual


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", type=Path, default=ROOT / "configs" / "tiny.yaml")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model override relative to the model section, e.g. llm.inline.hidden_size=512",
    )
    parser.add_argument("--label", default="tiny", help="name of this setting in the docs table")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    tokenizer = build_tiny_tokenizer(
        ["甲状腺右叶见一低回声结节。", "USER: ASSISTANT: liver kidney"] * 8, 1024
    )
    overrides = list(args.set)
    adaptive = build(args.preset, "feature", tokenizer, overrides)
    naive = build(args.preset, "none", tokenizer, overrides)
    # share all weights: the naive model is the adaptive one without its scorer
    missing, unexpected = naive.load_state_dict(adaptive.state_dict(), strict=False)
    assert not missing and all(k.startswith("selector.") for k in unexpected), (missing, unexpected)

    rows = []
    for k in args.ks:
        t_ad, v_ad = time_report(adaptive, tokenizer, k, args.new_tokens, args.repeats)
        t_nv, v_nv = time_report(naive, tokenizer, k, args.new_tokens, args.repeats)
        rows.append(
            {
                "k": k,
                "adaptive_ms": round(t_ad * 1e3, 1),
                "naive_ms": round(t_nv * 1e3, 1),
                "naive_over_adaptive": round(t_nv / t_ad, 2),
                "visual_tokens_adaptive": v_ad,
                "visual_tokens_naive": v_nv,
            }
        )
    result = {
        "preset": str(args.preset.relative_to(ROOT) if args.preset.is_relative_to(ROOT) else args.preset),
        "label": args.label,
        "overrides": overrides,
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "repeats": args.repeats,
        "rows": rows,
    }
    print(json.dumps(result, indent=2))
    if args.write_docs:
        write_docs(result)
    return result


def write_docs(result: dict) -> None:
    import shlex

    label = result["label"]
    begin, end = f"<!-- {MARK}-{label}:begin -->", f"<!-- {MARK}-{label}:end -->"
    # every argument the run used, defaults included, so the shown command reproduces the table
    args = [
        "--label",
        label,
        "--preset",
        result["preset"],
        "--ks",
        *(str(r["k"]) for r in result["rows"]),
        "--new-tokens",
        str(result["new_tokens"]),
        "--repeats",
        str(result["repeats"]),
        "--threads",
        str(result["threads"]),
        *(part for item in result["overrides"] for part in ("--set", item)),
        "--write-docs",
    ]
    command = "python benchmarks/selection_latency.py " + shlex.join(args)
    lines = [
        begin,
        f"## Adaptive selection vs naive multi-image: per-report latency ({label})",
        "",
        f"`{command}` — preset `{result['preset']}`, greedy "
        f"{result['new_tokens']} new tokens, median of {result['repeats']} runs, {result['threads']} CPU "
        "threads. Adaptive = encode all k frames, score, one frame into the LLM; naive = all k frames' "
        "tokens into the LLM. Same weights, same run.",
        "",
        "| k | adaptive (ms) | naive (ms) | naive / adaptive | visual tokens in prefill (adaptive / naive) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['k']} | {r['adaptive_ms']} | {r['naive_ms']} | {r['naive_over_adaptive']} | "
            f"{r['visual_tokens_adaptive']} / {r['visual_tokens_naive']} |"
        )
    lines += [
        "",
        "Both paths encode every frame with CLIP and SAM; the saving comes from the LLM prefill and from "
        "a KV cache that is k times shorter at every decoding step. On the real preset (576 visual tokens "
        "per image, a 13B LLM) the LLM dominates even more, so the ratio grows with model size.",
        end,
    ]
    path = ROOT / "docs" / "performance.md"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Performance\n"
    block = "\n".join(lines)
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
