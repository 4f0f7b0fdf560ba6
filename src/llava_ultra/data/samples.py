"""The instruction-sample format: one `<image>` per frame in the first human turn, checked.

Every generator of the data layer (templates in `instruct.py`, the LLM one in `llm_instruct.py`,
LoGra-Med extensions in `extend.py`, Med-VQA converters in `medvqa.py`) builds its samples with
`make_sample` and checks them with `check_sample`, so every sample has one shape:

    {"id", "report_id", "images", "conversations": [{"from": "human"|"gpt", "value"}, ...],
     "language", "site", "task", "question_types", "site_cue", "findings", "valid", ...}

It sits below those modules (and imports none of them), so `instruct.py` can register the LLM
generator without an import cycle. Also here: the site-cue choices and question prefixes, and the
measurement pattern (a number with cm/mm/厘米/毫米, possibly 'a×b') that answers are checked with.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from ..errors import DataError
from .reports import Report

IMAGE_TOKEN = "<image>"
SITE_CUE_CHOICES = ("with", "without", "both")

CUE_PREFIXES: dict[str, tuple[str, ...]] = {
    "zh": ("这是一张{site}超声图像，", "以下是{site}超声检查图像。", "这组图像来自{site}超声检查，"),
    "en": (
        "This is a {site} ultrasound image. ",
        "These images are from a {site} ultrasound examination. ",
        "Here is a {site} ultrasound. ",
    ),
}

_NUM = r"\d+(?:\.\d+)?"
_UNIT = r"(?:cm|mm|厘米|毫米)"
MEASUREMENT_RE = re.compile(rf"{_NUM}\s*(?:{_UNIT}\s*)?(?:[×xX*]\s*{_NUM}\s*(?:{_UNIT}\s*)?)*{_UNIT}")


def find_measurements(text: str) -> list[str]:
    """Every measurement (a number with cm/mm/厘米/毫米, possibly 'a×b') in `text`, verbatim."""
    return [m.group(0).strip() for m in MEASUREMENT_RE.finditer(text)]


def image_prompt(question: str, k: int) -> str:
    """The first human turn: one `<image>` per frame, newline-joined, then the question."""
    return "\n".join([IMAGE_TOKEN] * k + [question])


def make_sample(
    report: Report,
    turns: Sequence[tuple[str, str]],
    *,
    sample_id: str,
    task: str,
    question_types: Sequence[str],
    site_cue: bool,
    **extra: Any,
) -> dict[str, Any]:
    """Build and check one sample from (question, answer) pairs; places the image placeholders.

    Questions and answers must not contain `<image>` themselves. Other generators (e.g. the
    LLM-backed one) build their samples through this function so every sample has one shape.
    """
    if len(question_types) != len(turns):
        raise DataError(
            f"sample {sample_id}: {len(question_types)} question types for {len(turns)} turns; "
            "give one question type per human turn"
        )
    conversations: list[dict[str, str]] = []
    for i, (question, answer) in enumerate(turns):
        value = image_prompt(question, len(report.images)) if i == 0 else question
        conversations.append({"from": "human", "value": value})
        conversations.append({"from": "gpt", "value": answer})
    sample = {
        "id": sample_id,
        "report_id": report.id,
        "images": list(report.images),
        "conversations": conversations,
        "language": report.language,
        "site": report.site,
        "task": task,
        "question_types": list(question_types),
        "site_cue": site_cue,
        "findings": report.findings,
        "valid": list(report.valid) if report.valid is not None else None,
        **extra,
    }
    check_sample(sample)
    return sample


def check_sample(sample: dict[str, Any]) -> None:
    """Raise DataError unless `sample` is well formed.

    Checks: non-empty images; turns alternate human/gpt starting with human, none empty; the
    number of `<image>` placeholders equals the number of images, all in the first human turn.
    """
    sid = sample.get("id", "<no id>")
    images = sample.get("images") or []
    conv = sample.get("conversations") or []
    if not images:
        raise DataError(f"sample {sid} has no images; every sample needs at least one frame")
    if not conv or len(conv) % 2:
        raise DataError(f"sample {sid} has {len(conv)} turns; give human/gpt pairs")
    for i, turn in enumerate(conv):
        want = "human" if i % 2 == 0 else "gpt"
        if turn.get("from") != want:
            raise DataError(f"sample {sid}: turn {i} is from {turn.get('from')!r}, expected {want!r}")
        if not str(turn.get("value", "")).strip():
            raise DataError(f"sample {sid}: turn {i} is empty; every turn needs text")
    total = sum(str(t["value"]).count(IMAGE_TOKEN) for t in conv)
    if total != len(images):
        raise DataError(
            f"sample {sid}: {total} {IMAGE_TOKEN} placeholders but {len(images)} images; "
            f"put exactly one {IMAGE_TOKEN} per image in the first human turn"
        )
    first = str(conv[0]["value"]).count(IMAGE_TOKEN)
    if first != len(images):
        raise DataError(
            f"sample {sid}: first human turn has {first} {IMAGE_TOKEN} placeholders but there are "
            f"{len(images)} images; later turns and answers must carry none"
        )


def cue_flags(site_cue: str) -> tuple[bool, ...]:
    """'with' -> (True,), 'without' -> (False,), 'both' -> (True, False)."""
    if site_cue not in SITE_CUE_CHOICES:
        raise DataError(f"unknown site-cue choice {site_cue!r}; use one of: {', '.join(SITE_CUE_CHOICES)}")
    return {"with": (True,), "without": (False,), "both": (True, False)}[site_cue]
