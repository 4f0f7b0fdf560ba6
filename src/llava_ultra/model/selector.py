"""Redundancy adaptation: score a report's k images and send only the best to the LLM.

Pure functions over tensors (golden-testable) plus one small module holding the learned scorer.

(a) Feature scoring, `Selector.score`: over the projected, fused tokens H (M, N, D) of each image,
    a learned token weighting w = softmax_t(Linear_w(H_t)) pools the tokens, and a linear head maps
    the pooled vector to a scalar: s_fea = Linear_s(sum_t w_t H_t). `Linear_w` starts at zero, so
    training starts from mean pooling. The scorer reads H detached: it learns only through its own
    losses and never pulls the projectors around.
(b) Attention scoring, `attention_teacher`: the first N LLM layers (eager attention, no grad) run
    over [image tokens ; findings tokens] per image; the relevance of image i is the attention mass
    the findings tokens put on that image's tokens (mean over findings tokens, heads and layers;
    `teacher_relevance='peak'` takes the largest mass on any one image token instead).
    It is a teacher: `kd_loss` = KL(softmax(Norm(s_attn) / T) || softmax(s_fea)), Norm a z-score
    within the sample by default (`teacher_norm`; the raw masses differ by ~1e-3 between frames). The paper writes the
    cross-entropy -sum p log q; KL = cross-entropy - H(p), and the teacher entropy H(p) does not
    depend on the student, so the gradient is the paper's while the value is 0 exactly when teacher
    and student agree (a loss curve that reads as 'how far from the teacher').
Selection: top-m by s_fea (ties -> the earlier frame). Argmax has no gradient, so while training
    with `straight_through` the chosen images' features are multiplied by
        m = hard + (soft - soft.detach()),   soft = softmax(s_fea) over the sample's k images,
    which is exactly 1 in the forward pass (the features are unchanged) but has d m / d s = d soft / d s
    in the backward pass: the LM loss reaches the scorer even in 'feature' mode without a teacher.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..config import SelectorConfig


@dataclass
class Selection:
    """Which images of each sample reached the LLM, and why."""

    indices: list[list[int]]
    """Per sample, the chosen images' positions within that sample (ascending)."""
    scores: torch.Tensor | None = None
    """(B, K) feature scores s_fea (detached; -inf where a sample has fewer than K images)."""
    teacher: torch.Tensor | None = None
    """(B, K) attention-teacher relevance s_attn when it was computed (detached)."""


# ------------------------------------------------------------------------------ pure functions


def group(
    flat: torch.Tensor, counts: Sequence[int], fill: float = float("-inf")
) -> tuple[torch.Tensor, torch.Tensor]:
    """(M,) per-image values -> (B, K) padded with `fill`, and the (B, K) bool mask of real images."""
    k = max(counts, default=0)
    out = flat.new_full((len(counts), max(k, 1)), fill)
    valid = torch.zeros(len(counts), max(k, 1), dtype=torch.bool, device=flat.device)
    start = 0
    for b, n in enumerate(counts):
        out[b, :n] = flat[start : start + n]
        valid[b, :n] = True
        start += n
    return out, valid


