"""Reports -> LLaVA-style instruction samples: stage-1 captions, stage-2 conversations, eval QA.

One report with k frames becomes samples in the paper's template
`Human: X_q X_v^1..X_v^k <STOP> Assistant: X_c <STOP>`, stored the LLaVA way:

    {"id", "report_id", "images": [k paths relative to the dataset root],
     "conversations": [{"from": "human", "value": "<image>\\n...<image>\\nquestion"},
                       {"from": "gpt", "value": answer}, ...],
     "language", "site", "task", "question_types", "site_cue", "findings", "valid"}

Notable choices:
- The first human turn carries exactly one `<image>` per frame, placeholders first and joined by
  newlines (LLaVA's convention; the paper writes X_q before X_v, but the collator expands the
  placeholders wherever they stand, so only the count matters). Later turns carry none.
  `check_sample` enforces this and names both counts when they disagree.
- Answers are copied from the report text (findings, diagnosis, history, sentences holding a
  measurement) or name the site from `llava_ultra.sites`; templates only add framing words, so no
  fact is invented. A report's language picks the templates: Chinese reports give Chinese
  samples, English reports English ones.
- Two variants, as in the paper: `site_cue=True` names the examination site in the first
  question ("这是一张甲状腺超声图像，请描述所见。"); `site_cue=False` never names a site in any
  question, and its first answer states the site ("该图像为甲状腺超声。...").
- Randomness (which phrasing, which turns) comes from a `random.Random` seeded by
  (seed, language, report id, purpose), so a sample does not depend on the order or number of the
  other reports and re-runs are byte-identical.
- Stage-2 conversations come from an `InstructionGenerator`; `TemplateGenerator` lives here, the
  LLM-backed `llm_instruct.LLMGenerator` is registered as `llm` (imported on first use), and
  others can be added with `register_generator`. A generator with a `prefetch(reports)` method
  gets all reports of a split first (the LLM one runs them concurrently and resumably). Stage-1
  captions and the eval set are always template-built: they must stay short and exactly checkable.
- The eval set has one single-turn sample per (report, question type) with `question_type` and
  `answer_type` ("OPEN", or "CLOSED" for yes/no presence questions such as "是否存在结节？").
  History is not asked at eval time: it cannot be seen in the images.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..errors import DataError
from ..sites import FINDING_TYPES, site_name
from .reports import Report, read_reports_lenient, report_files, resolve_image
from .samples import (
    CUE_PREFIXES,
    check_sample,
    cue_flags,
    find_measurements,
    make_sample,
)

LANGUAGE_CHOICES = ("zh", "en", "both")
OPEN, CLOSED = "OPEN", "CLOSED"

# ------------------------------------------------------------------------------------ templates
# Every question template is site-free; the cue variant prepends one of CUE_PREFIXES.

QUESTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "zh": {
        "site": ("这是哪个部位的超声检查？", "这组超声图像显示的是哪个部位？", "请问这是什么部位的超声？"),
        "findings": ("请描述超声所见。", "请描述这组超声图像。", "图像中可以看到什么？"),
        "diagnosis": ("超声诊断是什么？", "请根据图像给出诊断。", "这组超声图像提示什么诊断？"),
        "measurement_lesion": ("病灶大小是多少？", "病灶的测量值是多少？", "请给出病灶的大小。"),
        "measurement": ("报告中有哪些测量值？", "请给出图像中的测量结果。"),
        "history": ("患者的临床病史是什么？", "这次检查的病史是什么？"),
        "caption": ("简要描述这组图像。", "请简要描述这张超声图像。", "用一句话概括这组超声图像。"),
        "presence": ("是否存在{finding}？", "图像中有{finding}吗？"),
    },
    "en": {
        "site": (
            "Which organ is examined?",
            "What body part is this ultrasound image from?",
            "Which examination site does this ultrasound show?",
        ),
        "findings": (
            "Describe the ultrasound findings.",
            "What do you see in this ultrasound?",
            "Please describe the image.",
        ),
        "diagnosis": (
            "What is the ultrasound diagnosis?",
            "Give the diagnosis of this ultrasound image.",
            "What diagnosis do these images suggest?",
        ),
        "measurement_lesion": (
            "How large is the lesion?",
            "What is the size of the lesion?",
            "Give the measurements of the lesion.",
        ),
        "measurement": ("What measurements are reported?", "Give the measurements seen in the image."),
        "history": ("What is the clinical history?", "What is the reason for this examination?"),
        "caption": (
            "Briefly describe the image.",
            "Give a short description of these ultrasound images.",
            "Summarise this ultrasound in one sentence.",
        ),
        "presence": ("Is there a {finding}?", "Does the image show a {finding}?"),
    },
}

# "{x}" is the report text being quoted; "{site}" the site name.
ANSWERS: dict[str, dict[str, tuple[str, ...]]] = {
    "zh": {
        "site": ("该图像为{site}超声。", "这是{site}超声检查。", "检查部位为{site}。"),
        "findings": ("{x}", "超声所见：{x}", "图像显示：{x}"),
        "diagnosis": ("超声诊断：{x}", "根据超声所见，诊断为：{x}", "{x}"),
        "measurement": ("{x}", "测量结果：{x}"),
        "history": ("患者病史：{x}", "{x}"),
        "yes": ("是",),
        "no": ("否",),
    },
    "en": {
        "site": (
            "This is a {site} ultrasound.",
            "The examination site is the {site}.",
            "This ultrasound examines the {site}.",
        ),
        "findings": ("{x}", "The ultrasound shows: {x}", "Findings: {x}"),
        "diagnosis": (
            "Ultrasound diagnosis: {x}",
            "Based on the ultrasound findings, the diagnosis is: {x}",
            "{x}",
        ),
        "measurement": ("{x}", "Measurements: {x}"),
        "history": ("Clinical history: {x}", "{x}"),
        "yes": ("yes",),
        "no": ("no",),
    },
}

# Word used in yes/no presence questions, and the words that spot it in report text.
PRESENCE_TERMS: dict[str, dict[str, str]] = {
    "zh": {"cyst": "囊肿", "nodule": "结节", "calcification": "钙化", "stone": "结石"},
    "en": {"cyst": "cyst", "nodule": "nodule", "calcification": "calcification", "stone": "stone"},
}
# A negation before a lesion word in the same clause rules the lesion out. "无回声" (anechoic)
# describes echogenicity, not absence, so it is removed before looking.
NEGATIONS: dict[str, re.Pattern[str]] = {
    "zh": re.compile(r"未见|未探及|未发现|没有|无"),
    "en": re.compile(r"\b(?:no|not|without|negative for|absence of)\b"),
}

_SENTENCE_END = {"zh": re.compile(r"(?<=[。；;！？!?\n])"), "en": re.compile(r"(?<=[.;!?])\s+|\n")}
_CLAUSE_SPLIT = re.compile(r"[，。；,;！？!?\n]|\.(?!\d)")

# --------------------------------------------------------------------------- text helpers (pure)


def sentences(text: str, language: str) -> list[str]:
    """Split report text into sentences, keeping their punctuation; decimals are never split."""
    parts = _SENTENCE_END[language].split(text.strip())
    return [p.strip() for p in parts if p and p.strip()]


def measurement_text(report: Report) -> str:
    """The report's sentences that hold a measurement, verbatim (findings first, then diagnosis)."""
    for text in (report.findings, report.diagnosis):
        hits = [s for s in sentences(text, report.language) if find_measurements(s)]
        if hits:
            return ("" if report.language == "zh" else " ").join(hits)
    return ""


