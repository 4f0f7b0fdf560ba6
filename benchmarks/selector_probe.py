"""Can frame validity be read from the tiny preset's frozen vision features at all? (an upper bound)

What this owns: the linear-probe experiment behind docs/results.md, "What we found about the
selector". It builds the tiny preset's frozen random-init CLIP and SAM encoders (seeded as
training seeds them), encodes every frame of a SynthUS dataset, and fits logistic-regression
probes on the TRAIN split's per-frame validity labels (supervision the real selector never gets:
it learns from the LM loss and the attention teacher only). On held-out reports (val + test) each
probe picks its highest-scoring frame; we report how often that frame is valid on the informative
reports (k > 1, valid and invalid frames) against random choice, with 95% bootstrap CIs.

Feature sets, each with and without centring on the report's mean (validity is relative within
a report: the valid frames are the ones showing the finding):
- clip-mean / sam-mean: token-mean of CLIP patch tokens (layer -2) / of the SAM neck grid;
- clip+sam max: token-max next to the mean (a small finding lights up few tokens);
- pixels: the 32x32 grey frame, as a reference for how hard the images are.

Notable choice: plain full-batch L2-regularised logistic regression in torch (LBFGS), so no new
dependency. Run: `python benchmarks/selector_probe.py --reports 600 [--hard]`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from llava_ultra.config import load_config
from llava_ultra.data.reports import read_reports, resolve_image
from llava_ultra.data.synth import SynthConfig, generate
from llava_ultra.eval.metrics import bootstrap_ci
from llava_ultra.model.vision import ImageProcessor, build_clip, build_sam, clip_tokens, sam_grid
from llava_ultra.recipes.quickstart import default_config_path
from llava_ultra.train.checkpoint import seed_everything
from llava_ultra.train.pretrain import encoder_overrides


def encode(root: Path, seed: int, encoders: Path | None = None) -> list[dict]:
    """Per report: validity labels, split and per-frame feature sets (random-init encoders, or the
    pretrained ones in `encoders`, a `llava-ultra pretrain-encoders` folder)."""
    overrides = encoder_overrides(encoders) if encoders else []
    cfg = load_config(default_config_path(), overrides).model
    seed_everything(seed)
    clip, sam = build_clip(cfg.vision), build_sam(cfg.sam)
    proc = ImageProcessor(cfg.vision, cfg.sam)
    out = []
    for split in ("train", "val", "test"):
        for rep in read_reports(root / f"{split}.en.jsonl"):
            frames = []
            for rel in rep.images:
                with Image.open(resolve_image(root, rel)) as im:
                    frames.append(im.convert("RGB"))
            px = proc(frames)
            with torch.no_grad():
                c = clip_tokens(clip, px["pixel_values_clip"], cfg.vision.select_layer, "patch")  # (k, N, Dc)
                s = sam_grid(sam, px["pixel_values_sam"]).flatten(2).transpose(1, 2)  # (k, G*G, C)
            grey = np.stack(
                [np.asarray(f.convert("L").resize((32, 32)), dtype=np.float32) / 255 for f in frames]
            )
            out.append(
                {
                    "split": split,
                    "valid": list(rep.valid),
                    "feats": {
                        "clip-mean": c.mean(1).numpy(),
                        "sam-mean": s.mean(1).numpy(),
                        "clip+sam mean+max": torch.cat(
                            [c.mean(1), c.amax(1), s.mean(1), s.amax(1)], -1
                        ).numpy(),
                        "pixels 32x32": grey.reshape(len(frames), -1),
                    },
                }
            )
    return out


def fit_logreg(x: np.ndarray, y: np.ndarray, l2: float = 1e-2) -> tuple[np.ndarray, float]:
    xt, yt = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt) + l2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy(), float(b.detach())


def evaluate(reports: list[dict], name: str, centred: bool) -> dict:
    def rows(split_set):
        xs, ys = [], []
        for r in reports:
            if r["split"] in split_set and len(r["valid"]) > 1:
                f = r["feats"][name]
                xs.append(f - f.mean(0, keepdims=True) if centred else f)
                ys.append(np.asarray(r["valid"], dtype=np.float64))
        return xs, ys

    xs, ys = rows({"train"})
    x, y = np.concatenate(xs), np.concatenate(ys)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    w, b = fit_logreg((x - mu) / sd, y)
    hits, rand = [], []
    for f, v in zip(*rows({"val", "test"}), strict=True):
        if v.all() or not v.any():
            continue
        score = ((f - mu) / sd) @ w + b
        hits.append(float(v[int(np.argmax(score))]))
        rand.append(float(v.mean()))
    lift = [h - r for h, r in zip(hits, rand, strict=True)]
    return {
        "features": name + (" (centred in report)" if centred else ""),
        "n_informative": len(hits),
        "probe_rate": 100 * float(np.mean(hits)),
        "random_rate": 100 * float(np.mean(rand)),
        "lift": 100 * float(np.mean(lift)),
        "lift_ci": [100 * v for v in bootstrap_ci(lift, n=2000)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reports", type=int, default=600)
    ap.add_argument("--hard", action="store_true")
    ap.add_argument("--seed", type=int, default=0, help="encoder init seed (training's train.seed)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--encoders", type=Path, default=None, help="a pretrain-encoders folder (default: random init)"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        synth = SynthConfig(reports=args.reports, seed=0, k_min=1, k_max=6, image_size=128, hard=args.hard)
        generate(Path(tmp), synth)
        reports = encode(Path(tmp), args.seed, args.encoders)
    results = [evaluate(reports, name, centred) for name in reports[0]["feats"] for centred in (False, True)]
    print(
        f"SynthUS {'hard' if args.hard else 'default'}, {args.reports} reports, "
        f"encoders {args.encoders or 'random-init'}, {time.perf_counter() - t:.0f}s"
    )
    print(f"{'features':44} {'n':>4} {'probe':>6} {'random':>6} {'lift [95% CI]':>22}")
    for r in results:
        ci = f"[{r['lift_ci'][0]:+.1f}, {r['lift_ci'][1]:+.1f}]"
        print(
            f"{r['features']:44} {r['n_informative']:4d} {r['probe_rate']:6.1f} {r['random_rate']:6.1f} "
            f"{r['lift']:+6.1f} {ci:>15}"
        )
    if args.json:
        payload = {"hard": args.hard, "encoders": str(args.encoders), "results": results}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
