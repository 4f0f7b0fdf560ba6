"""The checkpoint folder format: the one place a model is written to, or rebuilt from, a folder.

Two layouts, told apart by the files present (never by the folder's name), safetensors only:

    plain (`save_pretrained` of a model without trainability settings)
        config.json                       {"format": "llava-ultra", "format_version": 1, "model": ModelConfig}
        model.safetensors                 every weight (towers described inline in config.json)
        tokenizer files

    training (`save_checkpoint`; what training, `convert` and `save_pretrained` after
    `lora.apply_trainability` write; see docs/checkpoints.md)
        config.json                       as above
        trainability.json                 TrainabilityConfig (modes, LoRA settings, targets)
        model.safetensors                 frozen weights that cannot be rebuilt from a hub id
        adapter_model.safetensors         LoRA A/B weights (full names, no adapter name)
        non_lora_trainables.safetensors   every other weight of a 'full' component
        tokenizer files

Rule for base weights in the training layout: a tower (clip, sam, llm) whose config names a hub id /
folder (`path`) and whose weights are unchanged (mode 'frozen' or 'lora', not merged) is NOT saved;
it is reloaded from that `path`. Everything else is saved - random-init (`inline`) towers such as
the tiny preset, fused/selector modules (never on a hub), fully trained towers (their config is
written `inline`), and, with a hub LLM, its input/output embeddings (they grow when `<image>` is
added). So a folder is loadable alone, given the hub ids it names.

Notable choices:
- Loading is strict (`check_state_dict`): the files together with the hub weights must cover the
  model exactly; a missing, unexpected or mis-shaped key is a `CheckpointError` listing them.
- The model is built with `no_init_weights` (every weight is overwritten) in float32, loaded, then
  cast to the config's dtype for the device (`ultra.resolve_dtype`).
- `load_for_inference` is the one loader eval, serve, chat and predict share: it picks the layout,
  and insists on a tokenizer that maps the image token to the id the model expects.
- This module sits above `ultra.py` (the model) and `lora.py` (trainability), so neither of them
  knows about folders: the save/load code that was split across both lives here.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file, save_model
from torch import nn
from transformers import PreTrainedTokenizerBase
from transformers.initialization import no_init_weights

from ..config import ModelConfig, from_dict, model_config_from_dict, to_dict
from ..errors import CheckpointError
from .lora import (
    COMPONENTS,
    TOWERS,
    TrainabilityConfig,
    apply_trainability,
    component_of,
    is_lora_key,
    plain_name,
)
from .tokenizer import load_tokenizer
from .ultra import UltraModel, build_model, resolve_dtype
from .weights import read_safetensors_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TRAINABILITY_NAME = "trainability.json"
ADAPTER_NAME = "adapter_model.safetensors"
NON_LORA_NAME = "non_lora_trainables.safetensors"
FORMAT = "llava-ultra"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------- config


def write_model_config(folder: str | Path, config: ModelConfig) -> Path:
    """`config.json`: the format tag and the model's config (what `read_model_config` reads back)."""
    path = Path(folder) / CONFIG_NAME
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": to_dict(config)}
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def read_model_config(folder: str | Path) -> ModelConfig:
    """The `ModelConfig` saved in a checkpoint folder, with a clear error for foreign folders."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {CONFIG_NAME}; is it a llava-ultra checkpoint folder?")
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("format") != FORMAT:
        kind = data.get("model_type", "unknown")
        raise CheckpointError(
            f"{folder} is not a llava-ultra checkpoint (its config.json has model_type={kind!r}); "
            f"convert it first with `llava-ultra convert`"
        )
    return model_config_from_dict(data["model"])


def read_trainability(folder: str | Path) -> TrainabilityConfig:
    """The folder's trainability.json; all-frozen for folders without one (the plain layout)."""
    path = Path(folder) / TRAINABILITY_NAME
    if not path.is_file():
        return TrainabilityConfig()
    try:
        return from_dict(TrainabilityConfig, json.loads(path.read_text(encoding="utf-8")), "trainability")
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc


# ------------------------------------------------------------------------------ strict check


def check_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    source: str = "checkpoint",
    allow_missing: Sequence[str] = (),
    hint: str = "",
) -> None:
    """Compare `state_dict` with `model`'s keys and shapes (works on meta-device models too); any
    missing, unexpected or mis-shaped key is a `CheckpointError` listing them. A parameter tied to
    others (one tensor under several names, e.g. tied embeddings) needs only one of its names. Keys
    starting with a prefix in `allow_missing` may be absent (modules the source does not have)."""
    expected = model.state_dict()
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    twins = {name: names for names in aliases.values() for name in names}
    missing = [
        k
        for k in expected
        if not any(n in state_dict for n in twins.get(k, [k])) and not k.startswith(tuple(allow_missing))
    ]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k} {tuple(v.shape)} != {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if not (missing or unexpected or shapes):
        return

    def listing(name: str, keys: list[str]) -> str:
        shown = ", ".join(keys[:20]) + (f", ... ({len(keys) - 20} more)" if len(keys) > 20 else "")
        return f"{len(keys)} {name}: {shown}" if keys else ""

    parts = [listing("missing", missing), listing("unexpected", unexpected), listing("wrong shape", shapes)]
    raise CheckpointError(f"{source} does not match the model ({'; '.join(p for p in parts if p)}){hint}")


def load_state_dict_strict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    source: str = "checkpoint",
    allow_missing: Sequence[str] = (),
) -> None:
    """Load `state_dict` into `model` after `check_state_dict` found nothing missing or unexpected."""
    check_state_dict(
        model,
        state_dict,
        source,
        allow_missing,
        hint=". Check that the config beside the weights is the one they were trained with, "
        "or convert the checkpoint.",
    )
    model.load_state_dict(state_dict, strict=False)


