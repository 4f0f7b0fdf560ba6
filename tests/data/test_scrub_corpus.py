"""The scrubber measured on its labelled corpus (tests/data/scrub_corpus): recall per kind, false
positives, and clinical words that must never change. The figures are in docs/data.md."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

from llava_ultra.data.scrub import evaluate_scrubber

CORPUS = Path(__file__).parent / "scrub_corpus"
PHI_FILES = ("phi.jsonl", "handwritten_a.jsonl", "handwritten_b.jsonl", "handwritten_c.jsonl")
CLEAN_FILES = ("clean.jsonl", "handwritten_clean.jsonl", "handwritten_clean_c.jsonl")
STRICT_KINDS = ("name", "id_number", "phone", "record_number", "birth_date")


def _rows(*names: str) -> list[dict]:
    return [json.loads(line) for name in names for line in (CORPUS / name).read_text("utf-8").splitlines()]


@pytest.fixture(scope="module")
def report() -> dict:
    vocab = json.loads((CORPUS / "vocab.json").read_text("utf-8"))
    return evaluate_scrubber(_rows(*PHI_FILES), _rows(*CLEAN_FILES), vocab["zh"] + vocab["en"])


def test_corpus_size_and_coverage():
    phi, clean = _rows(*PHI_FILES), _rows(*CLEAN_FILES)
    assert len(phi) >= 300 and len(clean) >= 150
    assert {r["lang"] for r in phi} == {"zh", "en"} == {r["lang"] for r in clean}
    kinds = {kind for r in phi for kind, _ in r["phi"]}
    assert kinds == {
        "name",
        "id_number",
        "phone",
        "record_number",
        "birth_date",
        "email",
        "address",
        "url",
        "ip",
    }
    for row in phi:
        assert row["phi"] and all(value in row["text"] for _, value in row["phi"]), row


def test_recall_per_kind_and_overall(report):
    for kind in STRICT_KINDS:
        assert report["recall"][kind] >= 0.99, (kind, [m for m in report["missed"] if m[0] == kind])
    assert report["overall_recall"] >= 0.95, report["missed"]


def test_clean_snippets_and_clinical_words_are_never_changed(report):
    assert report["clean_changed"] == []
    assert report["clinical_words_changed"] == []
    assert report["chars_replaced_outside_labels"] <= 5  # e.g. initials "KL" beside a name


def test_committed_corpus_is_what_the_generator_writes(tmp_path):
    runpy.run_path(str(CORPUS / "build_corpus.py"))["main"](tmp_path)
    for name in ("phi.jsonl", "clean.jsonl", "vocab.json"):
        assert (tmp_path / name).read_bytes() == (CORPUS / name).read_bytes(), name


def test_held_out_set_d_floor():
    """Set D was written after the current rules and never tuned on: its recall is the honest
    estimate for unseen phrasing (docs/data.md). Keep it untuned (write set E for the next round
    of fixes); this only guards against regressions."""
    r = evaluate_scrubber(_rows("handwritten_d.jsonl"), _rows("handwritten_clean_d.jsonl"), [])
    assert r["overall_recall"] >= 0.81 and len(r["clean_changed"]) <= 1
