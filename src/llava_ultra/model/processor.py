"""Text + images -> model tensors: the one input processor, shared by training and inference.

In the spirit of transformers' `LlavaProcessor`: the tokenizer, the chat template and the image
processor are applied in one place, so a training batch and a generation batch describe the same
conversation with the same ids. Training collate (train/dataset.py) and `UltraModel.prepare_inputs`
(eval, serve, recipes) both come here.

What this file owns:
- `to_messages`: a LLaVA-style sample (human/gpt turns, k images) -> role/content messages;
- `sample_prompt`: a sample's first question as inference input, rendered as training renders it;
- `expand_image_tokens`: the ONE place the image placeholder becomes `ModelConfig.image_tokens_for(k)`
  tokens, after checking the text holds exactly one placeholder for k > 0 images (none for k = 0);
  a mismatch is a `DataError` naming both counts;
- `encode_sample`: a training sample -> token ids and labels (loss only on the assistant's answers);
- `pad_rows` / `pad_encoded` / `pad_findings` / `pad_extended`: padding of token rows (right for
  training, left for generation);
- `prepare_inputs`: prompts + images -> the left-padded batch `UltraModel.generate` takes.

Notable choices:
- Rendering goes through `model.tokenizer.render_conversation` (the same text `render_prompt`
  gives at inference), and the whole text is tokenised ONCE; labels come from character offsets
  (a token is a target when its last character lies in an assistant segment). Tokenising
  segments separately would split BPE merges differently from inference. Needs a fast tokenizer.
- The first human turn carries one `<image>` per frame; they are collapsed into one placeholder
  at the front ("<image>\\n question", LLaVA's layout) and expanded to
  `ModelConfig.image_tokens_for(k)` tokens: the number of visual tokens that reach the LLM after
  frame selection, not k x tokens_per_image. The model (`UltraModel.embed`) only checks the count.
- Generation batches are left-padded with the tokenizer's pad id (0 when it has none), so every
  row's last prompt token is at the same position; training batches are right-padded, labels with
  IGNORE_INDEX.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..config import ModelConfig
from ..errors import ConfigError, DataError
from .tokenizer import render_conversation, render_prompt
from .vision import ImageProcessor

IGNORE_INDEX = -100
ROLES = {"human": "user", "gpt": "assistant"}


# ----------------------------------------------------------------------------------- messages


def to_messages(sample: dict[str, Any], image_token: str) -> list[dict[str, str]]:
    """LLaVA turns (`from` human/gpt) -> role/content messages, with the first turn's per-frame
    placeholders collapsed into one at its front."""
    sid = sample.get("id", "<no id>")
    conv = sample.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise DataError(f"sample {sid} has no conversations; give human/gpt turns")
    messages = []
    for i, turn in enumerate(conv):
        role = ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
        if role is None or not isinstance(turn.get("value"), str):
            raise DataError(f"sample {sid}: turn {i} must be {{'from': 'human'|'gpt', 'value': str}}")
        messages.append({"role": role, "content": turn["value"]})
    n_images = len(sample.get("images") or [])
    first = messages[0]["content"]
    if first.count(image_token) != n_images or sum(m["content"].count(image_token) for m in messages) != (
        n_images
    ):
        raise DataError(
            f"sample {sid}: {sum(m['content'].count(image_token) for m in messages)} {image_token} "
            f"placeholders but {n_images} images; put one {image_token} per image in the first human turn"
        )
    if n_images:
        text = re.sub(rf"{re.escape(image_token)}\s*", "", first).strip()
        messages[0] = {"role": "user", "content": f"{image_token}\n{text}"}
    return messages


def sample_prompt(
    sample: dict[str, Any], image_token: str, template: str = "vicuna_v1", system: str | None = None
) -> str:
    """The model input for the sample's first question, rendered as in training."""
    return render_prompt(to_messages(sample, image_token)[:1], template, system, image_token)


# ------------------------------------------------------------------------------ placeholders


