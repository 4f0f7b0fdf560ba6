"""The cached default encoders: built once per recipe hash, reused, and loadable by a preset."""

from __future__ import annotations

import json

import pytest

from llava_ultra.config import Config, apply_overrides, from_dict, load_config, to_dict
from llava_ultra.errors import ConfigError
from llava_ultra.model.tokenizer import build_tiny_tokenizer
from llava_ultra.model.ultra import build_model
from llava_ultra.recipes.encoders import EncoderRecipe, ensure_encoders, resolve_encoders
from llava_ultra.recipes.quickstart import default_config_path

MICRO = EncoderRecipe(corpus_reports=6, steps=2, batch_size=8, probe_steps=2)


def test_built_once_and_reused_by_content_hash(tmp_path):
    messages = []
    first = ensure_encoders(MICRO, root=tmp_path, echo=messages.append)
    assert any("pretraining the tiny encoders once" in m for m in messages)
    stamp = (first / "clip" / "model.safetensors").stat().st_mtime_ns
    again = ensure_encoders(MICRO, root=tmp_path, echo=lambda m: pytest.fail(f"rebuilt: {m}"))
    assert again == first and (first / "clip" / "model.safetensors").stat().st_mtime_ns == stamp
    other = ensure_encoders(
        EncoderRecipe(corpus_reports=6, steps=3, batch_size=8, probe_steps=2),
        root=tmp_path,
        echo=lambda m: None,
    )
    assert other != first  # another recipe, another folder
    quality = json.loads((first / "encoder_quality.json").read_text())
    assert {"pretrained", "random_init"} <= set(quality)
    assert json.loads((first / "recipe.json").read_text())["steps"] == 2
    # the default recipe's token head and whole-report batches reach the pretraining config
    saved = json.loads((first / "pretrain_config.json").read_text())
    assert saved["token_lesion_weight"] == 1.0 and saved["report_batches"] is True
    assert json.loads((first / "sam_decoder.json").read_text())["token_head"] is True
    assert not list(tmp_path.glob(".*"))  # no temporary folder or corpus left behind


def test_overrides_make_the_tiny_preset_load_them(tmp_path):
    folder = ensure_encoders(MICRO, root=tmp_path, echo=lambda m: None)
    overrides = resolve_encoders(str(folder))
    cfg = load_config(default_config_path())
    cfg = from_dict(Config, apply_overrides(to_dict(cfg), overrides))
    assert cfg.model.vision.path.endswith("clip") and cfg.model.vision.inline is None
    assert cfg.model.sam.path.endswith("sam") and cfg.model.sam.inline is None
    tok = build_tiny_tokenizer(["甲状腺 thyroid nodule 结节"] * 4, vocab_size=300)
    model = build_model(cfg.model, tok)
    assert model.clip.config.hidden_size == 64 and model.sam.config.output_channels == 32
    assert resolve_encoders("random") == []
    with pytest.raises(ConfigError, match="not 'pretrained' or 'random', and not a folder"):
        resolve_encoders(str(tmp_path / "nowhere"))
