"""The heads encoder pretraining adds to CLIP and SAM, and how to read them back: shared by
training (train/pretrain.py) and measurement (eval/encoders.py).

What this file owns: the light SAM mask decoder (`MaskDecoder`) and its loss (`mask_loss`), the
label-map reduction its targets go through (`downsample_labels`), the small CLIP text tower
(`TextTower`), and the loaders of both from a `pretrain-encoders` folder (`load_text_tower`,
`load_mask_decoder`).

Notable choices:
- They live in the model layer, not in train/, so that eval measures the encoders without
  importing the trainer: eval never trains and never imports train (ARCHITECTURE.md).
- The mask decoder replaces SAM's prompt encoder + mask decoder (no prompts exist for a
  frame-level label map): neck (B, C, G, G) -> two 2x transposed convolutions -> 1x1 conv ->
  (B, L, 4G, 4G) label logits; its loss is MedSAM's (cross-entropy + soft Dice over the
  non-background labels, lesions up-weighted in the cross-entropy).
- Label maps are reduced by the highest label of each block, not nearest-neighbour sampling: a
  2-px lesion must survive a 2x reduction.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..errors import CheckpointError


def mask_loss(
    logits: torch.Tensor, target: torch.Tensor, dice_weight: float, lesion_weight: float = 10.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy + dice_weight * (1 - soft Dice) over labels 1..L-1. logits (B, L, H, W), target
    (B, H, W) int64 (-1 = no mask for this frame). Returns (loss, per-label soft Dice (L-1,))."""
    keep = (target >= 0).flatten(1).all(1)
    if not bool(keep.any()):
        return logits.sum() * 0.0, torch.zeros(logits.shape[1] - 1)
    logits, target = logits[keep], target[keep]
    weight = torch.ones(logits.shape[1], device=logits.device)
    weight[2:] = lesion_weight  # labels beyond organ (lesions) are rare: up-weight them in the CE
    ce = F.cross_entropy(logits, target, weight=weight)
    probs = logits.softmax(1)[:, 1:]  # (B, L-1, H, W)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].float()
    inter = (probs * onehot).sum((0, 2, 3))
    denom = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    dice = (2 * inter + 1.0) / (denom + 1.0)  # (L-1,), smoothed: an absent label does not explode
    return ce + dice_weight * (1 - dice).mean(), dice.detach()