def masked_softmax(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim restricted to `valid`; rows with no valid entry are all zero."""
    logits = scores.float().masked_fill(~valid, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.nan_to_num(probs, nan=0.0) * valid


def select_top(scores: torch.Tensor, valid: torch.Tensor, top_m: int) -> torch.Tensor:
    """(B, K) scores -> (B, K) hard 0/1 mask of the top-m valid images per row (ties: earlier index)."""
    masked = scores.float().masked_fill(~valid, float("-inf"))
    m = min(top_m, scores.shape[1])
    # a stable descending sort keeps the earlier frame first among equal scores
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices[:, :m]
    hard = torch.zeros_like(masked).scatter(1, order, 1.0)
    return hard * valid


def straight_through(scores: torch.Tensor, valid: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
    """Multipliers equal to `hard` in value whose gradient is that of softmax(scores) (see module doc)."""
    soft = masked_softmax(scores, valid)
    return hard + (soft - soft.detach())


def attention_relevance(
    attentions: Sequence[torch.Tensor], n_image: int, text_mask: torch.Tensor, how: str = "mass"
) -> torch.Tensor:
    """Relevance of the leading `n_image` image tokens to the text, from attention probabilities.

    attentions: per layer (M, H, L, L) probabilities over sequences [image (n_image) ; text (T)];
    text_mask: (M, T), 1 for real text tokens. Returns (M,), each in [0, 1]:
    - 'mass': the attention mass text tokens put on all image tokens (mean over text tokens, heads
      and layers) - how much the text reads the image at all;
    - 'peak': the largest attention any single image token receives (same means) - how strongly one
      region of the image answers the text (a finding the text names draws it to its tokens).
    """
    if how not in ("mass", "peak"):
        raise ValueError(f"unknown relevance {how!r}; use 'mass' or 'peak'")
    per_layer = []
    mask = text_mask.float()  # (M, T)
    for attn in attentions:
        to_image = attn[:, :, n_image:, :n_image].float()  # (M, H, T, n_image)
        value = to_image.sum(-1) if how == "mass" else to_image.amax(-1)  # (M, H, T)
        per_layer.append((value.mean(1) * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))
    return torch.stack(per_layer).mean(0)


def normalise_teacher(teacher: torch.Tensor, valid: torch.Tensor, norm: str) -> torch.Tensor:
    """'zscore': standardise each row over its valid entries ((x - mean) / std, std floored at 1e-6;
    a single image gives 0); 'none': unchanged."""
    if norm == "none":
        return teacher.float()
    x = teacher.float().masked_fill(~valid, 0.0)
    n = valid.sum(-1, keepdim=True).clamp(min=1)
    mean = x.sum(-1, keepdim=True) / n
    var = ((x - mean) ** 2 * valid).sum(-1, keepdim=True) / n
    return ((x - mean) / var.sqrt().clamp(min=1e-6)).masked_fill(~valid, 0.0)


def kd_loss(
    teacher: torch.Tensor,
    student: torch.Tensor,
    valid: torch.Tensor,
    temperature: float = 1.0,
    norm: str = "none",
) -> torch.Tensor:
    """KL(softmax(Norm(teacher) / T) || softmax(student)) per sample over its valid images, averaged
    over samples with at least two images (a single image has nothing to choose; its loss is 0)."""
    p = masked_softmax(normalise_teacher(teacher, valid, norm) / temperature, valid)
    log_q = torch.log_softmax(student.float().masked_fill(~valid, float("-inf")), dim=-1)
    log_p = torch.log(p.clamp(min=1e-30))
    per_sample = torch.where(valid, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)  # (B,)
    multi = valid.sum(-1) >= 2
    if not bool(multi.any()):
        return student.masked_fill(~valid, 0.0).sum() * 0.0  # -inf padding must not give NaN
    return per_sample[multi].mean()


def supervised_loss(student: torch.Tensor, valid: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Optional frame-label loss: cross-entropy between softmax(student) over a sample's images and
    the uniform distribution over its labelled-valid images. labels: (B, K) 1 valid, 0 invalid, -1
    unknown. Only samples with >= 2 images, all labelled, at least one valid and one invalid, count."""
    labelled = (labels >= 0) | ~valid
    pos = (labels == 1) & valid
    use = labelled.all(-1) & (valid.sum(-1) >= 2) & pos.any(-1) & (pos.sum(-1) < valid.sum(-1))
    if not bool(use.any()):
        return student.masked_fill(~valid, 0.0).sum() * 0.0  # -inf padding must not give NaN
    target = pos.float() / pos.sum(-1, keepdim=True).clamp(min=1)
    log_q = torch.log_softmax(student.float().masked_fill(~valid, float("-inf")), dim=-1)
    per = -(target * torch.where(valid, log_q, torch.zeros_like(log_q))).sum(-1)
    return per[use].mean()


# ------------------------------------------------------------------------------------ module


class Selector(nn.Module):
    """The learned feature scorer (empty in mode 'none'). State dict: `token_weight.*`, `score_head.*`."""

    def __init__(self, cfg: SelectorConfig, dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.mode == "none":
            return
        self.token_weight = nn.Linear(dim, 1)
        nn.init.zeros_(self.token_weight.weight)
        nn.init.zeros_(self.token_weight.bias)
        self.score_head = nn.Linear(dim, 1)

    def score(self, h: torch.Tensor) -> torch.Tensor:
        """Feature scores s_fea: (M, N, D) projected tokens -> (M,)."""
        h = h.detach()
        w = torch.softmax(self.token_weight(h).float(), dim=1).to(h.dtype)  # (M, N, 1)
        pooled = (w * h).sum(1)  # (M, D)
        return self.score_head(pooled).squeeze(-1).float()  # (M,)

    def fixed_choice(self, counts: Sequence[int], keys: Sequence[int] | None = None) -> list[list[int]]:
        """Mode 'none': all images, the first one, or a random one per sample.

        'random' while training draws from torch's global RNG (seeded by the run, restored on
        resume), so a report's text meets a different frame on each visit - the paper's "text
        assigned to each image". Outside training it picks `keys[b] % k` where `keys` are content
        hashes of each sample's images (`content_keys`): arbitrary but reproducible, and the same
        whatever the batch size or data-parallel split.
        """
        if self.cfg.none_strategy == "all":
            return [list(range(n)) for n in counts]
        if self.cfg.none_strategy == "first":
            return [[0] if n else [] for n in counts]
        if self.training or keys is None:
            return [[int(torch.randint(n, ()).item())] if n else [] for n in counts]
        return [[int(key) % n] if n else [] for key, n in zip(keys, counts, strict=True)]


def content_keys(images: torch.Tensor, counts: Sequence[int]) -> list[int]:
    """One reproducible integer per sample from the bytes of its images (M, ...) -> (B,) ints."""
    flat = images.detach().to("cpu", torch.float32).contiguous().view(images.shape[0], -1)
    keys, start = [], 0
    for n in counts:
        keys.append(zlib.crc32(flat[start : start + n].numpy().tobytes()) if n else 0)
        start += n
    return keys


class _StopForward(Exception):
    """Raised from a hook to end a forward pass after the layers we need."""


def attention_teacher(
    llm: nn.Module,
    image_feats: torch.Tensor,
    text_embeds: torch.Tensor,
    text_mask: torch.Tensor,
    n_layers: int,
    relevance: str = "mass",
) -> torch.Tensor:
    """Relevance s_attn of each image to its sample's findings text, from the first N LLM layers.

    image_feats: (M, N, D) fused tokens; text_embeds: (M, T, D) findings embeddings (the sample's text
    repeated for each of its images); text_mask: (M, T). Returns (M,). Runs without gradient and with
    eager attention (SDPA does not return weights); the forward stops after layer N.
    """
    layers = llm.get_decoder().layers
    n_layers = min(n_layers, len(layers))
    captured: list[torch.Tensor] = []

    def keep(_module, _inputs, output):
        captured.append(output[1])

    def stop(_module, _inputs, _output):
        raise _StopForward

    previous = llm.config._attn_implementation
    hooks = [layers[i].self_attn.register_forward_hook(keep) for i in range(n_layers)]
    hooks.append(layers[n_layers - 1].register_forward_hook(stop))
    embeds = torch.cat([image_feats, text_embeds.to(image_feats.dtype)], dim=1)  # (M, N + T, D)
    mask = torch.cat([text_mask.new_ones(image_feats.shape[:2]), text_mask], dim=1)  # (M, N + T)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    try:
        llm.set_attn_implementation("eager")
        with torch.no_grad():
            llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False)
    except _StopForward:
        pass
    finally:
        for hook in hooks:
            hook.remove()
        llm.set_attn_implementation(previous)
    if len(captured) != n_layers or any(a is None for a in captured):
        raise RuntimeError(f"the LLM's attention layers returned no weights ({type(llm).__name__})")
    return attention_relevance(captured, image_feats.shape[1], text_mask, relevance)


def select_features(
    feats: torch.Tensor, counts: Sequence[int], chosen: torch.Tensor, multipliers: torch.Tensor | None = None
) -> torch.Tensor:
    """Gather the chosen images' tokens in sample order.

    feats: (M, N, D) all images; chosen: (B, K) 0/1 mask; multipliers: optional (B, K) values to scale
    each chosen image by (straight-through). Returns (S, N, D), S = number of chosen images.
    """
    offsets = torch.tensor([0, *counts[:-1]], device=feats.device).cumsum(0)  # (B,)
    b_idx, k_idx = chosen.nonzero(as_tuple=True)  # row-major: sample order, then frame order
    out = feats[offsets[b_idx] + k_idx]  # (S, N, D)
    if multipliers is not None:
        out = out * multipliers[b_idx, k_idx].to(out.dtype).view(-1, 1, 1)
    return out


def indices_from_mask(chosen: torch.Tensor) -> list[list[int]]:
    """(B, K) 0/1 mask -> per-sample ascending positions."""
    return [row.nonzero().flatten().tolist() for row in chosen]


def mask_from_indices(indices: list[list[int]], k: int, device: torch.device | None = None) -> torch.Tensor:
    """Per-sample positions -> (B, K) 0/1 mask."""
    mask = torch.zeros(len(indices), max(k, 1), device=device)
    for b, idx in enumerate(indices):
        mask[b, idx] = 1.0
    return mask
