"""The SynthUS measurements the recipes share: question choice, site naming, spread over seeds."""

from __future__ import annotations

import pytest

from llava_ultra.eval.synthus import names_site, paired_delta, pick_eval_samples, summarise


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


def test_summaries() -> None:
    s = summarise([[0.0, 100.0], [100.0, 100.0]], n_boot=200)
    assert s["mean"] == 75.0 and s["per_seed"] == [50.0, 100.0] and s["n"] == 2
    assert s["sd"] == pytest.approx(35.355, abs=1e-3)
    d = paired_delta([[100.0, 100.0, 0.0]], [[0.0, 100.0, 0.0]], n_boot=200)
    assert d["mean"] == pytest.approx(100 / 3)
    assert d["ci"][0] <= d["mean"] <= d["ci"][1]
