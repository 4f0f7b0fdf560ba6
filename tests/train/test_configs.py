"""Every shipped accelerate config parses as accelerate's own config class, and every training preset
loads with a train: section whose stages have something to train."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig

from llava_ultra.config import load_config

ROOT = Path(__file__).resolve().parents[2]
ACCELERATE = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))


def test_the_expected_launch_configs_ship():
    names = {p.stem for p in ACCELERATE}
    assert {"single_gpu", "cpu_ddp", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"} <= names


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_config_parses(path: Path):
    cfg = ClusterConfig.from_yaml_file(str(path))
    raw = yaml.safe_load(path.read_text())
    assert cfg.distributed_type == raw["distributed_type"]
    ds_file = (raw.get("deepspeed_config") or {}).get("deepspeed_config_file")
    if ds_file:
        ds = json.loads((ROOT / ds_file).read_text())
        stage = int(path.stem[-1])
        assert ds["zero_optimization"]["stage"] == stage
        assert ds["gradient_accumulation_steps"] == "auto"


@pytest.mark.parametrize("name", ["tiny.yaml", "ultra-13b.yaml"])
def test_training_presets_load(name: str):
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.train.stages == [1, 2]
    assert cfg.data.stage1 and cfg.data.stage2
    assert cfg.train.stage1.template == "plain" and cfg.train.stage2.template == "vicuna_v1"
    assert {"clip", "sam"}.isdisjoint({k for k, v in cfg.train.stage2.trainable.items() if v != "frozen"})
