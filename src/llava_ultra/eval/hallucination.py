"""Hallucination and omission: findings an answer invents, leaves out, puts on the wrong side or
mis-sizes, counted per answer and per run with bootstrap CIs; POPE figures for probe questions.

What this file owns: `check_answer` (answer facts vs ground-truth facts -> one row of counts),
`hallucination_rows` (eval samples + predictions -> those rows, probe rows included),
`aggregate` (rows -> the `scores.json["hallucination"]` block), `by_selected_frame` (the same
over answers whose selected frame was valid vs invalid), and the entry points for other
commands: `hallucination_summary` (one run) and `hallucination_over_seeds` /
`hallucination_delta` (the ablation table's shape: mean +- sd over seeds, CI over questions).

Definitions (docs/metrics.md "Hallucination and omission" is the reference):
- Scope: OPEN answers whose question type is not about something else (`site`, `history`);
  CLOSED probe questions are scored by POPE (`probes.py`) instead.
- Ground truth per sample (`findings.truth_facts`): a `truth` list, structured SynthUS meta, or
  the report's findings text; public sets with none of these fall back to the reference answer.
- Stated findings = the answer's non-negated facts, mentions of one finding merged.
- CHAIR-i = invented / stated over the run, invented = a stated finding whose type is not among
  the ground-truth findings. CHAIR-s = share of answers with at least one invented finding.
- Omission = expected findings the answer does not state / expected findings, where expected =
  ground-truth findings whose type the reference answer states (a site question expects none).
  Contradiction = the expected findings the answer denies ('未见结节' when there is a nodule).
  Measurement questions expect nothing (a size answers them).
- Wrong side = stated findings matched to a true one whose side differs / those where both
  state a side; wrong location likewise for the part (upper pole, quadrant, wall, ...).
- Size error = matched findings with a size on both sides where a dimension is off by more than
  max(`abs_cm`, `rel` x true size) (largest dimension against largest) / those compared.
Ratios over a run are ratios of sums (CHAIR's convention), and their 95% CI is a percentile
bootstrap over answers (numerator and denominator resampled together), seeded like
`metrics.bootstrap_ci`; CHAIR-s, a mean of 0/1 values, uses `metrics.bootstrap_ci` itself.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError
from . import metrics
from .findings import ANY, Fact, Vocabulary, default_vocabulary, extract_findings, merge_facts, truth_facts
from .probes import is_probe, pope_aggregate, probe_row

NOT_ABOUT_FINDINGS = ("site", "history")
"""Question types whose answers are not scanned for findings."""
NO_OMISSION = ("measurement",)
"""Question types that expect no finding to be named (a size question is answered by a size)."""

# metric key -> (numerator count, denominator count); chair_s is a mean of 0/1 per answer
RATIOS: dict[str, tuple[str, str]] = {
    "chair_i": ("invented", "stated"),
    "omission": ("omitted", "expected"),
    "contradiction": ("contradicted", "expected"),
    "wrong_side": ("side_wrong", "side_checked"),
    "wrong_location": ("part_wrong", "part_checked"),
    "size_error": ("size_wrong", "size_checked"),
}
ANSWER_METRICS = (
    "chair_i",
    "chair_s",
    "omission",
    "contradiction",
    "wrong_side",
    "wrong_location",
    "size_error",
)
COUNTS = (
    "stated",
    "invented",
    "expected",
    "omitted",
    "contradicted",
    "side_checked",
    "side_wrong",
    "part_checked",
    "part_wrong",
    "size_checked",
    "size_wrong",
)
LABELS = {
    "chair_i": "CHAIR-i",
    "chair_s": "CHAIR-s",
    "omission": "Omission",
    "contradiction": "Contradiction",
    "wrong_side": "Wrong side",
    "wrong_location": "Wrong location",
    "size_error": "Size error",
    "pope_accuracy": "POPE acc",
    "pope_f1": "POPE F1",
    "pope_yes_ratio": "Yes-ratio",
}


@dataclass(frozen=True)
class Tolerance:
    """A size is wrong when a dimension differs by more than max(abs_cm, rel x true dimension)."""

    abs_cm: float = 0.1
    rel: float = 0.2

    def __post_init__(self) -> None:
        if self.abs_cm < 0 or self.rel < 0:
            raise ConfigError(f"size tolerance {self.abs_cm} cm / {self.rel}: both must be >= 0")

    def wrong(self, stated: Sequence[float], true: Sequence[float]) -> bool:
        """Dimensions compared largest with largest; as many as both give."""
        a, t = sorted(stated, reverse=True), sorted(true, reverse=True)
        return any(abs(x - y) > max(self.abs_cm, self.rel * y) + 1e-9 for x, y in zip(a, t, strict=False))


# ------------------------------------------------------------------------------- per answer


def _conflicts(a: Fact, t: Fact) -> int:
    return sum(x is not None and y is not None and x != y for x, y in ((a.side, t.side), (a.part, t.part)))


def _location_conflict(a: Fact, t: Fact) -> bool:
    return _conflicts(a, t) > 0


def check_answer(
    answer: Sequence[Fact],
    truth: Sequence[Fact],
    expected_types: Sequence[str] | set[str],
    tolerance: Tolerance | None = None,
) -> dict[str, Any]:
    """Counts for one answer: its facts (from `extract_findings`) against the ground-truth facts.

    `expected_types` are the finding types the reference answer states: the ones this answer
    should state too. Returns every key of `COUNTS` plus `invented_types` (sorted).
    """
    tol = tolerance or Tolerance()
    stated = merge_facts([f for f in answer if not f.negated and f.type != ANY])
    denied = [f for f in answer if f.negated]
    row: dict[str, Any] = dict.fromkeys(COUNTS, 0)
    invented: list[str] = []
    row["stated"] = len(stated)
    for f in stated:
        candidates = [t for t in truth if t.type == f.type]
        if not candidates:
            invented.append(f.type)
            continue
        t = min(candidates, key=lambda c: _conflicts(f, c))
        if f.side and t.side:
            row["side_checked"] += 1
            row["side_wrong"] += f.side != t.side
        if f.part and t.part:
            row["part_checked"] += 1
            row["part_wrong"] += f.part != t.part
        if f.size_cm and t.size_cm:
            row["size_checked"] += 1
            row["size_wrong"] += tol.wrong(f.size_cm, t.size_cm)
    row["invented"] = len(invented)
    row["invented_types"] = sorted(invented)
    expected = [t for t in truth if t.type in set(expected_types)]
    row["expected"] = len(expected)
    for t in expected:
        if any(f.type == t.type for f in stated):
            continue
        row["omitted"] += 1
        if any(n.type in (t.type, ANY) and not _location_conflict(n, t) for n in denied):
            row["contradicted"] += 1
    return row


def _text(pred: Any) -> str:
    if isinstance(pred, Mapping):
        pred = pred.get("text")
    return pred if isinstance(pred, str) else ""


def _reference(sample: Mapping[str, Any]) -> str:
    conv = sample.get("conversations") or []
    return str(conv[1].get("value", "")) if len(conv) >= 2 and isinstance(conv[1], Mapping) else ""


def in_scope(sample: Mapping[str, Any]) -> bool:
    """Is this an open answer about findings (scanned for invented findings)?"""
    open_ = str(sample.get("answer_type") or "OPEN").lower() != "closed"
    return open_ and str(sample.get("question_type") or "") not in NOT_ABOUT_FINDINGS


def hallucination_rows(
    samples: Sequence[Mapping[str, Any]],
    predictions: Sequence[Any],
    *,
    vocab: Vocabulary | None = None,
    tolerance: Tolerance | None = None,
) -> list[dict[str, Any]]:
    """One row per sample: kind 'answer' (counts of `check_answer`), 'probe' (POPE label and
    prediction) or None (out of scope). `predictions` are answer texts or prediction records."""
    if len(samples) != len(predictions):
        raise ConfigError(f"{len(samples)} samples but {len(predictions)} predictions; pass one per sample")
    vocab = vocab or default_vocabulary()
    rows: list[dict[str, Any]] = []
    for sample, pred in zip(samples, predictions, strict=True):
        lang = sample.get("language") if sample.get("language") in ("zh", "en") else None
        text = _text(pred)
        qtype = str(sample.get("question_type") or "")
        if is_probe(sample):
            rows.append({"kind": "probe", "question_type": qtype, **probe_row(sample, text, vocab)})
            continue
        if not in_scope(sample):
            rows.append({"kind": None, "question_type": qtype})
            continue
        truth, source = truth_facts(sample, vocab)
        reference = extract_findings(_reference(sample), lang, vocab)
        if source == "none":
            truth, source = (
                merge_facts([f for f in reference if not f.negated and f.type != ANY]),
                "reference",
            )
        expected = {f.type for f in reference if not f.negated and f.type != ANY}
        if qtype in NO_OMISSION:
            expected = set()
        answer = extract_findings(text, lang, vocab)
        row = check_answer(answer, truth, expected, tolerance)
        rows.append({"kind": "answer", "question_type": qtype, "truth_source": source, **row})
    return rows


# ------------------------------------------------------------------------------------ run level


def _bootstrap(
    stat: Callable[[np.ndarray], float], n_items: int, n_boot: int, seed: int
) -> list[float] | None:
    """95% percentile interval of `stat(indices)` over `n_boot` resamples of 0..n_items-1 (NaN
    resamples, e.g. an empty denominator, are left out); None without items or resamples."""
    if n_items == 0 or n_boot <= 0:
        return None
    rng = np.random.default_rng(seed)
    values = np.array([stat(rng.integers(0, n_items, size=n_items)) for _ in range(n_boot)])
    values = values[~np.isnan(values)]
    if values.size == 0:
        return None
    lo, hi = np.quantile(values, [0.025, 0.975])
    return [float(lo), float(hi)]


def ratio_ci(num: Sequence[float], den: Sequence[float], n_boot: int, seed: int = 0) -> list[float] | None:
    """Bootstrap CI (x 100) of sum(num) / sum(den), resampling items (pairs) with replacement;
    vectorised in chunks like `metrics.bootstrap_ci` (same generator, same seed convention)."""
    n, d = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    if n.size == 0 or n_boot <= 0:
        return None
    rng = np.random.default_rng(seed)
    chunk = max(1, 10_000_000 // n.size)
    values = []
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, n.size, size=(min(chunk, n_boot - start), n.size))
        tops, bottoms = n[idx].sum(axis=1), d[idx].sum(axis=1)
        values.append(100.0 * tops[bottoms > 0] / bottoms[bottoms > 0])
    flat = np.concatenate(values)
    if flat.size == 0:
        return None
    lo, hi = np.quantile(flat, [0.025, 0.975])
    return [float(lo), float(hi)]


def _ratio(num: float, den: float) -> float | None:
    return 100.0 * num / den if den > 0 else None


def aggregate(rows: Sequence[Mapping[str, Any]], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The run-level block: every metric x 100 with its 95% CI, the counts, what was invented,
    where the ground truth came from, per question type, and POPE when there are probe rows."""
    answers = [r for r in rows if r.get("kind") == "answer"]
    counts = {k: int(sum(r[k] for r in answers)) for k in COUNTS}
    out: dict[str, Any] = {"n_answers": len(answers), "counts": counts}
    ci: dict[str, list[float] | None] = {}
    for key, (num, den) in RATIOS.items():
        out[key] = _ratio(counts[num], counts[den])
        ci[key] = ratio_ci([r[num] for r in answers], [r[den] for r in answers], n_boot, seed)
    flags = [100.0 * (r["invented"] > 0) for r in answers]
    out["chair_s"] = float(np.mean(flags)) if flags else None
    ci["chair_s"] = list(metrics.bootstrap_ci(flags, n=n_boot, seed=seed)) if flags and n_boot > 0 else None
    out["ci"] = ci
    out["invented_types"] = dict(Counter(t for r in answers for t in r["invented_types"]).most_common())
    out["truth_source"] = dict(Counter(r["truth_source"] for r in answers))
    probes = [r for r in rows if r.get("kind") == "probe"]
    out["pope"] = pope_aggregate(probes, n_boot, seed) if probes else None
    return out


