"""eval/report.py: pairing errors, empty predictions, subsets and CIs, confusion, Markdown, compare.

Ground truth and predictions are written by hand here; expected numbers are worked out in the
comments (strict-mode rules from docs/metrics.md).
"""

from __future__ import annotations

import json

import pytest

from llava_ultra.errors import DataError
from llava_ultra.eval import metrics
from llava_ultra.eval.report import (
    compare_table,
    decoding_label,
    pair_by_id,
    read_scores,
    render_compare,
    render_report,
    score_run,
    write_scores,
)


def gt(sid, answer, kind="OPEN", lang="en", qtype="findings", k=1, valid=None, site="liver", modality="US"):
    return {
        "id": sid,
        "images": [f"{sid}/{i}.png" for i in range(k)],
        "conversations": [
            {"from": "human", "value": "\n".join(["<image>"] * k + ["question?"])},
            {"from": "gpt", "value": answer},
        ],
        "language": lang,
        "answer_type": kind,
        "question_type": qtype,
        "site": site,
        "modality": modality,
        "valid": valid,
    }


def pred(sid, text, selected=None):
    return {"question_id": sid, "text": text, "selected": selected}


# Strict mode, by hand:
#   o1 en open  "The liver is normal." vs "liver is normal"   -> EM 1, F1 1 (article and period dropped)
#   o2 en open  "kidney"               vs "spleen"            -> 0 everywhere
#   c1 en closed "Yes, there is."      vs "yes"               -> hit (whole-word yes)
#   c2 en closed "nodule seen"         vs "no"                -> miss (no yes/no cue: "nodule" is not "no")
#   z1 zh open  "肝脏大小正常"          vs "肝脏大小正常"       -> EM 1
GROUND_TRUTH = [
    gt("o1", "liver is normal", k=1),
    gt("o2", "spleen", k=2, valid=[True, False]),
    gt("c1", "yes", kind="CLOSED", qtype="presence", k=2, valid=[False, True]),
    gt("c2", "no", kind="CLOSED", qtype="presence", k=10, valid=[True] * 10, site=None),
    gt("z1", "肝脏大小正常", lang="zh", k=1, valid=[True]),
]
PREDICTIONS = [
    pred("o1", "The liver is normal."),
    pred("o2", "kidney", [0]),
    pred("c1", "Yes, there is.", [0]),
    pred("c2", "nodule seen", [3]),
    pred("z1", "肝脏大小正常", [0]),
]


def scored(mode="strict", n_boot=200, preds=PREDICTIONS, truth=GROUND_TRUTH, run=None):
    return score_run(preds, truth, mode=mode, n_boot=n_boot, seed=0, run=run)


def test_golden_overall_numbers_and_counts():
    scores, rows = scored()
    assert (scores["n"], scores["n_open"], scores["n_closed"]) == (5, 3, 2)
    assert scores["exact_match"] == pytest.approx(200 / 3)  # o1, z1 exact; o2 not
    assert scores["f1"] == pytest.approx(200 / 3)
    assert scores["closed_accuracy"] == 50.0  # c1 hit, c2 miss
    assert scores["mode"] == "strict" and scores["tokenizer"] == "zh=jieba+medical_dict,en=whitespace"
    assert [r["id"] for r in rows] == ["o1", "o2", "c1", "c2", "z1"]
    assert rows[3]["closed_hit"] == 0 and rows[3]["k"] == "10"


def test_overall_is_metrics_score_unchanged():
    scores, _ = scored()
    refs = [g["conversations"][1]["value"] for g in GROUND_TRUTH]
    direct = metrics.score(
        [p["text"] for p in PREDICTIONS],
        refs,
        [g["answer_type"] for g in GROUND_TRUTH],
        [g["language"] for g in GROUND_TRUTH],
        "strict",
    )
    assert {k: scores[k] for k in direct} == direct


def test_llava_med_mode_keeps_the_nodule_quirk():
    scores, _ = scored(mode="llava-med")
    assert scores["closed_accuracy"] == 100.0  # 'no' is a substring of 'nodule seen'
    assert scores["mode"] == "llava-med" and scores["tokenizer"] == "zh=whitespace,en=whitespace"


