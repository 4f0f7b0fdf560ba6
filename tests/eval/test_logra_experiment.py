"""logra-experiment's data subsets and option checks (the training runs are exercised by tests/train)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_ultra.errors import ConfigError
from llava_ultra.eval.logra_experiment import LograOptions, check_options, subset_instructions
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