def by_question_type(rows: Sequence[Mapping[str, Any]], n_boot: int, seed: int) -> dict[str, Any]:
    """`aggregate` per question type of the answer rows (probes are reported by strategy instead)."""
    types = sorted({r["question_type"] for r in rows if r.get("kind") == "answer"})
    out = {}
    for qt in types:
        part = aggregate(
            [r for r in rows if r.get("kind") == "answer" and r["question_type"] == qt], n_boot, seed
        )
        part.pop("pope", None)
        out[qt or "(none)"] = part
    return out


def headline(block: Mapping[str, Any] | None, key: str) -> tuple[float | None, list[float] | None]:
    """(value, CI) of a hallucination metric key (`LABELS`) from an `aggregate` block."""
    if not block:
        return None, None
    if key.startswith("pope_"):
        pope = (block.get("pope") or {}).get("all") or {}
        name = key.removeprefix("pope_")
        return pope.get(name), (pope.get("ci") or {}).get(name)
    return block.get(key), (block.get("ci") or {}).get(key)


def frame_group(sample: Mapping[str, Any], selected: Sequence[int] | None) -> str | None:
    """'valid' / 'invalid' / 'mixed': were the frames sent to the LLM ones the report describes?

    Only informative samples (k > 1 with valid and invalid frames) get a group: elsewhere every
    choice is valid (or none is), so there is nothing to compare. None without labels or choice.
    """
    valid = sample.get("valid")
    if not valid or not selected or len(valid) < 2 or all(valid) or not any(valid):
        return None
    if any(not 0 <= int(i) < len(valid) for i in selected):
        return None
    hits = [bool(valid[int(i)]) for i in selected]
    return "valid" if all(hits) else "invalid" if not any(hits) else "mixed"


