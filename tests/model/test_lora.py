"""LoRA / trainability invariants on our model (tiny random init), and the strict checkpoint folder."""

from __future__ import annotations

import copy

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from llava_ultra.config import LoraSettings
from llava_ultra.errors import ConfigError
from llava_ultra.model.lora import (
    LoraTargets,
    TrainabilityConfig,
    adapters_disabled,
    apply_trainability,
    lora_target_regex,
    merge_lora,
    trainable_parameter_names,
)
from tests.helpers import tiny_batch, tiny_model, tiny_tokenizer

STAGE2 = {"projectors": "full", "fusion": "full", "selector": "full", "llm": "lora"}


def _lora_modules(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def _randomise_lora_b(model, seed: int = 0) -> None:
    """LoRA B starts at zero (adapters are a no-op); give it values so the invariants can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def test_lora_targets_are_rooted_in_their_component():
    assert lora_target_regex("llm", ["q_proj", "v_proj"]) == r"(?:llm\.)(?:.*\.)?(?:q_proj|v_proj)"
    model = tiny_model()
    # bare names that CLIP also has (q_proj, k_proj, v_proj; out_proj exists only in CLIP)
    lora = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj"])
    apply_trainability(model, TrainabilityConfig(llm="lora", lora=lora))
    names = _lora_modules(model)
    assert len(names) == 2 * 3  # 2 layers x q/k/v
    assert all(n.startswith("llm.model.layers.") for n in names), names
    assert not any(isinstance(m, BaseTunerLayer) for m in model.clip.modules())
    assert not any(isinstance(m, BaseTunerLayer) for m in model.sam.modules())

    with pytest.raises(ConfigError, match=r"no module inside llm matches the targets \['out_proj'\]"):
        apply_trainability(
            tiny_model(), TrainabilityConfig(llm="lora", lora=LoraSettings(target_modules=["out_proj"]))
        )

    clip_only = tiny_model()
    apply_trainability(clip_only, TrainabilityConfig(clip="lora"))
    assert _lora_modules(clip_only) and all(n.startswith("clip.") for n in _lora_modules(clip_only))


def test_trainability_config_is_validated():
    with pytest.raises(ConfigError, match=r"trainable.llm='half'.*frozen, lora, full"):
        TrainabilityConfig(llm="half")
    with pytest.raises(ConfigError, match=r"trainable.fusion='lora' but no LoRA target.*targets.fusion"):
        TrainabilityConfig(fusion="lora")
    with pytest.raises(ConfigError, match=r"trainable.vision: unknown component"):
        TrainabilityConfig.from_trainable({"vision": "full"})
    with pytest.raises(ConfigError, match="dotted module names"):
        TrainabilityConfig(targets=LoraTargets(clip=["q_proj|.*"]))
    with pytest.raises(ConfigError, match=r"trainable.sam='full' but the model has no SAM"):
        apply_trainability(tiny_model(**{"sam.enabled": False}), TrainabilityConfig(sam="full"))
    with pytest.raises(ConfigError, match="merge_lora"):
        model = apply_trainability(tiny_model(), TrainabilityConfig.from_trainable(STAGE2))
        apply_trainability(model, TrainabilityConfig.from_trainable(STAGE2))


def test_merged_equals_unmerged_and_disabled_equals_base():
    base = tiny_model(seed=1)
    model = copy.deepcopy(base)
    cfg = TrainabilityConfig.from_trainable({"llm": "lora", "projectors": "lora", "clip": "lora"})
    apply_trainability(model, cfg)
    _randomise_lora_b(model)
    batch = tiny_batch(model, [2, 1])
    want_base, adapted = _logits(base, batch), _logits(model, batch)
    assert (adapted - want_base).abs().max() > 1e-3  # the adapters do something
    with adapters_disabled(model):
        torch.testing.assert_close(_logits(model, batch), want_base, atol=1e-6, rtol=0)
    torch.testing.assert_close(_logits(model, batch), adapted)  # re-enabled
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)

    merge_lora(model)
    assert not _lora_modules(model) and not hasattr(model, "peft_config")
    assert set(model.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(_logits(model, batch), adapted, atol=1e-5, rtol=0)
    assert model.trainability.llm == model.trainability.clip == "frozen"


def test_one_step_changes_only_trainable_parameters():
    torch.manual_seed(0)
    model = tiny_model(seed=2)
    apply_trainability(model, TrainabilityConfig.from_trainable(STAGE2))
    model.train()
    assert not model.clip.training and not model.sam.training  # frozen towers stay in eval mode
    names = set(trainable_parameter_names(model))
    assert names and all(n.startswith(("fusion.", "selector.")) or ".lora_" in n for n in names)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = tiny_batch(model, [3, 2])
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == model.config.image_token_id, -100)
    findings = tiny_tokenizer()(["肝脏大小正常", "gallbladder focus"], padding=True, return_tensors="pt")
    for _ in range(2):  # B starts at 0, so A gets its first gradient in step 2
        optimiser.zero_grad()
        out = model(
            **batch, labels=labels, findings_ids=findings.input_ids, findings_mask=findings.attention_mask
        )
        out.loss.backward()
        optimiser.step()
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == names, (sorted(changed - names)[:5], sorted(names - changed)[:5])
    assert all(torch.equal(after[k], before[k]) for k in after if k.startswith(("clip.", "sam.")))
    assert all(torch.equal(after[k], before[k]) for k in after if k.startswith("llm.") and ".lora_" not in k)
