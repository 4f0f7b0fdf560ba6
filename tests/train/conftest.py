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
