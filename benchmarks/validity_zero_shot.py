"""Label-free frame validity: which signal in pretrained encoders picks a report's valid frame?

Before training a selector against a teacher, measure whether the teacher could know the answer.
For each encoders folder written by `llava-ultra pretrain-encoders` and each informative report of a
fresh SynthUS set (k > 1, valid and invalid frames), every frame is scored without any training and
the argmax frame is checked against the validity labels:

- CLIP text similarity: cosine between the frame's CLIP embedding and the report's findings
  (or diagnosis) through the pretrained text tower; and "least like '<site> ultrasound. no lesion in
  this frame.'";
- SAM decoder: the lesion probability mass (sum) or peak (max) of the pretraining mask decoder.

Random choice is the mean share of valid frames. Used in docs/results.md, section 5.

Run: python benchmarks/validity_zero_shot.py DIR [DIR ...] --reports 300 --seed 1 [--hard]
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
from transformers import CLIPVisionModel, SamVisionModel

from llava_ultra.data.reports import resolve_image
from llava_ultra.data.synth import generate
from llava_ultra.eval.synthus import selection_reports
from llava_ultra.model.pretrain_heads import load_mask_decoder, load_text_tower
from llava_ultra.model.vision import ImageProcessor
from llava_ultra.recipes.quickstart import quickstart_synth
from llava_ultra.sites import SITES
from llava_ultra.train.pretrain import PretrainConfig

SIGNALS = ("clip_findings", "clip_diagnosis", "clip_not_no_lesion", "sam_lesion_mass", "sam_lesion_peak")


@torch.no_grad()
def score_folder(folder: Path, reports: list, root: Path) -> dict[str, float]:
    saved = json.loads((folder / "pretrain_config.json").read_text(encoding="utf-8"))
    cfg = PretrainConfig(**{k: v for k, v in saved.items() if k in ("vision", "sam")})
    proc = ImageProcessor(cfg.vision, cfg.sam)
    clip = CLIPVisionModel.from_pretrained(str(folder / "clip")).eval()
    tok, tower, vproj, _ = load_text_tower(folder)
    sam = SamVisionModel.from_pretrained(str(folder / "sam")).eval()
    decoder = load_mask_decoder(folder).eval()
    hits: dict[str, list[bool]] = {k: [] for k in SIGNALS}
    for rep in reports:
        frames = []
        for rel in rep.images:
            with Image.open(resolve_image(root, rel)) as im:
                frames.append(im.convert("RGB"))
        px = proc(frames)
        img = F.normalize(clip(pixel_values=px["pixel_values_clip"]).pooler_output @ vproj.t(), dim=-1)
        texts = [rep.findings, rep.diagnosis, f"{SITES[rep.site][1]} ultrasound. no lesion in this frame."]
        enc = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
        sim = img @ tower(enc["input_ids"], enc["attention_mask"]).t()  # (k, 3)
        lesion = decoder(sam(pixel_values=px["pixel_values_sam"]).last_hidden_state).softmax(1)[:, 2]
        valid = np.asarray(rep.valid)
        picks = {
            "clip_findings": sim[:, 0].argmax(),
            "clip_diagnosis": sim[:, 1].argmax(),
            "clip_not_no_lesion": sim[:, 2].argmin(),
            "sam_lesion_mass": lesion.sum((1, 2)).argmax(),
            "sam_lesion_peak": lesion.amax((1, 2)).argmax(),
        }
        for name, idx in picks.items():
            hits[name].append(bool(valid[int(idx)]))
    return {k: 100 * float(np.mean(v)) for k, v in hits.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", type=Path, nargs="+", help="`pretrain-encoders` output folders")
    ap.add_argument("--reports", type=int, default=300)
    ap.add_argument("--seed", type=int, default=1, help="data seed of the fresh set")
    ap.add_argument("--hard", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp), quickstart_synth(args.reports, args.seed, args.hard))
        reports = [
            r
            for r in selection_reports(Path(tmp), ("train", "val", "test"))
            if len(r.valid) > 1 and any(r.valid) and not all(r.valid)
        ]
        chance = 100 * float(np.mean([np.mean(r.valid) for r in reports]))
        table = {str(f): score_folder(f, reports, Path(tmp)) for f in args.folders}
    print(f"{len(reports)} informative reports; random choice {chance:.1f} %")
    print("| encoders | " + " | ".join(SIGNALS) + " |")
    print("|---|" + "---:|" * len(SIGNALS))
    for folder, row in table.items():
        print(f"| {folder} | " + " | ".join(f"{row[k]:.1f}" for k in SIGNALS) + " |")
    if args.json:
        payload = {"reports": len(reports), "random": chance, "table": table}
        args.json.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
