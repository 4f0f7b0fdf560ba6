"""LLM-written stage-2 instruction data: conversations, detailed descriptions, complex reasoning,
plus extended answers for LoGra-Med; `llava-ultra instruct --generator llm`.

What this file owns: the prompts (few-shot JSON files in `llm/prompts/`, zh and en, in the style
of LLaVA-Med's instruction-generation prompts adapted to ultrasound reports), parsing and
validating the LLM's JSON replies, and turning them into samples through `samples.make_sample`,
so they have exactly the template generator's format.

Per report: one request per task (`conversation`, `detailed_description`, `complex_reasoning`),
then, with `extended=True`, one request per task rewriting its answers (LoGra-Med's extended
captions). Each sample then carries `extended_answers`, one string per gpt turn in order: a
longer rewrite keeping every measurement, grading category and dictionary term of the answer,
within `data.extend`'s budget max(2 x length, length + MIN_EXTRA) (characters for zh, words for
en); and `extended_caption`, those joined like `data.extend.sample_answers` joins the answers
(the field LoGra-Med's text view reads). Both are omitted (and counted) when the rewrite fails
validation twice.

Validation, in order: the reply must be JSON of the task's shape (```json fences and text around
the object are tolerated); a malformed reply gets one repair request (the error is quoted back)
and then counts as a failed task. Turns are dropped (and counted by reason) when they admit not
seeing the image, talk about the source text ("the report", "the caption", "描述中", "报告中"
...), carry a scrubber placeholder ([姓名], [ID] ...), or state a measurement that is not in the
report. Medical wording is never rewritten: accepted text is kept as the LLM wrote it, minus any
stray `<image>` tokens (make_sample places those).

Variants: the LLM is asked never to name the site in questions; the `cue` variant prefixes the
first question with a site cue (samples.CUE_PREFIXES), the `nocue` variant uses the questions
as they are and is skipped (counted) when a question names the site anyway. Both variants share
one LLM reply.

Batching: `prefetch` (called by `build_instructions` with all reports of a split) runs the
reports `concurrency` at a time through `llm.batch.run_batch`, journaling each finished report
to a JSONL file keyed by report id + language, fingerprinted by the report text, model,
parameters and prompts: a killed run resumes where it stopped, and with the reply cache a
re-run sends nothing. A request the endpoint refuses (HTTP 400 / 413 / 422, `RequestRejected`:
a report too long for the context, a content filter) fails that task only, counted; the batch
goes on. A report whose every task failed raises DataError: it gets no stage-2 samples and is
listed, while its template-built captions and eval QA are kept (`instruct.build_instructions`).
When the first REFUSALS_BEFORE_ABORT requests are all refused and none accepted, the problem is a
setting, not the reports: LLMError stops the batch. `max_tokens` (1500 by default) is sized down
by the client when the endpoint says it does not fit (our own server caps replies at 1024).

Dry run: every request a report certainly needs is printed, the extended-answer rewrites too
(their answers, unknown until the first reply, are a placeholder, counted as one full reply in
the estimate); repair requests are sent only after an unusable reply and are not included.
Nothing is written: no journal, no reply cache, and `run_instruct` writes no files.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
import threading
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TextIO

from ..errors import ConfigError, DataError
from ..llm.batch import run_batch
from ..llm.client import ChatClient, ClientConfig, LLMError, RequestRejected, parse_price
from ..sites import FINDING_TYPES, SITES, site_name
from ..vocab import PLACEHOLDER_TEXTS, medical_terms
from .extend import MIN_EXTRA
from .reports import Report
from .samples import CUE_PREFIXES, cue_flags, find_measurements, make_sample

TASKS = ("conversation", "detailed_description", "complex_reasoning")
SHORT = {"conversation": "conv", "detailed_description": "detail", "complex_reasoning": "complex"}
_PROMPT_FILES = {
    "conversation": "conversation",
    "detailed_description": "detailed",
    "complex_reasoning": "complex",
    "extend": "extend",
}
MAX_TURNS = 6
REFUSALS_BEFORE_ABORT = 5
# Dry run: stands for the answers an extended-answer rewrite quotes (known only after the reply).
DRY_RUN_ANSWERS = {
    "zh": "<上一请求回复中的回答；试运行中未知>",
    "en": "<the answers from the reply to the request above; unknown in a dry run>",
}

DETAIL_QUESTIONS: dict[str, tuple[str, ...]] = {
    "zh": (
        "请详细描述这组超声图像。",
        "请对图像中的超声表现进行全面描述。",
        "请详细说明这组超声图像中可以看到的内容。",
        "请逐一描述图像中的所见，并给出综合印象。",
    ),
    "en": (
        "Describe these ultrasound images in detail.",
        "Give a detailed description of the ultrasound findings in the images.",
        "Walk me through everything visible in these ultrasound images.",
        "Describe the images thoroughly and give your overall impression.",
    ),
}

REPAIR = {
    "zh": "你的回复无法使用：{error}。请重新回复，只输出符合要求格式的 JSON 对象，不要输出其他内容。",
    "en": "Your reply could not be used: {error}. Reply again with only the JSON object in the required format.",
}

_REPORT_LABELS = {
    "zh": ("检查部位", "图像数量", "病史", "超声所见", "超声诊断"),
    "en": ("Examination site", "Number of images", "Clinical history", "Findings", "Impression"),
}

# Turns that admit not seeing the image.
_BLIND = {
    "zh": re.compile(
        r"无法(?:直接)?(?:看到|查看|观察|看见)|看不到|看不见|没有看到(?:图|影)像|未(?:提供|上传)(?:图|影)像|作为(?:一个)?(?:AI|人工智能)"
    ),
    "en": re.compile(
        r"\b(?:can ?not|can't|unable to|do not|don't|am not able to)\s+(?:directly\s+)?(?:see|view|access|look at|observe)\b"
        r"|\bas an ai\b|\bno image (?:is|was|has been) (?:provided|attached|shared)",
        re.IGNORECASE,
    ),
}
# Turns that talk about the source text instead of the image.
_SOURCE = {
    "zh": re.compile(
        r"描述中|报告中|报告(?:显示|提示|指出|提到|所述)|根据(?:报告|描述|文字|所给|提供)|文字描述|所给(?:的)?信息|提供的信息|原文|病历中|题干"
    ),
    "en": re.compile(
        r"\b(?:the|this|given|provided|above|that)\s+(?:caption|report|description|text|context|information provided)\b"
        r"|\b(?:mentioned|stated|described) in\b|\baccording to the\b",
        re.IGNORECASE,
    ),
}
_GRADES = re.compile(r"\b(?:TI-?RADS|BI-?RADS|O-?RADS|LI-?RADS)\s*\d[a-c]?", re.IGNORECASE)


class ReplyError(DataError):
    """An LLM reply that is not the JSON the task asked for, or fails a content check."""


# --------------------------------------------------------------------------------- prompts


@functools.cache
def load_prompt(task: str, language: str) -> dict[str, Any]:
    """The shipped few-shot prompt for (task, language): {"system", "examples": [...]}."""
    if task not in _PROMPT_FILES:
        raise ConfigError(f"unknown LLM task {task!r}; use one of: {', '.join(TASKS)}")
    if language not in ("zh", "en"):
        raise ConfigError(f"no LLM prompts for language {language!r}; use zh or en")
    name = f"llm/prompts/{_PROMPT_FILES[task]}.{language}.json"
    data = json.loads(resources.files("llava_ultra").joinpath(name).read_text("utf-8"))
    if not isinstance(data.get("system"), str) or not isinstance(data.get("examples"), list):
        raise ConfigError(f"prompt file {name} needs a 'system' string and an 'examples' list")
    return data


def prompts_digest(language: str, tasks: Sequence[str]) -> str:
    """sha256 over the prompt files a run uses (part of the journal fingerprint)."""
    blob = json.dumps(
        [load_prompt(t, language) for t in (*tasks, "extend")], ensure_ascii=False, sort_keys=True
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def render_report(fields: Mapping[str, Any], language: str) -> str:
    """The user message for one report: site, image count, history, findings, diagnosis."""
    site, count, history, findings, diagnosis = _REPORT_LABELS[language]
    sep = "：" if language == "zh" else ": "
    lines = [
        f"{site}{sep}{site_name(fields['site'], language)}",
        f"{count}{sep}{fields['images']}",
        f"{history}{sep}{fields.get('history') or ('无' if language == 'zh' else 'none')}",
        f"{findings}{sep}{fields.get('findings', '')}",
        f"{diagnosis}{sep}{fields.get('diagnosis', '')}",
    ]
    return "\n".join(lines)


def report_fields(report: Report) -> dict[str, Any]:
    return {
        "site": report.site,
        "images": len(report.images),
        "history": report.history.strip(),
        "findings": report.findings.strip(),
        "diagnosis": report.diagnosis.strip(),
    }


def task_messages(task: str, report: Report) -> list[dict[str, str]]:
    """System prompt, few-shot (report -> JSON) pairs, then this report."""
    prompt = load_prompt(task, report.language)
    messages = [{"role": "system", "content": prompt["system"]}]
    for example in prompt["examples"]:
        messages.append({"role": "user", "content": render_report(example["report"], report.language)})
        messages.append({"role": "assistant", "content": json.dumps(example["output"], ensure_ascii=False)})
    messages.append({"role": "user", "content": render_report(report_fields(report), report.language)})
    return messages


def extend_messages(answers: Sequence[str], language: str) -> list[dict[str, str]]:
    """System prompt, few-shot (answers -> extended) pairs, then these answers."""
    prompt = load_prompt("extend", language)
    messages = [{"role": "system", "content": prompt["system"]}]
    for example in prompt["examples"]:
        messages.append({"role": "user", "content": json.dumps(example["answers"], ensure_ascii=False)})
        messages.append({"role": "assistant", "content": json.dumps(example["output"], ensure_ascii=False)})
    messages.append({"role": "user", "content": json.dumps(list(answers), ensure_ascii=False)})
    return messages


# ------------------------------------------------------------------------ parsing (pure)


def parse_json_reply(text: str | None) -> dict[str, Any]:
    """The JSON object in an LLM reply (code fences and surrounding prose tolerated)."""
    if not text or not text.strip():
        raise ReplyError("the reply is empty")
    body = text.strip()
    fence = re.search(r"```(?:json)?\s*(.*?)```", body, re.DOTALL)
    if fence:
        body = fence.group(1).strip()
    start, end = body.find("{"), body.rfind("}")
    if start < 0 or end <= start:
        raise ReplyError(f"no JSON object in the reply: {text.strip()[:120]!r}")
    try:
        obj = json.loads(body[start : end + 1])
    except json.JSONDecodeError as exc:
        raise ReplyError(f"the reply is not valid JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(obj, dict):
        raise ReplyError("the reply's JSON is not an object")
    return obj


def _norm_measure(text: str) -> str:
    return re.sub(r"[×xX*＊]", "x", re.sub(r"\s+", "", text)).lower()


def turn_problem(question: str, answer: str, language: str, source: str) -> str | None:
    """Why a generated (question, answer) turn must be dropped, or None to keep it.

    `source` is the report text; a measurement in the answer must occur in it.
    """
    if not question.strip() or not answer.strip():
        return "empty"
    both = f"{question}\n{answer}"
    if _BLIND[language].search(both) or (language == "zh" and _BLIND["en"].search(both)):
        return "admits not seeing the image"
    if _SOURCE[language].search(both):
        return "talks about the report/caption"
    if any(p in both for p in PLACEHOLDER_TEXTS):
        return "carries a scrubbed placeholder"
    known = _norm_measure(source)
    for m in find_measurements(answer):
        if _norm_measure(m) not in known:
            return f"states a measurement not in the report ({m})"
    return None


def _clean(text: Any) -> str:
    return re.sub(r"\s*<image>\s*", " ", str(text)).strip() if isinstance(text, str) else ""


def task_turns(task: str, obj: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(question, answer) pairs from a parsed reply; the detailed task has no question (empty)."""
    if task == "conversation":
        conv = obj.get("conversation")
        if not isinstance(conv, list) or not conv:
            raise ReplyError(
                'expected {"conversation": [{"question": ..., "answer": ...}, ...]} with at least one turn'
            )
        turns = []
        for i, turn in enumerate(conv[:MAX_TURNS]):
            if (
                not isinstance(turn, Mapping)
                or not isinstance(turn.get("question"), str)
                or not isinstance(turn.get("answer"), str)
            ):
                raise ReplyError(f"conversation turn {i} needs string 'question' and 'answer' fields")
            turns.append((_clean(turn["question"]), _clean(turn["answer"])))
        return turns
    if task == "detailed_description":
        if not isinstance(obj.get("description"), str) or not obj["description"].strip():
            raise ReplyError('expected {"description": "..."} with a non-empty string')
        return [("", _clean(obj["description"]))]
    if task == "complex_reasoning":
        if not isinstance(obj.get("question"), str) or not isinstance(obj.get("answer"), str):
            raise ReplyError('expected {"question": "...", "answer": "..."} with string values')
        return [(_clean(obj["question"]), _clean(obj["answer"]))]
    raise ConfigError(f"unknown LLM task {task!r}; use one of: {', '.join(TASKS)}")


