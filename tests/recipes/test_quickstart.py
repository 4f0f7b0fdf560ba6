"""`llava-ultra quickstart` (what `make demo` runs), end to end on a very small setting, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llava_ultra.cli import app
from llava_ultra.quickstart import names_site, pick_eval_samples


def test_names_site_needs_the_right_site_and_no_other():
    assert names_site("This is a kidney ultrasound.", "kidney", "en")
    assert not names_site("This is a kidney and heart ultrasound.", "kidney", "en")
    assert names_site("该图像为甲状腺超声。", "thyroid", "zh")
    assert not names_site("Findings: Findings:", "thyroid", "en")


def test_eval_samples_cover_every_type():
    samples = [
        {"question_type": t, "id": f"{t}{i}"}
        for t in ("site", "findings", "diagnosis", "presence")
        for i in range(5)
    ]
    picked = pick_eval_samples(samples, 7)
    assert [s["question_type"] for s in picked] == ["site", "findings", "diagnosis"] * 2 + ["site"]


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
