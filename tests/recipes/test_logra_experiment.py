"""logra-experiment: data subsets, option checks, the recorded command line and a minimal end-to-end run."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from llava_ultra.errors import ConfigError
from llava_ultra.recipes.logra_experiment import (
    LograOptions,
    check_options,
    command_line,
    run_experiment,
    subset_instructions,
)
from tests.train.conftest import instruct_dir  # noqa: F401  (session fixture)


def test_subset_keeps_whole_reports_and_the_fraction(instruct_dir: Path, tmp_path: Path):  # noqa: F811
    full = {n: json.loads((instruct_dir / f"stage{n}.train.json").read_text()) for n in (1, 2)}
    reports = {s["report_id"] for n in full for s in full[n]}
    out = subset_instructions(instruct_dir, tmp_path / "sub", 0.25)
    kept = {n: json.loads((out / f"stage{n}.train.json").read_text()) for n in (1, 2)}
    ids = {s["report_id"] for s in kept[1]}
    assert ids == {s["report_id"] for s in kept[2]} and len(ids) == round(0.25 * len(reports))
    for n in (1, 2):  # every sample of a kept report, none of the others
        assert [s["id"] for s in kept[n]] == [s["id"] for s in full[n] if s["report_id"] in ids]
    assert subset_instructions(instruct_dir, tmp_path / "again", 0.25) and ids == {
        s["report_id"] for s in json.loads((tmp_path / "again" / "stage1.train.json").read_text())
    }
    meta = json.loads((out / "instruct_meta.json").read_text())
    assert Path(meta["image_root"]).is_dir()


def test_bad_options_are_refused(tmp_path: Path):
    with pytest.raises(ConfigError, match="fractions"):
        check_options(LograOptions(out=tmp_path, fractions=(0.0, 1.0)))
    with pytest.raises(ConfigError, match="seeds"):
        check_options(LograOptions(out=tmp_path, seeds=()))


def test_command_line_spells_out_every_option(tmp_path: Path):
    opts = LograOptions(
        out=tmp_path / "my out", fractions=(0.1, 1.0), seeds=(0, 2), overrides=["train.align.solver=ipfp"]
    )
    line = command_line(opts)
    assert line.startswith("llava-ultra logra-experiment --out ")
    assert shlex.split(line)[2:] == [
        "--out",
        str(tmp_path / "my out"),
        "--fractions",
        "0.1,1",
        "--seeds",
        "0,2",
        "--reports",
        "300",
        "--steps1",
        "40",
        "--steps2",
        "100",
        "--eval-samples",
        "120",
        "--encoders",
        "pretrained",
        "train.align.solver=ipfp",
    ]
    odd = command_line(LograOptions(out=tmp_path, steps2=None, n_boot=50, config=tmp_path / "c.yaml"))
    assert "--steps2" not in odd and odd.endswith(
        f"# not on the command line: steps2=None, config={tmp_path / 'c.yaml'}, n_boot=50"
    )


def test_minimal_experiment_end_to_end(tmp_path: Path):
    """The real run_experiment on a tiny setting: 2 fractions x 2 arms, Δ cells, the command line."""
    opts = LograOptions(
        out=tmp_path,
        fractions=(0.5, 1.0),
        seeds=(0,),
        reports=20,
        steps1=1,
        steps2=1,
        eval_samples=6,
        overrides=["train.align.k=2"],
        n_boot=50,
        encoders="random",
    )
    payload = run_experiment(opts, echo=lambda _m: None)
    assert [(r["fraction"], r["arm"]) for r in payload["table"]] == [
        (0.5, "plain"),
        (0.5, "logra"),
        (1.0, "plain"),
        (1.0, "logra"),
    ]
    assert all("delta_f1" in r for r in payload["table"] if r["arm"] == "logra")
    assert [r["final_align_loss"] is not None for r in payload["table"]] == [False, True, False, True]
    saved = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert saved["command"] == command_line(opts) and "train.align.k=2" in saved["command"]
    md = (tmp_path / "results.md").read_text(encoding="utf-8").splitlines()
    assert md[2] == f"Command: `{command_line(opts)}`"
    rows = [ln for ln in md if ln.startswith(("| 50% |", "| 100% |"))]
    assert len(rows) == 4
    header = next(ln for ln in md if ln.startswith("| data | arm |"))
    assert all(ln.count("|") == header.count("|") for ln in rows)
    delta = header.split("|").index(" ΔF1 ")
    for ln in rows:
        cell = ln.split("|")[delta].strip()
        assert (cell == "-") == ("| plain |" in ln), ln  # Δ cells filled for the aligned arm only
        if cell != "-":
            assert cell[0] in "+-" and "[" in cell
    # a finished run is re-used: a second invocation trains nothing
    again = run_experiment(opts, echo=lambda m: pytest.fail(f"retrained: {m}") if "training" in m else None)
    assert again["table"] == payload["table"]
