"""Scoring a run: pair predictions with ground truth, score overall and per subset with bootstrap
CIs, add the closed yes/no confusion and the selection evaluation; render Markdown; compare runs.

What this file owns: `score_run` (predictions + ground-truth eval samples -> the `scores.json`
dict), `render_report` (that dict -> `report.md`), `compare_table` / `render_compare` (several
runs -> one table shaped like the paper's Table 2), and reading/writing those files.

Notable choices:
- Predictions pair with ground truth by question id, never by position: a reordered, merged or
  partly skipped predictions file scores the same pairs. A ground-truth sample without a
  prediction, a duplicate id, or a prediction without a ground-truth sample (unless the caller
  allows those, e.g. after skipping malformed ground truth or with --limit) raises naming it.
- The live run and `llava-ultra score` both go through `score_run` on the same records, so a
  re-score reproduces the live numbers exactly (pinned by a test).
- Overall numbers are `metrics.score`'s output unchanged (mode, tokenizer, BLEU variant and
  closed rule travel with them); subsets re-aggregate `metrics.score_samples` rows with
  `metrics.aggregate`, so a subset of everything equals the overall numbers.
- Every metric gets a 95% percentile bootstrap CI over samples (`metrics.bootstrap_ci`, seeded:
  reports are reproducible); corpus sacreBLEU is reported per subset without a CI.
- Subsets: language, modality, answer type, question type, site, k (frames per sample) and
  dataset, each where the ground truth has values. Missing values show as '(none)'.
- Hallucination (`hallucination.py`, `findings.py`, `probes.py`): invented / omitted /
  mis-sided / mis-sized findings of open answers and POPE figures of probe questions, overall
  (`scores["hallucination"]`), per subset, per sample, in report.md, and as `compare` columns.
- The confusion matrix labels closed yes/no questions with the strict yes/no cue rule in both
  modes (llava-med's substring rule has no notion of a predicted label); other closed answers
  are left out of it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import DataError
from . import metrics
from .findings import Vocabulary
from .hallucination import LABELS as HALLUCINATION_LABELS
from .hallucination import Tolerance, headline, score_hallucination
from .hallucination import aggregate as hallucination_aggregate
from .selection import make_case, selection_report

SCORES_NAME = "scores.json"
REPORT_NAME = "report.md"
PER_SAMPLE_NAME = "per_sample.jsonl"

METRICS = (*metrics.METRIC_KEYS, metrics.OPEN_ACCURACY, "closed_accuracy")
METRIC_LABELS = {
    "exact_match": "EM",
    "f1": "F1",
    "precision": "Precision",
    "recall": "Recall",
    "bleu": "BLEU",
    "bleu_1": "BLEU-1",
    "bleu_2": "BLEU-2",
    "bleu_3": "BLEU-3",
    metrics.OPEN_ACCURACY: "Open acc",
    "closed_accuracy": "Closed acc",
}
HALLUCINATION_METRICS = tuple(HALLUCINATION_LABELS)
"""Hallucination keys `compare` accepts (`hallucination.LABELS`); read from scores["hallucination"]."""
COMPARE_DEFAULT = (*METRICS, "chair_i", "chair_s", "omission", "pope_f1", "pope_yes_ratio")
"""Columns of `compare` (and of the eval/score summary table) when none are chosen."""
SUBSETS = ("language", "modality", "answer_type", "question_type", "site", "k", "dataset")
NONE_LABEL = "(none)"


# ------------------------------------------------------------------------ ground-truth fields


def reference(sample: Mapping[str, Any]) -> str:
    """The reference answer of a single-turn eval sample (its first gpt turn)."""
    conv = sample.get("conversations") or []
    if len(conv) < 2 or not isinstance(conv[1], Mapping) or not isinstance(conv[1].get("value"), str):
        raise DataError(
            f"ground-truth sample {sample.get('id', '<no id>')} has no answer turn; "
            "give conversations [{'from': 'human', ...}, {'from': 'gpt', 'value': answer}]"
        )
    return conv[1]["value"]


def subset_value(sample: Mapping[str, Any], dimension: str) -> str | None:
    """The sample's value along a subset dimension ('k' = its number of frames), or None."""
    if dimension == "k":
        return str(len(sample.get("images") or []))
    value = sample.get(dimension)
    return None if value in (None, "") else str(value)


