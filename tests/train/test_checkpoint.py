"""Atomic checkpoint folders, retention, RNG capture and the run-folder guard."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from llava_ultra.errors import ConfigError
from llava_ultra.train import checkpoint as ck


def test_atomic_dir_replaces_or_leaves_the_old_folder(tmp_path: Path):
    final = tmp_path / "step-00000001"
    with ck.atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("one")
    assert (final / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError), ck.atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("killed while writing")
    assert (final / "a.txt").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]
    with ck.atomic_dir(final) as tmp:
        (tmp / "b.txt").write_text("two")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]


def test_prune_keeps_the_newest_complete_checkpoints(tmp_path: Path):
    for step in (1, 2, 3, 4):
        folder = ck.step_dir(tmp_path, step)
        folder.mkdir()
        (folder / "trainer_state.json").write_text("{}")
    (tmp_path / ".step-00000005.tmp").mkdir()  # an interrupted write is not a checkpoint
    ck.prune_checkpoints(tmp_path, keep=2)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [3, 4]


def test_rng_capture_restores_every_generator():
    state = ck.capture_rng()
    first = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    ck.restore_rng(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == first


def test_run_dir_guard(tmp_path: Path):
    out = tmp_path / "run"
    config = {"train": {"seed": 0, "progress": True}}
    assert ck.prepare_run_dir(out, config, resume=False, overwrite=False) is False
    ck.start_run(out, config, overwrite=False)
    with pytest.raises(ConfigError, match="already holds a run"):
        ck.prepare_run_dir(out, config, resume=False, overwrite=False)
    assert ck.prepare_run_dir(out, {"train": {"seed": 0, "progress": False}}, resume=True, overwrite=False)
    with pytest.raises(ConfigError, match="train.seed: 0 -> 1"):
        ck.prepare_run_dir(out, {"train": {"seed": 1, "progress": True}}, resume=True, overwrite=False)
    with pytest.raises(ConfigError, match="contradict"):
        ck.prepare_run_dir(out, config, resume=True, overwrite=True)
    assert ck.prepare_run_dir(out, config, resume=False, overwrite=True) is False
