"""LLM-as-a-judge, LLaVA-Med / LLaVA-Bench protocol: `llava-ultra judge --pred PRED --ref REF`.

What this file owns: pairing predictions with references, the judge prompt, parsing the judge's
two scores, the relative score per category, and the run (raw replies journaled, summary file).

Protocol: the system message is "You are a helpful and precise assistant for checking the
quality of the answer."; the user message gives the context (caption / report findings), the
question, the reference answer as `[Assistant 1]`, the model answer as `[Assistant 2]`, and
asks for the two 1-10 scores (helpfulness, relevance, accuracy, level of detail) on the first
line, then an explanation. Relative score = mean model score / mean reference score x 100
(LLaVA's `summarize_gpt_review`: a ratio of means), per category and over all items.

Notable choices:
- Pairing is by id (`question_id` in predictions; `question_id` or `id` in references), so a
  reference file may hold more items than were predicted; both sides' unmatched ids are
  counted and reported. Multi-turn references use their first question/answer pair.
- Categories: `category`, `type` or `task`, normalised to conversation / detailed_description /
  complex_reasoning (LLaVA-Med's conv / detail / complex), anything else kept as written.
- Scores parse leniently but strictly defined: exactly two numbers on the first non-empty line
  ("8 7", "8, 7", "8/10 7/10", "**8** **7**"; "Assistant 1"/"助手1" labels there are not
  numbers), as the protocol asks, else labelled scores anywhere ("Assistant 1: 8", "助手1：8"),
  each within 0-10. Anything else is unparseable: kept in the raw file, counted,
  left out of the means, never replaced by a guess.
- Repeats: n requests per item (repeat index in the cache key, so they are real requests); the
  item's scores are the medians over its parseable repeats.
- Temperature 0 by default; the requested model and the model the endpoint says it served are
  recorded with every raw reply and in the summary. An unreachable or refusing judge raises
  LLMError naming the URL: the command exits non-zero, with no fallback metric.
- Raw replies are the batch journal (`judge_raw.jsonl`): a killed run resumes, and the reply
  cache makes a re-run free.
- Two rubrics (`--rubric`): `llava-med` (the protocol above) and `hallucination`, which asks the
  judge to list the findings each answer invents or wrongly denies against the report and to rate
  faithfulness 1-10 on the same two-number first line. The hallucination rubric is reported
  separately (`judge_hallucination_raw.jsonl`, `judge_hallucination_scores.json`, beside the
  LLaVA-Med files in the same folder) and pinned: its text lives here, and the summary records
  its name and a hash of its text (`rubric_sha`), so a changed rubric is visible in the results.
"""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..llm.batch import run_batch
from ..llm.client import ChatClient, ClientConfig

SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
INSTRUCTION = (
    "We would like to request your feedback on the performance of two AI assistants in response to the "
    "user question displayed above. The user asks the question on observing one or more medical "
    "ultrasound images. For your reference, the visual content of the images is represented by the "
    "examination findings above.\n"
    "Please rate the helpfulness, relevance, accuracy and level of detail of their responses. Each "
    "assistant receives an overall score on a scale of 1 to 10, where a higher score indicates better "
    "overall performance.\n"
    "Please first output a single line containing only two values indicating the scores for Assistant 1 "
    "and 2, respectively. The two scores are separated by a space.\n"
    "In the subsequent line, please provide a comprehensive explanation of your evaluation, avoiding any "
    "potential bias and ensuring that the order in which the responses were presented does not affect "
    "your judgment."
)
CATEGORIES = {
    "conv": "conversation",
    "conversation": "conversation",
    "detail": "detailed_description",
    "detailed": "detailed_description",
    "description": "detailed_description",
    "detailed_description": "detailed_description",
    "complex": "complex_reasoning",
    "reasoning": "complex_reasoning",
    "complex_reasoning": "complex_reasoning",
}
RAW_NAME = "judge_raw.jsonl"
SCORES_NAME = "judge_scores.json"
CACHE_NAME = "judge_cache.sqlite3"