def by_selected_frame(
    rows: Sequence[Mapping[str, Any]],
    samples: Sequence[Mapping[str, Any]],
    selected: Sequence[Sequence[int] | None],
    n_boot: int,
    seed: int,
) -> dict[str, Any] | None:
    """`aggregate` of the answer rows of informative samples, grouped by `frame_group`: the paper's
    argument says an invalid frame paired with the report text makes the model invent."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row, sample, chosen in zip(rows, samples, selected, strict=True):
        group = frame_group(sample, chosen) if row.get("kind") == "answer" else None
        if group is not None:
            groups.setdefault(group, []).append(row)
    if not groups:
        return None
    out = {}
    for group in ("valid", "invalid", "mixed"):
        if group in groups:
            part = aggregate(groups[group], n_boot, seed)
            part.pop("pope", None)
            out[group] = part
    return out


def score_hallucination(
    samples: Sequence[Mapping[str, Any]],
    predictions: Sequence[Any],
    *,
    vocab: Vocabulary | None = None,
    vocab_name: str = "built-in",
    tolerance: Tolerance | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    selected: Sequence[Sequence[int] | None] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the `scores.json["hallucination"]` block, per-sample rows) of one run.

    `selected`: the frame positions sent to the LLM per sample (prediction records carry them);
    default: read from the prediction records when they are records. With validity labels in the
    samples this adds `by_selected_frame`.
    """
    tol = tolerance or Tolerance()
    rows = hallucination_rows(samples, predictions, vocab=vocab, tolerance=tol)
    block = aggregate(rows, n_boot, seed)
    block["by_question_type"] = by_question_type(rows, n_boot, seed)
    if selected is None:
        selected = [p.get("selected") if isinstance(p, Mapping) else None for p in predictions]
    block["by_selected_frame"] = by_selected_frame(rows, samples, selected, n_boot, seed)
    block["settings"] = {
        "tolerance": asdict(tol),
        "vocabulary": vocab_name,
        "scope": f"open answers except question types {', '.join(NOT_ABOUT_FINDINGS)}",
    }
    return block, rows