def test_subsets_partition_the_samples():
    scores, _ = scored()
    subsets = scores["subsets"]
    assert set(subsets) == {"language", "modality", "answer_type", "question_type", "site", "k"}
    assert list(subsets["language"]) == ["en", "zh"]
    assert subsets["language"]["en"]["n"] == 4 and subsets["language"]["zh"]["exact_match"] == 100.0
    # numeric order for k, not string order ("10" after "2")
    assert list(subsets["k"]) == ["1", "2", "10"]
    # missing values form their own group, listed last
    assert list(subsets["site"]) == ["liver", "(none)"] and subsets["site"]["(none)"]["n"] == 1
    # a subset holding every sample equals the overall numbers
    everything = subsets["modality"]["US"]
    for key in (*metrics.METRIC_KEYS, "closed_accuracy", "n"):
        assert everything[key] == scores[key]
    assert everything["ci"] == scores["ci"]
    # per-subset corpus sacreBLEU over open questions; closed-only subsets have none
    assert subsets["answer_type"]["CLOSED"]["sacrebleu"] is None


def test_bootstrap_intervals():
    scores, _ = scored(n_boot=300)
    lo, hi = scores["ci"]["closed_accuracy"]  # values [100, 0]
    assert lo <= 50.0 <= hi and lo >= 0 and hi <= 100
    assert scores["subsets"]["language"]["zh"]["ci"]["exact_match"] == [100.0, 100.0]
    assert scores["subsets"]["language"]["zh"]["ci"]["closed_accuracy"] is None  # no closed zh sample
    assert scored(n_boot=0)[0]["ci"]["f1"] is None
    assert scored(n_boot=300)[0]["ci"] == scores["ci"]  # seeded: reproducible


def test_closed_confusion_uses_strict_cues():
    scores, _ = scored(mode="llava-med")
    conf = scores["confusion"]
    assert conf["reference_labels"] == ["yes", "no"] and conf["predicted_labels"] == ["yes", "no", "none"]
    assert conf["counts"] == [[1, 0, 0], [0, 0, 1]]  # yes->yes, no->(no cue)
    open_only, _ = scored(preds=PREDICTIONS[:2], truth=GROUND_TRUTH[:2])
    assert open_only["confusion"] is None


def test_selection_section():
    scores, _ = scored(n_boot=0)
    sel = scores["selection"]
    # labelled with a selection: o2 picks valid frame 0 (hit), c1 picks invalid frame 0 (miss),
    # c2 (hit, all valid), z1 (hit, k=1); o1 has no labels and no selection
    assert sel["n_unlabelled"] == 1 and sel["all"]["n"] == 4
    assert sel["all"]["rate"] == 75.0
    assert sel["all"]["random_rate"] == pytest.approx((0.5 + 0.5 + 1 + 1) / 4 * 100)
    assert sel["informative"]["n"] == 2 and sel["informative"]["rate"] == 50.0  # o2, c1
    assert sel["informative"]["random_rate"] == 50.0 and sel["informative"]["lift"] == 0.0


def test_empty_predictions_score_zero_and_are_counted():
    preds = [dict(p) for p in PREDICTIONS]
    preds[0]["text"] = "   "
    del preds[2]["text"]
    preds[4]["text"] = None
    scores, rows = scored(preds=preds)
    assert scores["n_empty_predictions"] == 3
    assert [r["empty_prediction"] for r in rows] == [True, False, True, False, True]
    assert scores["exact_match"] == 0.0 and scores["closed_accuracy"] == 0.0
    assert "empty predictions: 3 (scored as 0)" in render_report(scores)


def test_missing_and_extra_predictions_are_named():
    with pytest.raises(
        DataError,
        match=r"4 predictions but 5 ground-truth samples: 1 ground-truth sample\(s\) have no prediction, "
        r"first: ground truth \[4\] id='z1'",
    ):
        pair_by_id(PREDICTIONS[:4], GROUND_TRUTH)
    extra = [*PREDICTIONS, pred("x9", "extra")]
    with pytest.raises(
        DataError,
        match=r"6 predictions but 5 .* 1 prediction\(s\) have no ground-truth sample, first: prediction "
        r"\[5\] question_id='x9'",
    ):
        pair_by_id(extra, GROUND_TRUTH)
    # allowed (ground truth cut by --limit, or malformed records skipped): left out and counted
    paired, unpaired = pair_by_id(extra, GROUND_TRUTH, allow_unpaired=True)
    assert [p["question_id"] for p in paired] == ["o1", "o2", "c1", "c2", "z1"] and unpaired == 1


def test_pairing_is_by_id_not_position():
    shuffled = [PREDICTIONS[i] for i in (4, 2, 0, 3, 1)]
    a, rows_a = scored()
    b, rows_b = scored(preds=shuffled)
    assert rows_a == rows_b
    assert {k: a[k] for k in metrics.METRIC_KEYS} == {k: b[k] for k in metrics.METRIC_KEYS}
    # integer ids in one file and strings in the other still pair (LLaVA-Med writes ints)
    truth = [dict(g, id=i) for i, g in enumerate(GROUND_TRUTH)]
    preds = [dict(p, question_id=str(i)) for i, p in enumerate(PREDICTIONS)]
    assert scored(preds=preds, truth=truth)[1] == [dict(r, id=i) for i, r in enumerate(rows_a)]