@functools.cache
def _dictionary_terms() -> tuple[str, ...]:
    names = [n for pair in (*SITES.values(), *FINDING_TYPES.values()) for n in pair]
    return tuple(sorted({w for w, _, _ in medical_terms()} | set(names), key=len, reverse=True))


def key_terms(text: str) -> list[str]:
    """Measurements, grading categories (TI-RADS 4a ...) and dictionary terms found in `text`."""
    low = text.lower()
    terms = find_measurements(text) + [m.group(0) for m in _GRADES.finditer(text)]
    terms += [t for t in _dictionary_terms() if t.lower() in low]
    return terms


def text_length(text: str, language: str) -> int:
    """Characters (zh, whitespace ignored) or words (en)."""
    return len(re.sub(r"\s+", "", text)) if language == "zh" else len(text.split())


def check_extended(answers: Sequence[str], obj: Mapping[str, Any], language: str) -> list[str]:
    """The validated extended answers: one per answer, keeping its terms, within the length budget."""
    ext = obj.get("extended")
    if not isinstance(ext, list) or not all(isinstance(e, str) for e in ext):
        raise ReplyError('expected {"extended": ["...", ...]} with one string per answer')
    if len(ext) != len(answers):
        raise ReplyError(
            f"got {len(ext)} extended answers for {len(answers)} answers; give one per answer, same order"
        )
    out = []
    for i, (answer, longer) in enumerate(zip(answers, ext, strict=True)):
        longer = _clean(longer)
        n, m = text_length(answer, language), text_length(longer, language)
        if m < n:
            raise ReplyError(f"extended answer {i + 1} is shorter than the original; make it longer")
        if m > max(2 * n, n + MIN_EXTRA[language]):
            raise ReplyError(
                f"extended answer {i + 1} is {m / max(n, 1):.1f}x the original; keep it within 2x"
            )
        low = _norm_measure(longer)
        missing = [t for t in key_terms(answer) if _norm_measure(t) not in low]
        if missing:
            raise ReplyError(
                f"extended answer {i + 1} drops the term(s) {', '.join(missing)}; keep them verbatim"
            )
        out.append(longer)
    return out


