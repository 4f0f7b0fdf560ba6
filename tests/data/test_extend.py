"""Template-built extended captions: longer, same terms, within budget, on real SynthUS reports."""

from __future__ import annotations

import random

import pytest

from llava_ultra.data.extend import (
    MIN_EXTRA,
    extend_answer_template,
    sample_answers,
    sample_extended_caption,
    text_length,
)
from llava_ultra.data.instruct import TemplateGenerator
from llava_ultra.data.samples import find_measurements
from llava_ultra.data.synth import SynthConfig, plan_report, report_texts
from llava_ultra.errors import DataError
from llava_ultra.sites import FINDING_TYPES, SITES


def _reports(n: int = 12):
    cfg = SynthConfig()
    return [r for i in range(n) for r in report_texts(plan_report(cfg, i))]


def test_extensions_of_synthus_answers_are_longer_keep_the_answer_and_stay_in_budget() -> None:
    gen = TemplateGenerator("both")
    seen_findings = 0
    for report in _reports():
        lang, li = report.language, 0 if report.language == "zh" else 1
        for sample in gen.generate(report, random.Random(0)):
            answer = sample_answers(sample)
            ext = sample_extended_caption(sample, report)
            n = text_length(answer, lang)
            assert answer in ext
            assert n < text_length(ext, lang) <= max(2 * n, n + MIN_EXTRA[lang]) + 1  # +1: closing stop
            assert SITES[report.site][li] in ext
            ftype = report.meta["finding_type"]
            if ftype != "none" and FINDING_TYPES[ftype][li] in ext:
                seen_findings += 1
            for size in find_measurements(answer):
                assert size in ext
    assert seen_findings > 0


def test_short_answers_get_site_and_finding_context() -> None:
    report = next(r for r in _reports() if r.language == "en" and r.meta["finding_type"] == "cyst")
    ext = extend_answer_template("yes", report, "en")
    site = SITES[report.site][1]
    assert ext == f"This is an ultrasound examination of the {site}. yes. A cyst is seen in the {site}."
    zh = next(r for r in _reports() if r.language == "zh" and r.meta["finding_type"] == "none")
    ext_zh = extend_answer_template(zh.diagnosis, zh, "zh")
    assert ext_zh.startswith(f"本次为{SITES[zh.site][0]}超声检查。") and ext_zh.count("未见明显异常") == 1


def test_without_meta_the_diagnosis_is_restated_and_rng_picks_phrasings() -> None:
    sample = {"site": "thyroid", "diagnosis": "Thyroid nodule, TI-RADS 3", "language": "en"}
    ext = extend_answer_template("A hypoechoic nodule of 1.2 cm × 0.8 cm.", sample, "en")
    assert "Thyroid nodule, TI-RADS 3" in ext and "1.2 cm × 0.8 cm" in ext.split("nodule of")[-1]
    variants = {extend_answer_template("yes", sample, "en", random.Random(s)) for s in range(20)}
    assert len(variants) > 1
    assert extend_answer_template("yes", sample, "en", random.Random(3)) == extend_answer_template(
        "yes", sample, "en", random.Random(3)
    )


def test_an_llm_written_caption_wins_and_bad_inputs_are_named() -> None:
    sample = {
        "id": "s1",
        "site": "liver",
        "language": "en",
        "conversations": [
            {"from": "human", "value": "<image>\nq"},
            {"from": "gpt", "value": "Normal liver."},
        ],
        "extended_caption": "  The liver looks normal in size and echotexture.  ",
    }
    assert sample_extended_caption(sample) == "The liver looks normal in size and echotexture."
    assert "Normal liver." in sample_extended_caption({**sample, "extended_caption": ""})
    with pytest.raises(DataError, match="unknown site"):
        extend_answer_template("x", {"site": "brain"}, "en")
    with pytest.raises(DataError, match="'zh' or 'en'"):
        extend_answer_template("x", {"site": "liver"}, "fr")
    with pytest.raises(DataError, match="empty answer"):
        extend_answer_template("  ", {"site": "liver"}, "en")
    with pytest.raises(DataError, match="no assistant answer"):
        sample_answers({"id": "s2", "conversations": [{"from": "human", "value": "q"}]})
