"""`llava-ultra pretrain-encoders`: domain pretraining of the CLIP vision tower and the SAM encoder.

What the real world does before LLaVA-Ultra's two stages (CLIP on image-text pairs, SAM on masks;
hospitals adapt them BiomedCLIP- and MedSAM-style), done here on a frame corpus (data/frames.py):

- **CLIP**: contrastive image-caption training, open_clip's `ClipLoss` (symmetric cross-entropy over
  the batch's image-text similarities, learnable temperature `logit_scale`, init log(1/0.07), clamped
  at 100) with a small text tower (`CLIPTextModel`, its own byte-level BPE built on the captions).
  One change from ClipLoss: frames with the *same* caption ("liver ultrasound. no lesion in this
  frame.") are not negatives of each other; the target of each row is uniform over the batch
  entries that share its caption (for unique captions this is exactly ClipLoss).
- **SAM**: mask prediction, MedSAM-style, with a documented light decoder instead of SAM's
  prompt encoder + mask decoder (no prompts exist for a frame-level label map): the neck output
  (B, C, Gs, Gs) -> two 2x transposed convolutions -> 1x1 conv -> (B, L, 4Gs, 4Gs) label logits,
  trained with cross-entropy + soft Dice over the non-background labels (MedSAM's loss), the
  target label map resized (nearest) to 4Gs.
- Both encoders see exactly the pixels the LLaVA-Ultra model will feed them (`ImageProcessor` of
  the same `model.vision` / `model.sam` sections), so the features transfer.
- Output: `OUT/clip` (`CLIPVisionModel.save_pretrained` + CLIP `preprocessor_config.json`) and
  `OUT/sam` (`SamVisionModel.save_pretrained` + SAM `preprocessor_config.json`), the folders a
  preset loads through `model.vision.path` / `model.sam.path`; `OUT/clip_text` (text tower,
  projections, tokenizer: zero-shot evaluation) and `OUT/sam_decoder.safetensors`; `OUT/pretrain.json`
  (config, losses, corpus identity) and `OUT/encoder_quality.json` (eval/encoders.py).
- Same habits as `train`: accelerate (`Accelerator`, one process or many), a progress bar and
  `metrics.jsonl`, atomic step checkpoints under `OUT/checkpoints` with optimiser and RNG state,
  `resume=True` continues bit-exactly from the newest one.
- The default tiny encoders are built once per content hash and reused (recipes/encoders.py).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..config import SamConfig, VisionConfig, from_dict
from ..errors import ConfigError, DataError
from ..model.pretrain_heads import MaskDecoder, TextTower, downsample_labels, mask_loss, token_lesion_loss
from .checkpoint import (
    atomic_dir,
    capture_rng,
    list_checkpoints,
    prune_checkpoints,
    restore_rng,
    seed_everything,
)

PRETRAIN_VERSION = "1"
"""Bumped when the pretraining code changes what it produces (part of the cache hash)."""

TINY_VISION = {
    "inline": {"image_size": 112, "patch_size": 14, "hidden_size": 64, "intermediate_size": 128,
               "num_hidden_layers": 2, "num_attention_heads": 4, "hidden_act": "quick_gelu"},
    "image_size": 112, "patch_size": 14,
}  # fmt: skip
TINY_SAM = {
    "inline": {"image_size": 128, "patch_size": 8, "hidden_size": 32, "output_channels": 32,
               "num_hidden_layers": 2, "num_attention_heads": 2, "mlp_dim": 64, "window_size": 8,
               "global_attn_indexes": [1], "initializer_range": 0.02},
    "image_size": 128,
}  # fmt: skip


@dataclass
class PretrainConfig:
    """Encoder pretraining settings. Saved as OUT/pretrain.json."""

    vision: VisionConfig = field(default_factory=lambda: from_dict(VisionConfig, TINY_VISION, "vision"))
    """The CLIP vision tower to train (same section as a preset's `model.vision`)."""
    sam: SamConfig = field(default_factory=lambda: from_dict(SamConfig, TINY_SAM, "sam"))
    """The SAM image encoder to train (same section as `model.sam`; enabled=false skips it)."""
    text: dict[str, Any] = field(
        default_factory=lambda: {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                 "num_attention_heads": 4, "max_position_embeddings": 64}
    )  # fmt: skip
    """`CLIPTextConfig` kwargs of the small text tower (vocab_size comes from its tokenizer)."""
    embed_dim: int = 64
    """Joint image-text embedding width."""
    text_vocab: int = 600
    """Size of the caption BPE (at most; small corpora support fewer merges)."""
    steps: int = 500
    """Optimiser steps (each trains CLIP and SAM on one batch)."""
    batch_size: int = 64
    """Frames per step."""
    lr: float = 3e-3
    """Peak learning rate (cosine schedule with warm-up)."""
    weight_decay: float = 0.05
    """AdamW weight decay."""
    warmup_steps: int = 30
    """Linear warm-up steps before the cosine decay."""
    dice_weight: float = 1.0
    """Weight of the soft Dice term next to cross-entropy in the mask loss."""
    lesion_weight: float = 30.0
    """Cross-entropy weight of the labels after 'organ' (lesions: a few pixels per frame)."""
    token_lesion_weight: float = 0.0
    """Weight of the per-token lesion-presence loss (0: off). A linear 1x1 head on SAM's neck
    predicts, for each token, whether its patch holds a lesion pixel (balanced BCE against the mask
    reduced to the token grid). The dense decoder can read lesions non-linearly; this head makes
    each SAM token carry lesion presence linearly, which is what the frame selector's scorer and
    the LLM's projector read (docs/results.md). Saved with the decoder (`token_head`)."""
    report_batches: bool = False
    """Fill each batch with whole reports (all frames of a report together) instead of frames drawn
    independently. Frames of one report share site and anatomy and differ in whether the lesion is
    in view, so their captions ("... no lesion in this frame." against "... nodule in the left
    lobe ...") become each other's hard negatives and CLIP must encode the lesion, not only the site.
    Reports are read from each record's meta.report_id (a frame without one is its own report)."""
    seed: int = 0
    """Corpus and training seed."""
    save_every: int = 200
    """Write a resumable checkpoint every N steps."""
    keep_last: int = 2
    """Checkpoints kept (older ones are deleted)."""
    log_every: int = 20
    """Print the losses every N steps."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if isinstance(self.vision, dict):
            self.vision = from_dict(VisionConfig, self.vision, "vision")
        if isinstance(self.sam, dict):
            self.sam = from_dict(SamConfig, self.sam, "sam")
        for name in (
            "embed_dim",
            "text_vocab",
            "steps",
            "batch_size",
            "save_every",
            "keep_last",
            "log_every",
        ):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"pretrain.{name}={getattr(self, name)}: must be at least 1")
        if self.batch_size < 2:
            raise ConfigError("pretrain.batch_size must be at least 2 (contrastive training needs negatives)")
        if not self.lr > 0:
            raise ConfigError(f"pretrain.lr={self.lr}: use a positive learning rate")
        for name in ("warmup_steps", "weight_decay", "dice_weight", "lesion_weight", "token_lesion_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"pretrain.{name}={getattr(self, name)}: must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


# ------------------------------------------------------------------------------------ losses


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
              caption_ids: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Symmetric contrastive loss over a batch. image_emb, text_emb: (B, E) L2-normalised;
    caption_ids: (B,) equal ids for equal captions (soft targets spread over duplicates)."""
    logits = logit_scale.exp().clamp(max=100.0) * image_emb @ text_emb.t()  # (B, B)
    same = (caption_ids[:, None] == caption_ids[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    loss_i = torch.sum(-target * F.log_softmax(logits, dim=1), dim=1).mean()
    loss_t = torch.sum(-target * F.log_softmax(logits.t(), dim=1), dim=1).mean()
    return (loss_i + loss_t) / 2


# ------------------------------------------------------------------------------------ modules


class Encoders(nn.Module):
    """Everything pretraining updates: CLIP vision + projection, text tower, logit scale, SAM + decoder."""

    def __init__(self, cfg: PretrainConfig, vocab_size: int, pad_id: int, labels: int) -> None:
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel, SamVisionConfig, SamVisionModel

        if cfg.vision.inline is not None:
            self.clip = CLIPVisionModel(CLIPVisionConfig(**cfg.vision.inline))
        else:
            self.clip = CLIPVisionModel.from_pretrained(cfg.vision.path)
        self.visual_proj = nn.Linear(self.clip.config.hidden_size, cfg.embed_dim, bias=False)
        self.text = TextTower(cfg.text, vocab_size, pad_id, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.sam = self.decoder = None
        if cfg.sam.enabled:
            if cfg.sam.inline is not None:
                self.sam = SamVisionModel(SamVisionConfig(**cfg.sam.inline))
            else:
                self.sam = SamVisionModel.from_pretrained(cfg.sam.path)
            self.decoder = MaskDecoder(self.sam.config.output_channels, labels, cfg.token_lesion_weight > 0)

    def image_embed(self, pixels: torch.Tensor) -> torch.Tensor:
        pooled = self.clip(pixel_values=pixels).pooler_output  # (B, Hc), post-layernorm CLS
        return F.normalize(self.visual_proj(pooled), dim=-1)

    def forward(self, clip_pixels, caption_ids, caption_mask, caption_keys, sam_pixels, masks, dice_weight,
                lesion_weight=10.0, token_lesion_weight=0.0):  # fmt: skip
        """(contrastive loss, mask loss) of one batch; a part without data contributes an exact 0
        that still touches its parameters (data-parallel ranks must all use every parameter)."""
        zero = self.logit_scale * 0.0
        if clip_pixels is not None:
            img = self.image_embed(clip_pixels)  # (B, E)
            txt = self.text(caption_ids, caption_mask)  # (B, E)
            c_loss = clip_loss(img, txt, self.logit_scale, caption_keys)
        else:
            c_loss = zero + sum(p.sum() * 0.0 for p in (*self.clip.parameters(), *self.text.parameters()))
        m_loss = zero
        if self.sam is not None and sam_pixels is not None and masks is not None and bool((masks >= 0).any()):
            grid = self.sam(pixel_values=sam_pixels).last_hidden_state  # (B, C, G, G)
            m_loss, _ = mask_loss(self.decoder(grid), masks, dice_weight, lesion_weight)
            if self.decoder.token is not None:
                m_loss = m_loss + token_lesion_weight * token_lesion_loss(
                    self.decoder.token_logits(grid), masks
                )
        elif self.sam is not None:
            m_loss = zero + sum(p.sum() * 0.0 for p in (*self.sam.parameters(), *self.decoder.parameters()))
        return c_loss, m_loss


# -------------------------------------------------------------------------------------- data


class FrameData:
    """The training frames as model inputs: preprocessed once and kept in memory when they fit in
    `memory_limit` bytes (the tiny sizes: ~350 KB per frame), else decoded per batch. Captions are
    tokenised once. A frame that cannot be decoded is dropped from every batch and reported once in
    `bad` (index, reason): a corrupt frame in a corpus of thousands is counted, never fatal."""

    def __init__(self, records: list[Any], root: Path, cfg: PretrainConfig, tokenizer: Any,
                 mask_side: int, memory_limit: int = 2 * 1024**3) -> None:  # fmt: skip
        from ..model.vision import ImageProcessor

        self.records, self.root, self.cfg, self.mask_side = records, root, cfg, mask_side
        self.proc = ImageProcessor(cfg.vision, cfg.sam)
        self.bad: dict[int, str] = {}
        captions = [r.caption or "" for r in records]
        enc = tokenizer(captions, padding=True, truncation=True, max_length=cfg.text["max_position_embeddings"],
                        return_tensors="pt", add_special_tokens=True)  # fmt: skip
        self.caption_ids, self.caption_mask = enc["input_ids"], enc["attention_mask"]
        keys = {c: i for i, c in enumerate(sorted(set(captions)))}
        self.caption_key = torch.tensor([keys[c] if c else -1 for c in captions])
        side = cfg.vision.image_size
        per_frame = 4 * 3 * (side**2 + (cfg.sam.image_size**2 if cfg.sam.enabled else 0)) + 8 * mask_side**2
        self.cached: dict[str, torch.Tensor | None] | None = None
        if per_frame * len(records) <= memory_limit:
            parts = [
                self._load(list(range(i, min(i + 256, len(records))))) for i in range(0, len(records), 256)
            ]
            self.cached = {
                k: None if parts[0][k] is None else torch.cat([p[k] for p in parts])
                for k in ("clip", "sam", "masks", "ok")
            }

    def _load(self, idx: list[int]) -> dict[str, torch.Tensor | None]:
        images, masks, ok = [], [], []
        for i in idx:
            r = self.records[i]
            try:
                with Image.open(self.root / r.image) as im:
                    image = im.convert("RGB")
                mask = (
                    _square_mask(
                        self.root / r.mask, image.size, self.cfg.vision.image_aspect_ratio, self.mask_side
                    )
                    if r.mask
                    else np.full((self.mask_side, self.mask_side), -1, dtype=np.int64)
                )
                ok.append(True)
            except (OSError, ValueError, DataError) as exc:
                self.bad.setdefault(i, f"{r.image}: {exc}")
                image = Image.new("RGB", (self.cfg.vision.image_size,) * 2)
                mask = np.full((self.mask_side, self.mask_side), -1, dtype=np.int64)
                ok.append(False)
            images.append(image)
            masks.append(mask)
        px = self.proc(images)
        return {
            "clip": px["pixel_values_clip"],
            "sam": px["pixel_values_sam"],
            "masks": torch.from_numpy(np.stack(masks)),
            "ok": torch.tensor(ok),
        }

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """Inputs of the frames `idx` that decode: clip, sam, masks, caption ids/mask/keys."""
        if self.cached is not None:
            part = {k: None if v is None else v[idx] for k, v in self.cached.items()}
        else:
            part = self._load(idx.tolist())
        keep = part.pop("ok")
        idx = idx[keep]
        out = {k: None if v is None else v[keep] for k, v in part.items()}
        out.update(
            caption_ids=self.caption_ids[idx],
            caption_mask=self.caption_mask[idx],
            caption_key=self.caption_key[idx],
        )
        return out


def _square_mask(path: Path, size: tuple[int, int], aspect: str, side: int) -> np.ndarray:
    """The label map put through the same square step as its image (pad with 0, crop, or resize)."""
    with Image.open(path) as im:
        labels = im.convert("L")
        if labels.size != size:
            raise DataError(
                f"mask {path} is {labels.size[0]}x{labels.size[1]} but its image is {size[0]}x{size[1]}"
            )
        w, h = size
        if w != h:
            s = max(w, h)
            if aspect == "pad":
                canvas = Image.new("L", (s, s), 0)
                canvas.paste(labels, ((s - w) // 2, (s - h) // 2))
                labels = canvas
            elif aspect == "crop":
                s = min(w, h)
                left, top = (w - s) // 2, (h - s) // 2
                labels = labels.crop((left, top, left + s, top + s))
        return downsample_labels(np.asarray(labels, dtype=np.int64), side)


def caption_tokenizer(captions: list[str], vocab: int) -> Any:
    from ..model.tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer(captions, vocab_size=max(vocab, 261 + 5))


def _eos(tokenizer: Any) -> Any:
    """Captions end with the EOS token so the text tower pools a fixed token."""
    from tokenizers import processors

    backend = tokenizer.backend_tokenizer
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    return tokenizer


# ------------------------------------------------------------------------------------ training


@dataclass
class PretrainResult:
    out: Path
    steps: int
    clip_loss: list[float]
    mask_loss: list[float]
    seconds: float
    resumed_from: int | None = None
    bad_frames: list[str] = field(default_factory=list)
    """Frames that could not be decoded (skipped, each reported once)."""


def _lr(cfg: PretrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def pretrain(corpus_path: Path, out: Path, cfg: PretrainConfig, *, resume: bool = False,
             overwrite: bool = False, echo=print) -> PretrainResult:  # fmt: skip
    """Pretrain CLIP (captions) and SAM (masks) on a frame corpus; write HF folders to `out`."""
    from accelerate import Accelerator

    from ..data.frames import read_frames
    from .progress import MetricsLog, ProgressBar

    out = Path(out)
    corpus = read_frames(corpus_path)
    for line in corpus.bad[:5]:
        echo(f"skipped {line}")
    if corpus.bad:
        echo(f"{len(corpus.bad)} unusable line(s) skipped (see above)")
    train_recs = corpus.split("train") or corpus.records
    has_caption = any(r.caption for r in train_recs)
    has_mask = any(r.mask for r in train_recs)
    if not has_caption and not has_mask:
        raise DataError(f"{corpus_path}: no training frame has a caption or a mask")
    if cfg.sam.enabled and not has_mask:
        echo("no frame has a mask: SAM is not trained (set sam.enabled=false to silence this)")
    state_path = out / "checkpoints"
    cp = Path(corpus_path)
    corpus_inside = (cp if cp.is_dir() else cp.parent).resolve()
    existing = [p for p in out.iterdir() if p.resolve() != corpus_inside] if out.is_dir() else []
    if existing:
        if overwrite:  # keep a corpus that lives inside OUT (the CLI's default place for it)
            for p in existing:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        elif not resume:
            raise ConfigError(
                f"{out} is not empty; pass --resume to continue it or --overwrite to replace it"
            )
    out.mkdir(parents=True, exist_ok=True)
    (out / "pretrain_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", encoding="utf-8")

    seed_everything(cfg.seed)
    captions = [r.caption for r in corpus.records if r.caption] or ["frame"]
    tokenizer = _eos(caption_tokenizer(captions, cfg.text_vocab))
    n_labels = max(len(corpus.labels or []), _max_label(corpus) + 1, 2)
    sam_grid = cfg.sam.image_size // int((cfg.sam.inline or {}).get("patch_size", 16))
    mask_side = 4 * sam_grid
    data = FrameData(train_recs, corpus.root, cfg, tokenizer, mask_side)
    groups = report_groups(train_recs)
    reported = 0
    model = Encoders(cfg, len(tokenizer), tokenizer.pad_token_id, n_labels)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    other = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}],
        lr=cfg.lr,
    )
    model, opt = acc.prepare(model, opt)
    start, resumed = 0, None
    ckpts = list_checkpoints(state_path)
    if resume and ckpts:
        step0, folder = ckpts[-1]
        state = torch.load(folder / "state.pt", weights_only=False, map_location="cpu")
        acc.unwrap_model(model).load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        restore_rng(state["rng"])
        start, resumed = step0, step0
        echo(f"resuming encoder pretraining from {folder} (step {step0})")
    elif resume:
        echo(f"--resume: no checkpoint under {state_path}; starting from step 0")

    log = MetricsLog(out, tensorboard=False) if acc.is_main_process else None
    bar = ProgressBar(cfg.steps, start, "pretrain encoders", cfg.progress and acc.is_main_process)
    clip_hist, mask_hist = [], []
    t0 = time.perf_counter()
    inner = acc.unwrap_model(model)
    for step in range(start, cfg.steps):
        idx = (
            report_batch_indices(groups, cfg.batch_size, step, cfg.seed)
            if cfg.report_batches
            else batch_indices(len(train_recs), cfg.batch_size, step, cfg.seed)
        )
        idx = idx[acc.process_index :: acc.num_processes]  # data parallel: each rank its share
        for group in opt.param_groups:
            group["lr"] = _lr(cfg, step)
        model.train()
        b = data.batch(idx)
        cap = b["caption_key"] >= 0
        c_loss, m_loss = model(
            clip_pixels=b["clip"][cap].to(acc.device) if int(cap.sum()) >= 2 else None,
            caption_ids=b["caption_ids"][cap].to(acc.device),
            caption_mask=b["caption_mask"][cap].to(acc.device),
            caption_keys=b["caption_key"][cap].to(acc.device),
            sam_pixels=b["sam"].to(acc.device) if b["sam"] is not None else None,
            masks=b["masks"].to(acc.device) if b["masks"] is not None else None,
            dice_weight=cfg.dice_weight,
            lesion_weight=cfg.lesion_weight,
            token_lesion_weight=cfg.token_lesion_weight,
        )
        for i in list(data.bad)[reported:]:
            bar.write(f"skipped frame (cannot be decoded): {data.bad[i]}")
            if log is not None:
                log.event("bad_frame", frame=data.bad[i])
        reported = len(data.bad)
        loss = c_loss + m_loss
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        acc.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            inner.logit_scale.clamp_(0, math.log(100))
        clip_hist.append(float(c_loss.detach()))
        mask_hist.append(float(m_loss.detach()))
        done = step + 1
        rate = len(idx) * (done - start) / max(1e-9, time.perf_counter() - t0)
        bar.update(float(loss.detach()), _lr(cfg, step), rate)
        if log is not None and (done % cfg.log_every == 0 or done == cfg.steps):
            log.log({"stage": 0, "step": done, "clip_loss": clip_hist[-1], "mask_loss": mask_hist[-1],
                     "lr": _lr(cfg, step), "logit_scale": float(inner.logit_scale.detach().exp())})  # fmt: skip
        if acc.is_main_process and done % cfg.save_every == 0 and done < cfg.steps:
            with atomic_dir(state_path / f"step-{done:08d}") as tmp:
                torch.save(
                    {"model": inner.state_dict(), "optimizer": opt.state_dict(), "rng": capture_rng()},
                    tmp / "state.pt",
                )
                (tmp / "trainer_state.json").write_text(json.dumps({"step": done}) + "\n", encoding="utf-8")
            prune_checkpoints(state_path, cfg.keep_last)
    bar.close()
    seconds = time.perf_counter() - t0
    if acc.is_main_process:
        save_encoders(inner, tokenizer, cfg, out)
        payload = {
            "version": PRETRAIN_VERSION,
            "config": cfg.to_dict(),
            "corpus": str(Path(corpus_path)),
            "frames": {"train": len(train_recs), "bad_lines": len(corpus.bad), "undecodable": len(data.bad)},
            "labels": n_labels,
            "steps": cfg.steps,
            "seconds": seconds,
            "clip_loss": {"first": _mean(clip_hist[:20]), "last": _mean(clip_hist[-20:])},
            "mask_loss": {"first": _mean(mask_hist[:20]), "last": _mean(mask_hist[-20:])},
        }
        (out / "pretrain.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        if log is not None:
            log.close()
    acc.wait_for_everyone()
    return PretrainResult(out, cfg.steps, clip_hist, mask_hist, seconds, resumed, list(data.bad.values()))


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """The frames of optimiser step `step`: a slice of an endless stream of per-epoch permutations
    (epoch e shuffled by seed and e). A pure function of its arguments, so a resumed run draws
    exactly the batches the uninterrupted one would have."""
    first, last = step * batch_size, (step + 1) * batch_size
    parts = []
    for epoch in range(first // n, (last - 1) // n + 1):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        lo, hi = max(first, epoch * n) - epoch * n, min(last, (epoch + 1) * n) - epoch * n
        parts.append(perm[lo:hi])
    return torch.cat(parts)


def report_groups(records: list[Any]) -> list[list[int]]:
    """Indices of the records of each report, in first-seen order (meta.report_id; none: alone)."""
    by_id: dict[Any, list[int]] = {}
    for i, r in enumerate(records):
        key = (r.meta or {}).get("report_id", ("frame", i))
        by_id.setdefault(key, []).append(i)
    return list(by_id.values())


def report_batch_indices(groups: list[list[int]], batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Like `batch_indices`, over a stream of whole reports: each epoch permutes the reports (by seed
    and epoch) and lists their frames report by report, so a batch holds a few complete reports (a
    report may straddle two batches). A pure function of its arguments, so resume is exact."""
    order = []
    sizes = sum(len(g) for g in groups)
    first, last = step * batch_size, (step + 1) * batch_size
    for epoch in range(first // sizes, (last - 1) // sizes + 1):
        perm = torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        stream = [i for g in perm.tolist() for i in groups[g]]
        lo, hi = max(first, epoch * sizes) - epoch * sizes, min(last, (epoch + 1) * sizes) - epoch * sizes
        order.extend(stream[lo:hi])
    return torch.tensor(order, dtype=torch.long)


def _max_label(corpus: Any) -> int:
    top = 0
    for r in corpus.records[:200]:
        if r.mask:
            with Image.open(corpus.root / r.mask) as im:
                top = max(top, int(np.asarray(im.convert("L")).max()))
    return top


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


# ------------------------------------------------------------------------------------ output


def save_encoders(model: Encoders, tokenizer: Any, cfg: PretrainConfig, out: Path) -> None:
    """OUT/clip, OUT/sam: loadable HF folders with their preprocessor configs; OUT/clip_text and
    OUT/sam_decoder.safetensors for zero-shot and mask evaluation."""
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, SamImageProcessor

    v = cfg.vision
    model.clip.save_pretrained(out / "clip")
    CLIPImageProcessor(
        size={"shortest_edge": v.image_size},
        crop_size={"height": v.image_size, "width": v.image_size},
        image_mean=list(v.image_mean),
        image_std=list(v.image_std),
    ).save_pretrained(out / "clip")
    write_json(out / "clip" / "llava_ultra_encoder.json", {"image_aspect_ratio": v.image_aspect_ratio,
                                                             "select_layer": v.select_layer})  # fmt: skip
    text_dir = out / "clip_text"
    text_dir.mkdir(parents=True, exist_ok=True)
    model.text.model.save_pretrained(text_dir)
    save_file(
        {"text_projection": model.text.proj.weight.detach().cpu().contiguous(),
         "visual_projection": model.visual_proj.weight.detach().cpu().contiguous(),
         "logit_scale": model.logit_scale.detach().cpu().reshape(1)},
        str(text_dir / "projections.safetensors"),
    )  # fmt: skip
    tokenizer.save_pretrained(text_dir)
    if model.sam is not None:
        s = cfg.sam
        model.sam.save_pretrained(out / "sam")
        SamImageProcessor(
            size={"longest_edge": s.image_size},
            pad_size={"height": s.image_size, "width": s.image_size},
            image_mean=list(s.image_mean),
            image_std=list(s.image_std),
        ).save_pretrained(out / "sam")
        save_file(
            {k: t.detach().cpu().contiguous() for k, t in model.decoder.state_dict().items()},
            str(out / "sam_decoder.safetensors"),
        )
        write_json(out / "sam_decoder.json", {"channels": model.sam.config.output_channels,
                                                "labels": model.decoder.out.out_channels,
                                                "token_head": model.decoder.token is not None})  # fmt: skip


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def encoder_overrides(folder: Path) -> list[str]:
    """Dotted overrides that make a preset load the encoders in `folder` (pretrain-encoders output):
    paths, sizes and normalisation read from each tower's saved config.json and
    preprocessor_config.json (SAM only when the folder has one)."""
    folder = Path(folder).resolve()
    out: list[str] = []
    for tower, section, sizes in (
        ("clip", "vision", ("image_size", "patch_size")),
        ("sam", "sam", ("image_size",)),
    ):
        if tower == "sam" and not (folder / tower / "config.json").is_file():
            continue
        cfg = json.loads((folder / tower / "config.json").read_text(encoding="utf-8"))
        pre = json.loads((folder / tower / "preprocessor_config.json").read_text(encoding="utf-8"))
        out += [f"model.{section}.path={json.dumps(str(folder / tower))}", f"model.{section}.inline=null"]
        out += [f"model.{section}.{k}={cfg[k]}" for k in sizes]
        out += [f"model.{section}.{k}={json.dumps(pre[k])}" for k in ("image_mean", "image_std")]
    return out
