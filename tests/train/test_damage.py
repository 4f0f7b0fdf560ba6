"""Damaged and moved runs, as a careless cluster leaves them: every case ends in a fallback to a valid
checkpoint or in a clear message naming the file and the fix, never in a silently wrong model.

One run is trained to the end (the reference) and one is killed after step 2 of 4 with a checkpoint
at every step; each test resumes a copy of the killed run, at another path (so every test also
resumes a moved run folder), after damaging it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llava_ultra.errors import CheckpointError, ConfigError
from llava_ultra.train import checkpoint as ck
from llava_ultra.train.loop import train
from tests.train.conftest import train_config

SETTINGS = {
    "train.stages": [1],
    "train.stage1.max_steps": 4,
    "train.save_every": 1,
    "train.keep_last": 2,
}
WEIGHTS = ("model.safetensors", "adapter_model.safetensors", "non_lora_trainables.safetensors")


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name in WEIGHTS:
        if (folder / name).is_file():
            out.update(load_file(str(folder / name)))
    return out


@pytest.fixture(scope="module")
def runs(instruct_dir: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("damage")
    train(train_config(instruct_dir, root / "whole", **SETTINGS))
    first = train(train_config(instruct_dir, root / "cut", **SETTINGS), stop_after=2)
    assert not first.stages[0].completed
    steps = [s for s, _ in ck.list_checkpoints(root / "cut" / "checkpoints" / "stage1", ck.MANIFEST)]
    assert steps == [1, 2]
    return {"whole": root / "whole", "cut": root / "cut"}


def moved_copy(runs: dict[str, Path], tmp_path: Path, instruct_dir: Path):
    """The killed run copied to a new place, and its config pointed there (as a user would)."""
    run = tmp_path / "moved" / "run"
    shutil.copytree(runs["cut"], run)
    return run, train_config(instruct_dir, run, **SETTINGS)


def ckpt(run: Path, step: int) -> Path:
    return ck.step_dir(run / "checkpoints" / "stage1", step)


def assert_reaches_the_uninterrupted_weights(run: Path, runs: dict[str, Path]) -> None:
    a, b = tensors(runs["whole"] / "stage1"), tensors(run / "stage1")
    assert set(a) == set(b)
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) <= 1e-6


def zero_tail(path: Path) -> None:
    size = path.stat().st_size
    with path.open("r+b") as fh:
        fh.seek(size // 2)
        fh.write(b"\0" * (size - size // 2))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGE = {
    # name: (what is done to step 2, what the message says about it)
    "zeroed_tail": (
        lambda f: zero_tail(f / "model.safetensors"),
        "model.safetensors has the right size but its SHA-256 differs from the manifest "
        "(its bytes were damaged)",
    ),
    "truncated_weights": (
        lambda f: truncate(f / "model.safetensors"),
        "model.safetensors is {size} bytes, the manifest says {full} (truncated or overwritten)",
    ),
    "truncated_model_file": (
        lambda f: truncate(f / "model" / "model.safetensors"),
        "model/model.safetensors is {size} bytes, the manifest says {full} (truncated or overwritten)",
    ),
    "missing_optimizer": (lambda f: (f / "optimizer.bin").unlink(), "optimizer.bin is missing"),
    "missing_manifest": (lambda f: (f / "manifest.json").unlink(), "manifest.json is missing"),
    # the trainer's counters (accelerate custom state 0)
    "missing_trainer_state": (
        lambda f: (f / "custom_checkpoint_0.pkl").unlink(),
        "custom_checkpoint_0.pkl is missing",
    ),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(case, runs, tmp_path, instruct_dir, capsys):
    run, cfg = moved_copy(runs, tmp_path, instruct_dir)
    damage, message = DAMAGE[case]
    step2 = ckpt(run, 2)
    manifest = json.loads((step2 / "manifest.json").read_text())["files"]
    damage(step2)
    if case == "zeroed_tail":  # the header is intact: the file still loads, into wrong weights
        assert load_file(str(step2 / "model.safetensors"))
    rel = "model/model.safetensors" if case == "truncated_model_file" else "model.safetensors"
    message = message.format(
        size=(step2 / rel).stat().st_size if (step2 / rel).exists() else 0, full=manifest[rel]["size"]
    )
    result = train(cfg, resume=True)
    out = capsys.readouterr().out
    assert f"stage 1: checkpoint {step2} is damaged: {message}; falling back to step-00000001" in out, out
    assert f"stage 1: resumed from {ckpt(run, 1)} (step 1, epoch 0, batch 1)" in out
    assert "resumed from step-00000001, the newest usable checkpoint; 1 newer one(s) skipped" in out
    assert result.stages[0].completed and result.stages[0].steps == 4
    assert_reaches_the_uninterrupted_weights(run, runs)


def test_unreadable_file_behind_a_valid_manifest_and_an_old_layout_fall_back(
    runs, tmp_path, instruct_dir, capsys
):
    """A file written damaged (its manifest was taken after: sizes and hashes match) still falls back
    when it cannot be read; a checkpoint in the hand-written layout of earlier versions is named."""
    run, cfg = moved_copy(runs, tmp_path, instruct_dir)
    truncate(ckpt(run, 2) / "scheduler.bin")
    ck.write_manifest(ckpt(run, 2))
    size = (ckpt(run, 2) / "scheduler.bin").stat().st_size
    old = ckpt(
        run, 3
    )  # newest: trainables.safetensors, optimizer.pt, ... as versions before accelerate wrote
    old.mkdir()
    (old / "trainables.safetensors").write_bytes(b"old")
    ck.write_manifest(old)
    train(cfg, resume=True)
    out = capsys.readouterr().out
    assert f"checkpoint {old} was written by an earlier llava-ultra (its own resume format" in out
    assert f"checkpoint {ckpt(run, 2)} is damaged: scheduler.bin ({size} bytes) cannot be read" in out
    assert f"stage 1: resumed from {ckpt(run, 1)}" in out
    assert "2 newer one(s) skipped" in out
    assert_reaches_the_uninterrupted_weights(run, runs)


def test_every_checkpoint_damaged_is_refused_with_the_files_named(runs, tmp_path, instruct_dir):
    run, cfg = moved_copy(runs, tmp_path, instruct_dir)
    zero_tail(ckpt(run, 2) / "model.safetensors")
    (ckpt(run, 1) / "random_states_0.pkl").unlink()
    root = run / "checkpoints" / "stage1"
    with pytest.raises(CheckpointError) as err:
        train(cfg, resume=True)
    text = str(err.value)
    assert text.startswith(f"stage 1: every checkpoint in {root} is damaged, none can be resumed:")
    assert f"checkpoint {ckpt(run, 2)} is damaged: model.safetensors has the right size" in text
    assert f"checkpoint {ckpt(run, 1)} is damaged: random_states_0.pkl is missing" in text
    assert text.endswith(
        f"restore the files from a backup, or delete {root} and resume again to start stage 1 from its first step"
    )
    assert not (run / "stage1").exists()  # no model was produced from damaged state


def test_resume_without_any_checkpoint_says_it_starts_the_stage(runs, tmp_path, instruct_dir, capsys):
    run, cfg = moved_copy(runs, tmp_path, instruct_dir)
    shutil.rmtree(run / "checkpoints")  # killed before its first save
    result = train(cfg, resume=True)
    out = capsys.readouterr().out
    assert (
        f"stage 1: --resume found no checkpoint of this stage in {run / 'checkpoints' / 'stage1'} (the run "
        f"stopped before its first save); starting stage 1 from its first step" in out
    )
    assert result.stages[0].steps == 4
    assert_reaches_the_uninterrupted_weights(run, runs)

    fresh = train_config(instruct_dir, tmp_path / "new", **{**SETTINGS, "train.stage1.max_steps": 1})
    train(fresh, resume=True)
    assert (
        f"--resume: {tmp_path / 'new'} holds no run yet; starting a new run there from the first step"
        in capsys.readouterr().out
    )


def test_truncated_run_json_is_rebuilt_from_config_yaml(runs, tmp_path, instruct_dir, capsys):
    run, cfg = moved_copy(runs, tmp_path, instruct_dir)
    truncate(run / "run.json")
    size = (run / "run.json").stat().st_size
    train(cfg, resume=True)
    out = capsys.readouterr().out
    assert f"{run / 'run.json'} is damaged (JSONDecodeError: " in out
    assert (
        f"; {size} bytes); using {run / 'config.yaml'} (the run's full config) instead, and rewriting "
        f"run.json from it" in out
    )
    assert json.loads((run / "run.json").read_text())["config"]["train"]["output_dir"] == "."
    assert_reaches_the_uninterrupted_weights(run, runs)


def test_run_json_and_config_yaml_both_damaged_is_a_clear_message(runs, tmp_path, instruct_dir):
    run, cfg = moved_copy(runs, tmp_path, instruct_dir)
    (run / "run.json").write_bytes(b'{"started": "2026')
    (run / "config.yaml").write_bytes(b"model: [")
    with pytest.raises(ConfigError) as err:
        train(cfg, resume=True)
    text = str(err.value)
    assert text.startswith(f"{run / 'run.json'} is damaged (JSONDecodeError: ")
    assert text.endswith(
        "so the config this run was started with is unknown. Restore run.json from a backup, or start "
        "a new run in another output_dir (this folder's checkpoints are left as they are)"
    )
    assert "Traceback" not in text and "--overwrite" not in text


def test_moved_run_resumes_and_a_real_difference_never_suggests_overwrite(
    runs, tmp_path, instruct_dir, capsys
):
    run, cfg = moved_copy(runs, tmp_path, instruct_dir)
    recorded = json.loads((run / "run.json").read_text())["config"]
    assert recorded["train"]["output_dir"] == "."  # nothing inside the run names where it lives
    changed = train_config(instruct_dir, run, **{**SETTINGS, "train.seed": 5})
    with pytest.raises(ConfigError) as err:
        train(changed, resume=True)
    assert str(err.value) == (
        f"cannot resume {run}: it holds a run with a different config:\n  train.seed: 0 -> 5\n"
        f"resume with the original config ({run / 'config.yaml'} holds it), or start a new run in "
        f"another output_dir"
    )
    result = train(cfg, resume=True)
    assert f"stage 1: resumed from {ckpt(run, 2)} (step 2, epoch 0, batch 2)" in capsys.readouterr().out
    assert result.stages[0].steps == 4
    assert_reaches_the_uninterrupted_weights(run, runs)
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {e["path"] for e in events if e.get("event") == "checkpoint"} >= {
        "checkpoints/stage1/step-00000003",
        "checkpoints/stage1/step-00000004",
    }


def test_run_identity_of_an_older_absolute_run_json(tmp_path: Path):
    """run.json files written before identities were relative still match after a move."""
    old = {"train": {"output_dir": "/data/runs/a", "init_from": "/data/runs/a/stage1", "seed": 0}}
    new = {
        "train": {"output_dir": str(tmp_path / "b"), "init_from": str(tmp_path / "b" / "stage1"), "seed": 0}
    }
    assert (
        ck.run_identity(old)
        == ck.run_identity(new)
        == {"train": {"output_dir": ".", "init_from": "./stage1", "seed": 0}}
    )


def test_damaged_final_or_starting_checkpoint_is_refused(runs, tmp_path, instruct_dir):
    run = tmp_path / "done"
    shutil.copytree(runs["whole"], run)
    cfg = train_config(instruct_dir, run, **SETTINGS)
    zero_tail(run / "stage1" / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        train(cfg, resume=True)
    assert str(err.value) == (
        f"stage 1's final checkpoint {run / 'stage1'} is damaged: model.safetensors has the right size "
        f"but its SHA-256 differs from the manifest (its bytes were damaged); delete {run / 'stage1'} and "
        f"resume again: stage 1 is then finished again from its last checkpoint in "
        f"{run / 'checkpoints' / 'stage1'}"
    )
    stage2 = train_config(
        instruct_dir, tmp_path / "s2", **{"train.stages": [2], "train.init_from": str(run / "stage1")}
    )
    with pytest.raises(CheckpointError) as err:
        train(stage2)
    assert str(err.value).startswith(f"train.init_from {run / 'stage1'} is damaged: model.safetensors has")
    assert str(err.value).endswith(
        "; copy that folder again from where it came from, or point train.init_from at another checkpoint"
    )
    assert not (tmp_path / "s2").exists()
