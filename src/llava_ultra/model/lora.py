"""What is frozen, LoRA-adapted or fully trained, per component; merging; the checkpoint folder.

Components and the state-dict prefixes they own (`UltraModel`'s module-name contract):

    clip        clip.*                                   CLIP vision tower
    sam         sam.*                                    SAM image encoder
    projectors  fusion.clip_projector.*, fusion.sam_projector.*
    fusion      fusion.alpha_logit, fusion.align.*       fusion weight and grid aligner
    selector    selector.*                               frame scorer
    llm         llm.*                                    language model

Every parameter belongs to exactly one component. LoRA targets are named per component and turned
into ONE regex rooted at each component (`llm\\.(?:.*\\.)?(?:q_proj|v_proj)`), so a bare name such as
`q_proj` for the LLM can never land in CLIP, which also has `q_proj`. Injection uses peft's
`inject_adapter_in_model` on our own model (no `PeftModel` wrapper), so state-dict names stay ours.

The checkpoint folder (see docs/checkpoints.md), safetensors only:

    config.json                       {"format": "llava-ultra", "model": ModelConfig}
    trainability.json                 TrainabilityConfig (modes, LoRA settings, targets)
    model.safetensors                 frozen weights that cannot be rebuilt from a hub id
    adapter_model.safetensors         LoRA A/B weights (full names, no adapter name)
    non_lora_trainables.safetensors   every other weight of a 'full' component
    tokenizer files

Rule for base weights: a tower (clip, sam, llm) whose config names a hub id / folder (`path`) and
whose weights are unchanged (mode 'frozen' or 'lora', not merged) is NOT saved; it is reloaded from
that `path`. Everything else is saved - random-init (`inline`) towers such as the tiny preset,
fused/selector modules (never on a hub), fully trained towers (their config is written `inline`),
and, with a hub LLM, its input/output embeddings (they grow when `<image>` is added). So a folder is
loadable alone, given the hub ids it names. Loading is strict: the files together with the hub
weights must cover the model exactly; missing, unexpected or mis-shaped keys raise `CheckpointError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedTokenizerBase
from transformers.initialization import no_init_weights

from ..config import COMPONENT_MODES, LoraSettings, ModelConfig, from_dict, to_dict
from ..errors import CheckpointError, ConfigError
from .tokenizer import load_tokenizer
from .ultra import (
    CONFIG_NAME,
    FORMAT,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    UltraModel,
    build_model,
    load_state_dict_strict,
    read_model_config,
    resolve_dtype,
)
from .weights import read_safetensors_file

TRAINABILITY_NAME = "trainability.json"
ADAPTER_NAME = "adapter_model.safetensors"
NON_LORA_NAME = "non_lora_trainables.safetensors"

COMPONENTS = ("clip", "sam", "projectors", "fusion", "selector", "llm")
COMPONENT_PREFIXES = {
    "clip": ("clip.",),
    "sam": ("sam.",),
    "projectors": ("fusion.clip_projector.", "fusion.sam_projector."),
    "fusion": ("fusion.align.", "fusion.alpha_logit"),
    "selector": ("selector.",),
    "llm": ("llm.",),
}
TOWERS = {"clip": "vision", "sam": "sam", "llm": "llm"}  # component -> ModelConfig field with path/inline
_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
_ADAPTER_SEGMENT = re.compile(r"\.(lora_[A-Za-z_]+)\.default(?=\.|$)")


@dataclass
class LoraTargets:
    """LoRA target module names of the components other than the LLM (whose list is
    `LoraSettings.target_modules`). A name matches a module whose dotted name ends with it, searched
    inside its own component only."""

    clip: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])
    """CLIP attention projections."""
    sam: list[str] = field(default_factory=lambda: ["attn.qkv", "attn.proj"])
    """SAM attention projections."""
    projectors: list[str] = field(default_factory=lambda: ["linear_1", "linear_2"])
    """Both projectors' linear layers."""
    fusion: list[str] = field(default_factory=list)
    """The 'conv' aligner's convolutions, e.g. ['convs.0', 'convs.1'] (none by default)."""
    selector: list[str] = field(default_factory=lambda: ["score_head"])
    """The scorer's output head."""


@dataclass
class TrainabilityConfig:
    """Per component: 'frozen', 'lora' (adapters on the named modules) or 'full'. Saved with checkpoints."""

    clip: str = "frozen"
    """CLIP vision tower."""
    sam: str = "frozen"
    """SAM image encoder."""
    projectors: str = "frozen"
    """CLIP and SAM projectors."""
    fusion: str = "frozen"
    """Fusion weight (alpha) and the 'conv' aligner."""
    selector: str = "frozen"
    """Frame scorer."""
    llm: str = "frozen"
    """Language model."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """Rank, alpha, dropout and the LLM's target modules."""
    targets: LoraTargets = field(default_factory=LoraTargets)
    """Target modules of the other components."""

    def __post_init__(self) -> None:
        for name in COMPONENTS:
            mode = getattr(self, name)
            if mode not in COMPONENT_MODES:
                raise ConfigError(
                    f"trainable.{name}={mode!r} is not a mode; use one of {', '.join(COMPONENT_MODES)}"
                )
            if mode == "lora" and not self.targets_for(name):
                raise ConfigError(
                    f"trainable.{name}='lora' but no LoRA target modules are named for {name}; set "
                    f"{'train.lora.target_modules' if name == 'llm' else f'targets.{name}'} or use 'full'"
                )
        for name in COMPONENTS:
            bad = [t for t in self.targets_for(name) if not _NAME.fullmatch(t)]
            if bad:
                raise ConfigError(
                    f"LoRA targets {bad} for {name} must be dotted module names such as 'q_proj'"
                )

    @classmethod
    def from_trainable(
        cls, trainable: dict[str, str], lora: LoraSettings | None = None, targets: LoraTargets | None = None
    ) -> TrainabilityConfig:
        """From a stage's `trainable` mapping (component -> mode); unnamed components are frozen."""
        for name in trainable:
            if name not in COMPONENTS:
                raise ConfigError(f"trainable.{name}: unknown component; use one of {', '.join(COMPONENTS)}")
        return cls(**trainable, lora=lora or LoraSettings(), targets=targets or LoraTargets())

    def mode(self, component: str) -> str:
        return getattr(self, component)

    def targets_for(self, component: str) -> list[str]:
        return (
            list(self.lora.target_modules) if component == "llm" else list(getattr(self.targets, component))
        )