def test_duplicate_ids_are_named():
    with pytest.raises(DataError, match=r"prediction records 0 and 5 both answer question_id 'o1'"):
        pair_by_id([*PREDICTIONS, pred("o1", "again")], GROUND_TRUTH)
    with pytest.raises(DataError, match=r"ground-truth samples \[0\] and \[1\] share id 'o1'"):
        pair_by_id(PREDICTIONS, [GROUND_TRUTH[0], GROUND_TRUTH[0]])


def test_malformed_prediction_records():
    with pytest.raises(DataError, match="prediction record 0 has no question_id"):
        pair_by_id([{"text": "a"}], GROUND_TRUTH[:1])
    with pytest.raises(DataError, match="text is int"):
        score_run([pred("o1", 3)], GROUND_TRUTH[:1])


def test_report_header_names_mode_tokenizer_model_data_decoding(tmp_path):
    run = {
        "model": "/ckpt/stage2",
        "data": "ultra:eval.test.json",
        "decoding": {"temperature": 0.0, "max_new_tokens": 64, "batch_size": 8, "template": "vicuna_v1"},
    }
    scores, rows = scored(run=run)
    text = render_report(scores)
    for needle in (
        "metric mode: **strict**",
        "tokenizer: `zh=jieba+medical_dict,en=whitespace`",
        "model: `/ckpt/stage2`",
        "data: `ultra:eval.test.json`",
        "decoding: greedy, max_new_tokens=64, batch_size=8, template=vicuna_v1",
        "## By language",
        "## Closed yes/no questions: confusion",
        "## Frame selection",
    ):
        assert needle in text, needle
    write_scores(tmp_path, scores, rows)
    assert read_scores(tmp_path)["f1"] == scores["f1"]
    assert len((tmp_path / "per_sample.jsonl").read_text().splitlines()) == 5


def test_decoding_label_for_sampling_and_unknown():
    assert decoding_label({"temperature": 0.7, "top_p": 0.9, "seed": 3}).startswith(
        "sampling (temperature=0.7, top_p=0.9, seed=3)"
    )
    assert decoding_label({}).startswith("unknown")


def test_compare_table_rows_runs_and_subsets():
    strict, _ = scored(n_boot=0)
    header, rows, notes = compare_table(
        [("A", strict), ("B", strict)], metric_keys=["exact_match", "closed_accuracy"]
    )
    tok = "zh=jieba+medical_dict,en=whitespace"
    assert header == ["run", "mode", "tokenizer", "n", "EM", "Closed acc"]
    assert rows == [["A", "strict", tok, "5", "66.67", "50.00"], ["B", "strict", tok, "5", "66.67", "50.00"]]
    assert notes == []
    text = render_compare(header, rows, notes)
    assert text.splitlines()[0] == "| run | mode | tokenizer | n | EM | Closed acc |"
    assert text.splitlines()[2] == f"| A | strict | {tok} | 5 | 66.67 | 50.00 |"

    _, rows, _ = compare_table([("A", strict)], subset="language", metric_keys=["exact_match"])
    assert rows == [
        ["A (en)", "strict", tok, "4", "50.00"],
        ["A (zh)", "strict", tok, "1", "100.00"],
        ["A (all)", "strict", tok, "5", "66.67"],
    ]


def test_compare_warns_when_modes_differ_and_shows_cis():
    strict, _ = scored(n_boot=200)
    compat, _ = scored(mode="llava-med", n_boot=200)
    _, rows, notes = compare_table(
        [("A", strict), ("B", compat)], metric_keys=["closed_accuracy"], with_ci=True
    )
    assert any("differ in mode" in n for n in notes)
    assert rows[0][2] == "zh=jieba+medical_dict,en=whitespace" and rows[1][2] == "zh=whitespace,en=whitespace"
    assert rows[0][4].startswith("50.00 [")
    assert "> note: runs differ in mode" in render_compare(["run"], [], notes)


def test_compare_bad_inputs(tmp_path):
    strict, _ = scored(n_boot=0)
    with pytest.raises(DataError, match="unknown metric 'bleu4'"):
        compare_table([("A", strict)], metric_keys=["bleu4"])
    with pytest.raises(DataError, match="unknown subset 'organ'"):
        compare_table([("A", strict)], subset="organ")
    with pytest.raises(DataError, match="scores.json not found"):
        read_scores(tmp_path)
    (tmp_path / "scores.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(DataError, match="not a llava-ultra scores file"):
        read_scores(tmp_path / "scores.json")
