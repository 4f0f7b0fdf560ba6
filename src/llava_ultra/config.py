"""Configuration: validated dataclasses, YAML -> dataclass loading, dotted overrides, JSON round-trip.

Every part of the toolkit reads its settings from one dataclass tree rooted at `Config`. Each field
carries a docstring-style comment, and each `__post_init__` validates its own fields, raising
`ConfigError` that names the dotted field and the fix. Loading is strict: an unknown key raises
`ConfigError` with the closest valid name (difflib), because a silently ignored typo in a training
config is a lost day of GPU time.

Notable choices:
- Pretrained parts (CLIP, SAM, LLM) are given either as `path` (a hub id or a local folder, loaded
  with `from_pretrained` at home) or as `inline` transformers config kwargs (random init, as in the
  tests and the `tiny` preset). Exactly one of the two. A saved checkpoint stores the resolved
  `inline` config so that it can be rebuilt from the folder alone (`origin` keeps the source).
- The conversion between dicts and dataclasses is generic (type-hint driven), so adding a section
  is adding a field: the training engineer adds `train:` and `data:` to `Config` (see the marked
  place below) and `load_config` picks them up.
- Overrides use dotted keys, `model.fusion.alpha_init=0.5`, values parsed as YAML scalars.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from .errors import ConfigError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ASPECT_RATIOS = ("pad", "crop", "resize")
RESIZE_RULES = ("square", "shortest_edge_crop")
RESAMPLE_FILTERS = ("nearest", "lanczos", "bilinear", "bicubic", "box", "hamming")  # PIL's 0..5
PAD_COLOUR_RULES = ("truncate", "round")
SELECT_FEATURES = ("patch", "cls_patch")
ALIGNS = ("pool", "conv")
PROJECTOR_TYPES = ("linear", "mlp2x_gelu")
SELECTOR_MODES = ("none", "feature", "feature+attention")
NONE_STRATEGIES = ("all", "first", "random")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
DTYPES = ("auto", "float32", "bfloat16", "float16")
TEMPLATES = ("vicuna_v1", "mistral_instruct", "plain")
"""Conversation formats (LLaVA's names), rendered by `model.tokenizer`: the one list that model,
training, evaluation and serving validate against."""


def _one_of(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        hint = difflib.get_close_matches(str(value), allowed, n=1, cutoff=0.5)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(f"{name}={value!r} is not supported{extra}; use one of {', '.join(allowed)}")


def _source(name: str, path: str | None, inline: dict | None) -> None:
    if (path is None) == (inline is None):
        raise ConfigError(
            f"{name}: set exactly one of {name}.path (a hub id or local folder) or {name}.inline "
            f"(transformers config kwargs for a random-init model); got "
            f"{'both' if path is not None else 'neither'}"
        )


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{name}={value} must be > 0")


def _triple(name: str, value: tuple[float, ...], positive: bool = False) -> None:
    if len(value) != 3 or (positive and any(v <= 0 for v in value)):
        need = "three positive numbers" if positive else "three numbers"
        raise ConfigError(f"{name}={list(value)} must be {need}, one per RGB channel")


def _inline_matches(name: str, inline: dict | None, key: str, value: int) -> None:
    if inline is not None and key in inline and inline[key] != value:
        raise ConfigError(
            f"{name}.inline.{key}={inline[key]} disagrees with {name}.{key}={value}; set them equal "
            f"(the preprocessing size must be the size the encoder was built for)"
        )


@dataclass
class VisionConfig:
    """The CLIP vision encoder (frozen by default) and its preprocessing."""

    path: str | None = None
    """Hub id or local folder of a CLIP checkpoint, e.g. 'openai/clip-vit-large-patch14-336'."""
    inline: dict[str, Any] | None = None
    """`transformers.CLIPVisionConfig` kwargs for a random-init encoder (tests, tiny preset)."""
    select_layer: int = -2
    """Index into the encoder's hidden states whose tokens are used (LLaVA: -2, the penultimate)."""
    select_feature: str = "patch"
    """'patch' drops the CLS token (LLaVA default); 'cls_patch' keeps it."""
    image_size: int = 336
    """Input side in pixels; must equal the encoder's own image_size."""
    patch_size: int = 14
    """Patch side in pixels; the token grid is image_size/patch_size per side."""
    image_aspect_ratio: str = "pad"
    """'pad': expand to a square with the mean colour (LLaVA v1.5); 'crop': centre crop; 'resize': squash."""
    resize: str = "square"
    """How CLIP's input reaches image_size: 'square' resizes the square image to image_size x image_size;
    'shortest_edge_crop' is CLIPImageProcessor's rule (shortest edge to image_size, the other edge
    int(image_size * long / short), then a centre crop), so with image_aspect_ratio='crop' the crop comes
    after the resize, as in llava-hf and in original LLaVA without 'pad'. Both agree on square images."""
    resample: str = "bicubic"
    """PIL resampling filter of the CLIP resize: nearest, lanczos, bilinear, bicubic, box or hamming."""
    pad_colour: str = "truncate"
    """How 'pad' turns image_mean into a colour: 'truncate' = int(mean * 255) per channel, LLaVA's
    expand2square rule; 'round' = round(mean * 255) (what llava-ultra did before this field existed)."""
    image_mean: tuple[float, float, float] = CLIP_MEAN
    """Per-channel normalisation mean (CLIP's by default)."""
    image_std: tuple[float, float, float] = CLIP_STD
    """Per-channel normalisation std (CLIP's by default)."""
    origin: str | None = None
    """Informational: where the weights came from (set when a checkpoint is saved)."""

    def __post_init__(self) -> None:
        _source("model.vision", self.path, self.inline)
        _one_of("model.vision.select_feature", self.select_feature, SELECT_FEATURES)
        _one_of("model.vision.image_aspect_ratio", self.image_aspect_ratio, ASPECT_RATIOS)
        _one_of("model.vision.resize", self.resize, RESIZE_RULES)
        _one_of("model.vision.resample", self.resample, RESAMPLE_FILTERS)
        _one_of("model.vision.pad_colour", self.pad_colour, PAD_COLOUR_RULES)
        _positive("model.vision.image_size", self.image_size)
        _positive("model.vision.patch_size", self.patch_size)
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"model.vision.image_size={self.image_size} is not a multiple of "
                f"model.vision.patch_size={self.patch_size}; pick sizes that divide evenly"
            )
        if self.select_layer == 0:
            raise ConfigError("model.vision.select_layer=0 is the patch embedding, not a layer; use e.g. -2")
        _inline_matches("model.vision", self.inline, "image_size", self.image_size)
        _inline_matches("model.vision", self.inline, "patch_size", self.patch_size)
        _triple("model.vision.image_mean", self.image_mean)
        _triple("model.vision.image_std", self.image_std, positive=True)

    @property
    def grid(self) -> int:
        """Tokens per side of the CLIP patch grid."""
        return self.image_size // self.patch_size