def presence_facts(report: Report) -> dict[str, bool]:
    """Which lesion types the report affirms (True) or explicitly rules out (False).

    `meta["finding_type"]` (one of `FINDING_TYPES`, e.g. from SynthUS) is trusted as the report's
    only finding: it is present and every other lesion type whose word is absent from the text is
    absent. Without it the text decides, clause by clause: a lesion word preceded by a negation
    in its clause ("未见明显结节", "no stone") is absent, otherwise present; a type the text both
    affirms and negates is left out.
    """
    terms = PRESENCE_TERMS[report.language]
    text = f"{report.findings}\n{report.diagnosis}"
    finding_type = report.meta.get("finding_type")
    if finding_type in FINDING_TYPES:
        facts = {t: False for t, word in terms.items() if t != finding_type and word not in text.lower()}
        if finding_type in terms:
            facts[finding_type] = True
        return facts
    seen: dict[str, set[bool]] = {}
    for clause in _CLAUSE_SPLIT.split(text):
        low = clause.lower()
        for ftype, word in terms.items():
            at = low.find(word)
            if at < 0:
                continue
            negated = bool(NEGATIONS[report.language].search(low[:at].replace("无回声", "")))
            seen.setdefault(ftype, set()).add(not negated)
    return {t: next(iter(v)) for t, v in seen.items() if len(v) == 1}