def names_site(text: str, report: Report) -> bool:
    zh, en = SITES[report.site]
    return zh in text or re.search(rf"\b{re.escape(en)}\b", text, re.IGNORECASE) is not None


# ------------------------------------------------------------------------------- generator


@dataclass
class LLMInstructOptions:
    """Settings of `llava-ultra instruct --generator llm` (the `--llm.*` options)."""

    base_url: str | None = None
    """Endpoint, e.g. http://127.0.0.1:8000/v1."""
    model: str | None = None
    """Model name (pin a dated snapshot)."""
    tasks: tuple[str, ...] = TASKS
    """Tasks to request: conversation, detailed_description, complex_reasoning (comma list)."""
    extended: bool = True
    """Also write extended_answers (LoGra-Med extended captions)."""
    api_key_env: str = "LLAVA_ULTRA_LLM_API_KEY,OPENAI_API_KEY"
    """Env variables holding the API key, tried in order."""
    api_version: str | None = None
    """Azure OpenAI api-version."""
    concurrency: int = 4
    """Requests in flight."""
    temperature: float = 0.7
    """Sampling temperature."""
    max_tokens: int = 1500
    """Longest reply; sized down by the client when the endpoint says it does not fit."""
    timeout: float = 120.0
    """Seconds per request."""
    max_attempts: int = 5
    """Tries per request."""
    json_mode: bool = False
    """Send response_format json_object."""
    cache: Path | None = None
    """Reply cache (default OUT/llm_cache.sqlite3)."""
    no_cache: bool = False
    """Do not read or write the reply cache."""
    journal: Path | None = None
    """Resume journal (default OUT/llm_journal.jsonl)."""
    dry_run: bool = False
    """Print the requests, send nothing."""
    price: str | None = None
    """'IN,OUT' USD per 1M tokens (default: built-in table)."""

    def generator_options(self, out: Path) -> dict[str, Any]:
        """`LLMGenerator` keyword arguments; the reply cache and the journal default to files in `out`."""
        if not self.base_url or not self.model:
            raise ConfigError(
                "--generator llm needs --llm-base-url and --llm-model (or LLAVA_ULTRA_LLM_BASE_URL and "
                "LLAVA_ULTRA_LLM_MODEL), e.g. --llm-base-url https://api.openai.com/v1 --llm-model gpt-4o-mini-2024-07-18"
            )
        return {
            "base_url": self.base_url,
            "model": self.model,
            "tasks": tuple(self.tasks),
            "extended": self.extended,
            "api_key_env": self.api_key_env,
            "api_version": self.api_version,
            "concurrency": self.concurrency,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "timeout": self.timeout,
            "max_attempts": self.max_attempts,
            "json_mode": self.json_mode,
            "cache": None if self.no_cache else (self.cache or Path(out) / "llm_cache.sqlite3"),
            "journal": self.journal or Path(out) / "llm_journal.jsonl",
            "dry_run": self.dry_run,
            "price": parse_price(self.price),
        }