HALLUCINATION_SYSTEM = (
    "You are a careful radiologist who checks answers about medical images for hallucinated findings."
)
HALLUCINATION_INSTRUCTION = (
    "The examination findings in the context above are the ground truth of what the ultrasound images "
    "show. Check the two AI assistants' answers to the user question against them.\n"
    "A hallucination is a finding an answer states that the context does not support: a lesion that "
    "is not there, a wrong side or location, a size that differs from the measured one, or a present "
    "finding that the answer denies. Omitting a finding is not a hallucination; vague wording is not "
    "a hallucination.\n"
    "Rate each assistant's faithfulness on a scale of 1 to 10, where 10 means it states nothing the "
    "context does not support and 1 means most of what it states is invented.\n"
    "Please first output a single line containing only two values indicating the faithfulness scores "
    "for Assistant 1 and 2, respectively. The two scores are separated by a space.\n"
    "In the subsequent lines, list every hallucinated finding of each assistant (or 'none'), then "
    "briefly explain, ensuring that the order in which the responses were presented does not affect "
    "your judgment."
)
RUBRICS: dict[str, tuple[str, str]] = {
    "llava-med": (SYSTEM, INSTRUCTION),
    "hallucination": (HALLUCINATION_SYSTEM, HALLUCINATION_INSTRUCTION),
}
"""rubric name -> (system message, instruction placed after the two answers)."""


def rubric_files(rubric: str) -> tuple[str, str]:
    """(raw replies file, scores file) of a rubric: LLaVA-Med keeps the historical names."""
    check_rubric(rubric)
    if rubric == "llava-med":
        return RAW_NAME, SCORES_NAME
    return f"judge_{rubric}_raw.jsonl", f"judge_{rubric}_scores.json"


def check_rubric(rubric: str) -> str:
    if rubric not in RUBRICS:
        raise DataError(f"unknown judge rubric {rubric!r}; use one of: {', '.join(RUBRICS)}")
    return rubric


def rubric_sha(rubric: str) -> str:
    """A short hash of the rubric's text, recorded with its scores (the rubric is pinned)."""
    import hashlib

    system, instruction = RUBRICS[check_rubric(rubric)]
    return hashlib.sha1(f"{system}\0{instruction}".encode()).hexdigest()[:12]


_NUMBER = r"(\d+(?:\.\d+)?)"
_LABELLED = [
    re.compile(
        rf"(?:assistant|助手)\s*{n}\s*(?:'s)?\s*(?:score)?\s*[:：=\-]?\s*\**\s*{_NUMBER}", re.IGNORECASE
    )
    for n in (1, 2)
]
_LABEL = re.compile(r"(?:assistant|助手)\s*[12](?!\d)", re.IGNORECASE)


# ---------------------------------------------------------------------------- pure parts


def normalize_category(value: Any) -> str:
    """conv/detail/complex (and long forms) -> our three names; others as written; None -> 'all'."""
    if value is None or str(value).strip() == "":
        return "uncategorized"
    key = str(value).strip().lower().replace(" ", "_").replace("-", "_")
    return CATEGORIES.get(key, str(value).strip())


def parse_scores(text: str | None) -> tuple[float, float] | None:
    """(reference score, model score) from a judge reply, or None when it cannot be read.

    The protocol puts the two scores on the first line, so that line is read first (with the
    "Assistant 1" / "助手1" labels taken out, so their digits are not scores); only when it does
    not hold exactly two numbers are labelled scores ("Assistant 1: 8 ... Assistant 2: 7")
    searched for in the whole reply. The explanation after the first line often quotes other
    numbers next to the labels ("Assistant 1: 3 findings listed"), which must not win.
    """
    if not text or not text.strip():
        return None
    first = next(line for line in text.strip().splitlines() if line.strip())
    first = re.sub(r"(\d)\s*/\s*10\b", r"\1", _LABEL.sub(" ", first.replace("*", "")))
    numbers = re.findall(r"(?<![\w.])" + _NUMBER + r"(?![\w.])", first)
    if len(numbers) == 2:
        scores = (float(numbers[0]), float(numbers[1]))
    else:
        found = [p.search(text) for p in _LABELLED]
        if not all(found):
            return None
        scores = (float(found[0].group(1)), float(found[1].group(1)))  # type: ignore[union-attr]
    if not all(0 <= s <= 10 for s in scores):
        return None
    return scores


