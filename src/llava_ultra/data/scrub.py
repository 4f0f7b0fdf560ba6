"""Scrub report files and measure the text scrubber on a labelled corpus.

The scrubber itself (`scrub_text`, a pure function used on every report before it leaves the
machine) lives in the core layer, `llava_ultra/scrub.py`, so that the LLM client below the data
layer can use it; it is re-exported here. This module owns the report-level parts:

- `scrub_file` applies the scrubber to history, findings, diagnosis and string meta values of
  every report of a .jsonl/.csv file (`llava-ultra scrub IN OUT`); unreadable lines are listed,
  not written.
- `evaluate_scrubber` measures recall per kind and false positives on a labelled corpus
  (tests/data/scrub_corpus; figures in docs/data.md).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..scrub import ScrubResult, scrub_text
from ..vocab import PLACEHOLDERS

__all__ = ["PLACEHOLDERS", "ScrubFileSummary", "ScrubResult", "evaluate_scrubber", "scrub_file", "scrub_text"]


# ----------------------------------------------------------------------------- report files


@dataclass
class ScrubFileSummary:
    """Outcome of `scrub_file`: counts by kind, reports changed, unreadable lines (line, error)."""

    src: str
    dst: str
    reports: int
    changed: int
    counts: dict[str, int]
    problems: list[tuple[int, str]]

    @property
    def ok(self) -> bool:
        return not self.problems

    def render(self) -> str:
        kinds = ", ".join(f"{k}: {n}" for k, n in sorted(self.counts.items())) or "nothing found"
        lines = [
            f"scrubbed {self.reports} report(s) from {self.src} -> {self.dst}; {self.changed} changed",
            f"replaced: {kinds}",
        ]
        if self.problems:
            lines.append(f"skipped {len(self.problems)} unreadable line(s) (not written; fix and re-run):")
            lines += [f"  {self.src}:{line}: {msg}" for line, msg in self.problems]
        return "\n".join(lines)


def _scrub_value(value: Any, language: str, counts: Counter[str]) -> Any:
    if isinstance(value, str):
        result = scrub_text(value, language)
        counts.update(kind for kind, _ in result.found)
        return result.text
    if isinstance(value, list):
        return [_scrub_value(v, language, counts) for v in value]
    if isinstance(value, dict):
        return {k: _scrub_value(v, language, counts) for k, v in value.items()}
    return value


def scrub_file(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> ScrubFileSummary:
    """Scrub history, findings, diagnosis and string values in meta of every report in `src`.

    Writes `dst` (.jsonl or .csv); unreadable lines are listed in the summary, not written.
    """
    from .reports import read_reports_lenient, write_reports

    if Path(src).resolve() == Path(dst).resolve():
        raise DataError(f"output {dst} is the input file; write the scrubbed copy to a new path")
    reports, problems = read_reports_lenient(src)
    counts: Counter[str] = Counter()
    out, changed = [], 0
    for r in reports:
        before = sum(counts.values())
        new = replace(
            r,
            history=_scrub_value(r.history, r.language, counts),
            findings=_scrub_value(r.findings, r.language, counts),
            diagnosis=_scrub_value(r.diagnosis, r.language, counts),
            meta=_scrub_value(r.meta, r.language, counts),
        )
        changed += sum(counts.values()) > before
        out.append(new)
    write_reports(dst, out)
    return ScrubFileSummary(str(src), str(dst), len(reports), changed, dict(counts), problems)


# ------------------------------------------------------------------------------- measurement


def _spans_of(text: str, value: str) -> list[tuple[int, int]]:
    spans, start = [], text.find(value)
    while start >= 0:
        spans.append((start, start + len(value)))
        start = text.find(value, start + 1)
    return spans


def _count(text: str, word: str) -> int:
    """Occurrences of a word; English words only as whole words (liver is not in Oliver)."""
    if word.isascii():
        return len(re.findall(rf"(?<![A-Za-z]){re.escape(word)}(?![A-Za-z])", text))
    return text.count(word)


def evaluate_scrubber(
    phi_rows: list[dict[str, Any]], clean_rows: list[dict[str, Any]], vocab: list[str]
) -> dict[str, Any]:
    """Recall per kind, false positives and clinical words changed, on a labelled corpus.

    `phi_rows`: `{"text", "lang", "phi": [[kind, value], ...]}`; a labelled span counts as found
    when the scrubber's spans cover every character of it. `clean_rows`: `{"text", "lang"}` with no
    PHI. False positives: clean snippets with any replacement, and characters replaced outside
    every label in the PHI snippets. A clinical word (from `vocab`) is changed when it occurs in
    an input fewer times in the output.
    """
    found_by_kind: Counter[str] = Counter()
    total_by_kind: Counter[str] = Counter()
    missed: list[tuple[str, str, str]] = []
    extra_chars = 0
    word_changes: list[tuple[str, str]] = []
    for row in phi_rows:
        text = row["text"]
        result = scrub_text(text, row.get("lang"))
        covered = [False] * len(text)
        for _, (s, e) in result.found:
            covered[s:e] = [True] * (e - s)
        labelled = [False] * len(text)
        for kind, value in row["phi"]:
            for s, e in _spans_of(text, value):
                total_by_kind[kind] += 1
                labelled[s:e] = [True] * (e - s)
                if all(covered[s:e]):
                    found_by_kind[kind] += 1
                else:
                    missed.append((kind, value, text))
        extra_chars += sum(c and not lab for c, lab in zip(covered, labelled, strict=True))
        word_changes += [(w, text) for w in vocab if _count(text, w) > _count(result.text, w)]
    clean_changed = []
    for row in clean_rows:
        result = scrub_text(row["text"], row.get("lang"))
        if result.found:
            clean_changed.append(row["text"])
        word_changes += [(w, row["text"]) for w in vocab if _count(row["text"], w) > _count(result.text, w)]
    total = sum(total_by_kind.values())
    return {
        "recall": {k: found_by_kind[k] / n for k, n in sorted(total_by_kind.items())},
        "labelled": dict(sorted(total_by_kind.items())),
        "overall_recall": sum(found_by_kind.values()) / total if total else 1.0,
        "missed": missed,
        "clean_snippets": len(clean_rows),
        "clean_changed": clean_changed,
        "false_positive_rate": len(clean_changed) / len(clean_rows) if clean_rows else 0.0,
        "chars_replaced_outside_labels": extra_chars,
        "clinical_words_changed": word_changes,
    }
