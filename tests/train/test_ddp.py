"""A 2-process DDP run on CPU (torchrun, gloo) through the CLI: it completes and both ranks agree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.train.conftest import launch_ddp, train_config, with_corrupt_image


@pytest.mark.slow
def test_two_process_ddp_on_cpu(instruct_dir: Path, tmp_path: Path):
    out = tmp_path / "run"
    cfg = train_config(instruct_dir, out, **{"train.stage1.batch_size": 2, "train.stage2.batch_size": 2})
    proc = launch_ddp(cfg, tmp_path, "--train.stage2.lr", "5e-3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    prints = [r for r in records if r.get("event") == "rank_fingerprints"]
    assert [p["stage"] for p in prints] == [1, 2]
    # SHA-256 of every trainable tensor's bytes on each rank: bit-identical weights on both
    assert all(len(p["values"]) == 2 and p["values"][0] == p["values"][1] for p in prints)
    assert all(len(v) == 64 for p in prints for v in p["values"])
    assert prints[0]["values"][0] != prints[1]["values"][0]  # stage 2 trained something
    steps = [r for r in records if "event" not in r]
    assert [r["samples"] for r in steps if r["stage"] == 1] == [4, 8, 12]  # 2 processes x batch 2
    assert {r["lr"] for r in steps if r["stage"] == 2 and r["step"] == 1} == {5e-3}
    assert (out / "stage2" / "config.json").is_file()
    assert proc.stdout.count("stage 2: 3 steps, 0 samples skipped") == 1  # only the main process reports


@pytest.mark.slow
def test_two_process_ddp_counts_a_corrupt_image_once(instruct_dir: Path, tmp_path: Path):
    """Over several epochs of a 2-process run the corrupt sample is met again and again; it is
    reported and counted once for the whole run (the new bad samples of every step are gathered
    from both ranks, so both hold the same list), and the run stays within a 1.5-sample budget."""
    path = with_corrupt_image(instruct_dir, tmp_path)
    epochs = 6
    out = tmp_path / "run"
    overrides = {
        "data.stage1": str(path),
        # budget of 1.5 bad samples: counting the corrupt one twice (per rank or epoch) aborts the run
        "data.max_bad_fraction": 1.5 / len(json.loads(path.read_text())),
        "train.stages": [1],
        "train.stage1.batch_size": 2,
        "train.stage1.epochs": epochs,
        "train.stage1.max_steps": 1000,
    }
    proc = launch_ddp(train_config(instruct_dir, out, **overrides), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("epoch", 0) for r in records) == epochs - 1
    assert [r["id"] for r in records if r.get("event") == "bad_sample"] == ["has-corrupt-image"]
    assert proc.stdout.count("1 samples skipped") == 1, proc.stdout[-2000:]