@dataclass
class SamConfig:
    """The second, fine-grained encoder: SAM's ViT image encoder (neck output)."""

    enabled: bool = True
    """False gives plain LLaVA (the paper's 'w/o visual enhancement' ablation)."""
    path: str | None = None
    """Hub id or local folder of a SAM checkpoint, e.g. 'facebook/sam-vit-large'."""
    inline: dict[str, Any] | None = None
    """`transformers.SamVisionConfig` kwargs for a random-init encoder."""
    image_size: int = 1024
    """Longest side after resizing; the image is padded to a square of this side."""
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    """Per-channel normalisation mean (SAM uses ImageNet statistics)."""
    image_std: tuple[float, float, float] = IMAGENET_STD
    """Per-channel normalisation std."""
    origin: str | None = None
    """Informational: where the weights came from (set when a checkpoint is saved)."""

    def __post_init__(self) -> None:
        if self.enabled:
            _source("model.sam", self.path, self.inline)
        _positive("model.sam.image_size", self.image_size)
        _inline_matches("model.sam", self.inline, "image_size", self.image_size)
        _triple("model.sam.image_mean", self.image_mean)
        _triple("model.sam.image_std", self.image_std, positive=True)


@dataclass
class FusionConfig:
    """Grid alignment of SAM to CLIP, the two projectors, and the fusion weight."""

    align: str = "pool"
    """'pool': parameter-free adaptive average pooling of the SAM grid to the CLIP grid;
    'conv': bilinear resize then stride-2 convolutions (DeepSeek-VL style)."""
    conv_channels: list[int] = field(default_factory=lambda: [512, 1024])
    """'conv' only: output channels of each stride-2 convolution (each halves the grid)."""
    projector_type: str = "mlp2x_gelu"
    """'linear' or 'mlp2x_gelu' (Linear-GELU-Linear, LLaVA v1.5), used for both projectors."""
    alpha_init: float = 0.5
    """Initial CLIP weight a in H_v = a*H1 + (1-a)*H2; a = sigmoid(free parameter), in (0, 1)."""

    def __post_init__(self) -> None:
        _one_of("model.fusion.align", self.align, ALIGNS)
        _one_of("model.fusion.projector_type", self.projector_type, PROJECTOR_TYPES)
        if not 0.0 < self.alpha_init < 1.0:
            raise ConfigError(
                f"model.fusion.alpha_init={self.alpha_init} must lie strictly between 0 and 1 "
                f"(it is the sigmoid of a free parameter); 0.5 weighs both encoders equally"
            )
        if not self.conv_channels or any(int(c) <= 0 for c in self.conv_channels):
            raise ConfigError(
                f"model.fusion.conv_channels={self.conv_channels} must be a non-empty list of positive ints"
            )