def hallucination_summary(
    samples: Sequence[Mapping[str, Any]],
    predictions: Sequence[Any],
    *,
    vocab: Vocabulary | None = None,
    tolerance: Tolerance | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    selected: Sequence[Sequence[int] | None] | None = None,
) -> dict[str, Any]:
    """One run's hallucination figures: `aggregate` of `hallucination_rows` plus per question type.

    `samples` are eval samples (instruct format, e.g. rows of `eval.test.json`); `predictions`
    the answer texts (or prediction records with `text`) in the same order; `selected` the frame
    positions sent to the LLM per sample (adds `by_selected_frame` when samples carry `valid`).
    """
    return score_hallucination(
        samples, predictions, vocab=vocab, tolerance=tolerance, n_boot=n_boot, seed=seed, selected=selected
    )[0]


# ----------------------------------------------------------------------------- over seeds


def _per_seed_rows(
    samples: Sequence[Mapping[str, Any]],
    predictions_by_seed: Sequence[Sequence[Any]],
    vocab: Vocabulary | None,
) -> list[list[dict[str, Any]]]:
    if not predictions_by_seed:
        raise ConfigError("no predictions given; pass one list of answers per seed")
    return [hallucination_rows(samples, preds, vocab=vocab) for preds in predictions_by_seed]


