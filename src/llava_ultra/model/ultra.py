"""The LLaVA-Ultra model: encode -> fuse -> select -> scatter into the LLM -> loss / generate.

Reading order follows the data. A batch has B samples; sample b has k_b images (its report's
frames), M = sum k_b images in all, flattened in sample order:

    pixel_values_clip (M, 3, S, S), pixel_values_sam (M, 3, S', S'), image_counts [k_1..k_B]
    1. encode  : CLIP (M, N, Dc) and SAM (M, C, Gs, Gs), each in ONE batched call over all M images
    2. fuse    : H_v = a*P1(CLIP) + (1-a)*P2(align(SAM))                               (M, N, D)
    3. select  : feature scores s_fea (M,) -> top-m per sample (straight-through while training);
                 with findings text, the attention teacher gives s_attn and the KD loss
    4. scatter : the S selected images' tokens (S, N, D) replace the image placeholder tokens
    5. LLM     : logits (B, T, V); loss = lm_loss + kd_weight * kd_loss

Placeholders are expanded by the input processor (model/processor.py), not here: the text of
sample b holds exactly `cfg.image_tokens_for(k_b)` = images_into_llm(k_b) * N placeholder tokens.
With selection on that is top_m images whatever k_b is, so the text length does not depend on which
frame wins; only the selected images ever reach the LLM. A mismatch raises `DataError` naming both
counts (as transformers' modeling_llava does). In mode 'none' only the images that will be used
are encoded.

Module names are a contract (state-dict prefixes that lora.py, checkpoint.py and convert.py rely on):
    clip      transformers CLIPVisionModel    -> clip.embeddings.*, clip.encoder.*, clip.pre_layrnorm.*,
              clip.post_layernorm.*  (transformers 5.x has no `vision_model.` level in CLIPVisionModel)
    sam       transformers SamVisionModel | None -> sam.vision_encoder.*
    fusion    fusion.clip_projector.linear_1/linear_2.*, fusion.sam_projector.*, fusion.align.*,
              fusion.alpha_logit
    selector  selector.token_weight.*, selector.score_head.*
    llm       any AutoModelForCausalLM       -> llm.model.*, llm.lm_head.*

dtype: 'auto' is float32 on CPU (never float16 there), bfloat16 on CUDA when supported, else float16.
The LLM uses SDPA unless configured otherwise; the attention teacher switches to eager for its pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import (
    CONFIG_MAPPING,
    AutoModelForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ..config import LLMConfig, ModelConfig
from ..errors import ConfigError, DataError
from . import processor
from .decode import DecodeStats, check_cache, decode_loop, eos_ids, next_token
from .fusion import Fusion
from .selector import (
    Selection,
    Selector,
    attention_teacher,
    content_keys,
    group,
    indices_from_mask,
    kd_loss,
    select_features,
    select_top,
    straight_through,
    supervised_loss,
)
from .vision import ImageProcessor, build_clip, build_sam, clip_tokens, sam_grid

IGNORE_INDEX = -100


def resolve_dtype(name: str, device: str | torch.device | None = None) -> torch.dtype:
    """The weight dtype for `name` ('auto' or an explicit dtype) on `device`."""
    device = torch.device(device or "cpu")
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name == "float16" and device.type == "cpu":
        raise ConfigError("model.dtype='float16' does not run on CPU; use 'auto' or 'float32' there")
    return getattr(torch, name)


def build_llm(cfg: LLMConfig, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The causal LM from a hub id / folder or from inline config kwargs ('model_type' picks the family)."""
    if cfg.inline is not None:
        kwargs = dict(cfg.inline)
        model_type = kwargs.pop("model_type", "llama")
        if model_type not in CONFIG_MAPPING:
            raise ConfigError(f"model.llm.inline.model_type={model_type!r} is not a transformers model type")
        config = CONFIG_MAPPING[model_type](**kwargs)
        return AutoModelForCausalLM.from_config(
            config, attn_implementation=cfg.attn_implementation, dtype=dtype
        )
    try:
        return AutoModelForCausalLM.from_pretrained(
            cfg.path, attn_implementation=cfg.attn_implementation, dtype=dtype
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"model.llm.path={cfg.path!r} could not be loaded as a causal LM: {exc}. Original LLaVA / "
            f"LLaVA-Med checkpoints must first be converted with `llava-ultra convert`"
        ) from exc


