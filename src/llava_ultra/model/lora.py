"""What is frozen, LoRA-adapted or fully trained, per component; LoRA injection and merging.

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

The checkpoint folder these settings are saved in (trainability.json beside the adapters and the
non-LoRA trainables) is written and read by `checkpoint.py`; this module never touches files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..config import COMPONENT_MODES, LoraSettings
from ..errors import ConfigError
from .ultra import UltraModel

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