def _seed_stats(rows_by_seed: Sequence[Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    """Per metric: arrays (seeds x answers) of numerators and denominators."""
    answer_idx = [i for i, r in enumerate(rows_by_seed[0]) if r.get("kind") == "answer"]
    stats = {}
    for key in ANSWER_METRICS:
        if key == "chair_s":
            num = [[float(rows[i]["invented"] > 0) for i in answer_idx] for rows in rows_by_seed]
            den = [[1.0] * len(answer_idx) for _ in rows_by_seed]
        else:
            n, d = RATIOS[key]
            num = [[float(rows[i][n]) for i in answer_idx] for rows in rows_by_seed]
            den = [[float(rows[i][d]) for i in answer_idx] for rows in rows_by_seed]
        stats[key] = (np.asarray(num), np.asarray(den))
    return stats


def hallucination_over_seeds(
    samples: Sequence[Mapping[str, Any]],
    predictions_by_seed: Sequence[Sequence[Any]],
    *,
    vocab: Vocabulary | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Per metric (x 100): mean +- sd of the per-seed values, and a 95% CI over questions of the
    value pooled over seeds (questions resampled, all seeds' answers to a question kept together).

    Each entry has the shape of `ablate.summarise`: {"mean", "sd", "ci", "per_seed", "n"}.
    """
    stats = _seed_stats(_per_seed_rows(samples, predictions_by_seed, vocab))
    out = {}
    for key, (num, den) in stats.items():
        per_seed = [_ratio(n.sum(), d.sum()) for n, d in zip(num, den, strict=True)]
        values = [v for v in per_seed if v is not None]
        pooled_n, pooled_d = num.sum(axis=0), den.sum(axis=0)
        out[key] = {
            "mean": float(np.mean(values)) if values else None,
            "sd": float(np.std(values, ddof=1)) if len(values) > 1 else (0.0 if values else None),
            "ci": ratio_ci(pooled_n, pooled_d, n_boot, seed),
            "per_seed": per_seed,
            "n": int(num.shape[1]),
        }
    return out


def hallucination_delta(
    samples: Sequence[Mapping[str, Any]],
    a_by_seed: Sequence[Sequence[Any]],
    b_by_seed: Sequence[Sequence[Any]],
    *,
    vocab: Vocabulary | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Per metric: pooled(a) - pooled(b) (x 100) on the same questions, with a paired bootstrap CI
    (the same resampled questions for both). Shape of `ablate.paired_delta`: {"mean", "ci"}."""
    sa = _seed_stats(_per_seed_rows(samples, a_by_seed, vocab))
    sb = _seed_stats(_per_seed_rows(samples, b_by_seed, vocab))
    out = {}
    for key in ANSWER_METRICS:
        an, ad = (x.sum(axis=0) for x in sa[key])
        bn, bd = (x.sum(axis=0) for x in sb[key])

        def diff(idx: np.ndarray, an=an, ad=ad, bn=bn, bd=bd) -> float:
            if ad[idx].sum() <= 0 or bd[idx].sum() <= 0:
                return float("nan")
            return 100.0 * (an[idx].sum() / ad[idx].sum() - bn[idx].sum() / bd[idx].sum())

        full = np.arange(len(an))
        value = diff(full) if len(an) else float("nan")
        out[key] = {
            "mean": None if np.isnan(value) else float(value),
            "ci": _bootstrap(diff, len(an), n_boot, seed),
        }
    return out