@dataclass
class UltraOutput:
    """What `UltraModel.forward` returns."""

    loss: torch.Tensor | None
    """lm_loss + kd_weight * kd_loss (None without labels and without a teacher)."""
    lm_loss: torch.Tensor | None
    """Next-token cross-entropy over labelled positions."""
    kd_loss: torch.Tensor | None
    """Selector distillation loss (mode 'feature+attention' with findings text), else None."""
    logits: torch.Tensor | None
    """(B, T, V); None with `forward(return_logits=False)` (training: only labelled positions are
    projected to the vocabulary, inside the loss)."""
    selection: Selection
    """Which images reached the LLM, with scores."""
    image_features: torch.Tensor | None = None
    """(S, N, D) the selected images' fused tokens as scattered into the LLM (None without images)."""
    hidden_states: torch.Tensor | None = None
    """(B, T, D) the LLM's last-layer hidden states, only with `forward(output_hidden_states=True)`."""


@dataclass
class GenerationOutput:
    """What `UltraModel.generate` returns."""

    sequences: list[list[int]]
    """New token ids per sample, without the prompt, EOS or padding."""
    texts: list[str] | None
    """Decoded answers cut before any stop string (when a tokenizer was given)."""
    selection: Selection
    """Which images were used."""
    stats: DecodeStats | None = None
    """Prefill / warm-up / decode timings and the decoding path taken."""


