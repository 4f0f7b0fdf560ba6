"""Frozen-feature cache: round trip, determinism, same loss as live encoders, refusals, CLI + training."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from llava_ultra.cli import app
from llava_ultra.config import to_dict
from llava_ultra.errors import CheckpointError, ConfigError, DataError
from llava_ultra.model.ultra import build_model
from llava_ultra.train import loop
from llava_ultra.train.dataset import Collator, InstructDataset, PixelSource, image_root_for
from llava_ultra.train.feature_cache import (
    INDEX_NAME,
    FeatureCache,
    build_cache,
    cached_source,
    encode_pixels,
    images_of,
)
from tests.train.conftest import copy_instruct, train_config


@pytest.fixture(scope="module")
def setup(instruct_dir: Path, tmp_path_factory):
    """Config, tokenizer, stage-2 samples, the fresh stage-1 model and an fp32 cache of all images."""
    root = tmp_path_factory.mktemp("fcache")
    cfg = train_config(instruct_dir, root / "run")
    tok = loop.resolve_tokenizer(cfg, None)
    mcfg = loop._model_config(cfg, None, tok)
    prepared = loop.prepare_stage_data(cfg, 2, tok, mcfg, log=lambda *_: None)
    model = loop.initial_model(cfg, tok)
    files = [cfg.data.stage1, cfg.data.stage2]
    build_cache(model, files, root / "fp32", batch_size=5, log=lambda _: None)
    return cfg, tok, prepared, model, root


def batch_from(source, setup, n: int = 4) -> dict:
    cfg, tok, prepared, _, _ = setup
    ds = InstructDataset(prepared, image_root_for(cfg.data.stage2), source)
    return Collator(tok.pad_token_id)([ds[i] for i in range(n)])["inputs"]


def test_round_trip_stores_encoder_outputs_and_is_deterministic(setup, instruct_dir: Path):
    cfg, _, _, model, root = setup
    cache = FeatureCache(root / "fp32")
    paths = images_of([cfg.data.stage1, cfg.data.stage2])
    assert len(cache.images) == len(paths) > 10  # every unique image once
    got = cache(paths[:3])
    live = encode_pixels(model, PixelSource(model.image_processor)(paths[:3]))
    assert got["clip_features"].shape == (3, 16, 32) and got["sam_features"].shape == (3, 16, 8, 8)
    torch.testing.assert_close(got["clip_features"], live["clip"], atol=1e-6, rtol=0)
    torch.testing.assert_close(got["sam_features"], live["sam"], atol=1e-6, rtol=0)
    # same model + data + settings -> a byte-identical folder
    again = build_cache(
        model, [cfg.data.stage1, cfg.data.stage2], root / "again", batch_size=5, log=lambda _: None
    )
    assert again.shards == 1 and again.hash == cache.hash
    for f in sorted((root / "fp32").iterdir()):
        assert f.read_bytes() == (root / "again" / f.name).read_bytes(), f.name
    with pytest.raises(ConfigError, match="--overwrite"):
        build_cache(model, [cfg.data.stage1], root / "again", log=lambda _: None)


def test_cache_gives_the_same_loss_as_live_encoders(setup):
    cfg, tok, _, _, root = setup
    model = loop._set_trainable(loop.initial_model(cfg, tok), cfg, 2).train()  # straight-through + teacher
    live = batch_from(PixelSource(model.image_processor), setup)
    cached = batch_from(cached_source(root / "fp32", model, setup[2], image_root_for(cfg.data.stage2)), setup)
    assert "pixel_values_clip" not in cached and cached["clip_features"].dtype == torch.float32
    torch.manual_seed(0)
    a = model(**live)
    torch.manual_seed(0)
    b = model(**cached)
    assert a.kd_loss is not None
    assert (
        abs(float(a.loss.detach()) - float(b.loss.detach())) < 1e-5
        and a.selection.indices == b.selection.indices
    )

    build_cache(model, [cfg.data.stage2], root / "fp16", dtype="float16", log=lambda _: None)
    half = batch_from(FeatureCache(root / "fp16"), setup)
    assert half["clip_features"].dtype == torch.float16
    fp16_loss = float(model(**half).loss.detach())
    assert abs(fp16_loss - float(a.loss.detach())) < 1e-2 * float(a.loss.detach())

    # mode 'none' (fixed first frame) indexes cached features like pixels; the encoders are built
    # before the selector, so the same seed gives the same encoders and the same cache applies
    mcfg = cfg.model
    torch.manual_seed(cfg.train.seed)
    plain = build_model(
        dataclasses.replace(mcfg, selector=dataclasses.replace(mcfg.selector, mode="none")), tok
    ).train()
    FeatureCache(root / "fp32").check_model(plain)
    x, y = plain(**live).loss.detach(), plain(**cached).loss.detach()
    assert abs(float(x) - float(y)) < 1e-5


def test_refuses_another_encoder_and_trainable_encoders(setup):
    cfg, tok, prepared, model, root = setup
    cache = FeatureCache(root / "fp32")
    torch.manual_seed(123)
    other = build_model(model.config, tok)  # same configs, different random weights
    with pytest.raises(CheckpointError) as err:
        cache.check_model(other)
    msg = str(err.value)
    assert cache.hash in msg and "weights.clip" in msg and "--overwrite" in msg
    layer = dataclasses.replace(
        model.config, vision=dataclasses.replace(model.config.vision, select_layer=-1)
    )
    shifted = build_model(layer, tok)
    shifted.load_state_dict(model.state_dict())
    with pytest.raises(CheckpointError, match=r"clip\.settings\.select_layer"):
        cache.check_model(shifted)
    model.clip.requires_grad_(True)
    try:
        with pytest.raises(ConfigError, match="clip encoder trains"):
            cache.check_model(model)
    finally:
        model.clip.requires_grad_(False)


def test_missing_image_and_bad_folder_are_clear_errors(setup, instruct_dir: Path, tmp_path: Path):
    cfg, _, prepared, model, root = setup
    part = copy_instruct(instruct_dir, tmp_path / "part", 2, lambda s: s[:2])
    build_cache(model, [part], tmp_path / "small", log=lambda _: None)
    with pytest.raises(DataError, match=r"not in feature cache .*\.png.*cache-features"):
        cached_source(tmp_path / "small", model, prepared, image_root_for(cfg.data.stage2))
    with pytest.raises(DataError, match="not in feature cache"):
        FeatureCache(tmp_path / "small")([Path("/nowhere/x.png")])
    with pytest.raises(ConfigError, match="holds no cache.json"):
        FeatureCache(tmp_path)
    # an image that changed after caching is refused
    index = json.loads((tmp_path / "small" / INDEX_NAME).read_text())
    entry = next(iter(index["images"].values()))
    entry["size"] += 1
    (tmp_path / "small" / INDEX_NAME).write_text(json.dumps(index))
    first = Path(next(iter(index["images"])))
    with pytest.raises(DataError, match="changed on disk"):
        FeatureCache(tmp_path / "small").check_covers([first])


def test_cli_builds_a_cache_that_training_uses_with_the_same_losses(instruct_dir: Path, tmp_path: Path):
    live_cfg = train_config(
        instruct_dir, tmp_path / "live", **{"train.stages": [1], "train.stage1.max_steps": 2}
    )
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(to_dict(live_cfg), allow_unicode=True), encoding="utf-8")
    res = CliRunner().invoke(app, ["cache-features", "--config", str(path), "--out", str(tmp_path / "cache")])
    assert res.exit_code == 0, res.output
    assert "encoder hash" in res.output
    live = loop.train(live_cfg).stages[0].losses
    cached_cfg = train_config(
        instruct_dir,
        tmp_path / "cached",
        **{"train.stages": [1], "train.stage1.max_steps": 2, "data.feature_cache": str(tmp_path / "cache")},
    )
    cached = loop.train(cached_cfg).stages[0].losses
    assert len(live) == len(cached) == 2
    assert all(abs(a - b) < 1e-4 for a, b in zip(live, cached, strict=True)), (live, cached)
    missing = CliRunner().invoke(
        app, ["train", "--config", str(path), "--data.feature_cache", str(tmp_path / "none"), "--overwrite"]
    )
    assert missing.exit_code == 2 and "holds no cache.json" in missing.output
