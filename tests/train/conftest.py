"""Fixtures for training tests: a tiny SynthUS + instruction set (built once per session) and a
builder for training configs over the tests' tiny model (tests/helpers.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from llava_ultra.config import Config, apply_overrides, from_dict
from tests.helpers import tiny_model_dict


@pytest.fixture(scope="session")
def instruct_dir(tmp_path_factory) -> Path:
    """SynthUS (16 reports, 48 px frames, 1-3 frames each) turned into instruction data."""
    from llava_ultra.data.instruct import run_instruct
    from llava_ultra.data.synth import SynthConfig, generate

    root = tmp_path_factory.mktemp("synthdata")
    generate(root / "synthus", SynthConfig(reports=16, seed=3, k_min=1, k_max=3, image_size=48))
    run_instruct(root / "synthus", root / "instruct", site_cue="without")
    return root / "instruct"


def train_config(instruct: Path, out: Path, **overrides: Any) -> Config:
    """A two-stage config over the tiny test model; dotted overrides relative to the root."""
    data: dict[str, Any] = {
        "model": tiny_model_dict(),
        "train": {
            "output_dir": str(out),
            "progress": False,
            "tensorboard": False,
            "stage1": {"batch_size": 4, "max_steps": 3, "lr": 1e-2, "warmup_ratio": 0.0},
            "stage2": {"batch_size": 4, "max_steps": 3, "lr": 1e-2, "warmup_ratio": 0.0},
        },
        "data": {
            "stage1": str(instruct / "stage1.train.json"),
            "stage2": str(instruct / "stage2.train.json"),
        },
    }
    data["model"]["llm"]["inline"].update(vocab_size=1024, max_position_embeddings=1024)
    return from_dict(Config, apply_overrides(data, overrides))


def copy_instruct(src: Path, dst: Path, stage: int, edit) -> Path:
    """Copy one stage's instruction file (and the meta that points at the images) with `edit`
    applied to the sample list; returns the new file."""
    dst.mkdir(parents=True, exist_ok=True)
    meta = json.loads((src / "instruct_meta.json").read_text(encoding="utf-8"))
    meta["image_root"] = str((src / meta["image_root"]).resolve())
    (dst / "instruct_meta.json").write_text(json.dumps(meta), encoding="utf-8")
    samples = json.loads((src / f"stage{stage}.train.json").read_text(encoding="utf-8"))
    path = dst / f"stage{stage}.train.json"
    path.write_text(json.dumps(edit(samples), ensure_ascii=False), encoding="utf-8")
    return path


def with_corrupt_image(instruct: Path, dst: Path, extra=lambda samples: []) -> Path:
    """Stage-1 training data plus one sample ("has-corrupt-image") whose PNG does not decode, and
    whatever `extra(samples)` adds; images are copied beside it. Returns the new stage-1 file."""
    import shutil

    from llava_ultra.train.dataset import image_root_for

    images = dst / "data"
    shutil.copytree(image_root_for(instruct / "stage1.train.json"), images)
    (images / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)

    def edit(samples):
        corrupt = json.loads(json.dumps(samples[0]))
        corrupt["id"], corrupt["images"] = "has-corrupt-image", ["images/corrupt.png"]
        corrupt["conversations"][0]["value"] = "<image>\nDescribe."
        return [*samples, corrupt, *extra(samples)]

    path = copy_instruct(instruct, dst / "inst", 1, edit)
    meta = json.loads((dst / "inst" / "instruct_meta.json").read_text())
    meta["image_root"] = str(images)
    (dst / "inst" / "instruct_meta.json").write_text(json.dumps(meta))
    return path


def launch_ddp(cfg: Config, tmp_path: Path, *args: str, timeout: int = 180):
    """`llava-ultra train` on 2 CPU processes (torchrun, gloo) with `cfg` written to YAML; extra CLI
    `args` are passed on. Returns the finished process (the caller checks returncode)."""
    import os
    import subprocess
    import sys

    import yaml

    from llava_ultra.config import to_dict

    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg), allow_unicode=True), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "llava_ultra", "train", "--config", str(path), *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=Path(__file__).parents[2]
    )
