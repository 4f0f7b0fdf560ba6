"""Can the selector's own scorer read frame validity from a trained model's fused features?

A fresh `Selector` (token weighting + linear head, exactly the model's scorer) is trained for 300
steps on the frozen fused tokens H_v of a trained checkpoint, with the frame-validity labels of the
train split's informative reports (supervision the paper's selector never gets), and then picks a
frame on the informative val + test reports. If it reaches the supervised-probe ceiling while the
end-to-end selector stays at chance, the features and the scorer are fine and the training signal
(the attention teacher, the straight-through gradient) is what fails.

Run: python benchmarks/scorer_probe.py CHECKPOINT_DIR SYNTHUS_DIR  (e.g. an ablation's
runs/full-seed0/stage2 and its synthus/)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from llava_ultra.data.reports import read_reports, resolve_image
from llava_ultra.model.checkpoint import load_checkpoint
from llava_ultra.model.selector import Selector, group, supervised_loss


def fused_features(model, synthus: Path, split: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for rep in read_reports(synthus / f"{split}.en.jsonl"):
        if len(rep.images) < 2:
            continue
        images = []
        for rel in rep.images:
            with Image.open(resolve_image(synthus, rel)) as im:
                images.append(im.convert("RGB"))
        px = model.image_processor(images)
        with torch.no_grad():
            feats = model.encode_images(px["pixel_values_clip"], px["pixel_values_sam"])  # (k, N, D)
        out.append((feats, torch.tensor(rep.valid)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("synthus", type=Path)
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, _ = load_checkpoint(args.checkpoint)
    model.eval()

    def informative(data):
        return [x for x in data if x[1].any() and not x[1].all()]

    train = informative(fused_features(model, args.synthus, "train"))
    test = informative(
        fused_features(model, args.synthus, "val") + fused_features(model, args.synthus, "test")
    )
    result = {"checkpoint": str(args.checkpoint), "n_train": len(train), "n_test": len(test)}
    result["random"] = 100 * float(np.mean([v.float().mean() for _, v in test]))
    for name, init in (("fresh scorer", None), ("the model's scorer", model.selector.state_dict())):
        sel = Selector(model.config.selector, model.fusion.clip_projector.linear_1.out_features)
        if init is not None:
            sel.load_state_dict(init)

        def rate(data, sel=sel):
            return 100 * float(np.mean([float(v[int(sel.score(f).argmax())]) for f, v in data]))

        before = rate(test)
        opt = torch.optim.Adam(sel.parameters(), lr=2e-3)
        for step in range(args.steps):
            idx = np.random.default_rng(step).choice(len(train), size=min(16, len(train)), replace=False)
            counts = [len(train[i][1]) for i in idx]
            scores, valid = group(torch.cat([sel.score(train[i][0]) for i in idx]), counts)
            labels, _ = group(torch.cat([train[i][1].float() for i in idx]), counts, fill=-1.0)
            loss = supervised_loss(scores, valid, labels.long())
            opt.zero_grad()
            loss.backward()
            opt.step()
        result[name] = {"before": before, f"after {args.steps} supervised steps": rate(test)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