@dataclass
class SelectorConfig:
    """Redundancy adaptation: which of a report's k images reach the LLM."""

    mode: str = "feature+attention"
    """'none' (no scoring), 'feature' (learned scorer), 'feature+attention' (scorer + KD from the
    attention teacher) - the paper's ablation rows."""
    none_strategy: str = "first"
    """mode 'none' only: 'all' sends every image to the LLM (naive multi-image), 'first' the first,
    'random' one arbitrary image per sample (a fresh draw each training visit; a content hash at eval)."""
    top_m: int = 1
    """Images per sample sent to the LLM by the scorer (the paper uses 1)."""
    attn_layers: int = 2
    """N: how many leading LLM layers the attention teacher runs."""
    kd_weight: float = 1.0
    """Weight of the KD loss in the total loss (mode 'feature+attention')."""
    teacher_temperature: float = 0.1
    """Softmax temperature for the teacher's relevances (after `teacher_norm`; below 1 sharpens)."""
    teacher_norm: str = "zscore"
    """How the teacher's relevances of one sample's k images are normalised before softmax(. / T):
    'none' (the raw attention masses, which lie in [0, 1] and differ by ~1e-3 between frames: a
    near-uniform target) or 'zscore' (standardised within the sample, so the target's sharpness is
    set by T alone, whatever the scale of the attention masses). See docs/results.md."""
    score_features: str = "fused"
    """What the feature scorer reads: 'fused' (the paper: H_v of CLIP + SAM for every frame) or
    'clip' (cheap selection: the CLIP projector's tokens H1; SAM then runs only on the chosen
    frames, k times less SAM compute; the attention teacher reads H1 too)."""
    teacher_relevance: str = "mass"
    """What the teacher reads from the attention of the findings text on an image's tokens: 'mass'
    (total attention on the image, the paper's reading of Attn(H_v, H_t)) or 'peak' (the largest
    attention on any single image token)."""
    teacher: str = "attention"
    """Who gives the KD target in mode 'feature+attention': 'attention' (the paper: the LLM's attention
    of the findings text on each image) or 'lesion' (an alternative that is not the paper's: the
    lesion probability mass that the SAM mask decoder of `llava-ultra pretrain-encoders` predicts on
    each frame; frozen, used in training only, never saved in the checkpoint). See docs/results.md."""
    teacher_decoder: str | None = None
    """teacher 'lesion' only: folder of a `pretrain-encoders` run (holding sam_decoder.safetensors);
    default: the folder above `model.sam.path`."""
    straight_through: bool = True
    """Give the scorer a gradient from the LM loss via a straight-through estimator while training."""
    supervised_weight: float = 0.0
    """Optional, off by default (not the paper's method): weight of a cross-entropy between the
    scorer's softmax over a sample's images and the frame validity labels (`valid` in the data),
    for users who have some labelled frames. Samples without labels contribute nothing."""

    def __post_init__(self) -> None:
        _one_of("model.selector.mode", self.mode, SELECTOR_MODES)
        _one_of("model.selector.none_strategy", self.none_strategy, NONE_STRATEGIES)
        if self.top_m < 1:
            raise ConfigError(f"model.selector.top_m={self.top_m} must be >= 1")
        if self.attn_layers < 1:
            raise ConfigError(f"model.selector.attn_layers={self.attn_layers} must be >= 1")
        if self.kd_weight < 0:
            raise ConfigError(f"model.selector.kd_weight={self.kd_weight} must be >= 0")
        _positive("model.selector.teacher_temperature", self.teacher_temperature)
        _one_of("model.selector.teacher_norm", self.teacher_norm, ("none", "zscore"))
        _one_of("model.selector.teacher_relevance", self.teacher_relevance, ("mass", "peak"))
        _one_of("model.selector.score_features", self.score_features, ("fused", "clip"))
        _one_of("model.selector.teacher", self.teacher, ("attention", "lesion"))
        if self.supervised_weight < 0:
            raise ConfigError(f"model.selector.supervised_weight={self.supervised_weight} must be >= 0")

    def images_into_llm(self, k: int) -> int:
        """How many of a sample's k images reach the LLM (the processor expands this many placeholders)."""
        if k <= 0:
            return 0
        if self.mode == "none":
            return k if self.none_strategy == "all" else 1
        return min(self.top_m, k)