# ---------------------------------------------------------------------------------- generators


@runtime_checkable
class InstructionGenerator(Protocol):
    """Turns one report into stage-2 samples (built with `make_sample`, so they pass check_sample).

    Options such as which site-cue variants to produce are constructor arguments; `generate` is
    called once per report with an rng seeded for that report, so results are reproducible and
    independent of report order. Raise DataError for a report that cannot be used: the batch
    records it and goes on.
    """

    name: str

    def generate(self, report: Report, rng: random.Random) -> list[dict[str, Any]]: ...


def _variant(cue: bool) -> str:
    return "cue" if cue else "nocue"


def _site(report: Report) -> str:
    return site_name(report.site, report.language)


def _question(report: Report, qtype: str, rng: random.Random, cue: bool, **fmt: str) -> str:
    question = rng.choice(QUESTIONS[report.language][qtype]).format(**fmt)
    if cue:
        question = rng.choice(CUE_PREFIXES[report.language]).format(site=_site(report)) + question
    return question


def _answer(report: Report, kind: str, rng: random.Random, text: str = "") -> str:
    return rng.choice(ANSWERS[report.language][kind]).format(x=text.strip(), site=_site(report))


def _join(language: str, *parts: str) -> str:
    return ("" if language == "zh" else " ").join(p for p in parts if p)


def _has_lesion(report: Report) -> bool:
    ftype = report.meta.get("finding_type")
    return ftype in FINDING_TYPES and ftype != "none"


def _content(report: Report) -> dict[str, str]:
    """Question type -> the report text its answer quotes (types with no text are left out)."""
    content = {
        "findings": report.findings.strip(),
        "measurement": measurement_text(report),
        "diagnosis": report.diagnosis.strip(),
        "history": report.history.strip(),
    }
    return {k: v for k, v in content.items() if v}


def _ask(report: Report, qtype: str, rng: random.Random, cue: bool) -> str:
    """A question of type `qtype`; measurements are asked as lesion size when meta names a lesion."""
    asked = "measurement_lesion" if qtype == "measurement" and _has_lesion(report) else qtype
    return _question(report, asked, rng, cue)


class TemplateGenerator:
    """Multi-turn (up to 4 turns) conversations from question/answer templates.

    Each conversation opens with the findings (or the diagnosis when findings are blank) and adds
    up to three turns drawn from site (no-cue variant only), measurement, diagnosis and history,
    as far as the report has text for them; a report with a single usable field gives a single
    turn. In the no-cue variant the site is stated either by its own first turn or at the start
    of the first answer.
    """

    name = "template"

    def __init__(self, site_cue: str = "both") -> None:
        self.cues = cue_flags(site_cue)

    def generate(self, report: Report, rng: random.Random) -> list[dict[str, Any]]:
        return [self._conversation(report, rng, cue) for cue in self.cues]

    def _conversation(self, report: Report, rng: random.Random, cue: bool) -> dict[str, Any]:
        content = _content(report)
        anchor = "findings" if "findings" in content else "diagnosis"
        optional = [t for t in ("measurement", "diagnosis", "history") if t in content and t != anchor]
        if not cue:
            optional.insert(0, "site")
        n_turns = rng.randint(2, 4)
        chosen = set(rng.sample(optional, min(n_turns - 1, len(optional))))
        order = ["site"] if "site" in chosen else []
        order += [anchor] + [t for t in optional if t in chosen and t != "site"]
        turns = []
        for i, qtype in enumerate(order):
            question = _ask(report, qtype, rng, cue and i == 0)
            answer = _answer(report, qtype, rng, content.get(qtype, ""))
            if i == 0 and not cue and qtype != "site":
                answer = _join(report.language, _answer(report, "site", rng), answer)
            turns.append((question, answer))
        return make_sample(
            report,
            turns,
            sample_id=f"{report.id}-{report.language}-conv-{_variant(cue)}",
            task="conversation",
            question_types=order,
            site_cue=cue,
        )


def _llm_generator(**options: Any) -> InstructionGenerator:
    """`--generator llm`: imported on use, so the template path never loads the LLM client."""
    from .llm_instruct import LLMGenerator

    return LLMGenerator(**options)


