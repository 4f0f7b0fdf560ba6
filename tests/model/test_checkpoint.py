"""The checkpoint folder format: both layouts round-trip exactly, loading is strict, foreign folders
are named, hub-backed towers are not saved."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from llava_ultra.config import LoraSettings
from llava_ultra.errors import CheckpointError
from llava_ultra.model.checkpoint import (
    from_pretrained,
    load_checkpoint,
    save_checkpoint,
    save_pretrained,
)
from llava_ultra.model.lora import (
    TrainabilityConfig,
    apply_trainability,
    merge_lora,
    trainable_parameter_names,
)
from llava_ultra.model.ultra import build_model
from tests.helpers import TINY_VOCAB, tiny_batch, tiny_model, tiny_model_dict, tiny_tokenizer
from tests.model.test_lora import STAGE2, _logits, _randomise_lora_b


def test_save_load_round_trip_and_strict_load(tmp_path):
    model = tiny_model(seed=2)
    folder = save_pretrained(model, tmp_path / "ckpt", tokenizer=tiny_tokenizer())
    saved = json.loads((folder / "config.json").read_text())
    assert saved["format"] == "llava-ultra" and saved["model"]["llm"]["inline"]["model_type"] == "llama"
    assert (folder / "tokenizer.json").is_file()
    loaded = from_pretrained(folder)
    batch = tiny_batch(model, [2, 1])
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)

    state = load_file(str(folder / "model.safetensors"))
    del state["fusion.clip_projector.linear_1.weight"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 missing: fusion\.clip_projector\.linear_1\.weight"):
        from_pretrained(folder)


def test_from_pretrained_rejects_foreign_folder(llava_folder):
    with pytest.raises(CheckpointError, match="model_type='llava'.*llava-ultra convert"):
        from_pretrained(llava_folder)


def test_save_load_round_trips_exactly(tmp_path):
    model = tiny_model(seed=3)
    apply_trainability(model, TrainabilityConfig.from_trainable(STAGE2, lora=LoraSettings(r=4, alpha=8)))
    _randomise_lora_b(model)
    folder = save_checkpoint(model, tmp_path / "ckpt", tiny_tokenizer())
    adapter = load_file(str(folder / "adapter_model.safetensors"))
    non_lora = load_file(str(folder / "non_lora_trainables.safetensors"))
    assert adapter and all(".lora_A.weight" in k or ".lora_B.weight" in k for k in adapter)
    assert "llm.model.layers.0.self_attn.q_proj.lora_A.weight" in adapter
    assert set(non_lora) == {n for n in trainable_parameter_names(model) if ".lora_" not in n}
    base = load_file(str(folder / "model.safetensors"))
    assert "llm.model.layers.0.self_attn.q_proj.weight" in base and "clip.pre_layrnorm.weight" in base
    assert json.loads((folder / "trainability.json").read_text())["llm"] == "lora"

    loaded, tokenizer = load_checkpoint(folder)
    assert tokenizer.convert_tokens_to_ids("<image>") == 4
    batch = tiny_batch(model, [2, 1])
    model.eval()
    assert torch.equal(_logits(model, batch), _logits(loaded, batch))
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    assert trainable_parameter_names(loaded) == trainable_parameter_names(model)
    assert torch.equal(_logits(from_pretrained(folder), batch), _logits(model, batch))


def test_loading_is_strict(tmp_path):
    model = apply_trainability(tiny_model(seed=4), TrainabilityConfig.from_trainable(STAGE2))
    folder = save_checkpoint(model, tmp_path / "ckpt", tiny_tokenizer())
    path = folder / "non_lora_trainables.safetensors"
    good = load_file(str(path))

    missing = {k: v for k, v in good.items() if not k.startswith("fusion.clip_projector.")}
    save_file(missing, str(path))
    with pytest.raises(CheckpointError, match=r"4 missing: fusion\.clip_projector\.linear_1\.weight"):
        load_checkpoint(folder)

    save_file(good | {"fusion.extra_gate.weight": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match=r"1 unexpected: fusion\.extra_gate\.weight"):
        load_checkpoint(folder)

    save_file(good, str(path))
    adapter = folder / "adapter_model.safetensors"
    adapter.rename(folder / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="safetensors only"):
        load_checkpoint(folder)


def test_hub_backed_towers_are_not_saved_but_merged_ones_are(tmp_path):
    """A tower named by `path` (a local folder here, a hub id at home) is reloaded from it, not saved."""
    spec = tiny_model_dict()
    torch.manual_seed(5)
    CLIPVisionModel(CLIPVisionConfig(**spec["vision"]["inline"])).save_pretrained(tmp_path / "clip")
    LlamaForCausalLM(
        LlamaConfig(**{k: v for k, v in spec["llm"]["inline"].items() if k != "model_type"})
    ).save_pretrained(tmp_path / "llm")
    spec["vision"] = {**spec["vision"], "inline": None, "path": str(tmp_path / "clip")}
    spec["llm"] = {"path": str(tmp_path / "llm")}
    from llava_ultra.config import model_config_from_dict

    model = build_model(model_config_from_dict(spec), tiny_tokenizer()).eval()
    assert model.llm.get_input_embeddings().num_embeddings == TINY_VOCAB
    apply_trainability(model, TrainabilityConfig.from_trainable(STAGE2))
    _randomise_lora_b(model)
    folder = save_checkpoint(model, tmp_path / "ckpt", tiny_tokenizer())
    base = load_file(str(folder / "model.safetensors"))
    assert not any(k.startswith("clip.") for k in base)
    assert {k for k in base if k.startswith("llm.")} == {
        "llm.model.embed_tokens.weight",
        "llm.lm_head.weight",
    }
    saved = json.loads((folder / "config.json").read_text())["model"]
    assert saved["vision"]["path"] == str(tmp_path / "clip") and saved["llm"]["path"] == str(tmp_path / "llm")

    batch = tiny_batch(model, [2])
    loaded, _ = load_checkpoint(folder)
    assert torch.equal(_logits(loaded, batch), _logits(model, batch))

    merge_lora(model)  # the LLM now differs from its folder: it must be saved and described inline
    merged = save_checkpoint(model, tmp_path / "merged", tiny_tokenizer())
    saved = json.loads((merged / "config.json").read_text())["model"]
    assert saved["llm"]["path"] is None and saved["llm"]["origin"] == str(tmp_path / "llm")
    assert "llm.model.layers.1.mlp.down_proj.weight" in load_file(str(merged / "model.safetensors"))
    reloaded, _ = load_checkpoint(merged)
    torch.testing.assert_close(_logits(reloaded, batch), _logits(model, batch))
