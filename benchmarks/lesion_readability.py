"""Can the frame selector read lesions from SAM's tokens? Teacher and student ceilings per encoder folder.

The selector's scorer is linear: a learned token weighting pools the tokens, a linear head scores
the pooled vector. It can only copy a teacher, or learn from labels, what SAM's tokens carry
linearly. For each `pretrain-encoders` folder this measures, on the informative reports (k > 1,
valid and invalid frames) of a fresh SynthUS set, how often the argmax frame is valid:

- label-free teachers from the frozen encoder and its pretraining mask decoder: the lesion
  probability mass of the dense decoder (`selector.teacher: lesion`), the same mass counting only
  what the report's other frames do not show nearby ('novelty': lesion-like anatomy present in
  every frame cancels), and the per-token head (`pretrain.token_lesion_weight`), sum and max;
- a supervised ceiling for the scorer: a fresh `Selector` (the model's own scorer design) trained
  with frame labels of a disjoint SynthUS set on SAM's tokens as the fusion sees them (average-
  pooled onto the 8x8 CLIP grid), max-pooled, and on the full 16x16 grid.

Random choice is the mean share of valid frames. Used in docs/results.md, section 1.

Run: python benchmarks/lesion_readability.py DIR [DIR ...] [--hard] [--reports 300] [--json F]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import SamVisionModel

from llava_ultra.config import SelectorConfig
from llava_ultra.data.reports import resolve_image
from llava_ultra.data.synth import generate
from llava_ultra.eval.synthus import selection_reports
from llava_ultra.model.pretrain_heads import load_mask_decoder
from llava_ultra.model.selector import Selector, group, supervised_loss
from llava_ultra.model.vision import ImageProcessor
from llava_ultra.recipes.quickstart import quickstart_synth
from llava_ultra.train.pretrain import PretrainConfig

TEACHERS = ("mass", "novelty", "token_sum", "token_max")
POOLS = ("avg8", "max8", "grid16")
WIDTHS = ((0, 6), (6, 10), (10, 999))


@torch.no_grad()
def encode_reports(folder: Path, seed: int, reports: int, hard: bool) -> list[dict]:
    """Per informative report: SAM tokens under each pooling, each teacher's per-frame relevance, labels."""
    saved = json.loads((folder / "pretrain_config.json").read_text(encoding="utf-8"))
    cfg = PretrainConfig(**{k: v for k, v in saved.items() if k in ("vision", "sam")})
    proc = ImageProcessor(cfg.vision, cfg.sam)
    sam = SamVisionModel.from_pretrained(str(folder / "sam")).eval()
    dec = load_mask_decoder(folder).eval()
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp), quickstart_synth(reports, seed, hard))
        for rep in selection_reports(Path(tmp), ("train", "val", "test")):
            if len(rep.valid) < 2 or all(rep.valid) or not any(rep.valid):
                continue
            frames = []
            for rel in rep.images:
                with Image.open(resolve_image(Path(tmp), rel)) as im:
                    frames.append(im.convert("RGB"))
            grid = sam(pixel_values=proc(frames)["pixel_values_sam"]).last_hidden_state  # (k, C, G, G)
            lesion = dec(grid).softmax(1)[:, 2:].sum(1)  # (k, S, S)
            spread = F.max_pool2d(lesion[:, None], 9, stride=1, padding=4)[:, 0]
            others = torch.stack(
                [torch.cat([spread[:j], spread[j + 1 :]]).amin(0) for j in range(len(lesion))]
            )
            token = dec.token_logits(grid).sigmoid() if dec.token is not None else None  # (k, G, G)
            teachers = {
                "mass": lesion.sum((1, 2)),
                "novelty": (lesion - others).clamp(min=0).sum((1, 2)),
                "token_sum": None if token is None else token.sum((1, 2)),
                "token_max": None if token is None else token.flatten(1).amax(1),
            }
            pools = {
                "avg8": F.adaptive_avg_pool2d(grid, 8),
                "max8": F.adaptive_max_pool2d(grid, 8),
                "grid16": grid,
            }
            out.append({
                "tokens": {k: v.flatten(2).transpose(1, 2) for k, v in pools.items()},  # (k, N, C)
                "teachers": teachers,
                "valid": torch.tensor(rep.valid),
                "width_px": (rep.meta.get("bbox") or [0, 0, 0, 0])[2] - (rep.meta.get("bbox") or [0, 0, 0, 0])[0],
            })  # fmt: skip
    return out


def pick_rate(data: list[dict], score) -> float:
    return 100 * float(np.mean([float(d["valid"][int(score(d).argmax())]) for d in data]))


def supervised_ceiling(train: list[dict], test: list[dict], pool: str, steps: int) -> float:
    torch.manual_seed(0)
    sel = Selector(SelectorConfig(), train[0]["tokens"][pool].shape[-1])
    opt = torch.optim.AdamW(sel.parameters(), lr=1e-2)
    for step in range(steps):
        idx = np.random.default_rng(step).choice(len(train), size=min(8, len(train)), replace=False)
        counts = [len(train[i]["valid"]) for i in idx]
        scores, valid = group(torch.cat([sel.score(train[i]["tokens"][pool]) for i in idx]), counts)
        labels, _ = group(torch.cat([train[i]["valid"].float() for i in idx]), counts, fill=-1.0)
        loss = supervised_loss(scores, valid, labels.long())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return pick_rate(test, lambda d: sel.score(d["tokens"][pool]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", type=Path, nargs="+", help="`pretrain-encoders` output folders")
    ap.add_argument("--reports", type=int, default=300, help="reports of the fresh test set")
    ap.add_argument("--seed", type=int, default=1, help="data seed of the fresh test set")
    ap.add_argument("--train-seed", type=int, default=3, help="data seed of the probe's training set")
    ap.add_argument("--train-reports", type=int, default=600)
    ap.add_argument("--steps", type=int, default=1000, help="steps of the supervised probe")
    ap.add_argument("--hard", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    table = {}
    for folder in args.folders:
        test = encode_reports(folder, args.seed, args.reports, args.hard)
        train = encode_reports(folder, args.train_seed, args.train_reports, args.hard)
        row = {
            "reports": len(test),
            "random": 100 * float(np.mean([d["valid"].float().mean() for d in test])),
        }
        for name in TEACHERS:
            if test[0]["teachers"][name] is not None:
                row[f"teacher {name}"] = pick_rate(test, lambda d, n=name: d["teachers"][n])
        for pool in POOLS:
            row[f"supervised {pool}"] = supervised_ceiling(train, test, pool, args.steps)
        for lo, hi in WIDTHS:  # where the mass teacher misses: by the lesion's width in the key frame
            part = [d for d in test if lo <= d["width_px"] < hi]
            if part:
                row[f"mass, lesion {lo}-{hi} px (n)"] = (
                    f"{pick_rate(part, lambda d: d['teachers']['mass']):.1f} ({len(part)})"
                )
        table[str(folder)] = row
    cols = list(dict.fromkeys(c for row in table.values() for c in row))  # first-seen order
    print("| encoders | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for folder, row in table.items():
        cells = [
            "-" if c not in row else f"{row[c]:.1f}" if isinstance(row[c], float) else str(row[c])
            for c in cols
        ]
        print(f"| {folder} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