# ------------------------------------------------------------------------------------ pairing


def pair_by_id(
    predictions: Sequence[Mapping[str, Any]],
    ground_truth: Sequence[Mapping[str, Any]],
    allow_unpaired: bool = False,
) -> tuple[list[Mapping[str, Any]], int]:
    """(the prediction of each ground-truth sample, in ground-truth order; predictions left over).

    Pairs by `question_id` == ground-truth `id` (compared as strings). Raises DataError for a
    prediction without question_id, a duplicate id on either side, a ground-truth sample
    without a prediction, and, unless `allow_unpaired`, a prediction without a ground-truth sample.
    """
    by_id: dict[str, int] = {}
    for i, pred in enumerate(predictions):
        if not isinstance(pred, Mapping) or "question_id" not in pred:
            raise DataError(
                f"prediction record {i} has no question_id; each line must be a JSON object with "
                "question_id and text (LLaVA-Med answer format)"
            )
        key = str(pred["question_id"])
        if key in by_id:
            raise DataError(
                f"prediction records {by_id[key]} and {i} both answer question_id {pred['question_id']!r}; "
                "keep one answer per question (merge shards once, or regenerate)"
            )
        by_id[key] = i
    gt_ids: dict[str, int] = {}
    for j, gt in enumerate(ground_truth):
        key = str(gt.get("id"))
        if key in gt_ids:
            raise DataError(
                f"ground-truth samples [{gt_ids[key]}] and [{j}] share id {gt.get('id')!r}; "
                "ids must be unique to pair predictions with them"
            )
        gt_ids[key] = j
    missing = [j for j, gt in enumerate(ground_truth) if str(gt.get("id")) not in by_id]
    if missing:
        j = missing[0]
        raise DataError(
            f"{len(predictions)} predictions but {len(ground_truth)} ground-truth samples: {len(missing)} "
            f"ground-truth sample(s) have no prediction, first: ground truth [{j}] "
            f"id={ground_truth[j].get('id')!r}. Score against the data the predictions were made on "
            "(same file, split and language filter), or pass --limit N for a partial run"
        )
    extra = [i for i, p in enumerate(predictions) if str(p["question_id"]) not in gt_ids]
    if extra and not allow_unpaired:
        i = extra[0]
        raise DataError(
            f"{len(predictions)} predictions but {len(ground_truth)} ground-truth samples: {len(extra)} "
            f"prediction(s) have no ground-truth sample, first: prediction [{i}] "
            f"question_id={predictions[i]['question_id']!r}. Score against the data the predictions were "
            "made on (same file, split and language filter)"
        )
    paired = [predictions[by_id[str(gt.get("id"))]] for gt in ground_truth]
    return paired, len(extra)


def prediction_text(pred: Mapping[str, Any]) -> str | None:
    """The answer text; a missing or null `text` counts as an empty prediction."""
    text = pred.get("text")
    if text is not None and not isinstance(text, str):
        raise DataError(
            f"prediction {pred.get('question_id')!r}: text is {type(text).__name__}, not a string"
        )
    return text


# ------------------------------------------------------------------------------------ scoring