def judge_messages(
    context: str, question: str, reference: str, answer: str, rubric: str = "llava-med"
) -> list[dict[str, str]]:
    """The two messages of one judgement (LLaVA-Bench layout, reference first) under `rubric`."""
    system, instruction = RUBRICS[check_rubric(rubric)]
    user = (
        f"[Context]\n{context}\n\n"
        f"[Question]\n{question}\n\n"
        f"[Assistant 1]\n{reference}\n\n[End of Assistant 1]\n\n"
        f"[Assistant 2]\n{answer}\n\n[End of Assistant 2]\n\n"
        f"[System]\n{instruction}\n\n"
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


@dataclass(frozen=True)
class JudgeItem:
    """One (reference, prediction) pair to judge."""

    id: str
    category: str
    context: str
    question: str
    reference: str
    answer: str


def _strip_images(text: str) -> str:
    return re.sub(r"\s*<image>\s*", "\n", text).strip()


def reference_fields(record: Mapping[str, Any]) -> tuple[str, str, str]:
    """(question, reference answer, context) of one reference record; DataError when missing."""
    rid = record.get("question_id", record.get("id", "<no id>"))
    conv = record.get("conversations")
    if isinstance(conv, list) and len(conv) >= 2:
        question, answer = conv[0].get("value"), conv[1].get("value")
    else:
        question = record.get("question", record.get("text"))
        answer = record.get("answer", record.get("gpt4_answer", record.get("reference")))
    if not isinstance(question, str) or not isinstance(answer, str) or not answer.strip():
        raise DataError(
            f"reference {rid!r} has no question/answer; give conversations [human, gpt] or "
            "'question' and 'answer' fields"
        )
    context = next(
        (
            record[k]
            for k in ("context", "caption", "fig_caption", "findings")
            if isinstance(record.get(k), str) and record[k].strip()
        ),
        "",
    )
    if isinstance(record.get("diagnosis"), str) and record["diagnosis"].strip():
        context = f"{context}\n{record['diagnosis']}".strip()
    return _strip_images(question), answer.strip(), context.strip()


def read_records(path: Path | str) -> list[dict[str, Any]]:
    """A JSON list or JSONL file of objects; DataError naming the file and line when malformed."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found; pass an existing predictions/reference file")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno}); fix the file") from None
        rows = list(enumerate(data, 1))
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise DataError(
                        f"{path}:{n}: not valid JSON ({exc.msg}); write one object per line"
                    ) from None
    for n, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{path}: record {n} is {type(row).__name__}, not a JSON object")
    return [row for _, row in rows]


@dataclass
class Pairing:
    items: list[JudgeItem]
    missing_predictions: list[str] = field(default_factory=list)
    unmatched_predictions: list[str] = field(default_factory=list)
    bad_references: list[str] = field(default_factory=list)


def pair_items(predictions: Sequence[Mapping[str, Any]], references: Sequence[Mapping[str, Any]]) -> Pairing:
    """Pair by id; unmatched ids and unusable references are listed, not fatal (unless nothing pairs)."""
    preds: dict[str, Mapping[str, Any]] = {}
    for i, p in enumerate(predictions):
        if "question_id" not in p:
            raise DataError(f"prediction record {i} has no question_id; use the LLaVA-Med answer format")
        preds[str(p["question_id"])] = p
    pairing = Pairing([])
    seen: set[str] = set()
    for ref in references:
        rid = str(ref.get("question_id", ref.get("id", "")))
        if not rid:
            pairing.bad_references.append("a reference without id/question_id")
            continue
        seen.add(rid)
        if rid not in preds:
            pairing.missing_predictions.append(rid)
            continue
        try:
            question, answer, context = reference_fields(ref)
        except DataError as exc:
            pairing.bad_references.append(str(exc))
            continue
        text = preds[rid].get("text")
        if text is not None and not isinstance(text, str):
            raise DataError(f"prediction {rid!r}: text is {type(text).__name__}, not a string")
        category = normalize_category(ref.get("category", ref.get("type", ref.get("task"))))
        pairing.items.append(JudgeItem(rid, category, context, question, answer, (text or "").strip()))
    pairing.unmatched_predictions = sorted(set(preds) - seen)
    if not pairing.items:
        raise DataError(
            f"no prediction matches a reference id ({len(preds)} predictions, {len(references)} references); "
            "judge predictions made on this reference file"
        )
    return pairing


def summarize(
    per_item: Mapping[str, Sequence[Mapping[str, Any]]], categories: Mapping[str, str]
) -> dict[str, Any]:
    """Per category and overall: items, mean scores (medians over repeats per item), relative score.

    `per_item` maps an item id to its raw records (one per repeat, each with `scores` or None).
    """
    groups: dict[str, list[tuple[float, float]]] = {}
    unscored: Counter[str] = Counter()
    for item_id, records in per_item.items():
        scored = [r["scores"] for r in records if r.get("scores")]
        category = categories[item_id]
        if not scored:
            unscored[category] += 1
            unscored["overall"] += 1
            continue
        pair = (statistics.median(s[0] for s in scored), statistics.median(s[1] for s in scored))
        groups.setdefault(category, []).append(pair)
        groups.setdefault("overall", []).append(pair)
    out: dict[str, Any] = {}
    names = sorted((set(groups) | set(unscored)) - {"overall"})
    for name in [*names, "overall"]:
        pairs = groups.get(name, [])
        ref = statistics.fmean(p[0] for p in pairs) if pairs else None
        model = statistics.fmean(p[1] for p in pairs) if pairs else None
        out[name] = {
            "items": len(pairs),
            "unscored_items": unscored.get(name, 0),
            "reference_score": ref,
            "model_score": model,
            "relative_score": (100.0 * model / ref) if pairs and ref else None,
        }
    return out


# ------------------------------------------------------------------------------------ run


@dataclass
class JudgeSummary:
    """What `run_judge` computed and wrote."""

    scores: dict[str, Any]
    meta: dict[str, Any]
    usage: str
    out_dir: Path
    dry_run: bool = False

    def render(self) -> str:
        m = self.meta
        raw_name, scores_name = rubric_files(m.get("rubric", "llava-med"))
        lines = [
            f"judge {m['judge_model']} (temperature {m['temperature']}, {m['repeats']} repeat(s)) at {m['base_url']}"
            f", rubric {m.get('rubric', 'llava-med')}"
        ]
        if self.dry_run:
            lines.append("dry run: requests printed above, nothing sent, no scores")
        else:
            lines.append(
                f"{'category':<24} {'items':>5} {'ref':>6} {'model':>6} {'relative':>9} {'unscored':>8}"
            )
            for name, s in self.scores.items():
                rel = "-" if s["relative_score"] is None else f"{s['relative_score']:.1f}"
                ref = "-" if s["reference_score"] is None else f"{s['reference_score']:.2f}"
                mod = "-" if s["model_score"] is None else f"{s['model_score']:.2f}"
                lines.append(
                    f"{name:<24} {s['items']:>5} {ref:>6} {mod:>6} {rel:>9} {s['unscored_items']:>8}"
                )
            lines.append(
                f"unparseable judge replies: {m['unparseable_replies']} of {m['replies']}"
                f" ({m['unscored_items']} item(s) with no parseable reply, left out)"
            )
            if m.get("resumed_replies"):
                lines.append(f"{m['resumed_replies']} replies reused from {self.out_dir / raw_name}")
        for label, key in (
            ("references without a prediction", "missing_predictions"),
            ("predictions without a reference", "unmatched_predictions"),
            ("unusable references", "bad_references"),
        ):
            if m[key]:
                lines.append(f"{label}: {len(m[key])} (first: {m[key][0]})")
        if m.get("served_models") and set(m["served_models"]) != {m["judge_model"]}:
            lines.append(f"note: the endpoint answered as {', '.join(m['served_models'])}")
        lines.append(self.usage)
        if not self.dry_run:
            lines.append(
                f"raw judge replies -> {self.out_dir / raw_name}; scores -> {self.out_dir / scores_name}"
            )
        return "\n".join(lines)


def run_judge(
    pred: Path | str,
    ref: Path | str,
    out_dir: Path | str,
    config: ClientConfig,
    *,
    repeats: int = 1,
    rubric: str = "llava-med",
) -> JudgeSummary:
    """Judge every paired item `repeats` times under `rubric`; write raw replies and the scores
    file (`rubric_files`: judge_scores.json for llava-med) to out_dir.

    With the hallucination rubric the scores are faithfulness (10 = nothing invented) and the
    relative score is model faithfulness / reference faithfulness x 100."""
    if repeats < 1:
        raise DataError(f"repeats must be >= 1, got {repeats}")
    raw_name, scores_name = rubric_files(rubric)
    pairing = pair_items(read_records(pred), read_records(ref))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(f"{item.id}#{r}", (item, r)) for item in pairing.items for r in range(repeats)]

    with ChatClient(config) as client:

        def messages(job: tuple[JudgeItem, int]) -> list[dict[str, str]]:
            item = job[0]
            return judge_messages(item.context, item.question, item.reference, item.answer, rubric)

        def fingerprint(job: tuple[JudgeItem, int]) -> str:
            return client.request_key(messages(job), cache_extra={"repeat": job[1]})

        def work(job: tuple[JudgeItem, int]) -> dict[str, Any]:
            item, repeat = job
            reply = client.chat(messages(job), cache_extra={"repeat": repeat})
            return {
                "id": item.id,
                "repeat": repeat,
                "category": item.category,
                "judge_model": config.model,
                "rubric": rubric,
                "served_model": reply.served_model,
                "temperature": config.temperature,
                "reply": reply.content,
                "scores": parse_scores(reply.content),
                "usage": reply.usage,
                "cached": reply.cached,
            }

        meta: dict[str, Any] = {
            "judge_model": config.model,
            "base_url": config.base_url,
            "temperature": config.temperature,
            "repeats": repeats,
            "rubric": rubric,
            "rubric_sha": rubric_sha(rubric),
            "pred": str(pred),
            "ref": str(ref),
            "missing_predictions": pairing.missing_predictions,
            "unmatched_predictions": pairing.unmatched_predictions,
            "bad_references": pairing.bad_references,
        }
        if config.dry_run:
            for _, job in jobs:
                client.chat(messages(job), cache_extra={"repeat": job[1]})
            return JudgeSummary({}, meta, client.render_usage(), out, dry_run=True)
        result = run_batch(
            jobs, work, out / raw_name, fingerprint=fingerprint, concurrency=config.concurrency
        )
        usage = client.render_usage()

    per_item: dict[str, list[dict[str, Any]]] = {}
    for key, _ in jobs:
        per_item.setdefault(key.rsplit("#", 1)[0], []).append(result.records[key])
    records = [r for rs in per_item.values() for r in rs]
    categories = {item.id: item.category for item in pairing.items}
    scores = summarize(per_item, categories)
    meta.update(
        replies=len(records),
        unparseable_replies=sum(1 for r in records if not r.get("scores")),
        unscored_items=scores["overall"]["unscored_items"],
        resumed_replies=result.resumed,
        served_models=sorted({r["served_model"] for r in records if r.get("served_model")}),
    )
    (out / scores_name).write_text(
        json.dumps({"scores": scores, "meta": meta}, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
    return JudgeSummary(scores, meta, usage, out)
