"""Foreign checkpoints -> llava-ultra checkpoint folders (`llava-ultra convert`).

Sources:
- `llava` / `llava-med`: original LLaVA / LLaVA-Med v1.5 (`LlavaLlamaForCausalLM`,
  `LlavaMistralForCausalLM`). Three kinds, told apart by the FILES present, never by the folder
  name: a full checkpoint (model weights), a LoRA output (`adapter_config.json`, plus
  `non_lora_trainables.bin` with `base_model.model.` prefixes; needs `--base`, the LLM it was
  trained on), a stage-1 output (`mm_projector.bin` only; needs `--base`). Behaviour comes from
  `config.json`: `mm_vision_tower`, `mm_hidden_size`, `mm_projector_type`, `mm_vision_select_layer`,
  `mm_vision_select_feature`, `mm_use_im_start_end`, `image_aspect_ratio`. The CLIP tower's weights
  are taken from the checkpoint when present (`model.vision_tower.vision_tower.vision_model.*`),
  else from `mm_vision_tower` (a hub id; `--vision-tower` gives a local folder instead).
- `llava-hf`: transformers' `LlavaForConditionalGeneration` folders (`model_config_from_llava_hf` +
  `LLAVA_HF_KEY_MAP`; `load_llava_hf_weights` loads one into a built model in memory).
- `sam`: a SAM checkpoint in HF format (`vision_encoder.*`, from `SamModel` or `SamVisionModel`) or
  the original format (`image_encoder.*`), written as an HF `SamVisionModel` folder usable as
  `model.sam.path`. `--sam` injects the same into a LLaVA conversion (the paper's initialisation:
  LLaVA-Med + SAM); the SAM projector, fusion weight and selector are then freshly initialised and
  listed in the summary.

Notable choices:
- The image placeholder of LLaVA v1.5 is id -200 spliced in at tokenisation, not a vocabulary entry.
  We add `<image>` to the tokenizer as a special token; when its id falls outside the LLM's
  embedding table the table (and lm_head) grow by one row set to the mean of the existing rows. Our
  model never looks the placeholder's embedding up (it is replaced by image features).
  A tokenizer without a pad token gets pad = unk, as LLaVA v1.5 does.
- The conversation template is recorded in the model config: `vicuna_v1` for LLaMA/Vicuna
  checkpoints, `mistral_instruct` for Mistral ones (LLaVA-Med v1.5), `plain` for stage-1 outputs;
  `--template` overrides.
- Memory: tensors are mapped and checked against the architecture built on the meta device, then
  written straight to safetensors, so peak memory is about one copy of the weights, in their own
  dtype (a 7B fp16 checkpoint needs ~14 GB). The output is self-contained (every tower inline).
- Strict: every weight the model needs must come from a source (or be a listed new module), and no
  source tensor may be left over; otherwise `CheckpointError` lists them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken
from transformers import (
    CONFIG_MAPPING,
    CLIPVisionConfig,
    CLIPVisionModel,
    PreTrainedTokenizerBase,
    SamVisionConfig,
    SamVisionModel,
)

from ..config import ModelConfig, apply_overrides, model_config_from_dict, to_dict
from ..errors import CheckpointError, ConfigError
from .checkpoint import CONFIG_NAME, check_state_dict, load_state_dict_strict, write_checkpoint
from .fusion import Fusion
from .lora import TrainabilityConfig
from .selector import Selector
from .tokenizer import load_tokenizer, prefix_scheme, set_prefix_scheme, tokenizer_image_token_ids
from .ultra import UltraModel
from .weights import read_safetensors_file

SOURCES = ("llava", "llava-med", "llava-hf", "sam")
CONFIG_JUNK = ("transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype", "auto_map")
LLAVA_ARCHITECTURES = {"LlavaLlamaForCausalLM": "llama", "LlavaMistralForCausalLM": "mistral"}
LLAVA_MODEL_TYPES = {"llava_llama": "llama", "llava_mistral": "mistral", "llava": "llama"}
LLAVA_ONLY_KEYS = (
    "image_aspect_ratio",
    "image_grid_pinpoints",
    "tokenizer_model_max_length",
    "tokenizer_padding_side",
    "use_mm_proj",
)
TEMPLATE_FOR_FAMILY = {"llama": "vicuna_v1", "mistral": "mistral_instruct"}
ASPECT = {"pad": "pad", None: "crop", "square": "crop"}  # LLaVA without 'pad': CLIP's resize + centre crop
PROCESSOR_NAME = "preprocessor_config.json"
COMBINED_PROCESSOR_NAME = "processor_config.json"
# image processors whose pipeline we reproduce: [pad to square] -> resize -> centre crop -> rescale -> normalise
CLIP_PROCESSORS = (
    "CLIPImageProcessor",
    "CLIPImageProcessorFast",
    "CLIPImageProcessorPil",
    "CLIPFeatureExtractor",
)
LLAVA_PROCESSORS = ("LlavaImageProcessor", "LlavaImageProcessorFast", "LlavaImageProcessorPil")
PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
CLIP_DEFAULTS = {
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}
# Original-LLaVA towers by their hub id (config.json `mm_vision_tower`): what a --vision-tower must match
KNOWN_TOWERS = {
    "openai/clip-vit-large-patch14-336": {"hidden_size": 1024, "image_size": 336, "patch_size": 14},
    "openai/clip-vit-large-patch14": {"hidden_size": 1024, "image_size": 224, "patch_size": 14},
}
# New modules a conversion may initialise (never the CLIP projector: a missing one is an error).
NEW_PREFIXES = ("fusion.sam_projector.", "fusion.alpha_logit", "fusion.align.", "selector.")
SETTABLE = ("fusion.", "selector.", "dtype")
# Buffers older transformers versions saved and current ones recompute (skipped, counted in the summary).
LEGACY_BUFFERS = (".rotary_emb.inv_freq", "embeddings.position_ids")

LLAVA_KEY_MAP = {  # original LLaVA names -> ours (longest prefix wins); the projector is mapped apart
    "model.vision_tower.vision_tower.vision_model.": "clip.",
    "model.": "llm.model.",
    "lm_head.": "llm.lm_head.",
}
PROJECTOR_KEY_MAPS = {
    "linear": {"model.mm_projector.": "fusion.clip_projector.linear_1."},
    "mlp2x_gelu": {
        "model.mm_projector.0.": "fusion.clip_projector.linear_1.",
        "model.mm_projector.2.": "fusion.clip_projector.linear_2.",
    },
}
SAM_RENAMES = (  # original segment-anything -> transformers SamVisionModel (HF's convert_sam_to_hf.py)
    (r"^image_encoder\.", "vision_encoder."),
    (r"\.patch_embed\.proj\.", ".patch_embed.projection."),
    (r"\.blocks\.(\d+)\.", r".layers.\1."),
    (r"\.layers\.(\d+)\.norm([12])\.", r".layers.\1.layer_norm\2."),
    (r"\.neck\.0\.", ".neck.conv1."),
    (r"\.neck\.1\.", ".neck.layer_norm1."),
    (r"\.neck\.2\.", ".neck.conv2."),
    (r"\.neck\.3\.", ".neck.layer_norm2."),
)


@dataclass
class ConvertSummary:
    """What a conversion did, for the CLI and for tests."""

    out: Path
    source: str
    kind: str
    """'full', 'lora', 'projector-only', 'llava-hf' or 'sam'."""
    tensors: int
    template: str | None = None
    image_token_id: int | None = None
    added_image_token: bool = False
    grew_vocab: bool = False
    initialised: list[str] = field(default_factory=list)
    """Keys of freshly initialised new modules (SAM projector, fusion weight, selector)."""
    ignored: int = 0
    """Legacy buffers in the source that the model recomputes (rotary inv_freq, CLIP position_ids)."""
    preprocessing: str | None = None
    """The image preprocessing recorded in the checkpoint, in words."""
    tokenizer_note: str | None = None
    """What was done to keep the source's tokenisation (sentencepiece prefix scheme)."""

    def render(self) -> str:
        lines = [f"converted {self.source} ({self.kind}) -> {self.out}: {self.tensors} tensors"]
        if self.template:
            lines.append(f"  conversation template: {self.template}")
        if self.image_token_id is not None:
            how = "added to the tokenizer" if self.added_image_token else "already in the tokenizer"
            grew = ", embeddings grew by one row (mean init)" if self.grew_vocab else ""
            lines.append(f"  image token <image> = id {self.image_token_id} ({how}{grew})")
        if self.preprocessing:
            lines.append(f"  image preprocessing: {self.preprocessing}")
        if self.tokenizer_note:
            lines.append(f"  tokenizer: {self.tokenizer_note}")
        if self.ignored:
            lines.append(f"  skipped {self.ignored} legacy buffers (rotary inv_freq / position_ids)")
        if self.initialised:
            lines.append(
                f"  newly initialised ({len(self.initialised)} tensors): " + ", ".join(self.initialised)
            )
        return "\n".join(lines)