class UltraModel(nn.Module):
    """CLIP (+ SAM) -> fusion -> selector -> LLM. Build with `build_model`, or from a folder with
    `checkpoint.load_for_inference` / `checkpoint.from_pretrained`."""

    def __init__(
        self, config: ModelConfig, clip: nn.Module, sam: nn.Module | None, llm: PreTrainedModel
    ) -> None:
        super().__init__()
        if config.image_token_id is None:
            raise ConfigError("model.image_token_id is unset; pass the tokenizer to build_model or set it")
        self.config = config
        self.clip = clip
        self.sam = sam
        llm_dim = llm.config.get_text_config().hidden_size
        sam_channels = sam.config.output_channels if sam is not None else None
        self.fusion = Fusion(
            config.fusion, clip.config.hidden_size, llm_dim, config.vision.grid, sam_channels
        )
        self.selector = Selector(config.selector, llm_dim)
        self.llm = llm
        # teacher 'lesion' (not the paper's): a frozen SAM mask decoder, kept out of the module tree
        # so that it is neither trained nor saved; loaded on first use (see _lesion_relevance).
        object.__setattr__(self, "_lesion_decoder", None)

    # ------------------------------------------------------------------------------- basics

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.get_input_embeddings().weight.dtype

    @property
    def image_processor(self) -> ImageProcessor:
        """Turns PIL images into this model's `pixel_values_clip` / `pixel_values_sam`."""
        return ImageProcessor(self.config.vision, self.config.sam)

    def train(self, mode: bool = True) -> UltraModel:
        """Like nn.Module.train, but frozen encoders (no trainable parameter) stay in eval mode."""
        super().train(mode)
        for encoder in (self.clip, self.sam):
            if encoder is not None and not any(p.requires_grad for p in encoder.parameters()):
                encoder.eval()
        return self

    # ------------------------------------------------------------------- 1-2. encode and fuse

    def encode_images(
        self,
        pixel_values_clip: torch.Tensor | None,
        pixel_values_sam: torch.Tensor | None,
        clip_features: torch.Tensor | None = None,
        sam_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(M, 3, S, S) [+ (M, 3, S', S')] -> fused visual tokens H_v (M, N, D).

        Precomputed encoder outputs (train/feature_cache.py) stand in for the pixels of their encoder:
        `clip_features` (M, N, Dc) for CLIP's selected-layer tokens, `sam_features` (M, C, Gs, Gs) for
        SAM's neck grid; the frozen encoder is then not run."""
        tokens = self._clip_tokens(pixel_values_clip, clip_features)
        return self._fuse(tokens, pixel_values_sam, sam_features)

    def _clip_tokens(
        self, pixel_values_clip: torch.Tensor | None, clip_features: torch.Tensor | None
    ) -> torch.Tensor:
        """(M, 3, S, S) pixels, or cached (M, N, Dc) features -> CLIP's selected-layer tokens (M, N, Dc)."""
        if clip_features is not None:
            return clip_features.to(self.device)
        v = self.config.vision
        return clip_tokens(self.clip, pixel_values_clip.to(self.device), v.select_layer, v.select_feature)

    def _fuse(
        self, tokens: torch.Tensor, pixel_values_sam: torch.Tensor | None, sam_features: torch.Tensor | None
    ) -> torch.Tensor:
        """CLIP tokens (M, N, Dc) + SAM (pixels or cached grid, same M images) -> H_v (M, N, D)."""
        grid = self._sam_grid(pixel_values_sam, sam_features)  # (M, C, Gs, Gs) or None
        return self.fusion(tokens.to(self.dtype), grid)  # (M, N, D)

    def _sam_grid(
        self, pixel_values_sam: torch.Tensor | None, sam_features: torch.Tensor | None
    ) -> torch.Tensor | None:
        """SAM's neck grid (M, C, Gs, Gs) from pixels or the cache; None without SAM."""
        if self.sam is None:
            return None
        if sam_features is not None:
            return sam_features.to(self.device)
        if pixel_values_sam is None:
            raise DataError(
                "this model fuses SAM features: pass pixel_values_sam (ImageProcessor makes both)"
            )
        return sam_grid(self.sam, pixel_values_sam.to(self.device))

    @torch.no_grad()
    def _lesion_relevance(
        self, pixel_values_sam: torch.Tensor | None, sam_features: torch.Tensor | None
    ) -> torch.Tensor:
        """Teacher 'lesion': the predicted lesion probability mass of each image (M,), from the frozen
        SAM mask decoder of the `pretrain-encoders` run (labels after 'organ' are lesions)."""
        if self._lesion_decoder is None:
            from .pretrain_heads import load_mask_decoder

            scfg = self.config.selector
            folder = scfg.teacher_decoder or (
                str(Path(self.config.sam.path).parent) if self.config.sam.path else None
            )
            if folder is None:
                raise ConfigError(
                    "model.selector.teacher='lesion' needs the SAM mask decoder of a pretrain-encoders "
                    "run: set model.selector.teacher_decoder=DIR (or load SAM from DIR/sam)"
                )
            decoder = load_mask_decoder(Path(folder)).eval().requires_grad_(False)
            object.__setattr__(self, "_lesion_decoder", decoder)
        decoder = self._lesion_decoder.to(self.device)
        grid = self._sam_grid(pixel_values_sam, sam_features).float()  # (M, C, Gs, Gs)
        probs = decoder(grid).softmax(1)  # (M, L, 4Gs, 4Gs)
        return probs[:, 2:].sum((1, 2, 3))  # (M,)

    # -------------------------------------------------------------------------------- 3. select

    def _select(
        self,
        pixel_values_clip: torch.Tensor | None,
        pixel_values_sam: torch.Tensor | None,
        counts: list[int],
        findings_ids: torch.Tensor | None,
        findings_mask: torch.Tensor | None,
        clip_features: torch.Tensor | None = None,
        sam_features: torch.Tensor | None = None,
        frame_valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, Selection, torch.Tensor | None, torch.Tensor | None]:
        """Encode, score and select. Returns the chosen images' tokens (S, N, D), the selection, kd_loss
        and the optional supervised selector loss (None unless `supervised_weight > 0`, training).
        Cached encoder outputs (`clip_features`, `sam_features`; see `encode_images`) replace pixels."""
        if (pixel_values_clip is None and clip_features is None) or sum(counts) == 0:
            return None, Selection(indices=[[] for _ in counts]), None, None
        scfg = self.config.selector
        if scfg.mode == "none":  # fixed choice: encode only the images that will be used
            keys = None
            if scfg.none_strategy == "random" and not self.training:
                source = pixel_values_clip if pixel_values_clip is not None else clip_features
                keys = content_keys(source, counts)
            indices = self.selector.fixed_choice(counts, keys)
            offsets = np.cumsum([0, *counts[:-1]])
            flat = torch.tensor([int(offsets[b]) + i for b, idx in enumerate(indices) for i in idx])
            pick = [None if x is None else x[flat] for x in (pixel_values_clip, pixel_values_sam)]
            cached = [None if x is None else x[flat] for x in (clip_features, sam_features)]
            return self.encode_images(*pick, *cached), Selection(indices=indices), None, None

        cheap = scfg.score_features == "clip" and self.sam is not None
        if cheap:  # score on CLIP alone; SAM runs only on the chosen frames (below)
            tokens = self._clip_tokens(pixel_values_clip, clip_features)  # (M, N, Dc)
            feats = self.fusion.clip_projector(tokens.to(self.dtype))  # (M, N, D): H1 of every frame
        else:
            feats = self.encode_images(
                pixel_values_clip, pixel_values_sam, clip_features, sam_features
            )  # (M, N, D)
        scores, valid = group(self.selector.score(feats), counts)  # (B, K), (B, K)
        chosen = select_top(scores, valid, scfg.top_m)  # (B, K) hard 0/1
        multipliers = None
        if self.training and scfg.straight_through and torch.is_grad_enabled():
            multipliers = straight_through(scores, valid, chosen)
        if cheap:
            offsets = torch.tensor([0, *counts[:-1]], device=chosen.device).cumsum(0)
            b_idx, k_idx = chosen.nonzero(as_tuple=True)
            flat = (offsets[b_idx] + k_idx).cpu()  # the chosen frames, sample order
            fused = self._fuse(
                tokens[flat.to(tokens.device)],
                None if pixel_values_sam is None else pixel_values_sam[flat],
                None if sam_features is None else sam_features[flat],
            )  # (S, N, D): SAM encoded for S frames instead of M
            if multipliers is not None:
                fused = fused * multipliers[b_idx, k_idx].to(fused.dtype).view(-1, 1, 1)
            selected = fused
        else:
            selected = select_features(feats, counts, chosen, multipliers)  # (S, N, D)

        kd, teacher = None, None
        # KD applies to the samples that carry findings text, whichever teacher gives the target
        if scfg.mode == "feature+attention" and findings_ids is not None and scfg.teacher == "lesion":
            teacher, _ = group(self._lesion_relevance(pixel_values_sam, sam_features), counts)  # (B, K)
            kd = kd_loss(teacher, scores, valid, scfg.teacher_temperature, scfg.teacher_norm)
        elif scfg.mode == "feature+attention" and findings_ids is not None:
            if findings_mask is None:
                findings_mask = torch.ones_like(findings_ids)
            repeat = torch.tensor(counts, device=self.device)
            text = self.llm.get_input_embeddings()(findings_ids.to(self.device))  # (B, T, D)
            s_attn = attention_teacher(
                self.llm,
                feats.detach(),
                text.repeat_interleave(repeat, dim=0),  # (M, T, D)
                findings_mask.to(self.device).repeat_interleave(repeat, dim=0),  # (M, T)
                scfg.attn_layers,
                scfg.teacher_relevance,
            )
            teacher, _ = group(s_attn, counts)
            kd = kd_loss(teacher, scores, valid, scfg.teacher_temperature, scfg.teacher_norm)
        sup = None
        if frame_valid is not None and scfg.supervised_weight > 0 and self.training:
            labels, _ = group(frame_valid.to(self.device).float(), counts, fill=-1.0)
            sup = supervised_loss(scores, valid, labels.long())
        selection = Selection(
            indices=indices_from_mask(chosen),
            scores=scores.detach(),
            teacher=teacher.masked_fill(~valid, float("-inf")) if teacher is not None else None,
        )
        return selected, selection, kd, sup

    # ------------------------------------------------------------------------------- 4. scatter

    def embed(
        self, input_ids: torch.Tensor, image_feats: torch.Tensor | None, selection: Selection
    ) -> torch.Tensor:
        """Token embeddings (B, T, D) with the placeholder positions filled by the selected images' tokens."""
        input_ids = input_ids.to(self.device)
        is_image = input_ids == self.config.image_token_id  # (B, T)
        embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(is_image, 0))  # (B, T, D)
        n_tokens = image_feats.shape[1] if image_feats is not None else self.config.tokens_per_image
        found = is_image.sum(1).tolist()
        for b, (have, idx) in enumerate(zip(found, selection.indices, strict=True)):
            if have != len(idx) * n_tokens:
                raise DataError(
                    f"sample {b}: image tokens and features do not match: the text has {have} image "
                    f"placeholder tokens but {len(idx)} selected image(s) x {n_tokens} tokens = "
                    f"{len(idx) * n_tokens} features; the processor (model/processor.py) must expand "
                    f"the placeholder to ModelConfig.image_tokens_for(k) tokens"
                )
        if image_feats is None:
            return embeds
        return embeds.masked_scatter(is_image.unsqueeze(-1), image_feats.to(embeds.dtype))

    # ---------------------------------------------------------------------------------- 5. LLM

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixel_values_clip: torch.Tensor | None = None,
        pixel_values_sam: torch.Tensor | None = None,
        image_counts: Sequence[int] | torch.Tensor | None = None,
        findings_ids: torch.Tensor | None = None,
        findings_mask: torch.Tensor | None = None,
        clip_features: torch.Tensor | None = None,
        sam_features: torch.Tensor | None = None,
        frame_valid: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        return_logits: bool = True,
    ) -> UltraOutput:
        """Logits and losses for a batch (shapes in the module docstring; labels use -100 to ignore).

        `output_hidden_states=True` also returns the LLM's last hidden states (LoGra-Med's text view).

        `return_logits=False` (training) skips the (B, T, V) logits: the decoder's hidden states at the
        L labelled positions alone go through the LM head, (L, D) -> (L, V), and the loss is the same
        cross-entropy. Answers are a small share of a conversation, so this saves most of the head's
        compute and the logits' memory (at a 32k vocabulary, 2048 tokens: 256 MB per sample in fp32).

        `clip_features` (M, N, Dc) / `sam_features` (M, C, Gs, Gs): precomputed frozen-encoder outputs
        (a feature cache) given instead of `pixel_values_clip` / `pixel_values_sam`.

        `frame_valid` (M,): optional per-image validity labels (1/0, -1 unknown), read only by the
        optional supervised selector loss (`selector.supervised_weight > 0`, training)."""
        images = pixel_values_clip if pixel_values_clip is not None else clip_features
        counts = _image_counts(image_counts, input_ids.shape[0], images)
        feats, selection, kd, sup = self._select(
            pixel_values_clip,
            pixel_values_sam,
            counts,
            findings_ids,
            findings_mask,
            clip_features,
            sam_features,
            frame_valid,
        )
        embeds = self.embed(input_ids, feats, selection)  # (B, T, D)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.device)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # right or left padding
        if labels is not None and not return_logits and self._head_is_plain_linear():
            hidden = self.llm.get_decoder()(
                inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions
            ).last_hidden_state  # (B, T, D), after the final norm
            targets = labels[:, 1:].to(self.device)  # (B, T-1): token t predicts t+1
            keep = targets != IGNORE_INDEX  # (B, T-1)
            if keep.any():
                head = self.llm.get_output_embeddings()
                supervised = head(hidden[:, :-1][keep])  # (L, D) -> (L, V)
                lm_loss = F.cross_entropy(supervised.float(), targets[keep])
            else:
                lm_loss = hidden.sum() * 0.0
            logits, hidden = None, (hidden if output_hidden_states else None)
        else:
            logits, hidden, lm_loss = self._full_logits_and_loss(
                embeds, attention_mask, positions, labels, output_hidden_states
            )
        scfg = self.config.selector
        parts = [
            x
            for x in (
                lm_loss,
                None if kd is None else scfg.kd_weight * kd,
                None if sup is None else scfg.supervised_weight * sup,
            )
            if x is not None
        ]
        loss = sum(parts[1:], parts[0]) if parts else None
        return UltraOutput(
            loss=loss,
            lm_loss=lm_loss,
            kd_loss=kd,
            logits=logits,
            selection=selection,
            image_features=feats,
            hidden_states=hidden,
        )

    def _head_is_plain_linear(self) -> bool:
        """Whether logits = lm_head(last hidden state) with nothing after it (LLaMA, Mistral, Vicuna,
        Qwen2); models that scale or soft-cap their logits (Gemma 2, Cohere) take the full path."""
        cfg = self.llm.config
        return (
            getattr(cfg, "final_logit_softcapping", None) is None
            and getattr(cfg, "logit_scale", None) in (None, 1.0)
            and isinstance(self.llm.get_output_embeddings(), nn.Linear)
        )

    def _full_logits_and_loss(
        self,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        positions: torch.Tensor,
        labels: torch.Tensor | None,
        output_hidden_states: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The causal LM's own forward: logits (B, T, V), optional last hidden states, lm_loss."""
        llm_out = self.llm(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=positions,
            output_hidden_states=output_hidden_states,
        )
        logits = llm_out.logits
        hidden = llm_out.hidden_states[-1] if output_hidden_states else None

        lm_loss = None
        if labels is not None:
            targets = labels[:, 1:].to(self.device)  # (B, T-1): token t predicts t+1
            if (targets != IGNORE_INDEX).any():
                lm_loss = F.cross_entropy(
                    logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                    targets.reshape(-1),
                    ignore_index=IGNORE_INDEX,
                )
            else:
                lm_loss = logits.sum() * 0.0
        return logits, hidden, lm_loss

    # -------------------------------------------------------------------------------- generate

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values_clip: torch.Tensor | None = None,
        pixel_values_sam: torch.Tensor | None = None,
        image_counts: Sequence[int] | torch.Tensor | None = None,
        *,
        max_new_tokens: int = 128,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_strings: Sequence[str] = (),
        eos_token_id: int | Sequence[int] | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        on_selection: Callable[[Selection], None] | None = None,
        on_token: Callable[[int, int, bool], bool | None] | None = None,
        cache: str = "dynamic",
        compile: bool | str = False,
    ) -> GenerationOutput:
        """Decode answers with the LLM's KV cache: one prefill over the prompt embeddings, then one token
        per step. Greedy by default; sampling with temperature / top_p / seed. Rows are left-padded
        internally (so batched greedy equals one-by-one greedy). Stops at EOS, at a stop string (needs
        `tokenizer`), or after `max_new_tokens`.

        Streaming hooks (used by serve/engine.py): `on_selection(selection)` is called once, before
        decoding; `on_token(row, token_id, ended)` for every token a live row samples (EOS included;
        `ended` says this token ended the row by EOS or stop string); returning True ends that row.

        `cache='static'` decodes on a preallocated KV cache with fixed shapes; `compile=True` also
        compiles the step (inductor, CUDA graphs on a GPU; a string names another torch.compile
        backend); see model/decode.py. Timings and the path taken are in `.stats`.
        """
        check_cache(cache)
        if stop_strings and tokenizer is None:
            raise ConfigError("stop_strings need the tokenizer to decode; pass tokenizer=...")
        if do_sample and temperature <= 0:
            raise ConfigError(
                f"temperature={temperature} must be > 0 when sampling; use do_sample=False for greedy"
            )
        if not 0 < top_p <= 1:
            raise ConfigError(f"top_p={top_p} must be in (0, 1]")
        was_training = self.training
        self.eval()
        try:
            counts = _image_counts(image_counts, input_ids.shape[0], pixel_values_clip)
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            input_ids, attention_mask = _left_pad(input_ids, attention_mask)
            feats, selection, _, _ = self._select(pixel_values_clip, pixel_values_sam, counts, None, None)
            embeds = self.embed(input_ids, feats, selection)  # (B, T, D)
            if on_selection is not None:
                on_selection(selection)
            eos = eos_ids(eos_token_id, tokenizer, self.llm)
            generator = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
            rows: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
            done = [False] * len(rows)

            def take(tokens: list[int]) -> bool:
                for b, t in enumerate(tokens):
                    if done[b]:
                        continue
                    if t in eos:
                        done[b] = True
                    else:
                        rows[b].append(t)
                        if stop_strings and any(s in tokenizer.decode(rows[b]) for s in stop_strings):
                            done[b] = True
                    if on_token is not None and on_token(b, t, done[b]):
                        done[b] = True
                return all(done)

            stats = decode_loop(
                self.llm,
                embeds,
                attention_mask,
                max_new_tokens=max_new_tokens,
                pick=lambda logits: next_token(logits, do_sample, temperature, top_p, generator),
                on_tokens=take,
                cache=cache,
                compile=compile,
            )
        finally:
            self.train(was_training)
        texts = None
        if tokenizer is not None:
            texts = [_cut(tokenizer.decode(r, skip_special_tokens=True), stop_strings) for r in rows]
        return GenerationOutput(sequences=rows, texts=texts, selection=selection, stats=stats)

    def prepare_inputs(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompts: Sequence[str],
        images: Sequence[Sequence[Image.Image]],
    ) -> dict[str, Any]:
        """Tokenise prompts (each with one image placeholder where its images go), expand the placeholder
        to the right number of tokens, left-pad, and preprocess the images: a batch for `generate`.
        The input processor (model/processor.py) does it, the same code training collate uses."""
        return processor.prepare_inputs(tokenizer, self.config, prompts, images)

    # -------------------------------------------------------------------------------- config

    def resolved_config(self) -> ModelConfig:
        """This model's config with every pretrained part described inline (rebuildable offline)."""

        def inline(module: nn.Module, keep_type: bool) -> dict:
            data = module.config.to_diff_dict()
            for key in ("transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype"):
                data.pop(key, None)
            if not keep_type:
                data.pop("model_type", None)
            return data

        c = self.config

        def part(sub: Any, module: nn.Module | None, keep_type: bool = False) -> Any:
            if module is None:
                return sub
            return dataclasses.replace(
                sub, path=None, inline=inline(module, keep_type), origin=sub.origin or sub.path
            )

        return dataclasses.replace(
            c,
            vision=part(c.vision, self.clip),
            sam=part(c.sam, self.sam),
            llm=part(c.llm, self.llm, keep_type=True),
        )


