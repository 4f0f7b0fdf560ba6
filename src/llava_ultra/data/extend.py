"""Template-built extended captions for LoGra-Med's third view, so alignment runs offline on SynthUS.

LoGra-Med's extended caption is an LLM rewrite of the answer: longer, same medical terms, at most
about twice the length. Issue 7's LLM generator writes such captions into a sample's
`extended_caption` field; `sample_extended_caption` uses that field when present and falls back to
`extend_answer_template`, which needs no model and no network.

The template extension restates, never invents: it keeps the answer verbatim and adds, in order of
priority while the length budget allows,
    1. the examination site, named from `llava_ultra.sites.SITES`;
    2. the report's finding summary: with `meta["finding_type"]` (SynthUS) the finding named from
       `llava_ultra.sites.FINDING_TYPES` at that site; without it, the report's diagnosis text;
    3. the measurements the answer already gives, restated as the lesion size.
A candidate whose text is already in the answer is left out, and so is the no-abnormality sentence when
the answer already says so. Length is counted in characters for
Chinese and in words for English; the budget is max(2 * len(answer), len(answer) + MIN_EXTRA), so
that one-word answers ("yes", "是") still get their context. Phrasing is the first template of each
kind, or drawn from `rng` when one is given (deterministic per seed).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

from ..errors import DataError
from ..sites import FINDING_TYPES, SITES, check_site
from .reports import LANGUAGES, Report
from .samples import find_measurements

MIN_EXTRA = {"zh": 24, "en": 16}
"""Length every answer may grow by whatever its own length (characters for zh, words for en)."""

TEMPLATES: dict[str, dict[str, tuple[str, ...]]] = {
    "zh": {
        "site": ("本次为{site}超声检查。", "该组图像来自{site}超声检查。"),
        "finding": ("{site}可见{finding}。", "超声提示{site}{finding}。"),
        "normal": ("{site}未见明显异常。", "本次{site}超声检查未见明显异常。"),
        "diagnosis": ("超声诊断：{diagnosis}。", "综合超声所见，诊断为{diagnosis}。"),
        "size": ("病灶大小约{size}。", "测得病灶约{size}。"),
    },
    "en": {
        "site": (
            "This is an ultrasound examination of the {site}.",
            "These images come from a {site} ultrasound.",
        ),
        "finding": ("A {finding} is seen in the {site}.", "The ultrasound shows a {finding} of the {site}."),
        "normal": (
            "No obvious abnormality of the {site} is seen.",
            "The {site} ultrasound shows no obvious abnormality.",
        ),
        "diagnosis": (
            "Ultrasound impression: {diagnosis}.",
            "Taken together, the findings indicate: {diagnosis}.",
        ),
        "size": ("The lesion measures about {size}.", "The measured size of the lesion is about {size}."),
    },
}


def text_length(text: str, language: str) -> int:
    """Characters (zh, whitespace ignored) or words (en): the unit of the length budget."""
    return len("".join(text.split())) if language == "zh" else len(text.split())


def _context(report: Report | Mapping[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """(site, diagnosis, meta) from a `Report` or an instruction-sample / report dict."""
    if isinstance(report, Report):
        return report.site, report.diagnosis, report.meta
    if "site" not in report:
        raise DataError("the report/sample has no 'site'; pass a Report or a sample with a 'site' key")
    return report["site"], str(report.get("diagnosis") or ""), dict(report.get("meta") or {})


def extend_answer_template(
    answer: str,
    report: Report | Mapping[str, Any],
    language: str,
    rng: random.Random | None = None,
) -> str:
    """A longer restatement of `answer` with the same medical terms (see the module docstring).

    `report` gives the site and, when it has them, the diagnosis and `meta["finding_type"]`; it can
    be a `Report` or a dict such as an instruction sample. The result starts with the site sentence,
    then the answer verbatim, then the restatements that fit in the budget.
    """
    if language not in LANGUAGES:
        raise DataError(f"unknown language {language!r}; use 'zh' or 'en'")
    if not answer.strip():
        raise DataError("cannot extend an empty answer; drop the turn or give it an answer")
    site_key, diagnosis, meta = _context(report)
    check_site(site_key)
    li = 0 if language == "zh" else 1
    site = SITES[site_key][li]
    answer = answer.strip()

    def phrase(kind: str, **fmt: str) -> str:
        options = TEMPLATES[language][kind]
        return (rng.choice(options) if rng is not None else options[0]).format(**fmt)

    candidates: list[tuple[str, str]] = [("before", phrase("site", site=site))]
    finding_type = meta.get("finding_type")
    if finding_type == "none":
        if FINDING_TYPES["none"][li] not in answer.lower():
            candidates.append(("after", phrase("normal", site=site)))
    elif finding_type in FINDING_TYPES:
        candidates.append(("after", phrase("finding", site=site, finding=FINDING_TYPES[finding_type][li])))
    elif diagnosis.strip() and diagnosis.strip() not in answer:
        candidates.append(("after", phrase("diagnosis", diagnosis=diagnosis.strip().rstrip("。."))))
    sizes = find_measurements(answer)
    if sizes and finding_type != "none":
        candidates.append(("after", phrase("size", size=sizes[0])))

    n = text_length(answer, language)
    budget = max(2 * n, n + MIN_EXTRA[language])
    before: list[str] = []
    after: list[str] = []
    used = n
    for where, text in candidates:
        cost = text_length(text, language)
        if text in answer or used + cost > budget:
            continue
        (before if where == "before" else after).append(text)
        used += cost
    sep = "" if language == "zh" else " "
    if language == "zh" and answer[-1] not in "。！？!?.；;":
        answer += "。"
    elif language == "en" and answer[-1] not in ".!?;":
        answer += "."
    return sep.join([*before, answer, *after])


def sample_answers(sample: Mapping[str, Any]) -> str:
    """All assistant turns of an instruction sample joined in order (the short-text view's tokens)."""
    turns = [t["value"].strip() for t in sample.get("conversations", []) if t.get("from") == "gpt"]
    if not any(turns):
        raise DataError(f"sample {sample.get('id', '?')} has no assistant answer to extend")
    return ("" if sample.get("language") == "zh" else " ").join(t for t in turns if t)


def sample_extended_caption(
    sample: Mapping[str, Any],
    report: Report | Mapping[str, Any] | None = None,
    rng: random.Random | None = None,
) -> str:
    """The sample's `extended_caption` when an LLM wrote one (issue 7), else the template extension.

    `report` (optional) adds the diagnosis and finding type the sample itself does not carry.
    """
    given = sample.get("extended_caption")
    if isinstance(given, str) and given.strip():
        return given.strip()
    language = sample.get("language")
    if language not in LANGUAGES:
        raise DataError(f"sample {sample.get('id', '?')} has language {language!r}; use 'zh' or 'en'")
    return extend_answer_template(
        sample_answers(sample), report if report is not None else sample, language, rng
    )