# ---------------------------------------------------------------------------------- reading


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; the source folder must hold its config.json")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc


def torch_load(path: Path) -> dict[str, torch.Tensor]:
    """A pickled state dict, read with `weights_only=True` (no code execution)."""
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors come in many types
        raise CheckpointError(f"{path} could not be read as a PyTorch state dict: {exc}") from exc
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path} does not hold a flat name -> tensor state dict")
    return data


def read_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    """One weights file: .safetensors, or a pickled .bin / .pt / .pth; damaged files raise CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"weights file {path} is missing; copy it into the folder")
    return read_safetensors_file(path) if path.suffix == ".safetensors" else torch_load(path)


def has_weights(folder: Path) -> bool:
    names = (
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
    )
    return any((folder / n).is_file() for n in names)


def _shards(index_path: Path) -> list[str]:
    """The shard file names an .index.json lists, each checked to exist."""
    index = _read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(
            f"{index_path} has no weight_map (tensor name -> shard file); re-download the index file"
        )
    shards = sorted(set(map(str, weight_map.values())))
    missing = [s for s in shards if not (index_path.parent / s).is_file()]
    if missing:
        raise CheckpointError(
            f"{index_path} lists {len(shards)} shard(s) but {len(missing)} are missing from "
            f"{index_path.parent}: {', '.join(missing)}; download or copy every shard the index names"
        )
    return shards


def read_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a transformers-style folder: safetensors or pytorch_model*.bin, single or sharded."""
    folder = Path(folder)
    for single, index in (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if (folder / single).is_file():
            return read_tensor_file(folder / single)
        if (folder / index).is_file():
            shards = _shards(folder / index)
            return {k: v for shard in shards for k, v in read_tensor_file(folder / shard).items()}
    raise CheckpointError(
        f"{folder} has no model weights (model.safetensors, pytorch_model.bin or their .index.json shards)"
    )


# ------------------------------------------------------------------------------- llava-hf

LLAVA_HF_KEY_MAP = {
    # source prefix -> our prefix; the longest matching prefix wins. Covers transformers 5.x in-memory
    # names (model.vision_tower.*), its saved names (vision_tower.*, language_model.model.*) and the
    # hub's llava-hf files (vision_tower.vision_model.*).
    "model.vision_tower.vision_model.": "clip.",
    "model.vision_tower.": "clip.",
    "vision_tower.vision_model.": "clip.",
    "vision_tower.": "clip.",
    "model.multi_modal_projector.": "fusion.clip_projector.",
    "multi_modal_projector.": "fusion.clip_projector.",
    "model.language_model.": "llm.model.",
    "language_model.model.": "llm.model.",
    "language_model.lm_head.": "llm.lm_head.",
    "lm_head.": "llm.lm_head.",
}


def map_keys(state_dict: dict[str, torch.Tensor], key_map: dict[str, str]) -> dict[str, torch.Tensor]:
    """Rename keys by longest matching prefix; keys with no match are kept (and reported by a strict load)."""
    prefixes = sorted(key_map, key=len, reverse=True)
    out = {}
    for key, tensor in state_dict.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        out[key_map[prefix] + key[len(prefix) :] if prefix else key] = tensor
    return out


def model_config_from_llava_hf(folder: str | Path) -> ModelConfig:
    """A plain-LLaVA `ModelConfig` (SAM off, selection off) equivalent to a llava-hf config.json."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {CONFIG_NAME}")
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("model_type") != "llava":
        raise CheckpointError(
            f"{path} has model_type={data.get('model_type')!r}, expected 'llava' (llava-hf format)"
        )
    layer = data.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise ConfigError(
            f"{path}: vision_feature_layer={layer} (several layers) is not supported; use one layer"
        )
    if data.get("projector_hidden_act", "gelu") != "gelu" or not data.get("multimodal_projector_bias", True):
        raise ConfigError(f"{path}: only a biased Linear-GELU-Linear projector (mlp2x_gelu) is supported")
    strategy = data.get("vision_feature_select_strategy", "default")
    vision = CLIPVisionConfig(**{k: v for k, v in data["vision_config"].items() if k != "model_type"})
    cfg = {
        "vision": {
            "inline": data["vision_config"],
            "select_layer": layer,
            "select_feature": {"default": "patch", "full": "cls_patch"}[strategy],
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
        },
        "sam": {"enabled": False},
        "fusion": {"projector_type": "mlp2x_gelu"},
        "selector": {"mode": "none", "none_strategy": "first"},
        "llm": {"inline": data["text_config"]},
        "image_token_id": data.get("image_token_id", data.get("image_token_index")),
    }
    return model_config_from_dict(cfg)


def load_llava_hf_weights(model: UltraModel, folder: str | Path, allow_missing: Sequence[str] = ()) -> None:
    """Copy a llava-hf checkpoint's weights into `model` (strictly, via LLAVA_HF_KEY_MAP)."""
    state = map_keys(read_weights(folder), LLAVA_HF_KEY_MAP)
    load_state_dict_strict(model, state, source=str(folder), allow_missing=allow_missing)


def _clean(config: dict[str, Any]) -> dict[str, Any]:
    """A transformers config dict as inline kwargs: no bookkeeping keys, no model_type."""
    return {k: v for k, v in config.items() if k not in CONFIG_JUNK and k != "model_type"}


# ----------------------------------------------------------------------------- architecture


def _meta_model(cfg: ModelConfig) -> UltraModel:
    """The model's architecture on the meta device: names, shapes and tied weights, no memory."""
    from .ultra import build_llm
    from .vision import build_clip, build_sam

    with torch.device("meta"):
        return UltraModel(cfg, build_clip(cfg.vision), build_sam(cfg.sam), build_llm(cfg.llm))


def _new_modules(
    cfg: ModelConfig, model: UltraModel, have: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Fresh (seeded) weights for the new modules the sources do not provide."""
    llm_dim = model.llm.config.get_text_config().hidden_size
    sam_channels = model.sam.config.output_channels if model.sam is not None else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fusion = Fusion(cfg.fusion, model.clip.config.hidden_size, llm_dim, cfg.vision.grid, sam_channels)
        selector = Selector(cfg.selector, llm_dim)
    fresh = {f"fusion.{k}": v for k, v in fusion.state_dict().items()}
    fresh |= {f"selector.{k}": v for k, v in selector.state_dict().items()}
    return {k: v for k, v in fresh.items() if k.startswith(NEW_PREFIXES) and k not in have}


def _finish(
    cfg_dict: dict[str, Any],
    state: dict[str, torch.Tensor],
    tokenizer: PreTrainedTokenizerBase | None,
    out: Path,
    summary: ConvertSummary,
    overrides: Sequence[str],
    source: str,
) -> ConvertSummary:
    """Apply overrides, validate, add new modules, check strictly and write the folder."""
    bad = [o for o in overrides if not o.split("=", 1)[0].strip().startswith(SETTABLE)]
    bad += [o for o in overrides if o.split("=", 1)[0].strip() == "fusion.projector_type"]
    if bad:
        raise ConfigError(
            f"--set {', '.join(bad)}: only fusion.*, selector.* and dtype can be set at conversion (and not "
            f"fusion.projector_type); everything else is read from the source checkpoint"
        )
    apply_overrides(cfg_dict, list(overrides), root=ModelConfig)
    cfg = model_config_from_dict(cfg_dict)
    model = _meta_model(cfg)
    expected = model.state_dict()
    stale = [k for k in state if k.endswith(LEGACY_BUFFERS) and k not in expected]
    state = {k: v for k, v in state.items() if k not in stale}
    fresh = _new_modules(cfg, model, state)
    state = state | fresh
    check_state_dict(model, state, source)
    write_checkpoint(out, cfg, TrainabilityConfig(), state, {}, {}, tokenizer)
    summary.tensors = len(state)
    summary.initialised = sorted(fresh)
    summary.ignored = len(stale)
    summary.template = cfg.template
    return summary


# ------------------------------------------------------------------------------------- SAM


def sam_config_from_original(state: dict[str, torch.Tensor]) -> SamVisionConfig:
    """Infer a `SamVisionConfig` from original-format `image_encoder.*` weights (shapes say it all)."""
    try:
        patch = state["image_encoder.patch_embed.proj.weight"]  # (D, 3, P, P)
        blocks = sorted(
            {int(m.group(1)) for k in state if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))}
        )
        rel = [state[f"image_encoder.blocks.{i}.attn.rel_pos_h"] for i in blocks]  # (2*size-1, head_dim)
        grid = state["image_encoder.pos_embed"].shape[1]
        lin1 = state["image_encoder.blocks.0.mlp.lin1.weight"]
        neck = state["image_encoder.neck.0.weight"]
    except KeyError as exc:
        raise CheckpointError(
            f"original SAM weights lack {exc}; expected segment-anything's image_encoder.* keys with "
            f"absolute and relative position embeddings"
        ) from exc
    hidden = patch.shape[0]
    global_idx = [i for i, r in zip(blocks, rel, strict=True) if r.shape[0] == 2 * grid - 1]
    windowed = [r.shape[0] for r in rel if r.shape[0] != 2 * grid - 1]
    return SamVisionConfig(
        hidden_size=hidden,
        output_channels=neck.shape[0],
        num_hidden_layers=len(blocks),
        num_attention_heads=hidden // rel[0].shape[1],
        image_size=grid * patch.shape[-1],
        patch_size=patch.shape[-1],
        qkv_bias="image_encoder.blocks.0.attn.qkv.bias" in state,
        window_size=(windowed[0] + 1) // 2 if windowed else grid,
        global_attn_indexes=global_idx,
        mlp_dim=lin1.shape[0],
        initializer_range=0.02,
    )


def rename_sam_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original `image_encoder.*` keys -> transformers `vision_encoder.*` keys (prompt/mask parts dropped)."""
    out = {}
    for key, tensor in state.items():
        if not key.startswith("image_encoder."):
            continue
        for pattern, repl in SAM_RENAMES:
            key = re.sub(pattern, repl, key)
        out[key] = tensor
    return out


def read_sam(src: str | Path) -> tuple[SamVisionConfig, dict[str, torch.Tensor]]:
    """(config, `vision_encoder.*` state) of a SAM checkpoint: an HF folder or an original file."""
    src = Path(src)
    if src.is_dir():
        if not (src / "config.json").is_file():
            raise CheckpointError(f"{src} has no config.json; pass an HF SAM folder or an original .pth file")
        config = SamVisionConfig.from_pretrained(str(src))
        state = read_weights(src)
    elif src.is_file():
        state, config = read_tensor_file(src), None
    else:
        raise CheckpointError(f"SAM checkpoint {src} does not exist")
    if any(k.startswith("image_encoder.") for k in state):
        config = config or sam_config_from_original(state)
        state = rename_sam_original(state)
    elif config is None:
        raise CheckpointError(
            f"{src} has no image_encoder.* keys (original format); an HF-format SAM must be a folder with config.json"
        )
    vision = {k: v for k, v in state.items() if k.startswith("vision_encoder.")}
    if not vision:
        raise CheckpointError(
            f"{src} holds no SAM image-encoder weights (image_encoder.* or vision_encoder.*)"
        )
    with torch.device("meta"):
        check_state_dict(SamVisionModel(config), vision, str(src))
    return config, vision


def convert_sam(src: str | Path, out: str | Path) -> ConvertSummary:
    """Write a SAM checkpoint as an HF `SamVisionModel` folder (config.json + model.safetensors)."""
    config, state = read_sam(src)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(out / "model.safetensors"),
        metadata={"format": "pt"},
    )
    return ConvertSummary(out=out, source=str(src), kind="sam", tensors=len(state))


def _inject_sam(cfg_dict: dict[str, Any], state: dict[str, torch.Tensor], sam: str | Path) -> None:
    config, vision = read_sam(sam)
    cfg_dict["sam"] = {
        "enabled": True,
        "inline": _clean(config.to_diff_dict()),
        "image_size": config.image_size,
        "origin": str(sam),
    }
    state.update({f"sam.{k}": v for k, v in vision.items()})


# ---------------------------------------------------------------------------- tokenizer


def _with_image_token(
    tokenizer: PreTrainedTokenizerBase,
    state: dict[str, torch.Tensor],
    llm: dict[str, Any],
    summary: ConvertSummary,
) -> int:
    """Make sure `<image>` is a token and the LLM's embedding table covers its id."""
    if tokenizer.pad_token is None and tokenizer.unk_token is not None:
        tokenizer.pad_token = tokenizer.unk_token  # LLaVA v1.5's choice
    if "<image>" not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
        summary.added_image_token = True
    token_id = tokenizer.convert_tokens_to_ids("<image>")
    for key in ("llm.model.embed_tokens.weight", "llm.lm_head.weight"):
        table = state.get(key)
        if table is not None and token_id >= table.shape[0]:
            grow = token_id + 1 - table.shape[0]
            mean = table.float().mean(0, keepdim=True).to(table.dtype)
            state[key] = torch.cat([table, mean.expand(grow, -1)])
            summary.grew_vocab = True
            llm["vocab_size"] = token_id + 1
    summary.image_token_id = token_id
    return token_id


def _tokenizer(folders: Sequence[Path]) -> PreTrainedTokenizerBase:
    for folder in folders:
        if (folder / "tokenizer_config.json").is_file():
            try:
                return load_tokenizer(folder)
            except ConfigError as exc:
                if (folder / "tokenizer.model").is_file() and not (folder / "tokenizer.json").is_file():
                    raise ConfigError(
                        f"{exc}. {folder} has only a SentencePiece tokenizer.model: install "
                        f"`pip install sentencepiece protobuf` so transformers can read it"
                    ) from exc
                raise
    raise CheckpointError(
        f"no tokenizer in {' or '.join(str(f) for f in folders)}; copy the LLM's tokenizer files "
        f"(tokenizer_config.json, tokenizer.model / tokenizer.json) into the source folder"
    )


# --------------------------------------------------------------------------- preprocessing


def _pair(value: Any, key: str) -> int | None:
    """An image processor size field ({"shortest_edge": n} / {"height": n, "width": n} / n) as one int."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        if key in value:
            return int(value[key])
        if value.get("height") == value.get("width") and value.get("height") is not None:
            return int(value["height"])
    return None


def preprocessing_from_processor(
    pp: dict[str, Any], image_size: int, where: str, aspect: str | None = None
) -> dict[str, Any]:
    """VisionConfig fields reproducing an image processor config (`preprocessor_config.json`).

    Supported: CLIPImageProcessor (and transformers' LlavaImageProcessor, whose `do_pad` is LLaVA's
    expand2square) with resize of the shortest edge to the tower's image_size, centre crop to the
    same size, rescale by 1/255 and normalisation. `aspect` is the original LLaVA
    `image_aspect_ratio` ('pad' puts expand2square in front); None = the processor alone.
    Anything else raises ConfigError naming the field.
    """
    kind = pp.get("image_processor_type") or pp.get("feature_extractor_type")
    if kind not in CLIP_PROCESSORS + LLAVA_PROCESSORS:
        raise ConfigError(
            f"{where}: image_processor_type={kind!r} is not supported; llava-ultra reproduces "
            f"{', '.join(CLIP_PROCESSORS[:1] + LLAVA_PROCESSORS[:1])} (shortest-edge resize, centre crop, "
            "rescale, normalise)"
        )
    shortest = _pair(pp.get("size", {"shortest_edge": 224}), "shortest_edge")
    crop = _pair(pp.get("crop_size", {"height": 224, "width": 224}), "height")
    problems = []
    if not pp.get("do_resize", True) or not isinstance(pp.get("size", {"shortest_edge": 0}), (dict, int)):
        problems.append(f"do_resize={pp.get('do_resize')!r}")
    elif isinstance(pp.get("size"), dict) and "shortest_edge" not in pp["size"]:
        problems.append(f"size={pp['size']!r} (only {{'shortest_edge': {image_size}}} is supported)")
    if shortest != image_size:
        problems.append(f"size shortest_edge={shortest} (the tower's image_size is {image_size})")
    if not pp.get("do_center_crop", True) or crop != image_size:
        problems.append(f"do_center_crop={pp.get('do_center_crop', True)}, crop_size={pp.get('crop_size')!r}")
    if not pp.get("do_rescale", True) or not math.isclose(pp.get("rescale_factor", 1 / 255), 1 / 255):
        problems.append(f"do_rescale={pp.get('do_rescale', True)}, rescale_factor={pp.get('rescale_factor')}")
    if not pp.get("do_normalize", True):
        problems.append("do_normalize=false")
    resample = pp.get("resample", 3)
    if resample not in PIL_RESAMPLE:
        problems.append(f"resample={resample!r} (use a PIL filter code 0-5)")
    if problems:
        raise ConfigError(
            f"{where}: {'; '.join(problems)}: this preprocessing is not supported; llava-ultra reproduces "
            f"resize of the shortest edge to {image_size}, a centre crop to {image_size} x {image_size}, "
            "rescale by 1/255 and normalisation"
        )
    if kind in LLAVA_PROCESSORS and pp.get("do_pad"):
        aspect = "pad"
    return {
        "image_aspect_ratio": "pad" if aspect == "pad" else "crop",
        "resize": "shortest_edge_crop",
        "resample": PIL_RESAMPLE[resample],
        "pad_colour": "truncate",
        "image_mean": list(pp.get("image_mean", CLIP_DEFAULTS["image_mean"])),
        "image_std": list(pp.get("image_std", CLIP_DEFAULTS["image_std"])),
    }


def _processor_config(folder: Path) -> tuple[dict[str, Any], str] | tuple[None, None]:
    """(image processor config, where it was read) from `preprocessor_config.json`, or from the
    "image_processor" entry of `processor_config.json` (how transformers 5 saves a processor)."""
    path = folder / PROCESSOR_NAME
    if path.is_file():
        return _read_json(path), str(path)
    combined = folder / COMBINED_PROCESSOR_NAME
    if combined.is_file():
        nested = _read_json(combined).get("image_processor")
        if isinstance(nested, dict):
            return nested, f"{combined} (image_processor)"
    return None, None


# --------------------------------------------------------------------------- original LLaVA


@dataclass
class LlavaFields:
    """The multimodal settings of an original LLaVA config.json."""

    family: str
    vision_tower: str | None
    mm_hidden_size: int | None
    projector_type: str
    select_layer: int
    select_feature: str
    aspect: str


def llava_fields(config: dict[str, Any], path: Path) -> LlavaFields:
    """Read and check the `mm_*` fields; unsupported settings raise with the field and the way out."""
    archs = config.get("architectures") or []
    family = next((LLAVA_ARCHITECTURES[a] for a in archs if a in LLAVA_ARCHITECTURES), None)
    family = family or LLAVA_MODEL_TYPES.get(config.get("model_type", ""))
    if family is None or "mm_vision_tower" not in config and "mm_projector_type" not in config:
        raise CheckpointError(
            f"{path} is not an original LLaVA config (architectures={archs}, model_type="
            f"{config.get('model_type')!r}, no mm_* fields); supported: "
            f"{', '.join(LLAVA_ARCHITECTURES)}. For transformers' LlavaForConditionalGeneration use --from llava-hf"
        )
    kind = config.get("mm_projector_type", "linear")
    if kind not in PROJECTOR_KEY_MAPS:
        raise ConfigError(
            f"{path}: mm_projector_type={kind!r} is not supported; llava-ultra projects CLIP features with "
            f"'linear' or 'mlp2x_gelu' (an 'identity' projector needs mm_hidden_size == the LLM width and "
            f"has no weights to convert)"
        )
    if config.get("mm_use_im_start_end"):
        raise ConfigError(
            f"{path}: mm_use_im_start_end=true (image start/end tokens) is not supported; convert a checkpoint "
            f"trained without them (LLaVA v1.5 / LLaVA-Med v1.5 use false)"
        )
    if config.get("mm_patch_merge_type", "flat") != "flat":
        raise ConfigError(
            f"{path}: mm_patch_merge_type={config['mm_patch_merge_type']!r} (LLaVA-NeXT) is not supported"
        )
    aspect = config.get("image_aspect_ratio")
    if aspect not in ASPECT:
        raise ConfigError(f"{path}: image_aspect_ratio={aspect!r} is not supported; use 'pad' or 'square'")
    feature = config.get("mm_vision_select_feature", "patch")
    if feature not in ("patch", "cls_patch"):
        raise ConfigError(
            f"{path}: mm_vision_select_feature={feature!r} is not supported; use patch or cls_patch"
        )
    return LlavaFields(
        family=family,
        vision_tower=config.get("mm_vision_tower"),
        mm_hidden_size=config.get("mm_hidden_size"),
        projector_type=kind,
        select_layer=int(config.get("mm_vision_select_layer", -2)),
        select_feature=feature,
        aspect=ASPECT[aspect],
    )


def llm_config_from_llava(config: dict[str, Any], family: str) -> dict[str, Any]:
    """The LLM's config kwargs (inline form, with model_type) without LLaVA's multimodal fields."""
    kwargs = {
        k: v
        for k, v in config.items()
        if not k.startswith(("mm_", "tune_mm_", "freeze_mm_", "unfreeze_mm_")) and k not in LLAVA_ONLY_KEYS
    }
    kwargs = _clean(kwargs)
    return {**_clean(CONFIG_MAPPING[family](**kwargs).to_diff_dict()), "model_type": family}


def _strip_peft(key: str) -> str:
    key = key.removeprefix("base_model.model.")
    return key[len("model.") :] if key.startswith("model.model.") else key


def merge_lora_weights(state: dict[str, torch.Tensor], folder: Path) -> None:
    """Fold a PEFT LoRA output (adapter_config.json + adapter_model.*) into `state` (LLaVA names), in place."""
    acfg = _read_json(folder / "adapter_config.json")
    unsupported = {
        "use_dora": acfg.get("use_dora"),
        "fan_in_fan_out": acfg.get("fan_in_fan_out"),
        "rank_pattern": acfg.get("rank_pattern"),
        "alpha_pattern": acfg.get("alpha_pattern"),
        "lora_bias": acfg.get("lora_bias"),
    }
    bad = {k: v for k, v in unsupported.items() if v}
    if acfg.get("peft_type", "LORA") != "LORA" or bad:
        raise ConfigError(
            f"{folder}/adapter_config.json: unsupported adapter settings {bad or acfg.get('peft_type')}"
        )
    files = [folder / n for n in ("adapter_model.safetensors", "adapter_model.bin") if (folder / n).is_file()]
    if not files:
        raise CheckpointError(f"{folder} has adapter_config.json but no adapter_model.safetensors / .bin")
    r, alpha = int(acfg["r"]), float(acfg["lora_alpha"])
    scale = alpha / math.sqrt(r) if acfg.get("use_rslora") else alpha / r
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in read_tensor_file(files[0]).items():
        key = _strip_peft(key)
        match = re.fullmatch(r"(.+)\.(lora_A|lora_B)(?:\.default)?\.weight", key)
        if match:
            pairs.setdefault(match.group(1), {})[match.group(2)] = tensor
        else:  # modules_to_save: a full replacement weight
            state[key.replace(".modules_to_save.default", "")] = tensor
    for module, ab in pairs.items():
        target = f"{module}.weight"
        if set(ab) != {"lora_A", "lora_B"} or target not in state:
            raise CheckpointError(
                f"{files[0]}: LoRA weights for {module} have {sorted(ab)} and the base has "
                f"{'a' if target in state else 'no'} {target}; is --base the model the adapters were trained on?"
            )
        weight = state[target]
        delta = ab["lora_B"].float() @ ab["lora_A"].float()
        state[target] = (weight.float() + scale * delta.reshape(weight.shape)).to(weight.dtype)


def _check_tower(
    src: Path,
    fields: LlavaFields,
    clip: CLIPVisionConfig,
    tower: str,
    state: dict[str, torch.Tensor],
    in_ckpt: bool,
) -> None:
    """The CLIP tower must be the one the projector was trained on: width (mm_hidden_size and the
    projector's input), image and patch size (the checkpoint's own tower weights, or the tower its
    config.json names when that is a known hub id)."""
    if fields.mm_hidden_size is not None and fields.mm_hidden_size != clip.hidden_size:
        raise ConfigError(
            f"{src}/config.json has mm_hidden_size={fields.mm_hidden_size} but the CLIP tower {tower!r} has "
            f"hidden_size={clip.hidden_size}; pass the tower the checkpoint was trained with"
        )
    first = state.get("model.mm_projector.0.weight", state.get("model.mm_projector.weight"))
    if first is not None and first.shape[-1] != clip.hidden_size:
        raise ConfigError(
            f"{src}: the projector takes {first.shape[-1]}-wide features but the CLIP tower {tower!r} has "
            f"hidden_size={clip.hidden_size}; pass the tower the checkpoint was trained with"
        )
    got = {"hidden_size": clip.hidden_size, "image_size": clip.image_size, "patch_size": clip.patch_size}
    prefix = "model.vision_tower.vision_tower.vision_model.embeddings."
    if in_ckpt:
        patch = state.get(prefix + "patch_embedding.weight")  # (D, 3, P, P)
        pos = state.get(prefix + "position_embedding.weight")  # ((S / P) ** 2 + 1, D)
        if patch is not None and pos is not None:
            p = patch.shape[-1]
            have = {
                "hidden_size": patch.shape[0],
                "image_size": round(math.sqrt(pos.shape[0] - 1)) * p,
                "patch_size": p,
            }
            if have != got:
                raise ConfigError(
                    f"{src} holds a CLIP tower with {_sizes(have)} but the tower config {tower!r} says "
                    f"{_sizes(got)}; pass --vision-tower with the config of the tower in the checkpoint"
                )
        return
    named = KNOWN_TOWERS.get(fields.vision_tower or "")
    if named is not None and named != got:
        raise ConfigError(
            f"--vision-tower {tower!r} has {_sizes(got)} but {src}/config.json was trained with mm_vision_tower="
            f"{fields.vision_tower!r} ({_sizes(named)}), and the checkpoint holds no tower weights: pass a local "
            f"copy of {fields.vision_tower}"
        )


def _sizes(d: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())


def _describe_preprocessing(pre: dict[str, Any], side: int, where: str) -> str:
    steps = []
    if pre["image_aspect_ratio"] == "pad":
        steps.append("pad to a square with int(mean * 255) (LLaVA's expand2square)")
    steps.append(f"{pre['resample']} resize of the shortest edge to {side}, centre crop {side} x {side}")
    return ", ".join(steps) + f", rescale 1/255, normalise (from {where})"


def _llava_tokenisation(tokenizer: PreTrainedTokenizerBase, src: Path) -> str | None:
    """Make our whole-prompt tokenisation give LLaVA's `tokenizer_image_token` ids; say what was done."""
    note = None
    if prefix_scheme(tokenizer) is not None:
        before = prefix_scheme(tokenizer)
        set_prefix_scheme(tokenizer, "always")
        note = (
            "sentencepiece-style (Metaspace): every piece after <image> gets the '▁' prefix, as LLaVA's "
            f"tokenizer_image_token gives it (prefix scheme 'always', legacy=true; the source loaded as {before!r})"
        )
    probe = (
        "A chat. USER: <image>\nWhat is shown? ASSISTANT: The liver.</s>USER: <image>\nAnd here? ASSISTANT:"
    )
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    ours = [-200 if i == image_id else i for i in tokenizer(probe).input_ids]
    theirs = tokenizer_image_token_ids(tokenizer, probe)
    if ours != theirs:
        raise ConfigError(
            f"{src}: the tokenizer ({type(tokenizer).__name__}) splits prompts differently from LLaVA's "
            f"tokenizer_image_token ({len(ours)} vs {len(theirs)} ids on a probe prompt); convert with a "
            "LLaMA/Mistral sentencepiece or byte-level BPE tokenizer"
        )
    return note


def convert_llava(
    src: str | Path,
    out: str | Path,
    *,
    source: str = "llava",
    vision_tower: str | Path | None = None,
    sam: str | Path | None = None,
    base: str | Path | None = None,
    template: str | None = None,
    overrides: Sequence[str] = (),
) -> ConvertSummary:
    """Original LLaVA / LLaVA-Med v1.5 (full, LoRA or stage-1 output) -> our checkpoint folder."""
    src = Path(src)
    config = _read_json(src / "config.json")
    fields = llava_fields(config, src / "config.json")
    if (src / "adapter_config.json").is_file():
        kind = "lora"
    elif has_weights(src):
        kind = "full"
    elif (src / "mm_projector.bin").is_file() or (src / "mm_projector.safetensors").is_file():
        kind = "projector-only"
    else:
        raise CheckpointError(
            f"{src} has config.json but no weights: expected model.safetensors / pytorch_model.bin (full), "
            f"adapter_config.json + adapter_model.* (LoRA) or mm_projector.bin (stage 1)"
        )
    if kind == "full" and base is not None:
        raise ConfigError(
            f"{src} is a full checkpoint (it has model weights); --base is only for LoRA / stage-1 outputs"
        )
    if kind != "full" and base is None:
        what = (
            "a LoRA output (adapter_config.json)"
            if kind == "lora"
            else "a stage-1 output (mm_projector.bin only)"
        )
        raise ConfigError(
            f"{src} is {what}; pass --base with the LLM it was trained on (e.g. a Vicuna folder)"
        )

    if kind == "full":
        state = read_weights(src)
    else:
        state = read_weights(base)
        extra = next(
            (
                src / n
                for n in (
                    "non_lora_trainables.bin",
                    "non_lora_trainables.safetensors",
                    "mm_projector.bin",
                    "mm_projector.safetensors",
                )
                if (src / n).is_file()
            ),
            None,
        )
        if extra is not None:
            state.update({_strip_peft(k): v for k, v in read_tensor_file(extra).items()})
        if kind == "lora":
            merge_lora_weights(state, src)
    state = {
        ("model.mm_projector." + k.split("mm_projector.", 1)[1] if "mm_projector." in k else k): v
        for k, v in state.items()
    }
    if not any(k.startswith("model.mm_projector.") for k in state):
        raise CheckpointError(
            f"{src} has no projector weights (model.mm_projector.*): the model would see images through a "
            f"random projector. Convert a checkpoint that contains them (full, LoRA with non_lora_trainables, "
            f"or stage-1 mm_projector.bin)"
        )
    if any(k.startswith("model.image_newline") for k in state):
        raise ConfigError(
            f"{src} has model.image_newline (LLaVA-NeXT); only LLaVA v1.5-style checkpoints are supported"
        )

    # the CLIP tower: weights from the checkpoint if present, else from mm_vision_tower / --vision-tower
    tower = str(vision_tower or fields.vision_tower or "")
    if not tower:
        raise CheckpointError(f"{src}/config.json names no mm_vision_tower; pass --vision-tower PATH")
    in_ckpt = any(k.startswith("model.vision_tower.") for k in state)
    try:
        clip_config = CLIPVisionConfig.from_pretrained(tower)
        if not in_ckpt:
            clip_state = CLIPVisionModel.from_pretrained(tower).state_dict()
            state.update(
                {f"model.vision_tower.vision_tower.vision_model.{k}": v for k, v in clip_state.items()}
            )
    except OSError as exc:
        raise CheckpointError(
            f"the CLIP tower {tower!r} could not be loaded ({exc}); pass --vision-tower with a local CLIP folder"
        ) from exc
    _check_tower(src, fields, clip_config, tower, state, in_ckpt)
    tower_folder = Path(tower)
    pp, where = _processor_config(tower_folder) if tower_folder.is_dir() else (None, None)
    side = clip_config.image_size
    if pp is None:  # what LLaVA's CLIPImageProcessor.from_pretrained(mm_vision_tower) holds for CLIP towers
        pp = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": side}}
        pp |= {"crop_size": {"height": side, "width": side}, "resample": 3, **CLIP_DEFAULTS}
        where = f"CLIPImageProcessor defaults for {tower!r} (no {PROCESSOR_NAME} in it)"
    preprocess = preprocessing_from_processor(pp, side, where, aspect=fields.aspect)
    key_map = LLAVA_KEY_MAP | PROJECTOR_KEY_MAPS[fields.projector_type]
    state = map_keys(state, key_map)

    llm = llm_config_from_llava(config, fields.family)
    summary = ConvertSummary(out=Path(out), source=f"{source} {src}", kind=kind, tensors=0)
    tokenizer = _tokenizer([src] + ([Path(base)] if base is not None else []))
    token_id = _with_image_token(tokenizer, state, llm, summary)
    summary.tokenizer_note = _llava_tokenisation(tokenizer, src)
    summary.preprocessing = _describe_preprocessing(preprocess, side, where)
    cfg_dict: dict[str, Any] = {
        "vision": {
            "inline": _clean(clip_config.to_diff_dict()),
            "select_layer": fields.select_layer,
            "select_feature": fields.select_feature,
            "image_size": clip_config.image_size,
            "patch_size": clip_config.patch_size,
            **preprocess,
            "origin": tower,
        },
        "sam": {"enabled": False},
        "fusion": {"projector_type": fields.projector_type},
        "selector": {"mode": "none", "none_strategy": "first"},
        "llm": {"inline": llm, "origin": str(src if kind == "full" else base)},
        "image_token_id": token_id,
        "template": template or ("plain" if kind == "projector-only" else TEMPLATE_FOR_FAMILY[fields.family]),
    }
    if sam is not None:
        _inject_sam(cfg_dict, state, sam)
    return _finish(cfg_dict, state, tokenizer, Path(out), summary, overrides, str(src))


def convert_llava_hf(
    src: str | Path,
    out: str | Path,
    *,
    sam: str | Path | None = None,
    template: str | None = None,
    overrides: Sequence[str] = (),
) -> ConvertSummary:
    """transformers' `LlavaForConditionalGeneration` folder -> our checkpoint folder."""
    src = Path(src)
    cfg = model_config_from_llava_hf(src)
    state = map_keys(read_weights(src), LLAVA_HF_KEY_MAP)
    tokenizer = _tokenizer([src])
    token_id = tokenizer.convert_tokens_to_ids(cfg.image_token)
    if token_id != cfg.image_token_id:
        raise CheckpointError(
            f"{src}: config.json says image_token_index={cfg.image_token_id} but the tokenizer maps "
            f"{cfg.image_token!r} to {token_id}; fix one of them"
        )
    pp, where = _processor_config(src)
    if pp is None:
        raise CheckpointError(
            f"{src} has no {PROCESSOR_NAME} (nor a {COMBINED_PROCESSOR_NAME} with an image_processor): the image "
            f"preprocessing the model was trained with is unknown; copy the model's {PROCESSOR_NAME} (from its "
            "hub page) into the folder"
        )
    preprocess = preprocessing_from_processor(pp, cfg.vision.image_size, where)
    cfg_dict = to_dict(dataclasses.replace(cfg, template=template or "vicuna_v1"))
    cfg_dict["vision"].update(preprocess)
    cfg_dict["vision"]["origin"] = cfg_dict["llm"]["origin"] = str(src)
    summary = ConvertSummary(
        out=Path(out), source=f"llava-hf {src}", kind="llava-hf", tensors=0, image_token_id=token_id
    )
    summary.preprocessing = _describe_preprocessing(preprocess, cfg.vision.image_size, where)
    scheme = prefix_scheme(tokenizer)
    if scheme is not None:  # keep what LlavaProcessor does with this tokenizer through our save / load
        set_prefix_scheme(tokenizer, scheme)
        summary.tokenizer_note = (
            f"sentencepiece-style (Metaspace), prefix scheme {scheme!r} kept as in the source"
        )
    if sam is not None:
        _inject_sam(cfg_dict, state, sam)
    return _finish(cfg_dict, state, tokenizer, Path(out), summary, overrides, str(src))


def convert(
    source: str,
    src: str | Path,
    out: str | Path,
    *,
    vision_tower: str | Path | None = None,
    sam: str | Path | None = None,
    base: str | Path | None = None,
    template: str | None = None,
    overrides: Sequence[str] = (),
) -> ConvertSummary:
    """Dispatch on `source` (one of SOURCES); see the module docstring."""
    if source not in SOURCES:
        raise ConfigError(f"--from {source!r} is not supported; use one of {', '.join(SOURCES)}")
    if not Path(src).exists():
        raise CheckpointError(f"source {src} does not exist")
    if source == "sam":
        used = {"--vision-tower": vision_tower, "--sam": sam, "--base": base, "--template": template}
        given = [k for k, v in used.items() if v is not None] + (["--set"] if overrides else [])
        if given:
            raise ConfigError(f"--from sam converts one SAM checkpoint; {', '.join(given)} do not apply")
        return convert_sam(src, out)
    if source == "llava-hf":
        if vision_tower is not None or base is not None:
            raise ConfigError(
                "--from llava-hf checkpoints hold their vision tower and LLM; drop --vision-tower / --base"
            )
        return convert_llava_hf(src, out, sam=sam, template=template, overrides=overrides)
    return convert_llava(
        src,
        out,
        source=source,
        vision_tower=vision_tower,
        sam=sam,
        base=base,
        template=template,
        overrides=overrides,
    )
