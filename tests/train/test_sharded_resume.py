"""FSDP and DeepSpeed resume, on GPUs only: a run killed after step 3 and resumed from its step-2
checkpoint ends with the weights and Adam moments of an uninterrupted run.

accelerate enables FSDP and DeepSpeed only on CUDA devices, so these tests skip on a machine with
fewer than 2 GPUs (DeepSpeed ones also without the `deepspeed` package); CI here has none. Run them
on a GPU machine with (docs/training.md, "Checking sharded resume on GPUs"):

    pytest -q tests/train/test_sharded_resume.py

Each case launches `accelerate launch --config_file configs/accelerate/<config> --num_processes 2
--mixed_precision no` on a script that trains the tiny model three times: uninterrupted, killed
(`stop_after=3`), resumed. GPU kernels are not bit-reproducible run to run, so the comparison allows
1e-5; a resume that restarted Adam's moments differs by far more (see test_trainer.py).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from llava_ultra.config import to_dict
from tests.train.conftest import train_config
from tests.train.test_loop import folder_tensors
from tests.train.test_trainer import SCRIPT, SETTINGS

ROOT = Path(__file__).parents[2]
CASES = {
    "fsdp": ("fsdp.yaml", None),
    "zero2": ("deepspeed_zero2.yaml", "deepspeed"),
    "zero3": ("deepspeed_zero3.yaml", "deepspeed"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_sharded_resume_matches_the_uninterrupted_run(case, instruct_dir: Path, tmp_path: Path):
    config, needs = CASES[case]
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs: accelerate runs FSDP / DeepSpeed on GPUs only")
    if needs is not None and importlib.util.find_spec(needs) is None:
        pytest.skip(f"needs the {needs} package (pip install {needs})")
    paths = []
    for name in ("whole", "cut"):
        cfg = train_config(
            instruct_dir,
            tmp_path / name,
            **SETTINGS,
            **{"train.stage1.epochs": 10, "model.dtype": "float32", "train.mixed_precision": "no"},
        )
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(to_dict(cfg), allow_unicode=True), encoding="utf-8")
        paths.append(str(path))
    script = tmp_path / "resume.py"
    script.write_text(SCRIPT)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    launch += [str(ROOT / "configs" / "accelerate" / config), "--num_processes", "2"]
    launch += ["--mixed_precision", "no", str(script), *paths]
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    proc = subprocess.run(launch, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "stage 1: resumed from " in proc.stdout and "(step 2, " in proc.stdout, proc.stdout[-2000:]
    a, b = folder_tensors(tmp_path / "whole" / "stage1"), folder_tensors(tmp_path / "cut" / "stage1")
    assert set(a) == set(b)
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) <= 1e-5
