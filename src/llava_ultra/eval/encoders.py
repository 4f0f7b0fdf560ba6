"""Encoder quality on held-out frames, pretrained against random-init (same architecture, same data).

Three measurements, each on the corpus's `val` frames (reports never seen in pretraining):

- **zero-shot site accuracy** (CLIP): each frame is assigned the site whose prompt
  "<site> ultrasound." has the most similar text embedding; chance is 1 / number of sites.
- **validity linear-probe AUC** (CLIP, SAM, both): frozen features as LLaVA-Ultra reads them (CLIP's
  `select_layer` patch tokens, SAM's neck grid; each mean- and max-pooled over tokens), a logistic
  regression fitted on the train frames of reports with a finding (label: the frame shows it),
  AUC on the val frames of such reports. 0.5 = no readable validity signal.
- **lesion Dice** (SAM): the mask decoder's lesion prediction against the lesion label, pooled
  over val frames that show a lesion (2|P∩G| / (|P|+|G|)); for the random-init encoder, the same
  light decoder is fitted on its frozen features for the same number of steps (a probe), since a
  random decoder would say nothing about the encoder.

All functions take a folder written by `pretrain-encoders`; `random_like` builds the random-init
twins from the same configs with a fixed seed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data.frames import FrameCorpus, read_frames


def auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney, ties counted half); None without both classes."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return None
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    allv = np.concatenate([pos, neg])[order]
    i = 0
    while i < len(allv):  # average ranks over ties
        j = i
        while j + 1 < len(allv) and allv[j + 1] == allv[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def logistic_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, l2: float = 1e-2,
                   steps: int = 300, seed: int = 0) -> np.ndarray:  # fmt: skip
    """Fit a standardised L2 logistic regression (full-batch LBFGS) and return test logits."""
    torch.manual_seed(seed)
    xt = torch.tensor(x_train, dtype=torch.float64)
    mu, sd = xt.mean(0), xt.std(0).clamp(min=1e-6)
    xt = (xt - mu) / sd
    xs = (torch.tensor(x_test, dtype=torch.float64) - mu) / sd
    y = torch.tensor(y_train, dtype=torch.float64)
    w = torch.zeros(xt.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(xt @ w + b, y) + l2 * (w @ w)
        loss.backward()
        return loss

    opt.step(closure)
    return (xs @ w + b).detach().numpy()


# --------------------------------------------------------------------------------- features


def _towers(folder: Path, random_init: bool) -> tuple[Any, Any, Any]:
    from transformers import CLIPVisionModel, SamVisionModel

    folder = Path(folder)
    sam_dir = folder / "sam"
    if random_init:
        torch.manual_seed(1234)
        clip = CLIPVisionModel(CLIPVisionModel.config_class.from_pretrained(str(folder / "clip")))
        sam = (
            SamVisionModel(SamVisionModel.config_class.from_pretrained(str(sam_dir)))
            if sam_dir.is_dir()
            else None
        )
    else:
        clip = CLIPVisionModel.from_pretrained(str(folder / "clip"))
        sam = SamVisionModel.from_pretrained(str(sam_dir)) if sam_dir.is_dir() else None
    return clip.eval(), (sam.eval() if sam is not None else None), folder


@torch.no_grad()
def frame_features(folder: Path, corpus: FrameCorpus, records: list[Any], random_init: bool = False,
                   batch: int = 128) -> dict[str, np.ndarray]:  # fmt: skip
    """Pooled frozen features per frame: 'clip' (mean+max of select_layer patch tokens), 'clip_cls'
    (projected CLS embedding), 'sam' (mean+max of the neck grid), and 'sam_grid' for the decoder."""
    from PIL import Image

    from ..config import SamConfig, VisionConfig, from_dict
    from ..model.vision import ImageProcessor, clip_tokens

    saved = _saved_config(folder)
    vision = from_dict(VisionConfig, saved["vision"], "vision")
    clip, sam, _ = _towers(folder, random_init)
    proc = ImageProcessor(vision, from_dict(SamConfig, saved["sam"], "sam"))
    out: dict[str, list[np.ndarray]] = {"clip": [], "clip_pooled": [], "sam": [], "sam_grid": []}
    for start in range(0, len(records), batch):
        images = []
        for r in records[start : start + batch]:
            with Image.open(corpus.root / r.image) as im:
                images.append(im.convert("RGB"))
        px = proc(images)
        tokens = clip_tokens(clip, px["pixel_values_clip"], vision.select_layer, vision.select_feature)
        out["clip"].append(torch.cat([tokens.mean(1), tokens.amax(1)], -1).numpy())
        out["clip_pooled"].append(clip(pixel_values=px["pixel_values_clip"]).pooler_output.numpy())
        if sam is not None and px["pixel_values_sam"] is not None:
            grid = sam(pixel_values=px["pixel_values_sam"]).last_hidden_state  # (B, C, G, G)
            out["sam"].append(torch.cat([grid.mean((2, 3)), grid.amax((2, 3))], -1).numpy())
            out["sam_grid"].append(grid.numpy())
    return {k: np.concatenate(v) for k, v in out.items() if v}


def _saved_config(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "pretrain_config.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------- measures


@torch.no_grad()
def zero_shot_sites(folder: Path, pooled: np.ndarray, sites: list[str], random_init: bool = False) -> float:
    """Accuracy of nearest-prompt site classification from CLIP pooled outputs (B, Hc)."""
    from ..model.pretrain_heads import TextTower, load_text_tower
    from ..sites import SITES

    tok, tower, vproj, _ = load_text_tower(folder)
    if random_init:
        torch.manual_seed(4321)
        fresh = TextTower(_saved_config(folder)["text"], len(tok), tok.pad_token_id, vproj.shape[0])
        tower, vproj = fresh.eval(), torch.randn_like(vproj) * 0.02
    names = sorted(SITES)
    prompts = [f"{SITES[s][1]} ultrasound." for s in names]
    enc = tok(prompts, padding=True, return_tensors="pt")
    text = tower(enc["input_ids"], enc["attention_mask"])  # (S, E)
    img = F.normalize(torch.tensor(pooled, dtype=torch.float32) @ vproj.t(), dim=-1)  # (B, E)
    pred = (img @ text.t()).argmax(1).tolist()
    return float(np.mean([names[p] == s for p, s in zip(pred, sites, strict=True)]))


def lesion_dice(pred: np.ndarray, target: np.ndarray, lesion: int = 2) -> float | None:
    """Pooled Dice of label `lesion` over frames that show it: 2|P∩G| / (|P|+|G|)."""
    has = (target == lesion).reshape(len(target), -1).any(1)
    if not has.any():
        return None
    p, g = pred[has] == lesion, target[has] == lesion
    return float(2 * (p & g).sum() / max(1, p.sum() + g.sum()))


def _masks(corpus: FrameCorpus, records: list[Any], side: int) -> np.ndarray:
    from PIL import Image

    from ..model.pretrain_heads import downsample_labels

    out = []
    for r in records:
        with Image.open(corpus.root / r.mask) as im:
            out.append(downsample_labels(np.asarray(im.convert("L"), dtype=np.int64), side))
    return np.stack(out)


def fit_decoder_probe(grids: np.ndarray, masks: np.ndarray, labels: int, steps: int = 300, seed: int = 0):
    """Fit the light mask decoder alone on frozen SAM grids (the random-init baseline)."""
    from ..model.pretrain_heads import MaskDecoder, mask_loss

    torch.manual_seed(seed)
    dec = MaskDecoder(grids.shape[1], labels)
    opt = torch.optim.AdamW(dec.parameters(), lr=3e-3)
    g, m = torch.tensor(grids), torch.tensor(masks)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(g), (min(64, len(g)),), generator=gen)
        loss, _ = mask_loss(dec(g[idx]), m[idx], 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return dec.eval()


def _lesion_report(record: Any) -> bool:
    """Frames whose validity is a question: those of reports with a finding (unknown: included)."""
    return record.meta.get("report_finding", "?") != "none"


def evaluate_encoders(
    folder: Path, corpus_path: Path, max_frames: int = 1500, decoder_steps: int = 300
) -> dict[str, Any]:
    """Every measure above for the pretrained encoders in `folder` and their random-init twins."""
    from ..model.pretrain_heads import load_mask_decoder

    corpus = read_frames(corpus_path)
    train = corpus.split("train")[:max_frames]
    val = corpus.split("val")[:max_frames]
    result: dict[str, Any] = {"frames": {"train": len(train), "val": len(val)}}
    for kind in ("pretrained", "random_init"):
        rnd = kind == "random_init"
        ftr = frame_features(folder, corpus, train, rnd)
        fva = frame_features(folder, corpus, val, rnd)
        part: dict[str, Any] = {}
        sites = [r.site for r in val]
        if all(sites):
            part["zero_shot_site_accuracy"] = zero_shot_sites(folder, fva["clip_pooled"], sites, rnd)
            part["zero_shot_chance"] = 1 / len(set(r.site for r in corpus.records))
        tr_idx = [i for i, r in enumerate(train) if r.valid is not None and _lesion_report(r)]
        va_idx = [i for i, r in enumerate(val) if r.valid is not None and _lesion_report(r)]
        ytr = np.array([bool(train[i].valid) for i in tr_idx])
        yva = np.array([bool(val[i].valid) for i in va_idx])
        for name, keys in (("clip", ("clip",)), ("sam", ("sam",)), ("clip+sam", ("clip", "sam"))):
            if not all(k in ftr for k in keys) or len(set(ytr.tolist())) < 2:
                continue
            xtr = np.concatenate([ftr[k][tr_idx] for k in keys], 1)
            xva = np.concatenate([fva[k][va_idx] for k in keys], 1)
            part[f"validity_auc_{name}"] = auc(logistic_probe(xtr, ytr, xva), yva)
        part["validity_frames"] = {"train": len(tr_idx), "val": len(va_idx)}
        if "sam_grid" in fva and any(r.mask for r in val):
            side = 4 * fva["sam_grid"].shape[-1]
            mva = _masks(corpus, val, side)
            if rnd:
                mtr = _masks(corpus, train, side)
                dec = fit_decoder_probe(
                    ftr["sam_grid"], mtr, int(max(mtr.max(), mva.max())) + 1, decoder_steps
                )
            else:
                dec = load_mask_decoder(folder)
            with torch.no_grad():
                pred = dec(torch.tensor(fva["sam_grid"])).argmax(1).numpy()
            part["lesion_dice"] = lesion_dice(pred, mva)
            part["organ_dice"] = lesion_dice(pred, mva, lesion=1)
        result[kind] = part
    return result


def render_quality(q: dict[str, Any]) -> str:
    """A small markdown table of `evaluate_encoders` output."""
    rows = [
        ("zero-shot site accuracy (CLIP)", "zero_shot_site_accuracy"),
        ("validity probe AUC, CLIP features", "validity_auc_clip"),
        ("validity probe AUC, SAM features", "validity_auc_sam"),
        ("validity probe AUC, CLIP + SAM", "validity_auc_clip+sam"),
        ("lesion Dice (SAM + decoder)", "lesion_dice"),
        ("organ Dice (SAM + decoder)", "organ_dice"),
    ]

    def cell(kind: str, key: str) -> str:
        v = q.get(kind, {}).get(key)
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"

    lines = ["| measure (x100, held-out frames) | random-init | pretrained |", "|---|---:|---:|"]
    lines += [f"| {name} | {cell('random_init', key)} | {cell('pretrained', key)} |" for name, key in rows]
    chance = q.get("pretrained", {}).get("zero_shot_chance")
    if chance:
        lines.append(f"\nZero-shot chance: {100 * chance:.1f}. Frames: {q['frames']}.")
    return "\n".join(lines)