GENERATORS: dict[str, Callable[..., InstructionGenerator]] = {
    "template": TemplateGenerator,
    "llm": _llm_generator,
}


def register_generator(name: str, factory: Callable[..., InstructionGenerator]) -> None:
    """Make `llava-ultra instruct --generator NAME` build its generator with `factory(**options)`."""
    GENERATORS[name] = factory


def make_generator(name: str, **options: Any) -> InstructionGenerator:
    """Build a registered generator by name; unknown names raise DataError listing the known ones."""
    if name not in GENERATORS:
        raise DataError(
            f"unknown instruction generator {name!r}; use one of: {', '.join(sorted(GENERATORS))}"
        )
    return GENERATORS[name](**options)


# ------------------------------------------------------------------------ stage 1 and eval sets


def build_captions(report: Report, rng: random.Random, cues: Iterable[bool]) -> list[dict[str, Any]]:
    """Stage-1 concept-alignment samples: one brief instruction, answer = site + main statement.

    The main statement is the first sentence of the diagnosis (of the findings when the
    diagnosis is blank), so captions stay one or two sentences long.
    """
    main = sentences(report.diagnosis.strip() or report.findings, report.language)[0]
    out = []
    for cue in cues:
        question = _question(report, "caption", rng, cue)
        answer = _join(report.language, _answer(report, "site", rng), main)
        out.append(
            make_sample(
                report,
                [(question, answer)],
                sample_id=f"{report.id}-{report.language}-cap-{_variant(cue)}",
                task="caption",
                question_types=["caption"],
                site_cue=cue,
            )
        )
    return out


def build_eval(report: Report, rng: random.Random, cues: Iterable[bool]) -> list[dict[str, Any]]:
    """Single-turn eval QA: one sample per (report, question type, variant).

    OPEN answers are the bare report text (site sentence, findings, measurement sentences,
    diagnosis). The site question is asked only without a cue (with one it answers itself).
    CLOSED presence questions come from `presence_facts`: at most one 'yes' and one 'no' per
    report, answered 是/否 or yes/no.
    """
    content = _content(report)
    facts = presence_facts(report)
    positives = sorted(t for t, v in facts.items() if v)
    negatives = sorted(t for t, v in facts.items() if not v)
    closed = positives[:1] + ([rng.choice(negatives)] if negatives else [])
    out = []
    for cue in cues:
        items: list[tuple[str, str, str, str]] = []  # (id part, answer_type, question, answer)
        if not cue:
            items.append(("site", OPEN, _question(report, "site", rng, False), _answer(report, "site", rng)))
        for qtype in ("findings", "measurement", "diagnosis"):
            if qtype in content:
                items.append((qtype, OPEN, _ask(report, qtype, rng, cue), content[qtype]))
        for ftype in closed:
            word = PRESENCE_TERMS[report.language][ftype]
            answer = ANSWERS[report.language]["yes" if facts[ftype] else "no"][0]
            items.append(
                (f"presence-{ftype}", CLOSED, _question(report, "presence", rng, cue, finding=word), answer)
            )
        for key, answer_type, question, answer in items:
            qtype = key.split("-")[0]
            out.append(
                make_sample(
                    report,
                    [(question, answer)],
                    sample_id=f"{report.id}-{report.language}-eval-{key}-{_variant(cue)}",
                    task="qa",
                    question_types=[qtype],
                    site_cue=cue,
                    question_type=qtype,
                    answer_type=answer_type,
                )
            )
    return out


# ------------------------------------------------------------------------------------ batches


@dataclass
class BadItem:
    """A report (or line) that was skipped, where it was, and why."""

    where: str
    reason: str


@dataclass
class InstructSet:
    """The three sample sets built from one list of reports, plus the reports that failed."""

    stage1: list[dict[str, Any]] = field(default_factory=list)
    stage2: list[dict[str, Any]] = field(default_factory=list)
    eval: list[dict[str, Any]] = field(default_factory=list)
    bad: list[BadItem] = field(default_factory=list)
    reports: int = 0
    no_stage2: list[BadItem] = field(default_factory=list)
    """Reports the generator failed on (e.g. every LLM task refused or invalid): no stage-2 samples,
    their template-built captions and eval QA kept."""


def report_rng(seed: int, report: Report, purpose: str) -> random.Random:
    """An rng for one (report, purpose); string seeds hash with SHA-512, stable across runs."""
    return random.Random(f"{seed}/{report.language}/{report.id}/{purpose}")


