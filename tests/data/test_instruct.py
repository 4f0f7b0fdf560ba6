"""Tests for reports -> instruction samples (stage-1 captions, stage-2 conversations, eval QA)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from llava_ultra.cli import app
from llava_ultra.data.instruct import (
    TemplateGenerator,
    build_captions,
    build_eval,
    build_instructions,
    image_root_of,
    make_generator,
    presence_facts,
    run_instruct,
)
from llava_ultra.data.reports import Report
from llava_ultra.data.samples import IMAGE_TOKEN, check_sample, find_measurements
from llava_ultra.errors import DataError
from llava_ultra.sites import SITES


def _zh(rid: str = "t1", k: int = 3, **kw) -> Report:
    fields = {
        "id": rid,
        "site": "thyroid",
        "history": "体检发现结节。",
        "findings": "右叶可见一无回声囊肿，大小约1.2×0.8cm，边界清，后方回声增强。左叶未见明显异常。",
        "diagnosis": "右叶囊肿。",
        "language": "zh",
        "images": [f"images/{rid}_{j}.png" for j in range(k)],
        "valid": [j % 2 == 1 for j in range(k)],
        "meta": {"finding_type": "cyst", "size_cm": 1.2},
    }
    if "images" in kw:
        fields["valid"] = None
    return Report(**{**fields, **kw})


def _en(rid: str = "t2", k: int = 2, **kw) -> Report:
    fields = {
        "id": rid,
        "site": "kidney",
        "history": "Flank pain.",
        "findings": "A hyperechoic focus of 6 mm with acoustic shadowing is seen in the lower pole. "
        "No hydronephrosis.",
        "diagnosis": "Left renal stone.",
        "language": "en",
        "images": [f"images/{rid}_{j}.png" for j in range(k)],
    }
    return Report(**{**fields, **kw})


def _all_samples(reports, seed=0, site_cue="both"):
    built = build_instructions(reports, TemplateGenerator(site_cue), seed=seed, site_cue=site_cue)
    assert not built.bad
    return built


def _site_names() -> list[str]:
    """Every site name; the fixtures' report text names none, so a site in an answer came from us."""
    return [name for pair in SITES.values() for name in pair]


def test_every_sample_has_one_placeholder_per_image_in_first_turn():
    reports = [_zh(f"z{i}", k=1 + i % 5) for i in range(12)] + [_en(f"e{i}", k=1 + i % 4) for i in range(12)]
    built = _all_samples(reports)
    samples = built.stage1 + built.stage2 + built.eval
    assert len(samples) > 100
    for s in samples:
        conv = s["conversations"]
        assert conv[0]["value"].count(IMAGE_TOKEN) == len(s["images"])
        assert all(IMAGE_TOKEN not in t["value"] for t in conv[1:])
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert len(s["question_types"]) == len(conv) // 2


def test_both_site_cue_variants_and_no_cue_answer_names_site():
    reports = [_zh(f"z{i}") for i in range(10)] + [_en(f"e{i}") for i in range(10)]
    built = _all_samples(reports)
    for samples in (built.stage1, built.stage2):
        assert {s["site_cue"] for s in samples} == {True, False}
        for s in samples:
            name = SITES[s["site"]][0 if s["language"] == "zh" else 1]
            first_q, first_a = s["conversations"][0]["value"], s["conversations"][1]["value"]
            if s["site_cue"]:
                assert name in first_q
            else:
                humans = [t["value"] for t in s["conversations"][::2]]
                assert not any(n in h for h in humans for n in _site_names()), humans
                assert name in first_a
    # with the site stated by a dedicated turn or by the first answer, both happen over 20 reports
    first_types = {s["question_types"][0] for s in built.stage2 if not s["site_cue"]}
    assert first_types == {"site", "findings"}


def test_languages_follow_the_report():
    built = _all_samples([_zh(), _en()])
    by_lang = {s["language"]: s for s in built.stage2}
    assert set(by_lang) == {"zh", "en"}
    assert "甲状腺" in json.dumps(by_lang["zh"], ensure_ascii=False)
    en_text = " ".join(t["value"] for t in by_lang["en"]["conversations"])
    assert not any("\u4e00" <= ch <= "\u9fff" for ch in en_text)


