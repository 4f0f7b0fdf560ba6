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


@pytest.mark.parametrize(
    "name, template",
    [
        ("tiny.yaml", "vicuna_v1"),
        ("ultra-13b.yaml", "vicuna_v1"),
        ("ultra-7b-mistral.yaml", "mistral_instruct"),
    ],
)
def test_training_presets_load(name: str, template: str):
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.train.stages == [1, 2]
    assert cfg.data.stage1 and cfg.data.stage2
    assert cfg.train.stage1.template == "plain" and cfg.train.stage2.template == template
    if name.startswith("ultra-"):  # the paper's optimiser settings on the real presets
        assert cfg.train.optimizer == "adam"
        assert cfg.train.stage1.lr == cfg.train.stage2.lr == 1e-3
    assert {"clip", "sam"}.isdisjoint({k for k, v in cfg.train.stage2.trainable.items() if v != "frozen"})


@pytest.mark.slow
def test_cpu_ddp_accelerate_config_starts_two_gloo_processes(tmp_path: Path):
    """`accelerate launch --config_file configs/accelerate/cpu_ddp.yaml` really starts 2 processes
    (a MULTI_CPU config silently starts one) and the trainer's Accelerator joins them over gloo."""
    import os
    import subprocess
    import sys

    script = tmp_path / "probe.py"
    script.write_text(
        "import pathlib, sys\n"
        "import torch\n"
        "from llava_ultra.config import load_config\n"
        "from llava_ultra.train.loop import make_accelerator\n"
        f"acc = make_accelerator(load_config({str(ROOT / 'configs/tiny.yaml')!r}))\n"
        "line = f'{acc.process_index} {acc.num_processes} {acc.device.type} {torch.distributed.get_backend()}'\n"
        "pathlib.Path(sys.argv[1], f'rank{acc.process_index}.txt').write_text(line)\n"
    )
    launcher = Path(sys.executable).parent / "accelerate"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    config = ROOT / "configs/accelerate/cpu_ddp.yaml"
    cmd = [str(launcher), "launch", "--config_file", str(config), str(script), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = sorted(p.read_text() for p in tmp_path.glob("rank*.txt"))  # one file per process
    assert found == ["0 2 cpu gloo", "1 2 cpu gloo"], proc.stdout