def build_instructions(
    reports: Iterable[Report],
    generator: InstructionGenerator,
    *,
    seed: int = 0,
    site_cue: str = "both",
    image_root: Path | str = ".",
) -> InstructSet:
    """Captions, generator conversations and eval QA for every report; bad reports are recorded.

    A report whose own data is unusable (duplicate id, image outside the root, text the templates
    refuse) contributes no sample (recorded in `bad` with the reason). A report the stage-2
    generator fails on (an LLM that refused or never gave valid JSON) keeps its template-built
    captions and eval QA and gets no stage-2 sample (recorded in `no_stage2`), so an LLM failure
    never removes a report from the template-built files. Only DataError is caught: anything else
    (a bug, an unreachable LLM endpoint) propagates.
    """
    cues = cue_flags(site_cue)
    result = InstructSet()
    seen: set[tuple[str, str]] = set()
    prefetch = getattr(generator, "prefetch", None)
    if callable(prefetch):  # batch generators (the LLM one) work on all reports at once
        reports = list(reports)
        prefetch(reports)
    for report in reports:
        result.reports += 1
        try:
            if (report.id, report.language) in seen:
                raise DataError(
                    f"duplicate report id {report.id!r} ({report.language}); make report ids unique"
                )
            for rel in report.images:
                resolve_image(image_root, rel)
            stage1 = build_captions(report, report_rng(seed, report, "caption"), cues)
            evals = build_eval(report, report_rng(seed, report, "eval"), cues)
        except DataError as exc:
            result.bad.append(BadItem(f"report {report.id}", str(exc)))
            continue
        try:
            stage2 = generator.generate(report, report_rng(seed, report, "conversation"))
            for sample in stage2:
                check_sample(sample)
        except DataError as exc:
            result.no_stage2.append(BadItem(f"report {report.id}", str(exc)))
            stage2 = []
        seen.add((report.id, report.language))
        result.stage1 += stage1
        result.stage2 += stage2
        result.eval += evals
    return result


def split_of(path: Path) -> str:
    """Split name of a reports file: its name up to the first dot ('train.zh.jsonl' -> 'train')."""
    return path.name.split(".")[0]


def _language_of(path: Path) -> str | None:
    parts = path.name.split(".")
    return parts[1] if len(parts) == 3 and parts[1] in ("zh", "en") else None


@dataclass
class InstructSummary:
    """What `run_instruct` wrote: per-split counts, skipped files and bad reports."""

    out_dir: Path
    counts: dict[str, dict[str, int]]
    bad: list[BadItem]
    skipped_files: list[str]
    notes: list[str] = field(default_factory=list)
    no_stage2: list[BadItem] = field(default_factory=list)
    dry_run: bool = False

    def render(self, max_bad: int = 20) -> str:
        head = (
            f"dry run: nothing written to {self.out_dir}"
            if self.dry_run
            else f"instruction data -> {self.out_dir}"
        )
        lines = [head, *self.notes]
        for split, c in self.counts.items():
            lines.append(
                f"  {split}: {c['reports']} reports -> stage1 {c['stage1']}, stage2 {c['stage2']}, eval {c['eval']}"
            )
        lines += [f"  skipped {name}" for name in self.skipped_files]
        if self.bad:
            lines.append(f"  {len(self.bad)} bad reports skipped:")
            lines += [f"    {b.where}: {b.reason}" for b in self.bad[:max_bad]]
            if len(self.bad) > max_bad:
                lines.append(f"    ... {len(self.bad) - max_bad} more in instruct_meta.json")
        if self.no_stage2:
            lines.append(
                f"  {len(self.no_stage2)} reports without stage-2 samples (the generator failed on them; "
                "their captions and eval QA are kept):"
            )
            lines += [f"    {b.where}: {b.reason}" for b in self.no_stage2[:max_bad]]
            if len(self.no_stage2) > max_bad:
                lines.append(f"    ... {len(self.no_stage2) - max_bad} more in instruct_meta.json")
        return "\n".join(lines)


def _write_json_list(path: Path, samples: list[dict[str, Any]]) -> None:
    """A JSON array with one sample per line: valid JSON, compact and diff-friendly."""
    body = ",\n".join(json.dumps(s, ensure_ascii=False) for s in samples)
    path.write_text(f"[\n{body}\n]\n" if samples else "[]\n", encoding="utf-8")


