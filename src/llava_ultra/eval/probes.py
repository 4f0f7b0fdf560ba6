"""POPE-style probes: yes/no questions about present and absent findings, and their scores.

What this file owns: `build_probes` (reports -> probe eval samples in the instruct eval format,
so `llava-ultra eval` runs them like any eval set), `run_probes` (`llava-ultra probes`: read a
SynthUS or reports folder, write the probe JSON), and the scoring side used by
`hallucination.py`: `is_probe`, `probe_row`, `pope_aggregate` (accuracy, precision, recall, F1
and the yes-ratio with 95% bootstrap CIs, per strategy, per language and pooled).

Construction (POPE, Li et al. 2023, adapted to reports that hold 0..n findings):
- Positives: one 'yes' question per finding type present in the report (ground truth from
  `findings.truth_facts`: SynthUS meta, else the report text).
- Negatives: 'no' questions about finding types absent from the report, as many in total as
  there are positives (a balanced set: an always-yes model scores accuracy 50 and yes-ratio
  100). Reports take turns in a seeded order, one negative per turn, so normal reports are
  probed too. Which absent type a report is asked about depends on the strategy:
  `random` (uniform, seeded per report), `popular` (most frequent types in the probed reports
  first) and `adversarial` (types co-occurring with the report's findings first, then the types
  most frequent at the report's site: the ones a model that guesses from the site would claim).
- Every strategy is a full set with the same positives, as in POPE's three settings. The zh and
  en records of a report (same id) get the same probes, so the languages are parallel.
- Questions reuse the presence templates and finding words of `data/instruct.py` (是否存在结节？/
  Is there a nodule?), answers are 是/否 and yes/no. Everything is a pure function of
  (reports, seed): the same call writes the same bytes.
- A prediction's label: the answer states the probed finding -> yes; denies it (or any
  finding), or describes only other findings -> no (the findings extractor); an answer stating no
  finding is read by the strict yes/no cues (`metrics.yes_no_label`); an
  answer read neither way counts as wrong and as `unanswered`, never dropped. How each answer
  was read is counted (`read_by`): a model never taught yes/no questions can still be probed.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data.instruct import ANSWERS, PRESENCE_TERMS, QUESTIONS, image_root_of
from ..data.reports import Report, read_reports
from ..data.samples import check_sample, image_prompt
from ..errors import ConfigError, DataError
from . import metrics
from .findings import ANY, Vocabulary, default_vocabulary, extract_findings, truth_facts

STRATEGIES = ("random", "popular", "adversarial")
QUESTION_TYPE = "probe"


# ---------------------------------------------------------------------------------- building


def report_truth(report: Report, vocab: Vocabulary | None = None) -> list[Any]:
    """The present findings of a report (`findings.truth_facts` on its fields and meta)."""
    record = {
        "findings": report.findings,
        "diagnosis": report.diagnosis,
        "language": report.language,
        "meta": report.meta,
    }
    return truth_facts(record, vocab)[0]


def _word(ftype: str, language: str, vocab: Vocabulary) -> str:
    word = PRESENCE_TERMS.get(language, {}).get(ftype)
    if word:
        return word
    terms = vocab.terms(ftype, language)
    return terms[0] if terms else ftype


def _rank(
    strategy: str,
    absent: list[str],
    present: set[str],
    site: str,
    seed: int,
    report_id: str,
    freq: Counter[str],
    site_freq: dict[str, Counter[str]],
    cooc: dict[str, Counter[str]],
    order: dict[str, int],
) -> list[str]:
    if strategy == "random":
        out = sorted(absent, key=order.__getitem__)
        random.Random(f"{seed}/probe/{report_id}").shuffle(out)
        return out
    if strategy == "popular":
        return sorted(absent, key=lambda t: (-freq[t], order[t]))
    return sorted(
        absent,
        key=lambda t: (-sum(cooc[p][t] for p in present), -site_freq[site][t], -freq[t], order[t]),
    )


def build_probes(
    reports: Sequence[Report],
    *,
    seed: int = 0,
    strategies: Sequence[str] = STRATEGIES,
    vocab: Vocabulary | None = None,
) -> list[dict[str, Any]]:
    """Probe eval samples for `reports` (any mix of zh and en records), deterministic by `seed`.

    Image paths are the reports' own (relative to their folder). Sample ids are `<report id>-<lang>-probe-<strategy>-<type>`.
    """
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown or not strategies:
        raise ConfigError(f"probe strategies {list(strategies)}: use any of {', '.join(STRATEGIES)}")
    vocab = vocab or default_vocabulary()
    types = list(vocab.types)
    order = {t: i for i, t in enumerate(types)}
    truth: dict[tuple[str, str], set[str]] = {}
    site_of: dict[str, str] = {}
    for r in reports:
        truth[(r.id, r.language)] = {f.type for f in report_truth(r, vocab) if f.type in order}
        site_of[r.id] = r.site
    # frequencies over reports (each report once, whatever its languages)
    per_report: dict[str, set[str]] = {}
    for (rid, _), present in sorted(truth.items()):
        per_report.setdefault(rid, present)
    freq: Counter[str] = Counter(t for p in per_report.values() for t in p)
    site_freq: dict[str, Counter[str]] = {}
    cooc: dict[str, Counter[str]] = {t: Counter() for t in types}
    for rid, present in per_report.items():
        site_freq.setdefault(site_of[rid], Counter()).update(present)
        for a in present:
            cooc[a].update(b for b in present if b != a)
    ids = sorted(per_report)
    random.Random(f"{seed}/probe-order").shuffle(ids)
    n_pos = sum(len(p) for p in per_report.values())
    target = n_pos if n_pos else len(ids)

    # which absent types each report is asked about, per strategy (shared by its languages)
    negatives: dict[str, dict[str, list[str]]] = {}
    for strategy in strategies:
        ranked = {
            rid: _rank(
                strategy,
                [t for t in types if t not in per_report[rid]],
                per_report[rid],
                site_of[rid],
                seed,
                rid,
                freq,
                site_freq,
                cooc,
                order,
            )
            for rid in ids
        }
        chosen: dict[str, list[str]] = {rid: [] for rid in ids}
        count, turn = 0, 0
        while count < target and any(turn < len(v) for v in ranked.values()):
            for rid in ids:
                if count < target and turn < len(ranked[rid]):
                    chosen[rid].append(ranked[rid][turn])
                    count += 1
            turn += 1
        negatives[strategy] = chosen

    samples = []
    for r in sorted(reports, key=lambda r: (r.id, r.language)):
        present = truth[(r.id, r.language)]
        facts = [f.as_dict() for f in report_truth(r, vocab)]
        images = list(r.images)
        for strategy in strategies:
            asks = [(t, True) for t in sorted(present, key=order.__getitem__)]
            asks += [(t, False) for t in negatives[strategy][r.id]]
            for ftype, label in asks:
                rng = random.Random(f"{seed}/probe-q/{r.id}/{ftype}")
                question = rng.choice(QUESTIONS[r.language]["presence"]).format(
                    finding=_word(ftype, r.language, vocab)
                )
                answer = ANSWERS[r.language]["yes" if label else "no"][0]
                sample = {
                    "id": f"{r.id}-{r.language}-probe-{strategy}-{ftype}",
                    "report_id": r.id,
                    "images": images,
                    "conversations": [
                        {"from": "human", "value": image_prompt(question, len(images))},
                        {"from": "gpt", "value": answer},
                    ],
                    "language": r.language,
                    "site": r.site,
                    "task": "probe",
                    "question_types": [QUESTION_TYPE],
                    "site_cue": False,
                    "findings": r.findings,
                    "valid": list(r.valid) if r.valid is not None else None,
                    "question_type": QUESTION_TYPE,
                    "answer_type": "CLOSED",
                    "probe": {"strategy": strategy, "finding": ftype, "label": "yes" if label else "no"},
                    "truth": facts,
                }
                check_sample(sample)
                samples.append(sample)
    return samples


@dataclass
class ProbeSummary:
    """What `run_probes` wrote."""

    out: Path
    reports: int
    spec: str
    """The dataset spec `llava-ultra eval --data` takes for the file (names the image root when
    the file does not sit where its image paths resolve)."""
    counts: dict[str, dict[str, int]] = field(default_factory=dict)

    def render(self) -> str:
        lines = [f"probes -> {self.out} ({self.reports} report records)"]
        for strategy, c in self.counts.items():
            lines.append(f"  {strategy:<12} {c['yes']} yes, {c['no']} no")
        lines.append(f"evaluate: llava-ultra eval --model CKPT --data '{self.spec}' --out RUN")
        return "\n".join(lines)


def _report_files(source: Path, split: str, languages: Iterable[str]) -> list[Path]:
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise DataError(f"{source} does not exist; pass a SynthUS folder or a reports .jsonl file")
    files = [source / f"{split}.{lang}.jsonl" for lang in languages]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise DataError(
            f"{missing[0]} not found; pass a folder written by `llava-ultra synth` (or a reports file) "
            "and a split it has (--split train|val|test)"
        )
    return files


def run_probes(
    source: str | Path,
    out: str | Path,
    *,
    split: str = "test",
    languages: Sequence[str] = ("zh", "en"),
    seed: int = 0,
    strategies: Sequence[str] = STRATEGIES,
    vocab: Vocabulary | None = None,
) -> ProbeSummary:
    """Read the reports of `split` (SynthUS folder) or a reports file, write the probe eval JSON.

    Image paths stay as the reports store them (relative to the reports' folder); the summary's
    `spec` names that folder as the image root (`ultra:OUT?root=DIR`) unless the `ultra:` reader
    finds it by itself (`out` in that folder, or beside an `instruct_meta.json` pointing there).
    """
    source, out = Path(source), Path(out)
    files = _report_files(source, split, languages)
    reports = [r for f in files for r in read_reports(f) if r.language in languages]
    if not reports:
        raise DataError(f"no {'/'.join(languages)} reports in {', '.join(map(str, files))}")
    out.parent.mkdir(parents=True, exist_ok=True)
    data_root = (source.parent if source.is_file() else source).resolve()
    reader_root = (
        image_root_of(out.parent) if (out.parent / "instruct_meta.json").is_file() else out.parent.resolve()
    )
    samples = build_probes(reports, seed=seed, strategies=strategies, vocab=vocab)
    out.write_text(json.dumps(samples, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    spec = f"ultra:{out}" if reader_root == data_root else f"ultra:{out}?root={data_root}"
    counts = {s: {"yes": 0, "no": 0} for s in strategies}
    for s in samples:
        counts[s["probe"]["strategy"]][s["probe"]["label"]] += 1
    return ProbeSummary(out, len(reports), spec, counts)


# ----------------------------------------------------------------------------------- scoring


def probe_info(sample: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The sample's `probe` block (top level, or under `meta` after the dataset reader)."""
    meta = sample.get("meta") if isinstance(sample.get("meta"), Mapping) else {}
    for holder in (sample, meta):
        info = holder.get("probe")
        if isinstance(info, Mapping) and info.get("label") in ("yes", "no"):
            return info
    return None


def is_probe(sample: Mapping[str, Any]) -> bool:
    """Is this a probe question (written by `build_probes`)?"""
    return probe_info(sample) is not None


def read_probe_answer(
    text: str, finding: str | None, language: str, vocab: Vocabulary | None = None
) -> tuple[str | None, str | None]:
    """(label, how) of a probe answer: 'yes' / 'no' / None, read by 'findings', 'cue' or None.

    First the findings extractor: an answer that states the probed finding type is a yes; one that
    denies it (or denies any finding: 未见明显异常), or describes only other findings, is a no.
    Only an answer that states no finding is read by the strict yes/no cues (是 / 否 / yes / no
    ...). The order matters for Chinese, where 可见 is a yes cue wherever it stands: '右肾可见一无
    回声区' describes a cyst, and answers 'is there a nodule?' with no.
    """
    facts = extract_findings(text, language, vocab) if finding else []
    if any(f.type == finding and not f.negated for f in facts):
        return "yes", "findings"
    if any(f.negated and f.type in (finding, ANY) for f in facts) or any(not f.negated for f in facts):
        return "no", "findings"
    label = metrics.yes_no_label(metrics.normalize_strict(text or "", language))
    return label, ("cue" if label else None)


def probe_row(sample: Mapping[str, Any], text: str, vocab: Vocabulary | None = None) -> dict[str, Any]:
    """Label, reading of the answer (`read_probe_answer`), strategy and language of one probe."""
    info = probe_info(sample)
    if info is None:
        raise DataError(f"sample {sample.get('id')!r} is not a probe (no probe.label yes/no)")
    lang = sample.get("language") if sample.get("language") in ("zh", "en") else metrics.detect_language(text)
    predicted, how = read_probe_answer(text or "", info.get("finding"), lang, vocab)
    return {
        "strategy": str(info.get("strategy", "unknown")),
        "finding": info.get("finding"),
        "label": info["label"],
        "predicted": predicted,
        "read_by": how,
        "language": lang,
    }


def _pope(labels: np.ndarray, predicted: np.ndarray, answered: np.ndarray) -> dict[str, Any]:
    """POPE figures x 100 along the last axis (so a (resamples, n) stack gives one per resample).

    labels / predicted: True = yes; answered: the answer had a yes/no cue. A figure whose
    denominator is 0 is NaN.
    """
    n = labels.shape[-1]
    yes = predicted & answered
    tp = (yes & labels).sum(axis=-1).astype(float)
    fp = (yes & ~labels).sum(axis=-1).astype(float)
    fn = (~yes & labels).sum(axis=-1).astype(float)
    correct = ((predicted == labels) & answered).sum(axis=-1).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "accuracy": 100.0 * correct / n,
            "precision": 100.0 * tp / (tp + fp),
            "recall": 100.0 * tp / (tp + fn),
            "f1": 100.0 * 2 * tp / (2 * tp + fp + fn),
            "yes_ratio": 100.0 * yes.sum(axis=-1) / n,
        }


