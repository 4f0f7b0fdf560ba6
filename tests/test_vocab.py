"""The core clinical vocabulary: the medical word list and the scrub placeholders."""

from __future__ import annotations

from llava_ultra.scrub import scrub_text
from llava_ultra.vocab import PLACEHOLDER_TEXTS, PLACEHOLDERS, medical_terms


def test_medical_terms_reads_the_dictionary_rows() -> None:
    rows = medical_terms()
    words = [w for w, _, _ in rows]
    assert len(rows) > 50 and len(set(words)) == len(words)
    assert all(freq is None or freq > 0 for _, freq, _ in rows)
    assert any("结节" in w for w in words)


def test_every_placeholder_is_what_the_scrubber_writes() -> None:
    assert len(PLACEHOLDER_TEXTS) == 2 * len(PLACEHOLDERS)
    zh, en = scrub_text("患者姓名：张三", "zh").text, scrub_text("Patient: John Smith", "en").text
    assert zh == "患者姓名：" + PLACEHOLDERS["name"][0]
    assert en == "Patient: " + PLACEHOLDERS["name"][1]