@dataclass
class LLMConfig:
    """The language model (any `AutoModelForCausalLM`; LLaMA/Vicuna/Mistral in practice)."""

    path: str | None = None
    """Hub id or local folder, e.g. 'lmsys/vicuna-13b-v1.5' or a converted LLaVA-Med folder."""
    inline: dict[str, Any] | None = None
    """Config kwargs for a random-init LLM; 'model_type' picks the family (default 'llama')."""
    attn_implementation: str = "sdpa"
    """Attention kernel; the attention teacher switches to 'eager' itself when it needs weights."""
    origin: str | None = None
    """Informational: where the weights came from (set when a checkpoint is saved)."""

    def __post_init__(self) -> None:
        _source("model.llm", self.path, self.inline)
        _one_of("model.llm.attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)


@dataclass
class ModelConfig:
    """Everything `build_model` needs, and nothing about training."""

    vision: VisionConfig
    """CLIP encoder."""
    llm: LLMConfig
    """Language model."""
    sam: SamConfig = field(default_factory=lambda: SamConfig(enabled=False))
    """SAM encoder (disabled unless configured)."""
    fusion: FusionConfig = field(default_factory=FusionConfig)
    """Alignment, projectors and fusion weight."""
    selector: SelectorConfig = field(default_factory=SelectorConfig)
    """Adaptive image selection."""
    image_token: str = "<image>"
    """Placeholder token string in prompts."""
    image_token_id: int | None = None
    """Its id; None means 'ask the tokenizer' at build time."""
    dtype: str = "auto"
    """'auto' = float32 on CPU, bfloat16 on CUDA when supported else float16; or an explicit dtype."""
    template: str = "vicuna_v1"
    """Conversation format the LLM was tuned with (recorded by `llava-ultra convert`, used to prompt it)."""

    def __post_init__(self) -> None:
        _one_of("model.dtype", self.dtype, DTYPES)
        _one_of("model.template", self.template, TEMPLATES)
        if not self.image_token:
            raise ConfigError("model.image_token is empty; use e.g. '<image>'")
        if self.sam.enabled and self.vision.select_feature == "cls_patch":
            raise ConfigError(
                "model.vision.select_feature='cls_patch' cannot be fused with SAM (SAM has no CLS token); "
                "use select_feature='patch' or set model.sam.enabled=false"
            )
        if self.selector.teacher == "lesion" and not self.sam.enabled:
            raise ConfigError(
                "model.selector.teacher='lesion' reads SAM's lesion masks but model.sam.enabled=false; "
                "use teacher='attention' or enable SAM"
            )
        inline = self.llm.inline or {}
        layers, vocab = inline.get("num_hidden_layers"), inline.get("vocab_size")
        if (
            self.selector.mode == "feature+attention"
            and layers is not None
            and self.selector.attn_layers > layers
        ):
            raise ConfigError(
                f"model.selector.attn_layers={self.selector.attn_layers} exceeds the LLM's "
                f"num_hidden_layers={layers}; use at most {layers}"
            )
        if self.image_token_id is not None and vocab is not None and not 0 <= self.image_token_id < vocab:
            raise ConfigError(
                f"model.image_token_id={self.image_token_id} is outside the LLM vocabulary (size {vocab}); "
                f"use the tokenizer's id for {self.image_token!r}"
            )

    @property
    def tokens_per_image(self) -> int:
        """Visual tokens one image occupies in the LLM sequence."""
        return self.vision.grid**2 + (1 if self.vision.select_feature == "cls_patch" else 0)

    def image_tokens_for(self, k: int) -> int:
        """Placeholder tokens the input processor inserts for a sample with k images."""
        return self.selector.images_into_llm(k) * self.tokens_per_image


OPTIMIZERS = ("adam", "adamw")
MIXED_PRECISIONS = ("auto", "no", "bf16", "fp16")
COMPONENTS = ("clip", "sam", "projectors", "fusion", "selector", "llm")
COMPONENT_MODES = ("frozen", "lora", "full")


@dataclass
class DataConfig:
    """Instruction data for training (files written by `llava-ultra instruct`)."""

    stage1: str | None = None
    """Instruction JSON for stage 1 (concept alignment), e.g. data/instruct/stage1.train.json."""
    stage2: str | None = None
    """Instruction JSON for stage 2 (instruction tuning), e.g. data/instruct/stage2.train.json."""
    image_root: str | None = None
    """Folder the samples' image paths are relative to; None: `image_root` of the instruct_meta.json
    beside the file, else the file's own folder."""
    max_length: int | None = None
    """Longest token sequence after expanding image placeholders; None: the LLM's max positions."""
    max_bad_fraction: float = 0.01
    """Largest fraction of skipped samples (missing/corrupt image, too long, malformed) before the
    run aborts; every skipped sample is reported by id either way."""
    findings_tokens: int = 64
    """Findings-text tokens given to the selector's attention teacher (stage 2, 'feature+attention')."""
    num_workers: int = 0
    """DataLoader worker processes per training process (0 = load in the training process)."""
    system: str | None = None
    """System prompt; None: the template's default (LLaVA's for 'vicuna_v1', none for 'mistral_instruct')."""
    feature_cache: str | None = None
    """Folder written by `llava-ultra cache-features`: training reads the frozen encoders' outputs
    from it instead of decoding images and running CLIP / SAM (refused for a different encoder)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError(f"data.max_bad_fraction={self.max_bad_fraction} must be in [0, 1]")
        if self.max_length is not None:
            _positive("data.max_length", self.max_length)
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers={self.num_workers} must be >= 0")
        if self.findings_tokens < 0:
            raise ConfigError(f"data.findings_tokens={self.findings_tokens} must be >= 0")


@dataclass
class StageConfig:
    """Optimisation settings of one training stage (`Stage1Config` / `Stage2Config` set the defaults)."""

    NAME: ClassVar[str] = "train.stage"
    DEFAULT_TRAINABLE: ClassVar[dict[str, str]] = {}

    template: str = "vicuna_v1"
    """Conversation format: 'plain' (image + caption, LLaVA stage 1), 'vicuna_v1' or 'mistral_instruct'
    (LLaVA-Med v1.5); use the one the LLM was tuned with (`model.template` of a converted checkpoint)."""
    trainable: dict[str, str] = field(default_factory=dict)
    """Component -> frozen | lora | full (components: clip, sam, projectors, fusion, selector, llm),
    merged over the stage's defaults (set a component to 'frozen' to freeze it); unnamed
    components are frozen. Stage 1: projectors + fusion; stage 2 adds the selector and LoRA on the LLM."""
    epochs: int = 1
    """Passes over the data."""
    max_steps: int | None = None
    """Stop after this many optimiser steps (None: run all epochs)."""
    lr: float = 1e-3
    """Peak learning rate (the paper: Adam, 1e-3)."""
    batch_size: int = 16
    """Samples per process per micro-batch (global batch = batch_size x grad_accum x processes)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimiser step."""
    warmup_ratio: float = 0.03
    """Fraction of the steps spent warming the learning rate up linearly from 0."""
    min_lr_ratio: float = 0.0
    """Cosine decay floor as a fraction of lr."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW) or L2 (Adam), not applied to biases and norms."""

    def __post_init__(self) -> None:
        name = self.NAME
        _one_of(f"{name}.template", self.template, TEMPLATES)
        self.trainable = {**self.DEFAULT_TRAINABLE, **self.trainable}
        for part, mode in self.trainable.items():
            _one_of(f"{name}.trainable component", part, COMPONENTS)
            _one_of(f"{name}.trainable.{part}", mode, COMPONENT_MODES)
        if all(mode == "frozen" for mode in self.trainable.values()):
            raise ConfigError(f"{name}.trainable leaves nothing to train; mark a component 'full' or 'lora'")
        _positive(f"{name}.lr", self.lr)
        for key in ("epochs", "batch_size", "grad_accum"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{name}.{key}={getattr(self, key)} must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"{name}.max_steps={self.max_steps} must be >= 1 (or null for all epochs)")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"{name}.warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"{name}.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if self.weight_decay < 0:
            raise ConfigError(f"{name}.weight_decay={self.weight_decay} must be >= 0")


@dataclass
class Stage1Config(StageConfig):
    """Stage 1, concept alignment: captions in the 'plain' format, projectors + fusion trainable."""

    NAME: ClassVar[str] = "train.stage1"
    DEFAULT_TRAINABLE: ClassVar[dict[str, str]] = {"projectors": "full", "fusion": "full"}

    template: str = "plain"


@dataclass
class Stage2Config(StageConfig):
    """Stage 2, instruction tuning: conversations; projectors, fusion, selector and LoRA on the LLM."""

    NAME: ClassVar[str] = "train.stage2"
    DEFAULT_TRAINABLE: ClassVar[dict[str, str]] = {
        "projectors": "full",
        "fusion": "full",
        "selector": "full",
        "llm": "lora",
    }

    template: str = "vicuna_v1"
    lr: float = 2e-4


@dataclass
class LoraSettings:
    """LoRA on the LLM (stage 2)."""

    r: int = 16
    """Rank."""
    alpha: int = 32
    """Scaling numerator (scale = alpha / r)."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """LLM module names that get adapters (matched inside the LLM only, never the vision towers)."""

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha < 1:
            raise ConfigError(f"train.lora.r={self.r} and train.lora.alpha={self.alpha} must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"train.lora.dropout={self.dropout} must be in [0, 1)")


ALIGN_SOLVERS = ("lap", "ipfp")


@dataclass
class AlignSettings:
    """LoGra-Med alignment loss settings (mirror `model.align.AlignConfig`; its weight is
    `train.align_weight`). See docs/logra.md."""

    k: int = 5
    """kNN neighbours per node; must be below every aligned stage's batch_size."""
    lam: float = 80.0
    """Black-box differentiation strength lambda."""
    hidden: int = 256
    """Width of the GNN's two graph convolutions."""
    solver: str = "lap"
    """'lap' (linear assignment on unary costs) or 'ipfp' (quadratic-assignment heuristic)."""
    noise: float = 0.1
    """Gumbel noise scale on the affinities while training."""
    ipfp_iters: int = 10
    """Iterations of the 'ipfp' heuristic."""
    stages: list[int] = field(default_factory=lambda: [1, 2])
    """Stages that add the loss (when train.align_weight > 0)."""

    def __post_init__(self) -> None:
        _one_of("train.align.solver", self.solver, ALIGN_SOLVERS)
        for key in ("k", "lam", "hidden", "ipfp_iters"):
            _positive(f"train.align.{key}", getattr(self, key))
        if self.noise < 0:
            raise ConfigError(f"train.align.noise={self.noise} must be >= 0 (0 disables the noise)")
        if any(s not in (1, 2) for s in self.stages):
            raise ConfigError(f"train.align.stages={self.stages} may only hold 1 and 2")


@dataclass
class TrainConfig:
    """The two-stage recipe: which stages, where outputs go, and how to optimise."""

    stages: list[int] = field(default_factory=lambda: [1, 2])
    """Stages to run in order: [1, 2] chained, or [1] / [2] alone (stage 2 alone needs init_from)."""
    output_dir: str = "runs/train"
    """Run folder: <output_dir>/stage1, <output_dir>/stage2 (final checkpoints), checkpoints/, logs."""
    init_from: str | None = None
    """Checkpoint folder the first stage starts from (stage 2 alone: stage 1's output folder)."""
    tokenizer: str | None = None
    """Tokenizer folder or hub id; None: init_from's, else model.llm.path's, else a tiny byte-level
    BPE trained on the training text (inline tiny models)."""
    seed: int = 0
    """Seeds model init, shuffling and every RNG; same seed and data give the same weights on CPU."""
    optimizer: str = "adamw"
    """'adam' or 'adamw'."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm (0 disables)."""
    mixed_precision: str = "auto"
    """'auto' = bf16 autocast on a GPU that supports it, none on CPU; or 'no', 'bf16', 'fp16'."""
    gradient_checkpointing: bool = False
    """Recompute LLM activations in the backward pass (less memory, ~30 % slower)."""
    save_every: int = 0
    """Write a resumable checkpoint every N optimiser steps (0: only at the end of a stage)."""
    keep_last: int = 2
    """Resumable checkpoints kept per stage (older ones are deleted)."""
    log_every: int = 1
    """Write a metrics.jsonl line every N optimiser steps."""
    progress: bool = True
    """Show a progress bar (main process only)."""
    tensorboard: bool = True
    """Also log to TensorBoard under <output_dir>/tb when the tensorboard package is installed."""
    find_unused_parameters: bool = False
    """DDP only: set when some trainable parameter gets no gradient in a step."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA settings for components marked 'lora'."""
    stage1: Stage1Config = field(default_factory=Stage1Config)
    """Stage 1, concept alignment: projectors + fusion trainable, everything else frozen."""
    stage2: Stage2Config = field(default_factory=Stage2Config)
    """Stage 2, instruction tuning: projectors, fusion, selector and LoRA on the LLM."""
    align_weight: float = 0.0
    """Weight of the LoGra-Med multi-graph alignment loss added to the LM loss (0 = off)."""
    align: AlignSettings = field(default_factory=AlignSettings)
    """Settings of that loss (used only when align_weight > 0)."""

    def __post_init__(self) -> None:
        if (
            not self.stages
            or any(s not in (1, 2) for s in self.stages)
            or self.stages != sorted(set(self.stages))
        ):
            raise ConfigError(f"train.stages={self.stages} must be [1], [2] or [1, 2]")
        _one_of("train.optimizer", self.optimizer, OPTIMIZERS)
        _one_of("train.mixed_precision", self.mixed_precision, MIXED_PRECISIONS)
        if self.keep_last < 1 or self.save_every < 0 or self.log_every < 1:
            raise ConfigError(
                f"train.keep_last={self.keep_last} must be >= 1, train.save_every={self.save_every} >= 0 "
                f"and train.log_every={self.log_every} >= 1"
            )
        if self.max_grad_norm < 0:
            raise ConfigError(f"train.max_grad_norm={self.max_grad_norm} must be >= 0")
        if self.align_weight < 0:
            raise ConfigError(f"train.align_weight={self.align_weight} must be >= 0 (0 turns it off)")
        for n in self.aligned_stages():
            if self.align.k >= self.stage(n).batch_size:
                raise ConfigError(
                    f"train.align.k={self.align.k} needs a per-device batch above it, but "
                    f"train.stage{n}.batch_size={self.stage(n).batch_size}; raise the batch size or "
                    f"lower train.align.k (or drop {n} from train.align.stages)"
                )

    def aligned_stages(self) -> list[int]:
        """The stages of this run that add the alignment loss (none when align_weight is 0)."""
        return [n for n in self.stages if self.align_weight > 0 and n in self.align.stages]

    def stage(self, n: int) -> StageConfig:
        """The settings of stage n (1 or 2)."""
        return self.stage1 if n == 1 else self.stage2


@dataclass
class Config:
    """The whole run. Sections are added as fields; `load_config` maps YAML keys onto them."""

    model: ModelConfig
    """The model (see `ModelConfig`)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training recipe (see `TrainConfig`); unused by model-only files."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data (see `DataConfig`)."""


# ------------------------------------------------------------------------------ dict <-> dataclass


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check and convert a plain YAML/JSON value to the annotated type `tp`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where} must not be null")
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list, got {type(value).__name__} {value!r}")
        args = typing.get_args(tp)
        item = args[0] if args else Any
        items = [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if value is None:
        raise ConfigError(f"{where} must not be null; give a {_type_name(tp)}")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value.strip()):
            value = float(value)  # PyYAML reads '1e-4' (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported field type {tp!r}")  # a bug in a dataclass definition


