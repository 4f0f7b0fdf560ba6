"""Config: every shipped preset loads, overrides, strict keys with suggestions, validation, round-trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from llava_ultra.config import Config, ModelConfig, from_dict, load_config, load_json, save_json, to_dict
from llava_ultra.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_presets_exist():
    names = {p.stem for p in CONFIGS}
    assert {"tiny", "ultra-13b", "ultra-7b-mistral"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    assert isinstance(cfg.model, ModelConfig)
    assert from_dict(Config, to_dict(cfg)) == cfg
    save_json(cfg.model, tmp_path / "model.json")
    assert load_json(ModelConfig, tmp_path / "model.json") == cfg.model


def test_real_presets_name_the_hub_weights():
    cfg = load_config(next(p for p in CONFIGS if p.stem == "ultra-13b")).model
    assert cfg.vision.path == "openai/clip-vit-large-patch14-336" and cfg.sam.path == "facebook/sam-vit-large"
    assert cfg.tokens_per_image == 576 and cfg.image_tokens_for(8) == 576


def test_tiny_preset_is_small():
    cfg = load_config(next(p for p in CONFIGS if p.stem == "tiny")).model
    assert 16 <= cfg.tokens_per_image <= 64
    assert cfg.llm.inline["hidden_size"] <= 128


def test_dotted_overrides_list_and_dict():
    tiny = next(p for p in CONFIGS if p.stem == "tiny")
    cfg = load_config(
        tiny,
        ["model.fusion.alpha_init=0.25", "model.sam.enabled=false", "model.llm.inline.num_hidden_layers=3"],
    )
    assert cfg.model.fusion.alpha_init == 0.25 and cfg.model.sam.enabled is False
    assert cfg.model.llm.inline["num_hidden_layers"] == 3
    cfg = load_config(tiny, {"model.selector.mode": "none", "model.selector.none_strategy": "all"})
    assert cfg.model.image_tokens_for(3) == 3 * 64


def test_unknown_key_suggests_the_closest_name(tmp_path):
    tiny = next(p for p in CONFIGS if p.stem == "tiny")
    with pytest.raises(ConfigError, match=r"unknown key model\.fusion\.alpha_int: did you mean 'alpha_init'"):
        load_config(tiny, ["model.fusion.alpha_int=0.3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(tiny.read_text().replace("top_m:", "topm:"))
    with pytest.raises(ConfigError, match=r"model\.selector\.topm: did you mean 'top_m'"):
        load_config(bad)
    # a key that lives one level down (per stage) points there, not at a look-alike name
    with pytest.raises(
        ConfigError,
        match=r"unknown key train\.lr: it is set per part: use train\.stage1\.lr or train\.stage2\.lr",
    ):
        load_config(tiny, ["train.lr=1e-4"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.fusion.alpha_init=1.0", r"alpha_init=1.0 must lie strictly between 0 and 1"),
        ("model.fusion.projector_type=mlp3x", r"projector_type='mlp3x' is not supported"),
        ("model.selector.mode=attention", r"mode='attention' is not supported"),
        ("model.selector.top_m=0", r"top_m=0 must be >= 1"),
        ("model.vision.image_size=100", r"image_size=100 is not a multiple of model.vision.patch_size=14"),
        ("model.vision.select_feature=cls_patch", r"'cls_patch' cannot be fused with SAM"),
        ("model.selector.attn_layers=9", r"attn_layers=9 exceeds the LLM's num_hidden_layers=4"),
        ("model.image_token_id=5000", r"image_token_id=5000 is outside the LLM vocabulary"),
        ("model.llm.path=some/llm", r"set exactly one of model.llm.path .* got both"),
        ("model.dtype=fp16", r"did you mean 'float16'"),
        ("model.selector.top_m=two", r"model.selector.top_m must be an integer"),
    ],
)
def test_validation_names_field_and_fix(override, message):
    tiny = next(p for p in CONFIGS if p.stem == "tiny")
    with pytest.raises(ConfigError, match=message):
        load_config(tiny, [override])


def test_missing_file_and_bad_override_syntax(tmp_path):
    with pytest.raises(
        ConfigError, match="nope.yaml: no such file; pass a YAML file such as configs/tiny.yaml"
    ):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="no '='"):
        load_config(next(p for p in CONFIGS if p.stem == "tiny"), ["model.dtype"])


def test_a_yaml_file_that_is_broken_or_not_a_mapping_is_named(tmp_path):
    broken, listed = tmp_path / "broken.yaml", tmp_path / "list.yaml"
    broken.write_text("model: [unclosed\n", encoding="utf-8")
    listed.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="broken.yaml is not valid YAML"):
        load_config(broken)
    with pytest.raises(ConfigError, match="list.yaml must hold a mapping with a 'model:' section"):
        load_config(listed)
