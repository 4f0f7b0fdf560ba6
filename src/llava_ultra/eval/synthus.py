"""How the recipes measure a checkpoint on SynthUS: answers, scores, frame choice, and their spread.

quickstart, ablate and the LoGra-Med experiment (recipes/) train models; everything they measure
is here, so the measurement is one code path and eval never trains.

What this file owns: which test questions are asked (`pick_eval_samples`: site, findings and
diagnosis questions, interleaved), greedy answers through the shared batch predictor
(`generate_answers`), strict-mode scores per question type and site accuracy (`score_answers` for a
summary, `per_question` for per-question values), the spread over seeds and the bootstrap CIs
(`summarise`, `paired_delta`), and frame choice measured directly on held-out reports
(`frame_diagnostics`, `selection_summary`, `pooled_selection`); `evaluate_folder` runs them all on
one checkpoint folder.

Notable choices:
- Answers are generated per question type in batches of 16, greedy, with a token budget per type
  (`MAX_NEW_TOKENS`); the prompt is the sample's first question in the default 'vicuna_v1' format.
- Metrics are strict mode, x100. Per row of a table: mean +- sd over seeds, and a 95% bootstrap CI
  over questions of the seed-averaged per-question score; a difference between two rows is a
  paired bootstrap over the same questions.
- Frame selection is measured on held-out reports (val + test, each report once, informative ones:
  k > 1 with valid and invalid frames) rather than through the questions, which ask several times
  about few reports. For models that train the scorer we also record what the attention teacher
  would pick on the same reports and how peaked it is (the diagnostics behind docs/results.md
  "What we found about the selector").
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..sites import SITES

EVAL_TYPES = ("site", "findings", "diagnosis")
MAX_NEW_TOKENS = {"site": 24, "findings": 160, "diagnosis": 48}
METRICS = ("exact_match", "f1", "bleu")


def eval_device() -> str:
    """'cuda' when a GPU is visible, else 'cpu' (quickstart, ablate and the LoGra experiment evaluate there)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_eval_samples(samples: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """Up to `limit` samples of the evaluated question types, interleaved so every type is covered."""
    by_type: dict[str, list[dict[str, Any]]] = {t: [] for t in EVAL_TYPES}
    for s in samples:
        if s.get("question_type") in by_type:
            by_type[s["question_type"]].append(s)
    out: list[dict[str, Any]] = []
    i = 0
    while len(out) < limit and any(i < len(v) for v in by_type.values()):
        for t in EVAL_TYPES:
            if i < len(by_type[t]) and len(out) < limit:
                out.append(by_type[t][i])
        i += 1
    return out


def names_site(text: str, site: str, language: str) -> bool:
    """True when `text` names `site` (in the sample's language) and no other site."""
    idx = 0 if language == "zh" else 1
    low = text.lower()
    hits = {key for key, names in SITES.items() if names[idx].lower() in low}
    if language == "en" and "liver" in low:
        hits.add("liver")
    return hits == {site}


def generate_answers(
    model: Any, tokenizer: Any, samples: list[dict[str, Any]], image_root: Path, batch_size: int = 16
) -> list[dict[str, Any]]:
    """Greedy answers and the selected frames for eval samples (first human turn as the prompt)."""
    from ..data.reports import resolve_image
    from ..model.predict import predict_batched
    from ..model.processor import sample_prompt

    model.eval()
    out = []
    order = sorted(range(len(samples)), key=lambda i: samples[i]["question_type"])
    for qtype in EVAL_TYPES:
        chunk = [samples[i] for i in order if samples[i]["question_type"] == qtype]
        predictions = predict_batched(
            model,
            tokenizer,
            [sample_prompt(s, model.config.image_token) for s in chunk],
            [[resolve_image(image_root, rel) for rel in s["images"]] for s in chunk],
            batch_size,
            max_new_tokens=MAX_NEW_TOKENS[qtype],
        )
        for s, p in zip(chunk, predictions, strict=True):
            out.append({"sample": s, "prediction": p.text, "selected": p.selected})
    return out


def score_answers(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Strict-mode metrics per question type, site accuracy, frame selection vs random, and
    hallucination (`eval.hallucination`: invented / omitted findings of the answers)."""
    from .hallucination import hallucination_summary
    from .metrics import score
    from .selection import make_case, selection_report

    result: dict[str, Any] = {"n": {}}
    for qtype in EVAL_TYPES:
        part = [r for r in rows if r["sample"]["question_type"] == qtype]
        if not part:
            continue
        result["n"][qtype] = len(part)
        result[qtype] = score(
            [r["prediction"] for r in part],
            [r["sample"]["conversations"][1]["value"] for r in part],
            [r["sample"].get("answer_type", "OPEN") for r in part],
            [r["sample"].get("language", "auto") for r in part],
            mode="strict",
        )
        if qtype == "site":
            hits = [names_site(r["prediction"], r["sample"]["site"], r["sample"]["language"]) for r in part]
            result["site_accuracy"] = 100.0 * sum(hits) / len(hits)
    cases = [
        make_case(r["sample"]["id"], r["sample"].get("valid"), r["selected"], r["sample"]["images"])
        for r in rows
        if r["selected"]
    ]
    result["hallucination"] = hallucination_summary(
        [r["sample"] for r in rows],
        [r["prediction"] for r in rows],
        n_boot=200,
        selected=[r["selected"] for r in rows],
    )
    report = selection_report(cases, n_boot=200)
    if report is not None:
        result["selection"] = report["informative"] if report["informative"]["n"] else report["all"]
        result["selection_all"] = report["all"]
    return result


# ------------------------------------------------------------------------------------ scoring


def per_question(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """Per question type (and 'overall'), each metric's per-question values x 100, in row order."""
    from .metrics import score_samples

    out: dict[str, dict[str, list[float]]] = {}
    for qtype in EVAL_TYPES:
        part = [r for r in rows if r["sample"]["question_type"] == qtype]
        if not part:
            continue
        scored = score_samples(
            [r["prediction"] for r in part],
            [r["sample"]["conversations"][1]["value"] for r in part],
            [r["sample"].get("answer_type", "OPEN") for r in part],
            [r["sample"].get("language", "auto") for r in part],
            mode="strict",
        )
        out[qtype] = {m: [100.0 * (s[m] or 0.0) for s in scored] for m in METRICS}
        if qtype == "site":
            out[qtype]["site_accuracy"] = [
                100.0 * names_site(r["prediction"], r["sample"]["site"], r["sample"]["language"])
                for r in part
            ]
    out["overall"] = {m: [v for t in EVAL_TYPES if t in out for v in out[t][m]] for m in METRICS}
    return out


def summarise(values_by_seed: Sequence[Sequence[float]], n_boot: int, seed: int = 0) -> dict[str, Any]:
    """Mean +- sd over seeds, and the bootstrap CI over items of the seed-averaged values."""
    from .metrics import bootstrap_ci

    means = [float(np.mean(v)) for v in values_by_seed if len(v)]
    pooled = np.mean(np.asarray(values_by_seed, dtype=float), axis=0) if means else np.zeros(0)
    ci = list(bootstrap_ci(pooled.tolist(), n=n_boot, seed=seed)) if len(pooled) and n_boot else None
    return {
        "mean": statistics.fmean(means) if means else None,
        "sd": statistics.stdev(means) if len(means) > 1 else 0.0 if means else None,
        "ci": ci,
        "per_seed": means,
        "n": len(pooled),
    }


def paired_delta(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], n_boot: int) -> dict[str, Any]:
    """Mean of (a - b) over items of the seed-averaged values, with a paired bootstrap CI."""
    from .metrics import bootstrap_ci

    diff = np.mean(np.asarray(a, dtype=float), axis=0) - np.mean(np.asarray(b, dtype=float), axis=0)
    ci = list(bootstrap_ci(diff.tolist(), n=n_boot)) if len(diff) and n_boot else None
    return {"mean": float(diff.mean()) if len(diff) else None, "ci": ci}


# ------------------------------------------------------------------------------ frame choice


def selection_reports(synthus: Path, splits: Sequence[str] = ("val", "test")) -> list[Any]:
    """The English records of the given splits (zh and en share frames and labels)."""
    from ..data.reports import read_reports

    return [r for s in splits for r in read_reports(synthus / f"{s}.en.jsonl")]


def frame_diagnostics(
    model: Any, tokenizer: Any, reports: Sequence[Any], root: Path, with_teacher: bool, batch: int = 16
) -> list[dict[str, Any]]:
    """Per report: validity labels, the frame the model sends to the LLM, and (with_teacher) the
    attention teacher's relevance per frame given the report's findings text."""
    import torch

    from ..data.reports import resolve_image
    from ..model.predict import load_images, predict
    from ..model.selector import attention_teacher
    from ..model.tokenizer import render_prompt

    model.eval()
    token = model.config.image_token
    prompt = render_prompt([{"role": "user", "content": f"{token}\nDescribe the findings."}])
    out = []
    for start in range(0, len(reports), batch):
        chunk = reports[start : start + batch]
        images = [load_images([resolve_image(root, rel) for rel in rep.images]) for rep in chunk]
        chosen = [
            p.selected for p in predict(model, tokenizer, [prompt] * len(chunk), images, max_new_tokens=1)
        ]
        for i, rep in enumerate(chunk):
            entry: dict[str, Any] = {"id": rep.id, "valid": list(rep.valid), "selected": chosen[i]}
            if with_teacher and len(rep.images) > 1:
                px = model.image_processor(images[i])
                with torch.no_grad():
                    feats = model.encode_images(px["pixel_values_clip"], px["pixel_values_sam"])
                    k = feats.shape[0]
                    scfg = model.config.selector
                    # the configured teacher, then every (text, relevance) variant for the diagnostics
                    for text_name in ("findings", "diagnosis"):
                        text_value = getattr(rep, text_name)
                        ids = tokenizer(text_value, add_special_tokens=False, return_tensors="pt")[
                            "input_ids"
                        ]
                        text = model.llm.get_input_embeddings()(ids.to(model.device))
                        for how in ("mass", "peak"):
                            rel = attention_teacher(
                                model.llm,
                                feats,
                                text.expand(k, -1, -1),
                                torch.ones(k, ids.shape[1], dtype=torch.long, device=model.device),
                                scfg.attn_layers,
                                how,
                            )
                            entry[f"teacher_{text_name}_{how}"] = rel.tolist()
                    entry["teacher"] = entry[f"teacher_findings_{scfg.teacher_relevance}"]
                    entry["scores"] = model.selector.score(feats).tolist()
            out.append(entry)
    return out


TEACHER_VARIANTS = tuple(f"teacher_{t}_{h}" for t in ("findings", "diagnosis") for h in ("mass", "peak"))
"""Teacher definitions measured on every checkpoint: which text it reads x which relevance."""


def selection_summary(
    diag: Sequence[dict[str, Any]], temperature: float, n_boot: int, norm: str = "none"
) -> dict[str, Any]:
    """Selector vs random (and teacher argmax vs random) on the informative reports."""
    from .selection import make_case, rate_summary

    info = [d for d in diag if len(d["valid"]) > 1 and any(d["valid"]) and not all(d["valid"])]
    cases = [make_case(d["id"], d["valid"], d["selected"]) for d in info]
    result = {"selector": rate_summary(cases, n_boot)}
    with_teacher = [d for d in info if "teacher" in d]
    if with_teacher:
        tcases = [make_case(d["id"], d["valid"], [int(np.argmax(d["teacher"]))]) for d in with_teacher]
        spread, top_p = [], []
        for d in with_teacher:
            t = np.asarray(d["teacher"], dtype=float)
            z = (t - t.mean()) / max(t.std(), 1e-6) if norm == "zscore" else t
            p = np.exp((z - z.max()) / temperature)
            p /= p.sum()
            spread.append(float(t.max() - t.min()))
            top_p.append(float(p.max() * len(t)))
        result["teacher"] = rate_summary(tcases, n_boot)
        variants = {}
        for name in TEACHER_VARIANTS:
            vcases = [
                make_case(d["id"], d["valid"], [int(np.argmax(d[name]))]) for d in with_teacher if name in d
            ]
            if vcases:
                variants[name] = rate_summary(vcases, n_boot)["rate"]
        result["teacher_variants"] = variants
        result["teacher_mass_mean"] = float(np.mean([np.mean(d["teacher"]) for d in with_teacher]))
        result["teacher_spread_mean"] = float(np.mean(spread))
        result["teacher_peak_over_uniform"] = float(np.mean(top_p))
    return result


def pooled_selection(
    by_seed: dict[int, dict[str, Any]], seeds: Sequence[int], n_boot: int
) -> dict[str, Any] | None:
    """Valid-frame rate of the selector on informative reports, averaged over seeds per report, with
    a 95% bootstrap CI over reports; the random-choice rate and the paired lift CI beside it."""
    from .metrics import bootstrap_ci

    frames = [by_seed[s].get("frames") for s in seeds]
    if any(f is None for f in frames):
        return None
    info = [
        i for i, d in enumerate(frames[0])
        if len(d["valid"]) > 1 and any(d["valid"]) and not all(d["valid"]) and d.get("selected")
    ]  # fmt: skip
    if not info:
        return None
    hits = np.array(
        [[100.0 * np.mean([f[i]["valid"][j] for j in f[i]["selected"]]) for i in info] for f in frames]
    )
    per_report = hits.mean(0)
    chance = np.array([100.0 * np.mean(frames[0][i]["valid"]) for i in info])
    return {
        "rate": float(per_report.mean()),
        "ci": list(bootstrap_ci(per_report.tolist(), n=n_boot)) if n_boot else None,
        "random": float(chance.mean()),
        "lift_ci": list(bootstrap_ci((per_report - chance).tolist(), n=n_boot)) if n_boot else None,
        "n": len(info),
    }


def evaluate_folder(
    folder: Path,
    samples: list[dict[str, Any]],
    root: Path,
    reports: Sequence[Any],
    synthus: Path,
    n_boot: int,
) -> dict[str, Any]:
    """Answers + per-question scores + frame diagnostics of one checkpoint folder."""
    from ..model.checkpoint import load_checkpoint

    model, tokenizer = load_checkpoint(folder, device=eval_device())
    rows = generate_answers(model, tokenizer, samples, root)
    scfg = model.config.selector
    diag = frame_diagnostics(model, tokenizer, reports, synthus, with_teacher=scfg.mode != "none")
    return {
        "per_question": per_question(rows),
        "selection": selection_summary(diag, scfg.teacher_temperature, n_boot, scfg.teacher_norm),
        "frames": diag,
        "answers": [
            {
                "id": r["sample"]["id"],
                "question_type": r["sample"]["question_type"],
                "language": r["sample"].get("language"),
                "prediction": r["prediction"],
                "selected": r["selected"],
            }
            for r in rows
        ],
    }