def run_instruct(
    reports_path: Path | str,
    out_dir: Path | str,
    *,
    language: str = "both",
    site_cue: str = "both",
    seed: int = 0,
    generator: str = "template",
    generator_options: dict[str, Any] | None = None,
) -> InstructSummary:
    """Build stage1/stage2/eval sets per split and write them, with `instruct_meta.json`, to out_dir.

    Outputs are `{stage1,stage2,eval}.<split>.json`, the split being the reports file name up to
    its first dot. Image paths stay relative to the reports' dataset root; `instruct_meta.json`
    records that root as `image_root` (relative to out_dir when possible). `generator_options`
    go to the generator's constructor (e.g. the LLM endpoint for `generator="llm"`); a generator
    with `summary_lines()` adds them (usage, cost) to the summary and to `instruct_meta.json`.
    """
    if language not in LANGUAGE_CHOICES:
        raise DataError(f"unknown language {language!r}; use one of: {', '.join(LANGUAGE_CHOICES)}")
    cue_flags(site_cue)
    gen = make_generator(generator, site_cue=site_cue, **(generator_options or {}))
    source, out = Path(reports_path), Path(out_dir)
    files = report_files(source)
    root = source if source.is_dir() else source.parent
    wanted = ("zh", "en") if language == "both" else (language,)

    by_split: dict[str, list[Report]] = {}
    bad: list[BadItem] = []
    skipped: list[str] = []
    for path in files:
        if _language_of(path) not in (None, *wanted):
            continue
        reports, problems = read_reports_lenient(path)
        file_bad = [BadItem(f"{path}:{line}", message) for line, message in problems]
        bad += file_bad
        if not reports and not file_bad:
            if len(files) == 1:
                raise DataError(
                    f"reports file {path} is empty; write one report per line (JSONL) or row (CSV)"
                )
            skipped.append(f"{path.name} (empty)")
            continue
        by_split.setdefault(split_of(path), []).extend(r for r in reports if r.language in wanted)
    if not any(by_split.values()):
        raise DataError(
            f"no usable {'/'.join(wanted)} reports in {source} ({len(bad)} bad lines); "
            "check the --language choice and the report files"
        )

    dry_run = bool(getattr(gen, "dry_run", False))  # prints requests; writes nothing
    if not dry_run:
        out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, dict[str, int]] = {}
    no_stage2: list[BadItem] = []
    for split, reports in by_split.items():
        built = build_instructions(reports, gen, seed=seed, site_cue=site_cue, image_root=root)
        bad += built.bad
        no_stage2 += built.no_stage2
        if not dry_run:
            for name in ("stage1", "stage2", "eval"):
                _write_json_list(out / f"{name}.{split}.json", getattr(built, name))
        counts[split] = {
            "reports": built.reports - len(built.bad),
            "stage1": len(built.stage1),
            "stage2": len(built.stage2),
            "eval": len(built.eval),
        }
    try:
        image_root = os.path.relpath(root.resolve(), out.resolve())
    except ValueError:  # different drives on Windows
        image_root = str(root.resolve())
    notes = list(gen.summary_lines()) if callable(getattr(gen, "summary_lines", None)) else []
    meta = {
        "image_root": image_root,
        "generator": generator,
        "generator_notes": notes,
        "seed": seed,
        "language": language,
        "site_cue": site_cue,
        "splits": counts,
        "skipped_files": skipped,
        "bad": [{"where": b.where, "reason": b.reason} for b in bad],
    }
    if no_stage2:  # only when there are some, so template-only outputs stay byte-identical
        meta["no_stage2"] = [{"where": b.where, "reason": b.reason} for b in no_stage2]
    if not dry_run:
        (out / "instruct_meta.json").write_text(
            json.dumps(meta, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
        )
    return InstructSummary(out, counts, bad, skipped, notes, no_stage2, dry_run)


def image_root_of(out_dir: Path | str) -> Path:
    """The folder the `images` paths of an instruct output resolve against."""
    meta_path = Path(out_dir) / "instruct_meta.json"
    if not meta_path.is_file():
        raise DataError(f"{meta_path} not found; run `llava-ultra instruct` to build {out_dir}")
    return (meta_path.parent / json.loads(meta_path.read_text(encoding="utf-8"))["image_root"]).resolve()