def _unknown_key(key: str, known: list[str], where: str, cls: type | None = None) -> ConfigError:
    prefix = f"{where}." if where else ""
    nested = []  # the key exists one level down (e.g. train.lr -> train.stage1.lr, train.stage2.lr)
    if cls is not None and dataclasses.is_dataclass(cls):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            sub = hints.get(f.name)
            if dataclasses.is_dataclass(sub) and key in {g.name for g in dataclasses.fields(sub)}:
                nested.append(f"{prefix}{f.name}.{key}")
    hint = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    if nested:
        suggestion = f"it is set per part: use {' or '.join(nested)}. "
    else:
        suggestion = f"did you mean {hint[0]!r}? " if hint else ""
    return ConfigError(
        f"unknown key {where + '.' if where else ''}{key}: {suggestion}valid keys: {', '.join(known)}"
    )


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, strictly (unknown keys, wrong types -> ConfigError)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__} must be a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise _unknown_key(str(key), names, where, cls)
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where or cls.__name__} is missing required key(s): {', '.join(missing)}")
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain JSON/YAML-safe dict of a config dataclass (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(cfg))


# ------------------------------------------------------------------------------------ overrides


def _field_type(cls: type, key: str, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    if key not in hints:
        raise _unknown_key(key, [f.name for f in dataclasses.fields(cls)], where, cls)
    tp = hints[key]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = inner[0] if len(inner) == 1 else tp
    return tp


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any], root: type = Config) -> dict:
    """Apply dotted overrides (`a.b.c=value` strings or a {dotted: value} dict) to a raw config dict.

    Keys are checked against the dataclass tree rooted at `root` (free-form `inline` dicts accept
    any sub-key). String values are parsed as YAML scalars: `0.5`, `true`, `null`, `[1, 2]`.
    """
    if isinstance(overrides, dict):
        pairs = list(overrides.items())
    else:
        pairs = []
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} has no '='; write it as dotted.key=value")
            key, raw = item.split("=", 1)
            pairs.append((key.strip(), yaml.safe_load(raw) if raw.strip() else ""))
    for dotted, value in pairs:
        parts = dotted.split(".")
        node, cls, where = data, root, ""
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if cls is not None:
                tp = _field_type(cls, part, where)
                cls = tp if dataclasses.is_dataclass(tp) else None
            where = f"{where}.{part}" if where else part
            if last:
                node[part] = value
            else:
                if not isinstance(node.get(part), dict):
                    node[part] = {}
                node = node[part]
    return data


# ------------------------------------------------------------------------------------- loading


def read_yaml_mapping(path: str | Path, missing: str, not_mapping: str) -> dict[str, Any]:
    """The mapping in a YAML file; `missing` / `not_mapping` end the error messages with the fix."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; {missing}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} {not_mapping}")
    return data


def load_config(path: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Read a YAML preset, apply dotted overrides, and return the validated `Config`."""
    path = Path(path)
    data = read_yaml_mapping(
        path,
        "pass a YAML file such as configs/tiny.yaml",
        "must hold a mapping with a 'model:' section at the top level",
    )
    apply_overrides(data, overrides or [])
    try:
        return from_dict(Config, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def model_config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """Validated `ModelConfig` from a plain dict (e.g. a checkpoint's saved config)."""
    return from_dict(ModelConfig, data, "model")


def save_json(cfg: Any, path: str | Path) -> None:
    """Write a config dataclass as indented UTF-8 JSON (beside checkpoints)."""
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def load_json(cls: type, path: str | Path) -> Any:
    """Read a config dataclass saved by `save_json`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    return from_dict(cls, data, "model" if cls is ModelConfig else "")