def test_conversations_have_two_to_four_turns_and_quote_the_report():
    reports = [_zh(f"z{i}") for i in range(20)]
    built = _all_samples(reports, site_cue="with")
    lengths = {len(s["conversations"]) // 2 for s in built.stage2}
    assert lengths <= {2, 3, 4} and len(lengths) >= 2
    r = reports[0]
    for s in built.stage2:
        for qtype, answer in zip(s["question_types"], s["conversations"][1::2], strict=True):
            source = {"findings": r.findings, "diagnosis": r.diagnosis, "history": r.history}.get(qtype)
            if source:
                assert source in answer["value"]


def test_caption_set_is_short_single_turn():
    r = _zh(findings="右叶可见一无回声囊肿，大小约1.2×0.8cm。" * 5, diagnosis="右叶囊肿。建议随访。")
    caps = build_captions(r, random.Random(0), (True, False))
    assert len(caps) == 2
    for s in caps:
        assert s["task"] == "caption" and len(s["conversations"]) == 2
        answer = s["conversations"][1]["value"]
        assert "右叶囊肿。" in answer and "建议随访" not in answer
        assert len(answer) < 30


def test_measurement_answers_match_report_text():
    reports = [_zh(f"z{i}") for i in range(15)] + [_en(f"e{i}") for i in range(15)]
    built = _all_samples(reports)
    seen = 0
    for s in built.stage2 + built.eval:
        for qtype, answer in zip(s["question_types"], s["conversations"][1::2], strict=True):
            if qtype != "measurement":
                continue
            seen += 1
            found = find_measurements(answer["value"])
            assert found, answer
            report_text = reports[0].findings if s["language"] == "zh" else reports[-1].findings
            assert all(m in report_text for m in found)
            assert ("1.2×0.8cm" if s["language"] == "zh" else "6 mm") in found
    assert seen > 10


def test_find_measurements_forms():
    text = "大小约1.2×0.8cm，另一处 12 mm；右侧 3.1 cm x 2.0 cm，约5毫米。EF: 67.3%"
    assert find_measurements(text) == ["1.2×0.8cm", "12 mm", "3.1 cm x 2.0 cm", "5毫米"]


def test_deterministic_by_seed_and_independent_of_order():
    reports = [_zh(f"z{i}") for i in range(8)] + [_en(f"e{i}") for i in range(8)]
    a = _all_samples(reports, seed=3)
    b = _all_samples(list(reversed(reports)), seed=3)
    c = _all_samples(reports, seed=4)
    key = lambda samples: sorted(json.dumps(s, ensure_ascii=False, sort_keys=True) for s in samples)  # noqa: E731
    assert key(a.stage2) == key(b.stage2) and key(a.eval) == key(b.eval) and key(a.stage1) == key(b.stage1)
    assert key(a.stage2) != key(c.stage2)


def test_eval_question_types_and_closed_answers():
    zh_eval = build_eval(_zh(), random.Random(0), (True, False))
    types = {(s["question_type"], s["answer_type"], s["site_cue"]) for s in zh_eval}
    assert ("site", "OPEN", False) in types and ("site", "OPEN", True) not in types
    for qtype in ("findings", "diagnosis", "measurement"):
        assert {(qtype, "OPEN", True), (qtype, "OPEN", False)} <= types
    closed = {s["id"]: s["conversations"][1]["value"] for s in zh_eval if s["answer_type"] == "CLOSED"}
    assert closed["t1-zh-eval-presence-cyst-cue"] == "是"
    assert sum(v == "否" for v in closed.values()) == 2  # one negative per variant
    assert all(len(s["conversations"]) == 2 for s in zh_eval)
    assert len({s["id"] for s in zh_eval}) == len(zh_eval)
    # without meta, the text decides: "No hydronephrosis" has no lesion word; the stone is affirmed
    en_eval = build_eval(_en(), random.Random(0), (False,))
    closed_en = [s for s in en_eval if s["answer_type"] == "CLOSED"]
    assert [s["id"] for s in closed_en] == ["t2-en-eval-presence-stone-nocue"]
    assert "stone" in closed_en[0]["conversations"][0]["value"]
    assert closed_en[0]["conversations"][1]["value"] == "yes"


def test_presence_facts_from_text_handle_negation_and_anechoic():
    negated = _en(findings="No stone or cyst is seen. The kidney is normal.", diagnosis="Normal kidney.")
    assert presence_facts(negated) == {"stone": False, "cyst": False}
    anechoic = _zh(findings="右叶可见一无回声囊肿，未见结节。", diagnosis="右叶囊肿。", meta={})
    assert presence_facts(anechoic) == {"cyst": True, "nodule": False}
    normal = _zh(
        findings="甲状腺大小形态正常。", diagnosis="甲状腺未见明显异常。", meta={"finding_type": "none"}
    )
    assert presence_facts(normal) == {"cyst": False, "nodule": False, "calcification": False, "stone": False}


def test_check_sample_names_id_and_both_counts():
    sample = build_captions(_zh(k=3), random.Random(0), (True,))[0]
    check_sample(sample)
    sample["images"] = sample["images"][:2]
    with pytest.raises(DataError, match=r"t1-zh-cap-cue.*3 <image> placeholders but 2 images"):
        check_sample(sample)
    sample = build_captions(_zh(k=2), random.Random(0), (True,))[0]
    sample["conversations"][1]["value"] += IMAGE_TOKEN
    sample["images"].append("images/extra.png")
    with pytest.raises(DataError, match="first human turn has 2 <image> placeholders but there are 3 images"):
        check_sample(sample)


def test_bad_reports_are_recorded_and_the_batch_continues():
    bad_text = _zh("bad", findings=f"含有{IMAGE_TOKEN}的文本。")
    escaping = _zh("esc", images=["../outside.png"])
    built = build_instructions([_zh("ok1"), bad_text, escaping, _zh("ok1"), _en("ok2")], TemplateGenerator())
    assert [b.where for b in built.bad] == ["report bad", "report esc", "report ok1"]
    assert "placeholders" in built.bad[0].reason and "escapes" in built.bad[1].reason
    assert "duplicate" in built.bad[2].reason
    assert {s["report_id"] for s in built.stage2} == {"ok1", "ok2"}


def test_unknown_generator_and_choices():
    with pytest.raises(DataError, match="unknown instruction generator 'gpt'.*template"):
        make_generator("gpt")
    with pytest.raises(DataError, match="site-cue choice 'maybe'"):
        TemplateGenerator("maybe")


def _write_dataset(root: Path) -> None:
    """A tiny SynthUS-shaped folder: images, train/test splits in zh and en, one bad line."""
    (root / "images").mkdir(parents=True)
    reports = {"train": [_zh("a", k=2), _zh("b", k=1)], "test": [_zh("c", k=3)]}
    for split, items in reports.items():
        for lang in ("zh", "en"):
            lines = []
            for r in items:
                for p in r.images:
                    Image.new("L", (8, 8)).save(root / p)
                if lang == "en":
                    r = _en(r.id, k=len(r.images), images=r.images)
                lines.append(json.dumps(r.to_dict(), ensure_ascii=False))
            if split == "train" and lang == "en":
                lines.append(json.dumps({**_en("d").to_dict(), "images": []}))
            (root / f"{split}.{lang}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "val.zh.jsonl").write_text("", encoding="utf-8")


def test_run_instruct_on_a_folder(tmp_path: Path):
    data, out = tmp_path / "synth", tmp_path / "instr"
    _write_dataset(data)
    summary = run_instruct(data, out, seed=1)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        [f"{n}.{s}.json" for n in ("stage1", "stage2", "eval") for s in ("train", "test")]
        + ["instruct_meta.json"]
    )
    assert summary.counts["train"]["reports"] == 4 and summary.counts["test"]["reports"] == 2
    assert len(summary.bad) == 1 and "train.en.jsonl:3" in summary.bad[0].where
    assert "has no images" in summary.bad[0].reason
    assert summary.skipped_files == ["val.zh.jsonl (empty)"]
    root = image_root_of(out)
    for name in ("stage1.train.json", "stage2.test.json", "eval.test.json"):
        samples = json.loads((out / name).read_text(encoding="utf-8"))
        assert samples
        for s in samples:
            check_sample(s)
            assert all((root / p).is_file() for p in s["images"])
    meta = json.loads((out / "instruct_meta.json").read_text(encoding="utf-8"))
    assert meta["image_root"] == "../synth" and meta["bad"][0]["where"] == summary.bad[0].where
    first = (out / "stage2.train.json").read_bytes()
    run_instruct(data, out, seed=1)
    assert (out / "stage2.train.json").read_bytes() == first


def test_run_instruct_language_filter_and_empty_file(tmp_path: Path):
    data = tmp_path / "synth"
    _write_dataset(data)
    run_instruct(data, tmp_path / "zh", language="zh", site_cue="without")
    samples = json.loads((tmp_path / "zh" / "stage2.train.json").read_text(encoding="utf-8"))
    assert {s["language"] for s in samples} == {"zh"} and {s["site_cue"] for s in samples} == {False}
    with pytest.raises(DataError, match="is empty"):
        run_instruct(data / "val.zh.jsonl", tmp_path / "x")
    with pytest.raises(DataError, match="unknown language 'fr'"):
        run_instruct(data, tmp_path / "x", language="fr")


def test_cli_instruct(tmp_path: Path):
    data, out = tmp_path / "synth", tmp_path / "instr"
    _write_dataset(data)
    runner = CliRunner()
    result = runner.invoke(app, ["instruct", "--reports", str(data), "--out", str(out), "--seed", "2"])
    assert result.exit_code == 0, result.output
    assert "train: 4 reports" in result.output and "1 bad reports skipped" in result.output
    assert (out / "eval.test.json").is_file()
    result = runner.invoke(app, ["instruct", "--reports", str(data), "--out", str(out), "--generator", "gpt"])
    assert result.exit_code == 2
    assert "unknown instruction generator 'gpt'" in result.output
