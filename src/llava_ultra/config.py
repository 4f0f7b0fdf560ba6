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
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ASPECT_RATIOS = ("pad", "crop", "resize")
SELECT_FEATURES = ("patch", "cls_patch")
ALIGNS = ("pool", "conv")
PROJECTOR_TYPES = ("linear", "mlp2x_gelu")
SELECTOR_MODES = ("none", "feature", "feature+attention")
NONE_STRATEGIES = ("all", "first")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
DTYPES = ("auto", "float32", "bfloat16", "float16")


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
    """mode 'none' only: 'all' sends every image to the LLM (naive multi-image), 'first' the first."""
    top_m: int = 1
    """Images per sample sent to the LLM by the scorer (the paper uses 1)."""
    attn_layers: int = 2
    """N: how many leading LLM layers the attention teacher runs."""
    kd_weight: float = 1.0
    """Weight of the KD loss in the total loss (mode 'feature+attention')."""
    teacher_temperature: float = 0.1
    """Softmax temperature for the teacher's attention masses (they lie in [0, 1]; below 1 sharpens)."""
    straight_through: bool = True
    """Give the scorer a gradient from the LM loss via a straight-through estimator while training."""

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

    def images_into_llm(self, k: int) -> int:
        """How many of a sample's k images reach the LLM (collate expands this many placeholders)."""
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

    def __post_init__(self) -> None:
        _one_of("model.dtype", self.dtype, DTYPES)
        if not self.image_token:
            raise ConfigError("model.image_token is empty; use e.g. '<image>'")
        if self.sam.enabled and self.vision.select_feature == "cls_patch":
            raise ConfigError(
                "model.vision.select_feature='cls_patch' cannot be fused with SAM (SAM has no CLS token); "
                "use select_feature='patch' or set model.sam.enabled=false"
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
        """Placeholder tokens collate must insert for a sample with k images."""
        return self.selector.images_into_llm(k) * self.tokens_per_image


@dataclass
class Config:
    """The whole run. Sections are added as fields; `load_config` maps YAML keys onto them."""

    model: ModelConfig
    """The model (see `ModelConfig`)."""
    # train: TrainConfig and data: DataConfig go here (added by the train/ and data/ owners);
    # give them defaults so that model-only YAML files (converted checkpoints) still load.


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
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported field type {tp!r}")  # a bug in a dataclass definition


def _unknown_key(key: str, known: list[str], where: str) -> ConfigError:
    hint = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
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
            raise _unknown_key(str(key), names, where)
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
        raise _unknown_key(key, [f.name for f in dataclasses.fields(cls)], where)
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


def load_config(path: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Read a YAML preset, apply dotted overrides, and return the validated `Config`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass a YAML file such as configs/tiny.yaml")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping with a 'model:' section at the top level")
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