def expand_image_tokens(
    ids: list[int], n_images: int, config: ModelConfig, where: str, fix: str
) -> tuple[list[int], int | None]:
    """`ids` with its one image placeholder replaced by `config.image_tokens_for(n_images)` copies,
    and the placeholder's position (None without images). `where` names the text and `fix` says
    what to change in the DataError raised when the text does not hold exactly one placeholder for
    n_images > 0 (none for 0)."""
    image_id = config.image_token_id
    found = ids.count(image_id)
    if found != (1 if n_images else 0):
        raise DataError(
            f"{where} has {found} {config.image_token!r} placeholder token(s) for {n_images} image(s); {fix}"
        )
    if not n_images:
        return ids, None
    at = ids.index(image_id)
    return ids[:at] + [image_id] * config.image_tokens_for(n_images) + ids[at + 1 :], at


# ---------------------------------------------------------------------------------- training


@dataclass
class Encoded:
    """One sample as token ids; placeholders already expanded to the LLM's visual-token count."""

    input_ids: np.ndarray
    """(T,) int64 token ids."""
    labels: np.ndarray
    """(T,) int64: the token id where the model is trained to produce it, else IGNORE_INDEX."""
    findings_ids: np.ndarray | None = None
    """(F,) findings text ids for the selector's attention teacher (None when not requested)."""
    extended_ids: np.ndarray | None = None
    """(X,) extended-caption ids for the LoGra-Med alignment loss (None when not requested; empty
    when the sample has no caption and cannot be extended: it then stays out of the graphs)."""


def encode_sample(
    sample: dict[str, Any],
    tokenizer: Any,
    model_cfg: ModelConfig,
    template: str,
    *,
    system: str | None = None,
    findings_tokens: int = 0,
    extended_tokens: int = 0,
) -> Encoded:
    """Token ids and labels of one sample (loss only on the assistant's answers, EOS included).

    `findings_tokens > 0` also tokenises the sample's findings text (at most that many tokens)
    for the attention teacher. `extended_tokens > 0` tokenises its extended caption (the LLM-written
    `extended_caption`, else the template of `data/extend.py`; at most that many tokens) for the
    LoGra-Med alignment loss. Raises DataError for a malformed sample.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            "the processor needs a fast (Rust) tokenizer for character offsets; load it with "
            "AutoTokenizer.from_pretrained(..., use_fast=True)"
        )
    sid = sample.get("id", "<no id>")
    image_token = model_cfg.image_token
    k = len(sample.get("images") or [])
    segments = render_conversation(
        to_messages(sample, image_token),
        template,
        system=system,
        image_token=image_token,
        eos_token=tokenizer.eos_token or "</s>",
    )
    text, targets, at = "", [], 0
    for seg in segments:
        if seg.is_target:
            targets.append((at, at + len(seg.text)))
        text += seg.text
        at += len(seg.text)
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    ids = list(enc["input_ids"])
    labels = [
        tok if end > start and any(a < end <= b for a, b in targets) else IGNORE_INDEX
        for tok, (start, end) in zip(ids, enc["offset_mapping"], strict=True)
    ]
    ids, pos = expand_image_tokens(
        ids,
        k,
        model_cfg,
        f"sample {sid}: the rendered text",
        f"the tokenizer must map {image_token!r} to id {model_cfg.image_token_id} as one token",
    )
    if pos is not None:
        labels = labels[:pos] + [IGNORE_INDEX] * model_cfg.image_tokens_for(k) + labels[pos + 1 :]
    if all(label == IGNORE_INDEX for label in labels):
        raise DataError(f"sample {sid} has no answer tokens to learn from; every sample needs a gpt turn")
    findings = None
    if findings_tokens > 0 and str(sample.get("findings") or "").strip():
        f_ids = tokenizer(str(sample["findings"]), add_special_tokens=False)["input_ids"]
        findings = np.asarray(f_ids[:findings_tokens], dtype=np.int64)
    extended = None
    if extended_tokens > 0:
        from ..data.extend import sample_extended_caption

        try:
            caption = sample_extended_caption(sample)
        except DataError:  # no site / language to build one from: the sample trains without the view
            caption = ""
        x_ids = tokenizer(caption, add_special_tokens=False)["input_ids"] if caption else []
        extended = np.asarray(x_ids[:extended_tokens], dtype=np.int64)
    return Encoded(np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64), findings, extended)


# ----------------------------------------------------------------------------------- padding


def pad_rows(rows: Sequence[np.ndarray], value: int, side: str) -> torch.Tensor:
    """(B, max length) int64 tensor of `rows`, filled with `value` on the `side` ('left'/'right')."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for b, r in enumerate(rows):
        if side == "right":
            out[b, : len(r)] = torch.from_numpy(r)
        else:
            out[b, width - len(r) :] = torch.from_numpy(r)
    return out


