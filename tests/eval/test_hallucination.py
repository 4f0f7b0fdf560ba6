"""eval/hallucination.py + eval/probes.py: golden counts of hand-written answers, run-level rates and
CIs, the seeds table, POPE probes (deterministic, balanced, always-yes), and the wiring into score/compare."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llava_ultra.cli import app
from llava_ultra.data.reports import Report
from llava_ultra.data.synth import SynthConfig, generate
from llava_ultra.eval.findings import Fact, extract_findings, truth_facts
from llava_ultra.eval.hallucination import (
    Tolerance,
    check_answer,
    frame_group,
    hallucination_delta,
    hallucination_over_seeds,
    hallucination_rows,
    hallucination_summary,
    ratio_ci,
)
from llava_ultra.eval.probes import build_probes, read_probe_answer, run_probes
from llava_ultra.eval.report import compare_table, render_report, score_run
from llava_ultra.eval.runner import load_ground_truth

RIGHT_NODULE = [Fact("nodule", False, "right", "upper", (1.2, 0.8))]


def check(answer: str, truth=RIGHT_NODULE, expected=("nodule",), lang=None, tol=None) -> dict:
    return check_answer(extract_findings(answer, lang), truth, set(expected), tol)


# ---------------------------------------------------------------------------- per answer


def test_correct_answer_counts_nothing_wrong():
    for text in (
        "甲状腺右叶上极见一大小约1.2cm×0.8cm的低回声结节。",
        "A nodule of 1.2 cm × 0.8 cm in the upper pole of the right thyroid lobe.",
    ):
        row = check(text)
        assert row["stated"] == 1 and row["invented"] == 0 and row["omitted"] == 0
        assert (row["side_checked"], row["side_wrong"], row["part_checked"], row["part_wrong"]) == (
            1,
            0,
            1,
            0,
        )
        assert (row["size_checked"], row["size_wrong"]) == (1, 0)


def test_negation_is_an_omission_and_a_contradiction_not_a_finding():
    row = check("甲状腺未见结节。")
    assert row["stated"] == 0 and row["invented"] == 0
    assert row["omitted"] == 1 and row["contradicted"] == 1
    assert check("未见明显异常。")["contradicted"] == 1  # generic denial covers the nodule
    vague = check("甲状腺形态大小正常。")
    assert vague["omitted"] == 1 and vague["contradicted"] == 0
    # denying a nodule on the other side does not contradict the right-sided one
    assert check("左叶未见结节。")["contradicted"] == 0


def test_invented_findings_and_synonyms():
    row = check("右叶上极低回声结节，伴点状强回声；右肾结石。")
    assert row["stated"] == 3 and row["invented"] == 2
    assert row["invented_types"] == ["calcification", "stone"]
    # a synonym of the true finding is not an invention
    assert (
        check(
            "An anechoic area in the right kidney.", truth=[Fact("cyst", False, "right")], expected=["cyst"]
        )["invented"]
        == 0
    )
    # a normal report: any stated finding is invented
    assert check("A cyst in the left breast.", truth=[], expected=[])["invented"] == 1


def test_wrong_side_and_location():
    row = check("甲状腺左叶上极见一结节。")
    assert row["invented"] == 0 and row["side_wrong"] == 1 and row["part_wrong"] == 0
    row = check("A nodule in the lower pole of the right lobe.", lang="en")
    assert row["side_wrong"] == 0 and (row["part_checked"], row["part_wrong"]) == (1, 1)
    # one right and one (extra) left nodule: the left one is the wrong side
    row = check("右叶上极见一结节，左叶见一结节。")
    assert row["stated"] == 2 and row["side_checked"] == 2 and row["side_wrong"] == 1


def test_size_beyond_tolerance():
    assert check("右叶上极结节，大小约1.3cm×0.8cm。")["size_wrong"] == 0  # within max(0.1, 20%)
    assert check("右叶上极结节，大小约12mm×8mm。")["size_wrong"] == 0  # units converted
    assert check("右叶上极结节，大小约2.0cm×0.8cm。")["size_wrong"] == 1
    assert check("A 0.8 cm × 1.2 cm nodule in the right lobe.")["size_wrong"] == 0  # order does not matter
    assert check("A 2.5 cm nodule in the right lobe.")["size_wrong"] == 1  # largest against largest
    assert check("右叶上极结节，大小约1.3cm×0.8cm。", tol=Tolerance(0.05, 0.0))["size_wrong"] == 1
    with pytest.raises(Exception, match="must be >= 0"):
        Tolerance(-1, 0)


# ------------------------------------------------------------------------------ run level


def sample(i, question_type, answer, findings, lang="zh", answer_type="OPEN", **extra):
    return {
        "id": f"s{i}",
        "images": ["a.png"],
        "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": answer}],
        "language": lang,
        "question_type": question_type,
        "answer_type": answer_type,
        "findings": findings,
        **extra,
    }


NODULE_REPORT = "甲状腺右叶上极见一大小约1.2cm×0.8cm的低回声结节，边界清。"
NORMAL_REPORT = "甲状腺形态大小正常，未见明显占位性病变。"
SAMPLES = [
    sample(0, "findings", NODULE_REPORT, NODULE_REPORT),
    sample(1, "findings", NORMAL_REPORT, NORMAL_REPORT),
    sample(2, "diagnosis", "甲状腺右叶上极实性结节 TI-RADS 3类", NODULE_REPORT),
    sample(3, "site", "该图像为甲状腺超声。", NODULE_REPORT),
    sample(
        4,
        "findings",
        "In the right kidney there is a stone.",
        "",
        lang="en",
        meta={"finding_type": "stone", "location": "right_middle", "size_cm": [0.5, 0.3]},
    ),
]
PREDICTIONS = [
    "甲状腺左叶上极见一结节，大小约1.2cm×0.8cm，伴钙化。",  # wrong side + invented calcification
    "甲状腺右叶见一囊肿。",  # invented cyst on a normal report
    "甲状腺未见明显异常。",  # omission + contradiction
    "右叶结节。",  # site question: out of scope whatever it says
    "A stone in the right kidney.",  # correct
]


def test_run_level_rates_are_ratios_of_sums():
    rows = hallucination_rows(SAMPLES, PREDICTIONS)
    assert [r["kind"] for r in rows] == ["answer", "answer", "answer", None, "answer"]
    assert [r["truth_source"] for r in rows if r["kind"]] == ["text", "text", "text", "meta"]
    h = hallucination_summary(SAMPLES, PREDICTIONS, n_boot=200)
    assert h["n_answers"] == 4
    c = h["counts"]
    assert (c["stated"], c["invented"]) == (4, 2)
    assert (c["expected"], c["omitted"], c["contradicted"]) == (3, 1, 1)
    assert h["chair_i"] == pytest.approx(50.0) and h["chair_s"] == pytest.approx(50.0)
    assert h["omission"] == pytest.approx(100 / 3) and h["contradiction"] == pytest.approx(100 / 3)
    assert h["wrong_side"] == pytest.approx(50.0)  # sample 0 wrong, sample 4 right
    assert h["invented_types"] == {"calcification": 1, "cyst": 1}
    assert set(h["by_question_type"]) == {"findings", "diagnosis"}
    lo, hi = h["ci"]["chair_i"]
    assert 0 <= lo <= h["chair_i"] <= hi <= 100
    assert h["pope"] is None
    assert hallucination_summary(SAMPLES, PREDICTIONS, n_boot=200) == h  # seeded


def test_ratio_ci_is_seeded_and_brackets_the_value():
    num, den = [1, 0, 2, 0, 1] * 10, [1, 1, 2, 1, 1] * 10
    a = ratio_ci(num, den, 500, seed=3)
    assert a == ratio_ci(num, den, 500, seed=3) and a != ratio_ci(num, den, 500, seed=4)
    assert a[0] < 100 * sum(num) / sum(den) < a[1]
    assert ratio_ci([0, 0], [0, 0], 100) is None and ratio_ci([], [], 100) is None


def test_over_seeds_and_delta_have_the_ablation_shapes():
    good = ["甲状腺右叶上极见一结节。", NORMAL_REPORT, "右叶上极实性结节", "", "A stone in the right kidney."]
    table = hallucination_over_seeds(SAMPLES, [PREDICTIONS, good], n_boot=200)
    assert set(table["chair_i"]) == {"mean", "sd", "ci", "per_seed", "n"}
    assert table["chair_i"]["per_seed"] == [pytest.approx(50.0), pytest.approx(0.0)]
    assert table["chair_i"]["mean"] == pytest.approx(25.0) and table["chair_i"]["n"] == 4
    delta = hallucination_delta(SAMPLES, [PREDICTIONS], [good], n_boot=200)
    assert delta["chair_i"]["mean"] == pytest.approx(50.0)
    assert delta["omission"]["mean"] == pytest.approx(100 / 3)
    same = hallucination_delta(SAMPLES, [good], [good], n_boot=200)
    assert same["chair_s"] == {"mean": 0.0, "ci": [0.0, 0.0]}


# ----------------------------------------------------------------------------------- probes


def reports(n: int = 24) -> list[Report]:
    kinds = [
        ("thyroid", "nodule", "right_lobe_upper"),
        ("kidney", "stone", "left_lower"),
        ("thyroid", "none", None),
    ]
    out = []
    for i in range(n):
        site, ftype, loc = kinds[i % 3]
        meta = {"finding_type": ftype, "location": loc, "size_cm": [1.0, 0.5] if loc else None}
        for lang in ("zh", "en"):
            out.append(
                Report(f"r{i:03d}", site, "", "text", "diag", lang, [f"images/r{i}_0.png"], [True], meta)
            )
    return out


def answer_all(samples, yes: bool) -> list[str]:
    return [("是" if yes else "否") if s["language"] == "zh" else ("yes" if yes else "no") for s in samples]


def test_probes_are_deterministic_balanced_and_parallel():
    reps = reports()
    probes = build_probes(reps, seed=0)
    assert probes == build_probes(list(reversed(reps)), seed=0)
    assert [p["probe"] for p in build_probes(reps, seed=1)] != [p["probe"] for p in probes]
    for strategy in ("random", "popular", "adversarial"):
        for lang in ("zh", "en"):
            part = [p for p in probes if p["probe"]["strategy"] == strategy and p["language"] == lang]
            labels = [p["probe"]["label"] for p in part]
            assert labels.count("yes") == labels.count("no") == 16  # 8 nodules + 8 stones
    zh = [(p["report_id"], p["probe"]) for p in probes if p["language"] == "zh"]
    en = [(p["report_id"], p["probe"]) for p in probes if p["language"] == "en"]
    assert zh == en
    first = next(p for p in probes if p["language"] == "zh")
    assert first["conversations"][0]["value"].startswith("<image>\n") and first["answer_type"] == "CLOSED"
    # popular: the most frequent absent type first (nodule/stone 8 each, others 0)
    popular = [
        p["probe"]["finding"]
        for p in probes
        if p["probe"]["strategy"] == "popular" and p["probe"]["label"] == "no"
    ]
    assert set(popular) <= {"nodule", "stone"}
    # adversarial: a normal thyroid report is asked about the thyroid's frequent finding (nodule);
    # a thyroid nodule report about the next most frequent type (stone, frequent elsewhere)
    adv = {
        p["report_id"]: p["probe"]["finding"]
        for p in probes
        if p["probe"]["strategy"] == "adversarial" and p["probe"]["label"] == "no" and p["site"] == "thyroid"
    }
    normal = {rid: t for rid, t in adv.items() if int(rid[1:]) % 3 == 2}
    assert normal and set(normal.values()) == {"nodule"}
    assert set(adv.values()) - set(normal.values()) <= {"stone"}


def test_always_yes_model_has_yes_ratio_100_and_accuracy_50():
    probes = build_probes(reports(), seed=0)
    pope = hallucination_summary(probes, answer_all(probes, True), n_boot=200)["pope"]
    assert pope["all"]["yes_ratio"] == 100.0 and pope["all"]["accuracy"] == 50.0
    assert pope["all"]["precision"] == 50.0 and pope["all"]["recall"] == 100.0
    assert pope["all"]["f1"] == pytest.approx(200 / 3)
    assert pope["by_strategy"]["random"]["yes_ratio"] == 100.0 and set(pope["by_language"]) == {"en", "zh"}
    no = hallucination_summary(probes, answer_all(probes, False), n_boot=0)["pope"]["all"]
    assert no["yes_ratio"] == 0.0 and no["accuracy"] == 50.0 and no["f1"] == 0.0 and no["recall"] == 0.0
    oracle = [s["conversations"][1]["value"] for s in probes]
    assert hallucination_summary(probes, oracle, n_boot=0)["pope"]["all"]["accuracy"] == 100.0
    mute = hallucination_summary(probes, [""] * len(probes), n_boot=0)["pope"]["all"]
    assert mute["accuracy"] == 0.0 and mute["unanswered"] == len(probes) and mute["read_by_findings"] == 0
    described = ["右肾见一结石。" if s["language"] == "zh" else "A stone in the left kidney." for s in probes]
    told = hallucination_summary(probes, described, n_boot=0)["pope"]["all"]
    assert told["read_by_findings"] == len(probes) and told["unanswered"] == 0


# ----------------------------------------------------------------------- wiring, end to end


@pytest.fixture(scope="module")
def synthus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthus")
    generate(
        out, SynthConfig(reports=14, seed=2, k_min=1, k_max=2, image_size=32, train_frac=0.0, val_frac=0.0)
    )
    return out


def test_probe_file_runs_through_eval_scoring_and_compare(synthus: Path, tmp_path: Path):
    path = tmp_path / "probes.test.json"
    summary = run_probes(synthus, path, seed=0)
    assert "random" in summary.render() and path.read_bytes() == (
        run_probes(synthus, tmp_path / "b.json").out.read_bytes()
    )
    assert summary.spec == f"ultra:{path}?root={synthus.resolve()}"
    assert run_probes(synthus, synthus / "p.json").spec == f"ultra:{synthus / 'p.json'}"
    gt, _ = load_ground_truth(summary.spec, check_images=True)
    assert all(Path(p).is_file() for g in gt for p in g["images"])
    preds = [{"question_id": g["id"], "text": "yes" if g["language"] == "en" else "是"} for g in gt]
    scores, per_sample = score_run(preds, gt, n_boot=100)
    pope = scores["hallucination"]["pope"]["all"]
    assert pope["yes_ratio"] == 100.0 and pope["accuracy"] == 50.0
    assert per_sample[0]["hallucination"]["kind"] == "probe"
    assert "### POPE probes" in render_report(scores)
    header, rows, _ = compare_table(
        [("yes-man", scores)], metric_keys=["pope_accuracy", "pope_yes_ratio", "chair_i"]
    )
    assert header[-3:] == ["POPE acc", "Yes-ratio", "CHAIR-i"] and rows[0][-3:] == ["50.00", "100.00", "-"]
    by_lang = scores["subsets"]["language"]["zh"]["hallucination"]["pope"]["all"]
    assert by_lang["yes_ratio"] == 100.0


def test_score_cli_reports_hallucination_of_open_answers(synthus: Path, tmp_path: Path):
    result = CliRunner().invoke(app, ["instruct", "--reports", str(synthus), "--out", str(tmp_path / "ins")])
    assert result.exit_code == 0, result.output
    eval_path = tmp_path / "ins" / "eval.test.json"
    samples = json.loads(eval_path.read_text(encoding="utf-8"))
    invented = {"zh": "右肾见一结石，大小约0.5cm×0.4cm。", "en": "A stone is seen in the right kidney."}
    preds = tmp_path / "predictions.jsonl"
    with preds.open("w", encoding="utf-8") as f:
        for s in samples:
            text = (
                invented[s["language"]]
                if s["question_type"] == "findings"
                else s["conversations"][1]["value"]
            )
            f.write(json.dumps({"question_id": s["id"], "text": text}, ensure_ascii=False) + "\n")
    out = tmp_path / "scored"
    args = ["score", str(preds), str(eval_path), "--out", str(out), "--bootstrap", "50", "--no-plots"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "CHAIR-i" in result.output.splitlines()[1]
    scores = json.loads((out / "scores.json").read_text(encoding="utf-8"))
    h = scores["hallucination"]
    findings = h["by_question_type"]["findings"]
    asked = [s for s in samples if s["question_type"] == "findings"]
    no_stone = [s for s in asked if "stone" not in {f.type for f in truth_facts(s)[0]}]
    assert findings["n_answers"] == len(asked) and 0 < len(no_stone) < len(asked)
    assert findings["chair_i"] == pytest.approx(100 * len(no_stone) / len(asked))
    assert findings["chair_s"] == pytest.approx(100 * len(no_stone) / len(asked))
    assert h["by_question_type"]["diagnosis"]["chair_i"] == 0.0  # reference answers invent nothing
    assert "## Hallucination" in (out / "report.md").read_text(encoding="utf-8")
    res = CliRunner().invoke(app, ["compare", str(out), "--metrics", "f1,chair_i,omission,wrong_side"])
    assert res.exit_code == 0 and "| Wrong side |" in res.output


def test_measurement_questions_expect_no_named_finding():
    s = sample(9, "measurement", "右叶上极见一大小约1.2cm×0.8cm的低回声结节。", NODULE_REPORT)
    row = hallucination_rows([s], ["1.2cm×0.8cm"])[0]
    assert row["kind"] == "answer" and row["expected"] == 0 and row["omitted"] == 0 and row["stated"] == 0


@pytest.mark.parametrize(
    ("text", "finding", "lang", "expected"),
    [
        ("是", "nodule", "zh", ("yes", "cue")),
        ("否。", "nodule", "zh", ("no", "cue")),
        ("答案：是的", "nodule", "zh", ("yes", "cue")),
        ("甲状腺右叶见一结节。", "nodule", "zh", ("yes", "findings")),
        ("未见结节。", "nodule", "zh", ("no", "findings")),
        ("甲状腺未见明显异常。", "cyst", "zh", ("no", "findings")),
        # 可见 would be a yes cue, but the answer describes a cyst, not the nodule asked about
        ("右肾可见一无回声区。", "nodule", "zh", ("no", "findings")),
        ("Yes, there is a nodule.", "nodule", "en", ("yes", "findings")),
        ("No.", "stone", "en", ("no", "cue")),
        ("There is no stone.", "stone", "en", ("no", "findings")),
        ("This is a kidney ultrasound.", "stone", "en", (None, None)),
        ("", "stone", "en", (None, None)),
    ],
)
def test_probe_answers_are_read_by_findings_then_cues(text, finding, lang, expected):
    assert read_probe_answer(text, finding, lang) == expected


def test_hallucination_by_selected_frame_validity():
    assert frame_group({"valid": [True, False]}, [0]) == "valid"
    assert frame_group({"valid": [True, False]}, [1]) == "invalid"
    assert frame_group({"valid": [True, False, True]}, [0, 1]) == "mixed"
    assert frame_group({"valid": [True, True]}, [1]) is None  # not informative
    assert frame_group({"valid": [True]}, [0]) is None and frame_group({"valid": None}, [0]) is None
    assert frame_group({"valid": [True, False]}, None) is None
    samples = [
        sample(0, "findings", NODULE_REPORT, NODULE_REPORT, valid=[True, False]),
        sample(1, "findings", NODULE_REPORT, NODULE_REPORT, valid=[True, False]),
        sample(2, "findings", NODULE_REPORT, NODULE_REPORT, valid=[True, True]),
    ]
    answers = ["右叶上极见一结节。", "右叶上极见一结节，伴钙化。", "右肾结石。"]
    h = hallucination_summary(samples, answers, n_boot=0, selected=[[0], [1], [0]])
    frames = h["by_selected_frame"]
    assert set(frames) == {"valid", "invalid"}
    assert frames["valid"]["chair_i"] == 0.0 and frames["invalid"]["chair_i"] == 50.0
    assert frames["valid"]["n_answers"] == frames["invalid"]["n_answers"] == 1
    records = [{"text": a, "selected": s} for a, s in zip(answers, [[0], [1], [0]], strict=True)]
    assert hallucination_summary(samples, records, n_boot=0)["by_selected_frame"] == frames
    assert hallucination_summary(samples, answers, n_boot=0)["by_selected_frame"] is None
