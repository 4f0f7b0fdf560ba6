"""Resume through accelerate's save_state / load_state: the trainer's registered state (counters, bad
samples) and every RNG round-trip; Adam's moments after a kill and resume equal an uninterrupted
run's; and a 2-process (torchrun, gloo) run killed and resumed reaches the uninterrupted weights."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from llava_ultra.config import to_dict
from llava_ultra.train.dataset import BadSample
from llava_ultra.train.loop import train
from llava_ultra.train.trainer import BadSampleLog, Progress
from tests.train.conftest import train_config
from tests.train.test_loop import folder_tensors


def test_registered_state_and_rng_round_trip_through_accelerate(tmp_path: Path):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    progress, bad = Progress(stage=2, step=7, epoch=1, batch=3, samples_seen=28), BadSampleLog()
    bad.add(BadSample(id="s1", kind="corrupt_image", reason="x.png does not decode"))
    acc.register_for_checkpointing(progress, bad)
    acc.save_state(str(tmp_path / "state"))
    draws = (random.random(), float(np.random.rand()), float(torch.rand(1)))

    progress.load_state_dict(Progress().state_dict())
    bad.load_state_dict({"items": []})
    acc.load_state(str(tmp_path / "state"))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == draws
    assert progress == Progress(stage=2, step=7, epoch=1, batch=3, samples_seen=28)
    assert [b.id for b in bad.items] == ["s1"]
    assert not bad.add(BadSample(id="s1", kind="corrupt_image", reason="x.png does not decode"))


SETTINGS = {
    "train.stages": [1],
    "train.save_every": 2,
    "train.keep_last": 1,
    "train.stage1.max_steps": 5,
    "train.stage1.grad_accum": 2,
    "train.stage1.batch_size": 2,
    "train.stage1.warmup_ratio": 0.2,
}


def adam_moments(folder: Path) -> dict[str, torch.Tensor]:
    """exp_avg / exp_avg_sq of every parameter in a checkpoint's optimizer.bin (accelerate's file)."""
    state = torch.load(folder / "optimizer.bin", weights_only=False)["state"]
    return {f"{i}.{k}": v for i, s in state.items() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")}


def test_adam_moments_survive_a_resume(instruct_dir: Path, tmp_path: Path):
    train(train_config(instruct_dir, tmp_path / "whole", **SETTINGS))
    cut = train_config(instruct_dir, tmp_path / "cut", **SETTINGS)
    train(cut, stop_after=3)  # killed after step 3; its last checkpoint is step 2
    killed = adam_moments(tmp_path / "cut" / "checkpoints" / "stage1" / "step-00000002")
    train(cut, resume=True)

    final = "checkpoints/stage1/step-00000005"
    want, got = adam_moments(tmp_path / "whole" / final), adam_moments(tmp_path / "cut" / final)
    assert set(want) == set(got) and len(want) >= 4
    assert all(float(want[k].abs().max()) > 0 for k in want)  # real moments, not zeros
    assert max(float((want[k] - got[k]).abs().max()) for k in want) <= 1e-6
    # what a restart from zero would miss: the moments at the resume point were not small
    assert max(float(killed[k].abs().max()) for k in killed if k.endswith("exp_avg")) > 1e-4


SCRIPT = """
import sys
from llava_ultra.config import load_config
from llava_ultra.train.loop import train

whole, cut = sys.argv[1], sys.argv[2]
train(load_config(whole))
first = train(load_config(cut), stop_after=3)
assert not first.stages[0].completed
train(load_config(cut), resume=True)
"""


@pytest.mark.slow
def test_two_process_resume_is_bit_equal(instruct_dir: Path, tmp_path: Path):
    """2 CPU processes (torchrun, gloo; DDP through accelerate): an uninterrupted run, and one killed
    after step 3 and resumed from its step-2 checkpoint, end with equal weights and Adam moments."""
    paths = []
    for name in ("whole", "cut"):
        cfg = train_config(instruct_dir, tmp_path / name, **SETTINGS, **{"train.stage1.epochs": 10})
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(to_dict(cfg), allow_unicode=True), encoding="utf-8")
        paths.append(str(path))
    script = tmp_path / "resume.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run(
        [*cmd, str(script), *paths],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=Path(__file__).parents[2],
    )
    errors = [line for line in proc.stderr.splitlines() if "Error" in line]  # every rank's, not the last
    assert proc.returncode == 0, "\n".join(errors[-20:]) + "\n" + proc.stderr[-2000:]
    ckpt = tmp_path / "cut" / "checkpoints" / "stage1" / "step-00000005"
    assert sorted(p.name for p in ckpt.glob("random_states_*.pkl")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    assert (
        f"stage 1: resumed from {tmp_path / 'cut' / 'checkpoints' / 'stage1' / 'step-00000002'} (step 2, "
        in proc.stdout
    )
    a, b = folder_tensors(tmp_path / "whole" / "stage1"), folder_tensors(tmp_path / "cut" / "stage1")
    assert set(a) == set(b)
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) <= 1e-6
    final = "checkpoints/stage1/step-00000005"
    want, got = adam_moments(tmp_path / "whole" / final), adam_moments(tmp_path / "cut" / final)
    assert set(want) == set(got) and max(float((want[k] - got[k]).abs().max()) for k in want) <= 1e-6
