"""`llava-ultra quickstart` (what `make demo` runs), end to end on a very small setting, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llava_ultra.cli import app


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tmp_path: Path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["quickstart", "--out", str(out), "--fast"])
    assert result.exit_code == 0, result.output
    assert "site accuracy" in result.output and "untrained" in result.output
    assert f"llava-ultra chat {out / 'run' / 'stage2'}" in result.output or "load_checkpoint" in result.output
    summary = json.loads((out / "quickstart.json").read_text())
    for model in ("untrained", "trained"):
        assert set(summary[model]["n"]) == {"site", "findings", "diagnosis"}
        assert summary[model]["findings"]["mode"] == "strict"
    assert summary["trained"]["selection_all"]["n"] > 0
    assert (out / "run" / "stage2" / "config.json").is_file()
    again = CliRunner().invoke(app, ["quickstart", "--out", str(out), "--fast"])
    assert again.exit_code == 2 and "already holds a quickstart run" in again.output
    assert "--overwrite" in again.output
    (out / "run" / "stale-marker").write_text("from the earlier run")
    replaced = CliRunner().invoke(
        app, ["quickstart", "--out", str(out), "--fast", "--overwrite"]
    )  # `make demo` twice
    assert replaced.exit_code == 0, replaced.output
    assert not (out / "run" / "stale-marker").exists()
    assert json.loads((out / "quickstart.json").read_text())["trained"]["selection_all"]["n"] > 0