class MaskDecoder(nn.Module):
    """Light mask head on SAM's neck: (B, C, G, G) -> (B, L, 4G, 4G) label logits.

    With `token_head`, also a linear (1x1) lesion-presence head on the neck itself:
    (B, C, G, G) -> (B, G, G) logits that a token's patch holds a lesion pixel (`token_logits`).
    Being linear, it makes lesion presence linearly readable from each SAM token, which is how the
    frame selector's scorer (a linear token weighting and head) and the LLM's projector read them."""

    def __init__(self, channels: int, labels: int, token_head: bool = False) -> None:
        super().__init__()
        self.up1 = nn.ConvTranspose2d(channels, channels, 2, stride=2)
        self.up2 = nn.ConvTranspose2d(channels, max(8, channels // 2), 2, stride=2)
        self.out = nn.Conv2d(max(8, channels // 2), labels, 1)
        self.token = nn.Conv2d(channels, 1, 1) if token_head else None

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.out(F.gelu(self.up2(F.gelu(self.up1(grid)))))

    def token_logits(self, grid: torch.Tensor) -> torch.Tensor:
        """(B, C, G, G) neck -> (B, G, G) per-token lesion-presence logits (needs `token_head`)."""
        if self.token is None:
            raise CheckpointError(
                "this SAM mask decoder has no token head (pretrain.token_lesion_weight was 0)"
            )
        return self.token(grid).squeeze(1)


def token_lesion_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Balanced BCE of per-token lesion presence. logits (B, G, G); target (B, S, S) int64 labels at
    S = r * G (-1 = no mask): a token is positive when any pixel of its r x r block is a lesion
    (label >= 2). Positive and negative tokens are averaged separately, then together, so the few
    lesion tokens of a frame (1-4 of 256) weigh as much as the rest."""
    keep = (target >= 0).flatten(1).all(1)
    if not bool(keep.any()):
        return logits.sum() * 0.0
    logits, target = logits[keep], target[keep]
    g = logits.shape[-1]
    if target.shape[-1] % g or target.shape[-2] % g:
        raise ValueError(f"mask {tuple(target.shape[-2:])} is not a whole multiple of the {g}x{g} token grid")
    r = target.shape[-1] // g
    pos = (target >= 2).float().reshape(len(target), g, r, g, r).amax((2, 4))  # (B, G, G)
    bce = F.binary_cross_entropy_with_logits(logits.float(), pos, reduction="none")
    parts = [bce[pos > 0.5].mean()] if bool((pos > 0.5).any()) else []
    parts.append(bce[pos < 0.5].mean())
    return torch.stack(parts).mean()


class TextTower(nn.Module):
    """CLIPTextModel + projection; pools the last real token (the caption's end token)."""

    def __init__(self, text_cfg: dict[str, Any], vocab_size: int, pad_id: int, embed_dim: int) -> None:
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModel

        cfg = CLIPTextConfig(
            **text_cfg, vocab_size=vocab_size, pad_token_id=pad_id, eos_token_id=2, bos_token_id=1
        )
        self.model = CLIPTextModel(cfg)
        self.proj = nn.Linear(cfg.hidden_size, embed_dim, bias=False)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, H)
        last = mask.long().sum(1) - 1  # (B,)
        pooled = hidden[torch.arange(ids.shape[0], device=ids.device), last]
        return F.normalize(self.proj(pooled), dim=-1)


def downsample_labels(labels: np.ndarray, side: int) -> np.ndarray:
    """(H, W) integer labels -> (side, side), keeping the highest label of each block (a 2-px lesion
    must survive a 2x reduction; nearest-neighbour sampling would drop it). Labels are ordered by
    priority (SynthUS: lesion 2 > organ 1 > background 0)."""
    h, w = labels.shape
    if h % side == 0 and w % side == 0:
        return labels.reshape(side, h // side, side, w // side).max(axis=(1, 3))
    img = Image.fromarray(labels.astype(np.uint8))
    return np.asarray(img.resize((side, side), Image.Resampling.NEAREST), dtype=np.int64)


def load_text_tower(folder: Path) -> tuple[Any, TextTower, torch.Tensor, torch.Tensor]:
    """(tokenizer, text tower, visual projection weight, logit scale) saved by `save_encoders`."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, CLIPTextModel

    folder = Path(folder) / "clip_text"
    if not (folder / "projections.safetensors").is_file():
        raise CheckpointError(
            f"{folder} holds no text tower; it is written by `llava-ultra pretrain-encoders`"
        )
    tok = AutoTokenizer.from_pretrained(str(folder))
    text = CLIPTextModel.from_pretrained(str(folder))
    proj = load_file(str(folder / "projections.safetensors"))
    tower = TextTower.__new__(TextTower)
    nn.Module.__init__(tower)
    tower.model = text
    tower.proj = nn.Linear(text.config.hidden_size, proj["text_projection"].shape[0], bias=False)
    tower.proj.weight.data.copy_(proj["text_projection"])
    return tok, tower.eval(), proj["visual_projection"], proj["logit_scale"]


def load_mask_decoder(folder: Path) -> MaskDecoder:
    from safetensors.torch import load_file

    if not (Path(folder) / "sam_decoder.json").is_file():
        raise CheckpointError(
            f"{folder} holds no SAM mask decoder (sam_decoder.json); give the output folder of "
            "`llava-ultra pretrain-encoders`"
        )
    meta = json.loads((Path(folder) / "sam_decoder.json").read_text(encoding="utf-8"))
    dec = MaskDecoder(meta["channels"], meta["labels"], bool(meta.get("token_head", False)))
    dec.load_state_dict(load_file(str(Path(folder) / "sam_decoder.safetensors")))
    return dec.eval()
