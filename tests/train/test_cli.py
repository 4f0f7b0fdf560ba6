"""`llava-ultra train`: override parsing, a short run, and user errors as one-line messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from llava_ultra.cli import COMMANDS, app
from llava_ultra.cli_args import build
from llava_ultra.config import to_dict
from llava_ultra.errors import LlavaUltraError
from tests.train.conftest import train_config


def test_overrides_accept_three_spellings():
    cmd = COMMANDS["train"]
    cls, _ = cmd.loader()

    def overrides(*args: str) -> list[str]:
        return build(cls, ["--config", "c.yaml", *args], training=cmd.training).overrides

    args = ["--train.stage2.lr", "1e-4", "--train.seed=3", "data.num_workers=2"]
    assert overrides(*args) == ["train.stage2.lr=1e-4", "train.seed=3", "data.num_workers=2"]
    with pytest.raises(LlavaUltraError, match="needs a value"):
        overrides("--train.seed")
    with pytest.raises(LlavaUltraError, match="unexpected argument"):
        overrides("oops")


def write(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(to_dict(cfg), allow_unicode=True), encoding="utf-8")
    return path


def test_train_command_runs_and_reports_user_errors(instruct_dir: Path, tmp_path: Path):
    out = tmp_path / "run"
    path = write(train_config(instruct_dir, out, **{"train.stages": [1]}), tmp_path / "c.yaml")
    runner = CliRunner()
    typo = runner.invoke(app, ["train", "--config", str(path), "--train.stage1.lrr", "1e-4"])
    assert typo.exit_code == 2 and "did you mean 'lr'" in typo.output
    ok = runner.invoke(
        app, ["train", "--config", str(path), "--train.stage1.max_steps", "2", "train.stage1.lr=1e-3"]
    )
    assert ok.exit_code == 0, ok.output
    assert "stage 1: 2 steps, 0 samples skipped" in ok.output
    again = runner.invoke(
        app, ["train", "--config", str(path), "--train.stage1.max_steps", "2", "train.stage1.lr=1e-3"]
    )
    assert again.exit_code == 2 and "--resume" in again.output and "Traceback" not in again.output
    resumed = runner.invoke(
        app,
        ["train", "--config", str(path), "--resume", "--train.stage1.max_steps", "2", "train.stage1.lr=1e-3"],
    )
    assert resumed.exit_code == 0 and "already complete" in resumed.output