def build_model(
    cfg: ModelConfig,
    tokenizer: PreTrainedTokenizerBase | None = None,
    device: str | torch.device | None = None,
) -> UltraModel:
    """Build the model from its config alone: pretrained parts from `path`, random init from `inline`.

    With a tokenizer, `image_token_id` is taken from (and checked against) it, and the LLM's
    embeddings grow to the tokenizer's size if it has more tokens (new rows use transformers' init).
    """
    dtype = resolve_dtype(cfg.dtype, device)
    if tokenizer is not None:
        token_id = tokenizer.convert_tokens_to_ids(cfg.image_token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ConfigError(
                f"the tokenizer has no {cfg.image_token!r} token; add it (tokenizer.add_special_tokens) "
                f"or build one with build_tiny_tokenizer"
            )
        if cfg.image_token_id is not None and cfg.image_token_id != token_id:
            raise ConfigError(
                f"model.image_token_id={cfg.image_token_id} but the tokenizer maps {cfg.image_token!r} to "
                f"{token_id}; set model.image_token_id={token_id}"
            )
        cfg = dataclasses.replace(cfg, image_token_id=token_id)
    llm = build_llm(cfg.llm, dtype=torch.float32)
    if tokenizer is not None and len(tokenizer) > llm.get_input_embeddings().num_embeddings:
        llm.resize_token_embeddings(len(tokenizer))
    model = UltraModel(cfg, build_clip(cfg.vision), build_sam(cfg.sam), llm)
    return model.to(device=device or "cpu", dtype=dtype)


# ------------------------------------------------------------------------------------- helpers


def _image_counts(
    counts: Sequence[int] | torch.Tensor | None, batch: int, pixels: torch.Tensor | None
) -> list[int]:
    """Per-sample image counts, checked against the number of images given."""
    total = 0 if pixels is None else int(pixels.shape[0])
    if counts is None:
        if total not in (0, batch):
            raise DataError(
                f"{total} images for {batch} samples: pass image_counts (images per sample) with the pixels"
            )
        return [total // batch] * batch if batch else []
    counts = [int(c) for c in (counts.tolist() if isinstance(counts, torch.Tensor) else counts)]
    if len(counts) != batch or any(c < 0 for c in counts):
        raise DataError(
            f"image_counts {counts} must hold one non-negative count per sample ({batch} samples)"
        )
    if sum(counts) != total:
        raise DataError(
            f"image_counts add up to {sum(counts)} images but pixel_values_clip holds {total} images"
        )
    return counts


def _left_pad(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's real tokens to the right end (left padding), keeping their order."""
    if bool(attention_mask[:, -1].all()):
        return input_ids, attention_mask
    ids, mask = torch.zeros_like(input_ids), torch.zeros_like(attention_mask)
    width = input_ids.shape[1]
    for b in range(input_ids.shape[0]):
        real = input_ids[b][attention_mask[b].bool()]
        ids[b, width - len(real) :] = real
        mask[b, width - len(real) :] = 1
    return ids, mask


def _cut(text: str, stop_strings: Sequence[str]) -> str:
    """Text before the first occurrence of any stop string."""
    cuts = [text.find(s) for s in stop_strings if s in text]
    return text[: min(cuts)] if cuts else text