# ------------------------------------------------------------------------------------ save


def hub_backed(config: ModelConfig, cfg: TrainabilityConfig) -> set[str]:
    """Towers whose weights are reloaded from their `path` instead of being saved."""
    return {
        c for c, attr in TOWERS.items() if getattr(config, attr).path is not None and cfg.mode(c) != "full"
    }


def _embedding_names(model: UltraModel) -> set[str]:
    wanted = {id(model.llm.get_input_embeddings()), id(model.llm.get_output_embeddings())}
    return {plain_name(f"{name}.weight") for name, m in model.named_modules() if id(m) in wanted}


def _owning(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors that own their storage, one per shared storage (tied weights keep one name)."""
    out, seen = {}, set()
    for key, t in tensors.items():
        if t.data_ptr() in seen and t.numel():
            continue
        seen.add(t.data_ptr())
        t = t.detach().contiguous()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # a view into a larger storage (e.g. a torch.load'ed shard)
        out[key] = t
    return out


def write_checkpoint(
    folder: str | Path,
    config: ModelConfig,
    trainability: TrainabilityConfig,
    base: dict[str, torch.Tensor],
    adapter: dict[str, torch.Tensor],
    non_lora: dict[str, torch.Tensor],
    tokenizer: PreTrainedTokenizerBase | None,
) -> Path:
    """Write the training layout from already-partitioned tensors (plain names). Used by save and convert."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_model_config(folder, config)
    (folder / TRAINABILITY_NAME).write_text(
        json.dumps(to_dict(trainability), indent=2) + "\n", encoding="utf-8"
    )
    for name, tensors in ((WEIGHTS_NAME, base), (ADAPTER_NAME, adapter), (NON_LORA_NAME, non_lora)):
        save_file(_owning(tensors), str(folder / name), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return folder


def save_checkpoint(
    model: UltraModel, folder: str | Path, tokenizer: PreTrainedTokenizerBase | None = None
) -> Path:
    """Write `model` in the training layout (base-weight rule in the module docstring).

    `model` may also be a stand-in exposing `state_dict()` (a gathered full one under FSDP / ZeRO-3)
    with the model's attributes, as the trainer passes."""
    cfg = getattr(model, "trainability", None) or TrainabilityConfig()
    hub = hub_backed(model.config, cfg)
    keep = _embedding_names(model) if "llm" in hub else set()
    base, adapter, non_lora = {}, {}, {}
    for key, tensor in model.state_dict().items():
        name = plain_name(key)
        comp = component_of(name)
        if is_lora_key(key):
            adapter[name] = tensor
        elif cfg.mode(comp) == "full":
            non_lora[name] = tensor
        elif comp not in hub or name in keep:
            base[name] = tensor
    resolved = model.resolved_config()
    parts = {attr: getattr(resolved, attr) for c, attr in TOWERS.items() if c not in hub}
    config = dataclasses.replace(model.config, **parts)
    return write_checkpoint(folder, config, cfg, base, adapter, non_lora, tokenizer)


def save_pretrained(
    model: UltraModel, folder: str | Path, tokenizer: PreTrainedTokenizerBase | None = None
) -> Path:
    """Write `model` to `folder`: the plain layout (config resolved inline + every weight), or the
    training layout once `lora.apply_trainability` gave the model trainability settings."""
    if getattr(model, "trainability", None) is not None:
        return save_checkpoint(model, folder, tokenizer)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_model_config(folder, model.resolved_config())
    save_model(model, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return folder


# ------------------------------------------------------------------------------------ load


def _read_tensors(folder: Path, name: str, required: bool) -> dict[str, torch.Tensor]:
    path = folder / name
    if path.is_file():
        return read_safetensors_file(path)
    if path.with_suffix(".bin").is_file():
        raise CheckpointError(
            f"{folder} holds {path.with_suffix('.bin').name}, not {name}: llava-ultra checkpoints are "
            f"safetensors only; convert foreign checkpoints with `llava-ultra convert`"
        )
    if required:
        raise CheckpointError(
            f"{folder} has no {name}; it is needed by its {TRAINABILITY_NAME} / config.json"
        )
    return {}


def load_checkpoint(
    folder: str | Path, device: str | torch.device | None = None, dtype: str | None = None
) -> tuple[UltraModel, PreTrainedTokenizerBase | None]:
    """Rebuild (model, tokenizer) from a training-layout folder alone, strictly; the model is in eval mode.

    The tokenizer is None when the folder holds none. `dtype` overrides the saved `model.dtype`.
    """
    folder = Path(folder)
    config = read_model_config(folder)
    if dtype is not None:
        config = dataclasses.replace(config, dtype=dtype)
    cfg = read_trainability(folder)
    tokenizer = load_tokenizer(folder) if (folder / "tokenizer_config.json").is_file() else None
    hub = hub_backed(config, cfg)
    with no_init_weights():  # every weight is overwritten below; skip the random init
        model = build_model(dataclasses.replace(config, dtype="float32"), tokenizer)
    base = _read_tensors(folder, WEIGHTS_NAME, required=not hub)
    apply_trainability(model, cfg)
    adapter = _read_tensors(folder, ADAPTER_NAME, required=any(cfg.mode(c) == "lora" for c in COMPONENTS))
    non_lora = _read_tensors(folder, NON_LORA_NAME, required=any(cfg.mode(c) == "full" for c in COMPONENTS))
    files = {WEIGHTS_NAME: base, ADAPTER_NAME: adapter, NON_LORA_NAME: non_lora}
    state: dict[str, torch.Tensor] = {}
    for name, tensors in files.items():
        twice = sorted(set(state) & set(tensors))
        if twice:
            raise CheckpointError(
                f"{folder}: {name} repeats keys saved in another file: {', '.join(twice[:10])}"
            )
        state.update(tensors)
    current = model.state_dict()
    actual = {plain_name(k): k for k in current}
    saved_anyway = _embedding_names(model) if "llm" in hub else set()
    for name, key in actual.items():  # hub weights, already loaded by build_model
        if (
            component_of(name) in hub
            and name not in state
            and not is_lora_key(key)
            and name not in saved_anyway
        ):
            state[name] = current[key]
    state = {actual.get(k, k): v for k, v in state.items()}
    load_state_dict_strict(model, state, source=str(folder))
    return model.to(device=device or "cpu", dtype=resolve_dtype(config.dtype, device)).eval(), tokenizer


def from_pretrained(
    folder: str | Path, device: str | torch.device | None = None, dtype: str | None = None
) -> UltraModel:
    """The model of any checkpoint folder (either layout), strictly: missing/unexpected keys raise."""
    folder = Path(folder)
    if (folder / TRAINABILITY_NAME).is_file():
        return load_checkpoint(folder, device, dtype)[0]
    cfg = read_model_config(folder)
    if dtype is not None:
        cfg = dataclasses.replace(cfg, dtype=dtype)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{folder} has no {WEIGHTS_NAME}; save the model there with save_pretrained")
    with no_init_weights():  # every weight is overwritten below; skip the random init
        model = build_model(dataclasses.replace(cfg, dtype="float32"))
    load_state_dict_strict(model, read_safetensors_file(weights), source=str(weights))
    return model.to(device=device or "cpu", dtype=resolve_dtype(cfg.dtype, device))


def load_for_inference(
    folder: str | Path, device: str | torch.device | None = None, dtype: str | None = None
) -> tuple[UltraModel, Any]:
    """(model in eval mode, tokenizer) from any checkpoint folder: the one loader eval, serve, chat
    and predict share. The layout is chosen by the files in it (never by its name): a training
    checkpoint (trainability.json, LoRA adapters or non-LoRA trainables beside config.json) loads with
    `load_checkpoint`; a plain folder (config.json + model.safetensors) with `from_pretrained`. Both
    load strictly; the tokenizer must be saved in the folder, and it must map the image token to the
    id the model expects."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(
            f"checkpoint folder {folder} does not exist; pass a folder written by training "
            "(e.g. <run>/stage2) or by save_pretrained"
        )
    if not (folder / CONFIG_NAME).is_file():
        stages = [s for s in ("stage2", "stage1") if (folder / s / CONFIG_NAME).is_file()]
        if stages:
            raise CheckpointError(
                f"{folder} has no {CONFIG_NAME}; it looks like a training run: pass {folder / stages[0]}"
            )
    read_model_config(folder)  # a clear error for folders that are not ours
    training_files = (TRAINABILITY_NAME, ADAPTER_NAME, NON_LORA_NAME)
    if any((folder / name).is_file() for name in training_files):
        model, tokenizer = load_checkpoint(folder, device=device, dtype=dtype)
    else:
        model = from_pretrained(folder, device=device, dtype=dtype)
        tokenizer = load_tokenizer(folder) if (folder / "tokenizer_config.json").is_file() else None
    if tokenizer is None:
        raise CheckpointError(
            f"{folder} holds no tokenizer; save the training tokenizer there (tokenizer.save_pretrained)"
        )
    token_id = tokenizer.convert_tokens_to_ids(model.config.image_token)
    if token_id != model.config.image_token_id:
        raise CheckpointError(
            f"{folder}: the tokenizer maps {model.config.image_token!r} to {token_id} but the model expects "
            f"{model.config.image_token_id}; save the tokenizer the model was trained with beside it"
        )
    return model.eval(), tokenizer