def _values(rows: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    if key == metrics.OPEN_ACCURACY:
        return [r[key] * 100.0 for r in rows if r["answer_type"] == "open" and r.get(key) is not None]
    if key == "closed_accuracy":
        return [
            r["closed_hit"] * 100.0
            for r in rows
            if r["answer_type"] == "closed" and r["closed_hit"] is not None
        ]
    return [r[key] * 100.0 for r in rows if r["answer_type"] == "open"]


def confidence_intervals(
    rows: Sequence[Mapping[str, Any]], n_boot: int, seed: int
) -> dict[str, list[float] | None]:
    """95% bootstrap CI (x 100) of every metric over `rows`; None for empty sets or n_boot = 0."""
    out: dict[str, list[float] | None] = {}
    for key in METRICS:
        values = _values(rows, key)
        if not values or n_boot <= 0:
            out[key] = None
            continue
        out[key] = list(metrics.bootstrap_ci(values, n=n_boot, seed=seed))
    return out


def _subset_scores(
    rows: Sequence[Mapping[str, Any]],
    preds: Sequence[str | None],
    refs: Sequence[str],
    n_boot: int,
    seed: int,
) -> dict[str, Any]:
    out = metrics.aggregate(rows)
    out["ci"] = confidence_intervals(rows, n_boot, seed)
    open_idx = [i for i, r in enumerate(rows) if r["answer_type"] == "open"]
    bleu = metrics.corpus_sacrebleu(
        [preds[i] for i in open_idx], [refs[i] for i in open_idx], [rows[i]["language"] for i in open_idx]
    )
    out["sacrebleu"] = bleu["sacrebleu"]
    return out


def closed_confusion(
    rows: Sequence[Mapping[str, Any]], preds: Sequence[str | None], refs: Sequence[str]
) -> dict[str, Any] | None:
    """Reference yes/no x predicted yes/no/none counts for closed yes/no questions (strict cues)."""
    counts = {"yes": {"yes": 0, "no": 0, "none": 0}, "no": {"yes": 0, "no": 0, "none": 0}}
    for row, pred, ref in zip(rows, preds, refs, strict=True):
        if row["answer_type"] != "closed":
            continue
        lang = row["language"]
        ref_label = metrics.yes_no_label(metrics.normalize_strict(ref, lang))
        if ref_label is None:
            continue
        pred_label = metrics.yes_no_label(metrics.normalize_strict(pred or "", lang)) or "none"
        counts[ref_label][pred_label] += 1
    total = sum(sum(r.values()) for r in counts.values())
    if total == 0:
        return None
    return {
        "reference_labels": ["yes", "no"],
        "predicted_labels": ["yes", "no", "none"],
        "counts": [[counts[r][p] for p in ("yes", "no", "none")] for r in ("yes", "no")],
        "n": total,
        "rule": "strict yes/no cues (whole words, Chinese synonyms); 'none' = no yes/no cue in the answer",
    }


def score_run(
    predictions: Sequence[Mapping[str, Any]],
    ground_truth: Sequence[Mapping[str, Any]],
    *,
    mode: str = "strict",
    tokenizer: str | Mapping[str, str] | None = None,
    closed_variant: str = metrics.DEFAULT_CLOSED_VARIANT,
    candidates: Sequence[Any] | None = None,
    candidates_label: str | None = None,
    allow_unpaired: bool = False,
    n_boot: int = 1000,
    seed: int = 0,
    run: Mapping[str, Any] | None = None,
    vocab: Vocabulary | None = None,
    vocab_name: str = "built-in",
    tolerance: Tolerance | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score predictions (LLaVA-Med answer records) against ground-truth eval samples.

    Returns (scores, per-sample rows). `scores` = `metrics.score` output + `ci`, `subsets`,
    `confusion`, `selection`, `n_unpaired_predictions`, `hallucination`
    (`hallucination.score_hallucination`: invented, omitted, mis-sided and mis-sized findings, POPE
    for probe questions; also in every subset) and the `run` description given. Rows carry the
    sample id, the subset values, the per-sample metrics and the sample's hallucination counts.
    Pairing is by id (`pair_by_id`); `candidates` is llava-med mode's open-accuracy set (None = open
    references). `vocab` / `tolerance`: the findings vocabulary and size tolerance (defaults: built-in).
    """
    predictions, unpaired = pair_by_id(predictions, ground_truth, allow_unpaired)
    preds = [prediction_text(p) for p in predictions]
    refs = [reference(g) for g in ground_truth]
    types = [str(g.get("answer_type") or "OPEN") for g in ground_truth]
    langs = [str(g.get("language") or "auto") for g in ground_truth]
    scores = metrics.score(
        preds, refs, types, langs, mode, tokenizer, closed_variant, candidates, candidates_label
    )
    rows = metrics.score_samples(preds, refs, types, langs, mode, tokenizer, closed_variant, candidates)
    scores["n_unpaired_predictions"] = unpaired
    scores["ci"] = confidence_intervals(rows, n_boot, seed)
    scores["bootstrap"] = {"resamples": n_boot, "seed": seed, "level": 0.95, "kind": "percentile"}
    scores["hallucination"], h_rows = score_hallucination(
        ground_truth,
        predictions,
        vocab=vocab,
        vocab_name=vocab_name,
        tolerance=tolerance,
        n_boot=n_boot,
        seed=seed,
    )

    subsets: dict[str, dict[str, Any]] = {}
    for dim in SUBSETS:
        values = [subset_value(g, dim) for g in ground_truth]
        if all(v is None for v in values):
            continue
        groups: dict[str, list[int]] = {}
        for i, v in enumerate(values):
            groups.setdefault(NONE_LABEL if v is None else v, []).append(i)
        order = sorted(groups, key=lambda v: (v == NONE_LABEL, int(v) if dim == "k" else 0, v))
        subsets[dim] = {
            v: _subset_scores(
                [rows[i] for i in groups[v]],
                [preds[i] for i in groups[v]],
                [refs[i] for i in groups[v]],
                n_boot,
                seed,
            )
            for v in order
        }
        for v in order:
            part = [h_rows[i] for i in groups[v]]
            if any(r.get("kind") for r in part):
                subsets[dim][v]["hallucination"] = hallucination_aggregate(part, n_boot, seed)
    scores["subsets"] = subsets
    scores["confusion"] = closed_confusion(rows, preds, refs)
    cases = [
        make_case(
            str(g.get("id")),
            g.get("valid"),
            p.get("selected"),
            tuple(str(x) for x in g.get("images") or ()),
        )
        for p, g in zip(predictions, ground_truth, strict=True)
    ]
    scores["selection"] = selection_report(cases, n_boot, seed)
    scores["run"] = dict(run or {})

    per_sample = []
    for row, pred, gt, h in zip(rows, predictions, ground_truth, h_rows, strict=True):
        out = {"id": gt.get("id"), **{d: subset_value(gt, d) for d in SUBSETS}}
        keys = (
            *metrics.METRIC_KEYS,
            metrics.OPEN_ACCURACY,
            "closed_hit",
            "empty_prediction",
            "empty_reference",
        )
        out.update({k: row[k] for k in keys})
        out["selected"] = pred.get("selected")
        out["hallucination"] = (
            {k: v for k, v in h.items() if k not in ("question_type",)} if h.get("kind") else None
        )
        per_sample.append(out)
    return scores, per_sample


# ----------------------------------------------------------------------------------- markdown


def fmt(value: float | None, ci: Sequence[float] | None = None, digits: int = 2) -> str:
    """'62.00 [58.10, 65.90]', '62.00' without a CI, '-' for a missing value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" + (" " + fmt_ci(ci, digits) if ci else "")


def fmt_ci(ci: Sequence[float] | None, digits: int = 2) -> str:
    """'[58.10, 65.90]', or '-' without an interval."""
    return f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "-"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return out


def _metric_cells(entry: Mapping[str, Any], with_ci: bool = True) -> list[str]:
    ci = entry.get("ci") or {}
    return [fmt(entry.get(k), ci.get(k) if with_ci else None) for k in METRICS]


def decoding_label(decoding: Mapping[str, Any]) -> str:
    """'greedy, max_new_tokens=64, batch_size=8' or 'sampling (temperature=0.7, top_p=0.9, seed=0), ...'."""
    if not decoding:
        return "unknown (predictions made elsewhere)"
    temp = decoding.get("temperature", 0)
    head = (
        "greedy"
        if not temp
        else f"sampling (temperature={temp}, top_p={decoding.get('top_p')}, seed={decoding.get('seed')})"
    )
    rest = [f"{k}={decoding[k]}" for k in ("max_new_tokens", "batch_size", "template") if k in decoding]
    if decoding.get("stop"):
        rest.append(f"stop={decoding['stop']}")
    return ", ".join([head, *rest])


def _selection_lines(sel: Mapping[str, Any]) -> list[str]:
    lines = [
        "## Frame selection (selector vs random choice)",
        "",
        f"{sel['definition']}. {sel['n_samples']} samples, {sel['n_unlabelled']} without labels or "
        f"selection, {sel['n_repeats_dropped']} repeats of the same frames dropped.",
        "",
    ]
    header = ["subset", "n", "selector % [95% CI]", "random % [95% CI]", "lift [95% CI]"]

    def row(name: str, s: Mapping[str, Any]) -> list[str]:
        return [
            name,
            str(s["n"]),
            fmt(s["rate"], s["rate_ci"]),
            fmt(s["random_rate"], s["random_rate_ci"]),
            fmt(s["lift"], s["lift_ci"]),
        ]

    rows = [row("all", sel["all"]), row("informative", sel["informative"])]
    rows += [row(f"k={k}", s) for k, s in sel["by_k"].items()]
    return lines + _table(header, rows) + [""]


def _pope_rows(pope: Mapping[str, Any]) -> list[list[str]]:
    def row(name: str, b: Mapping[str, Any]) -> list[str]:
        ci = b.get("ci") or {}
        return [
            name,
            str(b["n"]),
            fmt(b.get("accuracy"), ci.get("accuracy")),
            fmt(b.get("precision")),
            fmt(b.get("recall")),
            fmt(b.get("f1"), ci.get("f1")),
            fmt(b.get("yes_ratio"), ci.get("yes_ratio")),
            str(b.get("read_by_findings", 0)),
            str(b.get("unanswered", 0)),
        ]

    rows = [row(f"strategy {k}", b) for k, b in pope.get("by_strategy", {}).items()]
    rows += [row(f"language {k}", b) for k, b in pope.get("by_language", {}).items()]
    return [*rows, row("all probes", pope["all"])]


def _hallucination_lines(block: Mapping[str, Any]) -> list[str]:
    """The report section of `scores["hallucination"]` (definitions: docs/metrics.md)."""
    settings = block.get("settings") or {}
    tol = settings.get("tolerance") or {}
    c = block.get("counts") or {}
    sources = ", ".join(f"{k} {v}" for k, v in (block.get("truth_source") or {}).items()) or "-"
    lines = [
        "## Hallucination (findings the answers invent, omit or misplace)",
        "",
        f"Scope: {settings.get('scope', '?')}: {block['n_answers']} answers. Findings are read by the "
        f"rule-based extractor (vocabulary: {settings.get('vocabulary', 'built-in')}); ground truth per "
        f"answer from: {sources}. Size tolerance: max({tol.get('abs_cm')} cm, {tol.get('rel')} x true "
        "size). Lower is better. Definitions: docs/metrics.md.",
        "",
    ]
    if block["n_answers"]:
        spec = [
            ("chair_i", f"{c.get('invented', 0)} invented of {c.get('stated', 0)} stated findings"),
            ("chair_s", "answers with at least one invented finding"),
            ("omission", f"{c.get('omitted', 0)} of {c.get('expected', 0)} expected findings not stated"),
            ("contradiction", f"{c.get('contradicted', 0)} expected findings denied"),
            ("wrong_side", f"{c.get('side_wrong', 0)} of {c.get('side_checked', 0)} sides compared"),
            ("wrong_location", f"{c.get('part_wrong', 0)} of {c.get('part_checked', 0)} locations compared"),
            ("size_error", f"{c.get('size_wrong', 0)} of {c.get('size_checked', 0)} sizes compared"),
        ]
        ci = block.get("ci") or {}
        rows = [[HALLUCINATION_LABELS[k], fmt(block.get(k)), fmt_ci(ci.get(k)), what] for k, what in spec]
        lines += _table(["metric (%)", "value", "95% CI", "counts"], rows) + [""]
        if block.get("invented_types"):
            invented = ", ".join(f"{k} {v}" for k, v in block["invented_types"].items())
            lines += [f"Invented finding types: {invented}.", ""]
        by_qt = block.get("by_question_type") or {}
        if len(by_qt) > 1:
            keys = ("chair_i", "chair_s", "omission", "wrong_side", "size_error")
            rows = [
                [qt, str(b["n_answers"]), *[fmt(b.get(k), (b.get("ci") or {}).get(k)) for k in keys]]
                for qt, b in by_qt.items()
            ]
            lines += _table(["question type", "n", *[HALLUCINATION_LABELS[k] for k in keys]], rows) + [""]
    by_frame = block.get("by_selected_frame")
    if by_frame:
        keys = ("chair_i", "chair_s", "omission", "wrong_side", "size_error")
        lines += [
            "By the frame the selector sent (informative samples: k > 1 with valid and invalid frames; "
            "an invalid frame does not show the finding the report describes):",
            "",
        ]
        rows = [
            [g, str(b["n_answers"]), *[fmt(b.get(k), (b.get("ci") or {}).get(k)) for k in keys]]
            for g, b in by_frame.items()
        ]
        lines += _table(["selected frame", "n", *[HALLUCINATION_LABELS[k] for k in keys]], rows) + [""]
    pope = block.get("pope")
    if pope:
        lines += [
            "### POPE probes (yes/no questions about present and absent findings)",
            "",
            f"Labels: {pope['rule']}. An always-yes model scores yes-ratio 100 and accuracy 50 on a balanced set.",
            "",
        ]
        header = [
            "probes",
            "n",
            "accuracy [95% CI]",
            "precision",
            "recall",
            "F1 [95% CI]",
            "yes-ratio [95% CI]",
            "read by findings",
            "unanswered",
        ]
        lines += _table(header, _pope_rows(pope)) + [""]
    return lines


def render_report(scores: Mapping[str, Any]) -> str:
    """The Markdown report of a scored run (the `scores.json` dict)."""
    run = scores.get("run") or {}
    lines = [
        "# Evaluation report",
        "",
        f"- model: `{run.get('model', 'unknown')}`",
        f"- data: `{run.get('data', 'unknown')}`",
        f"- decoding: {decoding_label(run.get('decoding') or {})}",
        f"- metric mode: **{scores['mode']}**; tokenizer: `{scores['tokenizer']}`",
        f"- BLEU: {scores['bleu_variant']}",
        f"- closed questions: {scores['closed_rule']}",
        f"- samples: {scores['n']} ({scores['n_open']} open, {scores['n_closed']} closed, "
        f"{scores['n_closed_scored']} closed scored); empty predictions: {scores['n_empty_predictions']} "
        + (
            "(scored as the text '', as LLaVA-Med does)" if scores["mode"] == "llava-med" else "(scored as 0)"
        ),
    ]
    if scores.get("n_empty_references"):
        lines.append(
            f"- empty reference answers: {scores['n_empty_references']} (scored like any other answer, as "
            "LLaVA-Med v1.0.0 does: an empty reference is a substring of every prediction)"
        )
    if scores.get("open_accuracy_candidates"):
        lines.append(f"- open accuracy candidates: {scores['open_accuracy_candidates']}")
    if scores.get("n_unpaired_predictions"):
        lines.append(
            f"- predictions without a ground-truth sample (left out): {scores['n_unpaired_predictions']}"
        )
    if run.get("bad_records") is not None:
        lines.append(f"- ground-truth records skipped as malformed: {run['bad_records']}")
    if run.get("failed_samples"):
        lines.append(f"- samples whose images could not be read (empty prediction): {run['failed_samples']}")
    lines.append(
        f"- corpus sacreBLEU (open questions): {fmt(scores.get('sacrebleu'))} `{scores['sacrebleu_signature']}`"
    )
    boot = scores.get("bootstrap") or {}
    lines += [
        f"- intervals: 95% percentile bootstrap over samples, {boot.get('resamples')} resamples, seed {boot.get('seed')}",
        "",
        "## Overall",
        "",
    ]
    ci = scores.get("ci") or {}
    overall = [[METRIC_LABELS[k], fmt(scores.get(k)), fmt_ci(ci.get(k))] for k in METRICS]
    lines += _table(["metric", "value", "95% CI"], overall)
    lines.append("")
    header = ["n", *[METRIC_LABELS[k] for k in METRICS], "sacreBLEU"]
    for dim, groups in scores.get("subsets", {}).items():
        lines += [f"## By {dim.replace('_', ' ')}", ""]
        rows = [[v, str(e["n"]), *_metric_cells(e), fmt(e.get("sacrebleu"))] for v, e in groups.items()]
        lines += _table([dim, *header], rows) + [""]
    conf = scores.get("confusion")
    if conf:
        lines += ["## Closed yes/no questions: confusion", "", f"Labels: {conf['rule']}.", ""]
        rows = [
            [f"reference {r}", *map(str, counts)]
            for r, counts in zip(conf["reference_labels"], conf["counts"], strict=True)
        ]
        lines += _table(["", *[f"predicted {p}" for p in conf["predicted_labels"]]], rows) + [""]
    if scores.get("selection"):
        lines += _selection_lines(scores["selection"])
    if scores.get("hallucination"):
        lines += _hallucination_lines(scores["hallucination"])
    if scores.get("plots"):
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in scores["plots"]] + [""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- files


def write_scores(
    out_dir: str | Path, scores: Mapping[str, Any], per_sample: Sequence[Mapping[str, Any]]
) -> None:
    """Write scores.json, per_sample.jsonl and report.md into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / SCORES_NAME).write_text(json.dumps(scores, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    with (out / PER_SAMPLE_NAME).open("w", encoding="utf-8") as f:
        for row in per_sample:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out / REPORT_NAME).write_text(render_report(scores) + "\n", encoding="utf-8")


def read_scores(path: str | Path) -> dict[str, Any]:
    """A run's scores: `path` is a run folder holding scores.json, or the scores.json itself."""
    path = Path(path)
    file = path / SCORES_NAME if path.is_dir() else path
    if not file.is_file():
        raise DataError(
            f"{file} not found; pass a run folder written by `llava-ultra eval` / `llava-ultra score --out`"
        )
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{file} is not valid JSON ({exc}); re-create it with `llava-ultra score`") from None
    if not isinstance(data, dict) or "mode" not in data or "n" not in data:
        raise DataError(f"{file} is not a llava-ultra scores file (no 'mode'/'n' keys)")
    return data


# ------------------------------------------------------------------------------------ compare


def compare_table(
    runs: Sequence[tuple[str, Mapping[str, Any]]],
    subset: str | None = None,
    metric_keys: Sequence[str] = COMPARE_DEFAULT,
    with_ci: bool = False,
) -> tuple[list[str], list[list[str]], list[str]]:
    """(header, rows, notes) with one row per run (per run and subset value when `subset` is given).

    Each row names the metric mode and tokenizer its numbers were computed with. Metric keys are
    `METRICS` and the hallucination keys (`HALLUCINATION_METRICS`: chair_i, chair_s, omission,
    ..., pope_accuracy, pope_f1, pope_yes_ratio); a run scored before those existed shows '-'.

    Notes warn when runs were scored with different modes or tokenizers (their numbers are not
    comparable) and name runs without the requested subset.
    """
    unknown = [k for k in metric_keys if k not in METRICS and k not in HALLUCINATION_METRICS]
    if unknown:
        raise DataError(
            f"unknown metric {unknown[0]!r}; use any of: {', '.join((*METRICS, *HALLUCINATION_METRICS))}"
        )
    if subset is not None and subset not in SUBSETS:
        raise DataError(f"unknown subset {subset!r}; use one of: {', '.join(SUBSETS)}")
    labels = {**METRIC_LABELS, **HALLUCINATION_LABELS}
    header = ["run", "mode", "tokenizer", "n", *[labels[k] for k in metric_keys]]
    rows: list[list[str]] = []
    notes: list[str] = []

    def cell(entry: Mapping[str, Any], key: str) -> str:
        if key in HALLUCINATION_METRICS:
            value, ci = headline(entry.get("hallucination"), key)
        else:
            value, ci = entry.get(key), (entry.get("ci") or {}).get(key)
        return fmt(value, ci if with_ci else None)

    def cells(entry: Mapping[str, Any]) -> list[str]:
        return [cell(entry, k) for k in metric_keys]

    for name, scores in runs:
        scored_as = [scores["mode"], str(scores.get("tokenizer", "unknown"))]
        if subset is None:
            rows.append([name, *scored_as, str(scores["n"]), *cells(scores)])
            continue
        groups = scores.get("subsets", {}).get(subset)
        if not groups:
            notes.append(f"{name} has no {subset} subsets (its ground truth carries no {subset})")
            continue
        label = "k=" if subset == "k" else ""
        rows += [[f"{name} ({label}{v})", *scored_as, str(e["n"]), *cells(e)] for v, e in groups.items()]
        rows.append([f"{name} (all)", *scored_as, str(scores["n"]), *cells(scores)])
    for key in ("mode", "tokenizer", "closed_rule"):
        seen = {s.get(key) for _, s in runs}
        if len(seen) > 1:
            notes.append(
                f"runs differ in {key} ({', '.join(sorted(map(str, seen)))}): their numbers are not comparable"
            )
    return header, rows, notes


def render_compare(header: Sequence[str], rows: Sequence[Sequence[str]], notes: Sequence[str]) -> str:
    """A Markdown table followed by the notes."""
    lines = _table(header, rows)
    if notes:
        lines += [""] + [f"> note: {n}" for n in notes]
    return "\n".join(lines) + "\n"