class LLMGenerator:
    """`InstructionGenerator` backed by an OpenAI-compatible chat endpoint (see module docstring)."""

    name = "llm"

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        site_cue: str = "both",
        tasks: Sequence[str] = TASKS,
        extended: bool = True,
        journal: Path | str | None = None,
        cache: Path | str | None = None,
        concurrency: int = 4,
        temperature: float = 0.7,
        max_tokens: int = 1500,
        dry_run: bool = False,
        api_key_env: str | Sequence[str] = ("LLAVA_ULTRA_LLM_API_KEY", "OPENAI_API_KEY"),
        api_version: str | None = None,
        timeout: float = 120.0,
        max_attempts: int = 5,
        json_mode: bool = False,
        price: tuple[float, float] | None = None,
        out: TextIO | None = None,
    ) -> None:
        self.cues = cue_flags(site_cue)
        unknown = [t for t in tasks if t not in TASKS]
        if unknown or not tasks:
            raise ConfigError(f"unknown LLM task(s) {unknown or tasks}; use some of: {', '.join(TASKS)}")
        self.tasks = tuple(tasks)
        self.extended = extended
        self.journal = Path(journal) if journal else None
        self.concurrency = concurrency
        self.config = ClientConfig(
            base_url=base_url,
            model=model,
            api_key_env=tuple(api_key_env) if not isinstance(api_key_env, str) else api_key_env,
            api_version=api_version,
            timeout=timeout,
            max_attempts=max_attempts,
            concurrency=concurrency,
            cache=Path(cache) if cache else None,
            dry_run=dry_run,
            temperature=temperature,
            max_tokens=max_tokens,
            json_mode=json_mode,
            price=price,
        )
        self.client = ChatClient(self.config, out=out)
        self._records: dict[str, dict[str, Any]] = {}
        self._failed: dict[str, str] = {}
        self._printed: set[str] = set()  # dry run: reports whose requests were printed
        self._lock = threading.Lock()
        self.stats: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self._accepted = 0  # replies received (cache hits included)
        self._refused = 0  # requests the endpoint refused (RequestRejected)

    @property
    def dry_run(self) -> bool:
        """Print the requests, send nothing, write nothing (`run_instruct` checks this too)."""
        return self.config.dry_run

    # ---- batch

    def _key(self, report: Report) -> str:
        return f"{report.id}/{report.language}"

    def _fingerprint(self, report: Report) -> str:
        blob = json.dumps(
            {
                "report": report_fields(report),
                "language": report.language,
                "model": self.config.model,
                "temperature": self.config.temperature,
                "max_tokens": self.config.max_tokens,
                "json_mode": self.config.json_mode,
                "tasks": self.tasks,
                "extended": self.extended,
                "prompts": prompts_digest(report.language, self.tasks),
            },
            ensure_ascii=False,
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def prefetch(self, reports: Iterable[Report]) -> None:
        """Generate for every report not yet done, `concurrency` at a time, journaling each."""
        todo = [(self._key(r), r) for r in reports if self._key(r) not in self._records]
        if self.config.dry_run:
            for key, report in todo:
                if key not in self._printed:
                    self._printed.add(key)
                    self._work(report)
            return
        if self.journal is None:
            raise ConfigError("the LLM generator needs a journal file (journal=...) for resumable runs")
        result = run_batch(
            todo, self._work, self.journal, fingerprint=self._fingerprint, concurrency=self.concurrency
        )
        with self._lock:
            self._records.update(result.records)
            self._failed.update(result.failed)
            self.stats["reports resumed from the journal"] += result.resumed

    def _chat(self, messages: list[dict[str, str]]) -> Any:
        """One request; a refusal of this request (HTTP 400 / 413 / 422) is returned, not raised,
        unless every request so far was refused (then the settings are wrong: LLMError)."""
        try:
            reply = self.client.chat(messages)
        except RequestRejected as exc:
            with self._lock:
                self._refused += 1
                self.stats["requests refused by the endpoint (HTTP 400/413/422)"] += 1
                hopeless = self._refused >= REFUSALS_BEFORE_ABORT and self._accepted == 0
            if hopeless:
                raise LLMError(
                    f"the endpoint refused the first {self._refused} requests and accepted none, so "
                    f"the problem is a setting, not the reports (last: {exc}); check --llm-model, "
                    "--llm-json-mode and the endpoint's limits"
                ) from None
            return exc
        if not reply.dry_run:
            with self._lock:
                self._accepted += 1
        return reply

    def _ask(self, messages: list[dict[str, str]], language: str, check) -> tuple[Any, str | None]:
        """One request, and one repair request when `check(parse(reply))` fails; (value, error)."""
        reply = self._chat(messages)
        if isinstance(reply, RequestRejected):
            return None, f"the endpoint refused the request: {reply}"
        if reply.dry_run:
            return None, None
        try:
            return check(parse_json_reply(reply.content)), None
        except ReplyError as first:
            self._count("repair requests")
            repair = [
                *messages,
                {"role": "assistant", "content": reply.content or ""},
                {"role": "user", "content": REPAIR[language].format(error=first)},
            ]
            again = self._chat(repair)
            if isinstance(again, RequestRejected):
                return None, f"{first}; the endpoint refused the repair request: {again}"
            try:
                value = check(parse_json_reply(again.content))
            except ReplyError as second:
                return None, f"{first}; after repair: {second}"
            self._count("repairs that worked")
            return value, None

    def _work(self, report: Report) -> dict[str, Any]:
        lang = report.language
        source = "\n".join((report.history, report.findings, report.diagnosis))
        tasks: dict[str, Any] = {}
        for task in self.tasks:
            turns, error = self._ask(
                task_messages(task, report), lang, lambda obj, t=task: task_turns(t, obj)
            )
            if error:
                self._count(f"failed {task} replies")
                tasks[task] = {"error": error}
                continue
            if turns is None:  # dry run: print the rewrite request too, its answers a placeholder
                if self.extended:
                    self.client.chat(extend_messages([DRY_RUN_ANSWERS[lang]], lang))
                    # the real answers are unknown: count them as one full reply at most
                    self.client.usage.add(dry_run_prompt_tokens=self.config.max_tokens or 0)
                continue
            kept = []
            for question, answer in turns:
                reason = turn_problem(question or "-", answer, lang, source)
                if reason:
                    with self._lock:
                        self.dropped[reason.split(" (")[0]] += 1
                else:
                    kept.append((question, answer))
            if not kept:
                self._count(f"{task} replies with no usable turn")
                tasks[task] = {"error": "every turn was dropped by the content checks"}
                continue
            entry: dict[str, Any] = {"turns": [list(t) for t in kept], "extended": None}
            if self.extended:
                answers = [a for _, a in kept]
                ext, ext_error = self._ask(
                    extend_messages(answers, lang), lang, lambda obj, a=answers: check_extended(a, obj, lang)
                )
                if ext_error:
                    self._count("extended rewrites failed (samples written without extended_answers)")
                    entry["extended_error"] = ext_error
                entry["extended"] = ext
            tasks[task] = entry
        if self.config.dry_run:
            return {}
        if not any("turns" in t for t in tasks.values()):
            raise DataError(
                "the LLM gave no usable output for any task: "
                + "; ".join(f"{t}: {v['error']}" for t, v in tasks.items())
            )
        self._count("reports generated")
        return {"report_id": report.id, "language": lang, "model": self.config.model, "tasks": tasks}

    def _count(self, what: str) -> None:
        with self._lock:
            self.stats[what] += 1

    # ---- InstructionGenerator

    def generate(self, report: Report, rng: random.Random) -> list[dict[str, Any]]:
        key = self._key(report)
        if key not in self._records and key not in self._failed and key not in self._printed:
            self.prefetch([report])
        if self.config.dry_run:
            return []
        if key in self._failed:
            raise DataError(self._failed[key])
        record = self._records[key]
        samples = []
        for task in self.tasks:
            entry = record["tasks"].get(task) or {}
            if "turns" not in entry:
                continue
            turns = [tuple(t) for t in entry["turns"]]
            if task == "detailed_description":
                turns = [(rng.choice(DETAIL_QUESTIONS[report.language]), turns[0][1])]
            extra: dict[str, Any] = {"generator": "llm", "llm_model": record.get("model")}
            if entry.get("extended"):
                extra["extended_answers"] = list(entry["extended"])
                extra["extended_caption"] = ("" if report.language == "zh" else " ").join(entry["extended"])
            for cue in self.cues:
                if cue:
                    prefix = rng.choice(CUE_PREFIXES[report.language]).format(
                        site=site_name(report.site, report.language)
                    )
                    first = [(prefix + turns[0][0], turns[0][1]), *turns[1:]]
                elif any(names_site(q, report) for q, _ in turns):
                    self._count("nocue samples skipped (a question names the site)")
                    continue
                else:
                    first = turns
                samples.append(
                    make_sample(
                        report,
                        first,
                        sample_id=f"{report.id}-{report.language}-llm-{SHORT[task]}-{'cue' if cue else 'nocue'}",
                        task=task,
                        question_types=[task] * len(first),
                        site_cue=cue,
                        **extra,
                    )
                )
        return samples

    def summary_lines(self) -> list[str]:
        """Usage, cost and counts of this run, for the instruct summary."""
        lines = self.client.render_usage().splitlines()
        lines += [f"  {what}: {n}" for what, n in sorted(self.stats.items())]
        lines += [f"  turns dropped ({reason}): {n}" for reason, n in sorted(self.dropped.items())]
        if self.config.dry_run:
            lines.append(
                "  dry run: each rewrite request's answers (unknown until the first reply) are counted as "
                "one full reply (max_tokens); repair requests (sent only after an unusable reply) are "
                "not in the estimate; nothing was written (no instruction files, journal or reply cache)"
            )
            return lines
        if self.journal is not None:
            lines.append(f"  journal: {self.journal}")
        if self.config.cache is not None:
            lines.append(f"  reply cache: {self.config.cache}")
        return lines

    def close(self) -> None:
        self.client.close()