# ----------------------------------------------------------------------------------- names


def component_of(name: str) -> str:
    """The component owning a parameter / module name (in our plain naming)."""
    for comp, prefixes in COMPONENT_PREFIXES.items():
        if any(name.startswith(p) or name == p.rstrip(".") for p in prefixes):
            return comp
    raise ConfigError(
        f"{name} belongs to no trainability component; add its prefix to lora.COMPONENT_PREFIXES"
    )


def plain_name(key: str) -> str:
    """Our name for a state-dict key of a LoRA-injected model: no `.base_layer`, no adapter name."""
    return _ADAPTER_SEGMENT.sub(r".\1", key.replace(".base_layer.", "."))


def is_lora_key(key: str) -> bool:
    return ".lora_" in key


def lora_target_regex(component: str, targets: list[str]) -> str:
    """A fullmatch regex for module names inside `component` that end with one of `targets`."""
    prefixes = [p for p in COMPONENT_PREFIXES[component] if p.endswith(".")]
    roots = "|".join(re.escape(p) for p in prefixes)
    names = "|".join(re.escape(t) for t in targets)
    return rf"(?:{roots})(?:.*\.)?(?:{names})"


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


# ---------------------------------------------------------------------------- trainability


def apply_trainability(model: UltraModel, cfg: TrainabilityConfig) -> UltraModel:
    """Inject LoRA into the 'lora' components' named modules and set requires_grad per component.

    In place; returns the model. A model that already carries adapters must be merged first.
    """
    if has_lora(model):
        raise ConfigError(
            "this model already has LoRA adapters; call merge_lora(model) before applying new ones"
        )
    if model.sam is None and cfg.sam != "frozen":
        raise ConfigError(f"trainable.sam={cfg.sam!r} but the model has no SAM encoder; set it to 'frozen'")
    lora_parts = [c for c in COMPONENTS if cfg.mode(c) == "lora"]
    if lora_parts:
        patterns = {c: lora_target_regex(c, cfg.targets_for(c)) for c in lora_parts}
        names = [n for n, _ in model.named_modules()]
        for comp, pattern in patterns.items():
            if not any(re.fullmatch(pattern, n) for n in names):
                raise ConfigError(
                    f"trainable.{comp}='lora' but no module inside {comp} matches the targets "
                    f"{cfg.targets_for(comp)}; name modules that exist there or use 'full'"
                )
        lora = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules="|".join(f"(?:{p})" for p in patterns.values()),
            bias="none",
        )
        try:
            inject_adapter_in_model(lora, model)
        except ValueError as exc:
            raise ConfigError(f"LoRA could not be applied to {', '.join(lora_parts)}: {exc}") from exc
    for name, param in model.named_parameters():
        mode = cfg.mode(component_of(plain_name(name)))
        param.requires_grad_(mode == "full" or (mode == "lora" and is_lora_key(name)))
    model.trainability = cfg
    return model.train(model.training)  # new LoRA modules start in training mode; match the model's


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters that will be trained (requires_grad), as `named_parameters` gives them."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the model as its base (adapters bypassed) inside the block; restores them after."""
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    grads = {id(p): p.requires_grad for m in layers for p in m.parameters()}
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)
            for p in layer.parameters():
                p.requires_grad_(grads[id(p)])


def merge_lora(model: UltraModel) -> UltraModel:
    """Fold every adapter into its base weight and remove the peft modules (in place; returns the model).

    The merged components are recorded as 'frozen', and a merged tower loaded from a hub id is
    re-described `inline` (its weights no longer equal the hub's, so a checkpoint must save them).
    """
    merged: set[str] = set()
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge(safe_merge=True)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
            merged.add(component_of(name))
    if hasattr(model, "peft_config"):
        del model.peft_config
    cfg = getattr(model, "trainability", None) or TrainabilityConfig()
    model.trainability = dataclasses.replace(cfg, **{c: "frozen" for c in merged})
    resolved = model.resolved_config()
    changed = {TOWERS[c]: getattr(resolved, TOWERS[c]) for c in merged if c in TOWERS}
    model.config = dataclasses.replace(model.config, **changed)
    return model


# ------------------------------------------------------------------------------ checkpoints


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
    """Write the folder layout from already-partitioned tensors (plain names). Used by save and convert."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": to_dict(config)}
    (folder / CONFIG_NAME).write_text(
        json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
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
    """Write `model` as one checkpoint folder (layout and base-weight rule in the module docstring)."""
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


def read_trainability(folder: str | Path) -> TrainabilityConfig:
    """The folder's trainability.json; all-frozen for folders without one (UltraModel.save_pretrained)."""
    path = Path(folder) / TRAINABILITY_NAME
    if not path.is_file():
        return TrainabilityConfig()
    try:
        return from_dict(TrainabilityConfig, json.loads(path.read_text(encoding="utf-8")), "trainability")
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc


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
    """Rebuild (model, tokenizer) from a checkpoint folder alone, strictly; the model is in eval mode.

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