def pad_encoded(encs: Sequence[Encoded], pad_id: int, side: str) -> dict[str, torch.Tensor]:
    """`input_ids` (padded with `pad_id`), `attention_mask` and `labels` (padded with IGNORE_INDEX)."""
    return {
        "input_ids": pad_rows([e.input_ids for e in encs], pad_id, side),
        "attention_mask": pad_rows([np.ones(len(e.input_ids), np.int64) for e in encs], 0, side),
        "labels": pad_rows([e.labels for e in encs], IGNORE_INDEX, side),
    }


def pad_findings(encs: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """`findings_ids` / `findings_mask` for the attention teacher (right-padded; a sample without
    findings is one pad token with mask 0). Empty when no sample was encoded with findings."""
    if not any(e.findings_ids is not None for e in encs):
        return {}
    rows = [e.findings_ids if e.findings_ids is not None else np.zeros(0, np.int64) for e in encs]
    rows = [r if len(r) else np.asarray([pad_id]) for r in rows]
    return {
        "findings_ids": pad_rows(rows, pad_id, "right"),
        "findings_mask": pad_rows(
            [
                np.ones(len(e.findings_ids), np.int64)
                if e.findings_ids is not None and len(e.findings_ids)
                else np.zeros(1, np.int64)
                for e in encs
            ],
            0,
            "right",
        ),
    }


def pad_extended(encs: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor] | None:
    """The padded extended captions (`input_ids`, `attention_mask`; an empty caption is one pad
    token with mask 0), or None when no sample was encoded with them."""
    if not any(e.extended_ids is not None for e in encs):
        return None
    rows = [e.extended_ids if e.extended_ids is not None else np.zeros(0, np.int64) for e in encs]
    return {
        "input_ids": pad_rows([r if len(r) else np.asarray([pad_id]) for r in rows], pad_id, "right"),
        "attention_mask": pad_rows(
            [np.ones(max(len(r), 1), np.int64) * bool(len(r)) for r in rows], 0, "right"
        ),
    }


# --------------------------------------------------------------------------------- inference


def prepare_inputs(
    tokenizer: Any,
    config: ModelConfig,
    prompts: Sequence[str],
    images: Sequence[Sequence[Image.Image]],
) -> dict[str, Any]:
    """Tokenise prompts (each with one image placeholder where its images go, none without images),
    expand the placeholder, left-pad, and preprocess the images: a batch for `UltraModel.generate`."""
    if len(prompts) != len(images):
        raise DataError(f"got {len(prompts)} prompts but {len(images)} image lists; give one list per prompt")
    rows = []
    for i, (prompt, imgs) in enumerate(zip(prompts, images, strict=True)):
        ids, _ = expand_image_tokens(
            tokenizer(prompt).input_ids,
            len(imgs),
            config,
            f"prompt {i}",
            "put exactly one placeholder where the images go (none without images)",
        )
        rows.append(np.asarray(ids, dtype=np.int64))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pixels = ImageProcessor(config.vision, config.sam)([im for imgs in images for im in imgs])
    return {
        "input_ids": pad_rows(rows, pad, "left"),
        "attention_mask": pad_rows([np.ones(len(r), np.int64) for r in rows], 0, "left"),
        "image_counts": [len(imgs) for imgs in images],
        **pixels,
    }