def _pope_block(rows: Sequence[Mapping[str, Any]], n_boot: int, seed: int) -> dict[str, Any]:
    labels = np.array([r["label"] == "yes" for r in rows], dtype=bool)
    predicted = np.array([r["predicted"] == "yes" for r in rows], dtype=bool)
    answered = np.array([r["predicted"] is not None for r in rows], dtype=bool)
    out: dict[str, Any] = {
        "n": len(rows),
        "n_yes_labels": int(labels.sum()),
        "unanswered": int((~answered).sum()),
        "read_by_findings": sum(r.get("read_by") == "findings" for r in rows),
    }
    if not rows:
        out.update(dict.fromkeys(("accuracy", "precision", "recall", "f1", "yes_ratio")), ci={})
        return out
    for key, value in _pope(labels, predicted, answered).items():
        out[key] = None if np.isnan(value) else float(value)
    ci: dict[str, list[float] | None] = {}
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, len(rows), size=(n_boot, len(rows)))
        draws = _pope(labels[idx], predicted[idx], answered[idx])
        for key in ("accuracy", "f1", "yes_ratio"):
            vals = draws[key][~np.isnan(draws[key])]
            ci[key] = [float(x) for x in np.quantile(vals, [0.025, 0.975])] if vals.size else None
    out["ci"] = ci
    return out


def pope_aggregate(rows: Sequence[Mapping[str, Any]], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """POPE figures over probe rows: pooled ('all'), per strategy and per language."""
    strategies = [s for s in STRATEGIES if any(r["strategy"] == s for r in rows)]
    strategies += sorted({r["strategy"] for r in rows} - set(strategies))
    languages = sorted({r["language"] for r in rows})
    return {
        "all": _pope_block(rows, n_boot, seed),
        "by_strategy": {
            s: _pope_block([r for r in rows if r["strategy"] == s], n_boot, seed) for s in strategies
        },
        "by_language": {
            g: _pope_block([r for r in rows if r["language"] == g], n_boot, seed) for g in languages
        },
        "rule": "the probed finding stated -> yes; denied, or only other findings described -> no; "
        "else strict yes/no cues; 'yes' is the "
        "positive class; an answer read neither way is wrong (unanswered)",
    }
