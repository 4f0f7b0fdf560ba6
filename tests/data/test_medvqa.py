"""Tests for the Med-VQA readers: tiny fixture folders in each public layout, written per test."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
from PIL import Image

from llava_ultra.data.instruct import CLOSED, OPEN, run_instruct
from llava_ultra.data.medvqa import (
    OPENI_QUESTION,
    READERS,
    VQASample,
    load_dataset,
    load_dataset_lenient,
    parse_spec,
    read_openi_zh,
    read_pathvqa,
    read_slake,
    read_ultra,
    read_vqa_rad,
    to_eval_sample,
)
from llava_ultra.data.reports import Report, write_reports
from llava_ultra.data.samples import IMAGE_TOKEN, check_sample
from llava_ultra.errors import DataError


def _img(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (4, 4), 128).save(path)


def _json(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def _slake_rec(qid: int, img: str, lang: str = "en", **kw) -> dict:
    rec = {
        "img_id": int(img.split("/")[0][5:]),
        "img_name": img,
        "question": "Which organ is abnormal?" if lang == "en" else "哪个器官不正常？",
        "answer": "Liver" if lang == "en" else "肝脏",
        "q_lang": lang,
        "location": "Abdomen",
        "modality": "CT",
        "answer_type": "OPEN",
        "base_type": "vqa",
        "content_type": "Organ",
        "triple": ["vhead", "_", "_"],
        "qid": qid,
    }
    rec.update(kw)
    return rec


def _slake(tmp_path: Path) -> Path:
    root = tmp_path / "Slake1.0"
    for name in ("xmlab1/source.jpg", "xmlab2/source.jpg"):
        _img(root / "imgs" / name)
    _json(root / "train.json", [_slake_rec(1, "xmlab1/source.jpg")])
    _json(root / "validate.json", [_slake_rec(2, "xmlab1/source.jpg", "zh")])
    _json(
        root / "test.json",
        [
            _slake_rec(10, "xmlab1/source.jpg"),
            _slake_rec(11, "xmlab2/source.jpg", "zh", answer="是", answer_type="CLOSED", modality="MRI"),
            _slake_rec(12, "xmlab2/source.jpg", answer="Yes", answer_type="CLOSED", modality="X-Ray"),
        ],
    )
    return root


def _vqa_rad(tmp_path: Path) -> Path:
    root = tmp_path / "vqa_rad"
    for name in ("synpic1.jpg", "synpic2.jpg"):
        _img(root / "VQA_RAD Image Folder" / name)
    base = {"image_organ": "CHEST", "question_type": " pres", "image_name": "synpic1.jpg"}
    records = [
        {**base, "qid": 1, "question": "Is there a mass?", "answer": "yes", "answer_type": "CLOSED ", "phrase_type": "freeform"},
        {**base, "qid": 2, "question": "How many ribs are broken?", "answer": 2, "answer_type": "open", "phrase_type": "test_freeform"},
        {**base, "qid": 3, "image_name": "synpic2.jpg", "question": "Size?", "answer": 2.0, "answer_type": "OPEN", "phrase_type": "test_para"},
    ]  # fmt: skip
    _json(root / "VQA_RAD Dataset Public.json", records)
    return root


def _pathvqa(tmp_path: Path) -> Path:
    root = tmp_path / "pvqa"
    for name in ("test_0001", "test_0002"):
        _img(root / "images" / "test" / f"{name}.jpg")
    qa = [
        {"image": "test_0001", "question": "Is this necrosis?", "answer": "no"},
        {"image": "test_0002", "question": "What is present?", "answer": "granuloma"},
    ]
    (root / "qas" / "test").mkdir(parents=True)
    (root / "qas" / "test" / "test_qa.pkl").write_bytes(pickle.dumps(qa))
    return root


def _openi(tmp_path: Path, ids=("162_2", "162_1", "175_1")) -> Path:
    root = tmp_path / "openi"
    for image_id in ids:
        _img(root / "images" / f"{image_id}.png")
    captions = {"162": "心肺未见明显异常。", "175": "右下肺见片状阴影，考虑炎症。"}
    _json(root / "openi-zh.json", {"annotations": [{"image_id": i, "caption": captions[i[:3]]} for i in ids]})
    return root


def _reports(tmp_path: Path) -> Path:
    root = tmp_path / "hospital"
    reports = [
        Report(
            id=f"r{i}",
            site="thyroid",
            history="",
            findings=f"右叶可见一囊肿，大小约1.{i}×0.8cm，边界清。",
            diagnosis="右叶囊肿。",
            language="zh",
            images=[f"images/r{i}_{j}.png" for j in range(i + 1)],
        )
        for i in range(2)
    ]
    for r in reports:
        for rel in r.images:
            _img(root / rel)
    write_reports(root / "test.zh.jsonl", reports)
    return root


# ------------------------------------------------------------------------------------- SLAKE


def test_slake_fields_language_modality_and_split(tmp_path):
    root = _slake(tmp_path)
    test = read_slake(root)
    assert [s.id for s in test] == ["slake-test-10", "slake-test-11", "slake-test-12"]
    first = test[0]
    assert (first.question, first.answer, first.answer_type, first.language) == (
        "Which organ is abnormal?",
        "Liver",
        OPEN,
        "en",
    )
    assert (first.dataset, first.split, first.modality, first.question_type) == (
        "slake",
        "test",
        "CT",
        "Organ",
    )
    assert first.images == ["imgs/xmlab1/source.jpg"] and first.image_paths()[0].is_file()
    assert first.meta["report_id"] == "1" and first.meta["location"] == "Abdomen"
    assert [s.modality for s in test] == ["CT", "MRI", "X-Ray"]
    assert [s.answer_type for s in test] == [OPEN, CLOSED, CLOSED]

    zh = read_slake(root, language="zh")
    assert [(s.id, s.answer) for s in zh] == [("slake-test-11", "是")]
    assert [s.id for s in read_slake(root, split="val")] == ["slake-validate-2"]
    assert len(read_slake(root, split="all")) == 5
    assert [s.id for s in load_dataset(f"slake:{root}?split=test&lang=en")] == [
        "slake-test-10",
        "slake-test-12",
    ]


def test_slake_layout_errors(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("hi")
    with pytest.raises(
        DataError, match=r"expected train.json/validate.json/test.json in .*SLAKE layout.*notes.txt"
    ):
        read_slake(tmp_path / "x")
    _json(tmp_path / "x" / "train.json", [])
    with pytest.raises(
        DataError, match=r"expected test.json in .* split 'test'.*found: notes.txt, train.json"
    ):
        read_slake(tmp_path / "x")
    with pytest.raises(DataError, match="expected an imgs/ folder"):
        read_slake(tmp_path / "x", split="train")
    assert read_slake(tmp_path / "x", split="train", check_images=False) == []
    with pytest.raises(DataError, match="does not exist"):
        read_slake(tmp_path / "nowhere")
    with pytest.raises(DataError, match="unknown SLAKE split 'dev'"):
        read_slake(tmp_path / "x", split="dev")
    with pytest.raises(DataError, match="unknown language 'fr'"):
        read_slake(tmp_path / "x", language="fr")


def test_slake_malformed_records_name_file_index_and_field(tmp_path):
    root = _slake(tmp_path)
    records = json.loads((root / "test.json").read_text(encoding="utf-8"))
    del records[1]["answer"]
    records[2]["q_lang"] = "fr"
    _json(root / "test.json", records)
    with pytest.raises(DataError, match=r"test\.json record\[1\]: missing field\(s\) answer"):
        read_slake(root)
    problems = []
    samples = read_slake(root, problems=problems)
    assert [s.id for s in samples] == ["slake-test-10"]
    assert [p.where.rsplit(" ", 1)[1] for p in problems] == ["record[1]", "record[2]"]
    assert "'q_lang' is 'fr'" in problems[1].reason

    (root / "test.json").write_text('[{"qid": 1,\n "answer": }]', encoding="utf-8")
    with pytest.raises(DataError, match=r"test\.json: bad JSON at line 2 column"):
        read_slake(root, problems=[])  # file-level problems raise even in lenient mode
    _json(root / "test.json", {"not": "a list"})
    with pytest.raises(DataError, match="expected a JSON list of SLAKE records, got a dict"):
        read_slake(root)


def test_missing_image_is_named_and_lenient_mode_skips_it(tmp_path):
    root = _slake(tmp_path)
    (root / "imgs" / "xmlab2" / "source.jpg").unlink()
    missing = str(root.resolve() / "imgs" / "xmlab2" / "source.jpg")
    with pytest.raises(DataError, match=r"record\[1\]: image .*xmlab2.source\.jpg does not exist") as info:
        read_slake(root)
    assert missing in str(info.value)
    samples, problems = load_dataset_lenient(f"slake:{root}")
    assert [s.id for s in samples] == ["slake-test-10"]
    assert len(problems) == 2 and all(missing in p.reason for p in problems)
    assert len(load_dataset(f"slake:{root}?check_images=0")) == 3


def test_image_paths_cannot_escape_the_dataset_folder(tmp_path):
    root = _slake(tmp_path)
    _json(root / "test.json", [_slake_rec(1, "xmlab1/../../../secret.jpg")])
    with pytest.raises(DataError, match="escapes the dataset root"):
        read_slake(root, check_images=False)


def test_duplicate_ids_are_rejected(tmp_path):
    root = _slake(tmp_path)
    _json(root / "test.json", [_slake_rec(5, "xmlab1/source.jpg"), _slake_rec(5, "xmlab2/source.jpg")])
    with pytest.raises(
        DataError, match=r"record\[1\]: duplicate sample id 'slake-test-5' \(first at .*record\[0\]\)"
    ):
        read_slake(root)


# ----------------------------------------------------------------------------------- VQA-RAD


def test_vqa_rad_coerces_answers_normalises_types_and_splits_by_phrase_type(tmp_path):
    root = _vqa_rad(tmp_path)
    test = read_vqa_rad(root)
    assert [(s.id, s.answer, s.answer_type, s.split) for s in test] == [
        ("vqa-rad-2", "2", OPEN, "test"),
        ("vqa-rad-3", "2", OPEN, "test"),
    ]
    train = read_vqa_rad(root, split="train")
    assert [(s.id, s.answer_type, s.question_type) for s in train] == [("vqa-rad-1", CLOSED, "PRES")]
    assert train[0].language == "en" and train[0].meta["organ"] == "CHEST"
    assert train[0].images == ["VQA_RAD Image Folder/synpic1.jpg"] and train[0].image_paths()[0].is_file()
    assert len(load_dataset(f"vqa-rad:{root}?split=all")) == 3


def test_vqa_rad_bad_layout_and_records(tmp_path):
    with pytest.raises(
        DataError, match=r"expected 'VQA_RAD Dataset Public.json' in .*found: \(empty folder\)"
    ):
        read_vqa_rad(tmp_path)
    root = _vqa_rad(tmp_path)
    records = json.loads((root / "VQA_RAD Dataset Public.json").read_text(encoding="utf-8"))
    records[1]["phrase_type"] = "holdout"
    records[2]["answer_type"] = "MAYBE"
    _json(root / "VQA_RAD Dataset Public.json", records)
    with pytest.raises(DataError, match=r"record\[1\]: field 'phrase_type' is 'holdout'"):
        read_vqa_rad(root)
    problems = []
    assert read_vqa_rad(root, split="all", problems=problems)[0].id == "vqa-rad-1"
    assert "'answer_type' is 'MAYBE'; expected OPEN or CLOSED" in problems[1].reason


# ----------------------------------------------------------------------------------- PathVQA


def test_pathvqa_pickle_and_yes_no_answer_type(tmp_path):
    root = _pathvqa(tmp_path)
    samples = read_pathvqa(root)
    assert [(s.id, s.answer, s.answer_type) for s in samples] == [
        ("pathvqa-test-0", "no", CLOSED),
        ("pathvqa-test-1", "granuloma", OPEN),
    ]
    assert samples[0].images == ["images/test/test_0001.jpg"] and samples[0].modality == "pathology"
    assert samples[0].meta["report_id"] == "test_0001"


def test_pathvqa_prefers_llava_med_json(tmp_path):
    root = _pathvqa(tmp_path)
    _json(
        root / "test.json",
        [
            {
                "id": "q7",
                "image": "test_0002.jpg",
                "conversations": [
                    {"from": "human", "value": f"{IMAGE_TOKEN}\nWhat is present?"},
                    {"from": "gpt", "value": "granuloma"},
                ],
                "answer_type": "open",
            }
        ],
    )
    (sample,) = load_dataset(f"pathvqa:{root}?split=test")
    assert (sample.id, sample.question, sample.answer, sample.answer_type) == (
        "pathvqa-test-q7",
        "What is present?",
        "granuloma",
        OPEN,
    )


def test_pathvqa_refuses_unsafe_pickles(tmp_path):
    root = _pathvqa(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (root / "qas" / "test" / "test_qa.pkl").write_bytes(pickle.dumps([Evil()]))
    with pytest.raises(
        DataError, match="not a plain pickled list of dicts.*refusing to load.*convert it to JSON"
    ):
        read_pathvqa(root)
    assert not marker.exists()

    outside = tmp_path / "elsewhere.pkl"
    outside.write_bytes(pickle.dumps([]))
    (root / "qas" / "test" / "test_qa.pkl").unlink()
    (root / "qas" / "test" / "test_qa.pkl").symlink_to(outside)
    with pytest.raises(DataError, match="outside .*refusing to unpickle"):
        read_pathvqa(root)


def test_pathvqa_layout_and_record_errors(tmp_path):
    root = _pathvqa(tmp_path)
    with pytest.raises(
        DataError, match=r"expected one of train.json, qas/train.json, qas/train/train_qa.pkl"
    ):
        read_pathvqa(root, split="train")
    (root / "qas" / "test" / "test_qa.pkl").write_bytes(
        pickle.dumps([{"image": "test_0001", "answer": "no"}])
    )
    with pytest.raises(DataError, match=r"test_qa\.pkl record\[0\]: missing field\(s\) question"):
        read_pathvqa(root)


# ---------------------------------------------------------------------------------- OpenI-zh


def test_openi_groups_frames_by_report(tmp_path):
    root = _openi(tmp_path)
    samples = read_openi_zh(root)
    assert [(s.id, len(s.images)) for s in samples] == [("openi-zh-162", 2), ("openi-zh-175", 1)]
    first = samples[0]
    assert first.images == ["images/162_1.png", "images/162_2.png"]  # ordered by frame number
    assert (first.question, first.answer, first.language, first.modality) == (
        OPENI_QUESTION,
        "心肺未见明显异常。",
        "zh",
        "X-Ray",
    )
    assert first.meta["image_ids"] == ["162_1", "162_2"] and first.meta["findings"] == first.answer
    assert load_dataset(f"openi-zh:{root / 'openi-zh.json'}")[1].id == "openi-zh-175"


def test_openi_missing_frame_and_layout(tmp_path):
    root = _openi(tmp_path)
    (root / "images" / "162_1.png").unlink()
    with pytest.raises(DataError, match=r"annotations\[1\]: image .*162_1\.png does not exist"):
        read_openi_zh(root)
    samples, problems = load_dataset_lenient(f"openi-zh:{root}")
    assert [s.images for s in samples] == [["images/162_2.png"], ["images/175_1.png"]]
    assert len(problems) == 1
    data = json.loads((root / "openi-zh.json").read_text(encoding="utf-8"))
    _json(root / "openi-zh.json", {"annotations": data["annotations"] + data["annotations"][-1:]})
    with pytest.raises(DataError, match=r"annotations\[3\]: image_id '175_1' repeats .*annotations\[2\]"):
        read_openi_zh(root, check_images=False)
    (root / "openi-zh.json").rename(root / "a.json")
    _json(root / "b.json", {})
    with pytest.raises(DataError, match=r"expected openi-zh.json .*found: a.json, b.json, images/"):
        read_openi_zh(root)
    _json(root / "openi-zh.json", {"images": []})
    with pytest.raises(DataError, match="XrayGLM format"):
        read_openi_zh(root)


# -------------------------------------------------------------------------- our own formats


def test_ultra_eval_round_trips_and_reports_give_the_same_qa(tmp_path):
    hospital = _reports(tmp_path)
    out = tmp_path / "instruct"
    run_instruct(hospital, out)
    original = json.loads((out / "eval.test.json").read_text(encoding="utf-8"))
    samples = read_ultra(out / "eval.test.json")
    assert len(samples) == len(original) and samples[0].split == "test" and samples[0].dataset == "ultra"
    assert all(s.root == str(hospital.resolve()) for s in samples)
    closed = [s for s in samples if s.answer_type == CLOSED]
    assert closed and all(s.answer in ("是", "否") for s in closed)
    for rec, sample in zip(original, samples, strict=True):
        back = to_eval_sample(sample, image_root=sample.root)
        assert {k: back[k] for k in rec} == rec

    from_reports = load_dataset(f"reports:{hospital / 'test.zh.jsonl'}?seed=0&site_cue=both")
    assert [(s.id, s.question, s.answer, s.images) for s in from_reports] == [
        (s.id, s.question, s.answer, s.images) for s in samples
    ]
    assert {s.dataset for s in from_reports} == {"reports"}
    assert load_dataset(f"reports:{hospital}?lang=en") == []


def test_ultra_multi_turn_samples_split_into_turns(tmp_path):
    hospital = _reports(tmp_path)
    out = tmp_path / "instruct"
    run_instruct(hospital, out, site_cue="with")
    stage2 = json.loads((out / "stage2.test.json").read_text(encoding="utf-8"))
    samples = read_ultra(out / "stage2.test.json")
    assert len(samples) == sum(len(r["conversations"]) // 2 for r in stage2)
    multi = next(r for r in stage2 if len(r["conversations"]) > 2)
    turns = [s for s in samples if s.id.startswith(multi["id"] + "-t")]
    assert [s.question_type for s in turns] == multi["question_types"]
    assert all(IMAGE_TOKEN not in s.question for s in turns)


def test_ultra_and_report_errors(tmp_path):
    hospital = _reports(tmp_path)
    path = _json(
        tmp_path / "mine.json",
        [{"id": "a", "images": ["x.png", "y.png"], "language": "zh",
          "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\n问"}, {"from": "gpt", "value": "答"}]}],
    )  # fmt: skip
    with pytest.raises(
        DataError, match=r"mine\.json record\[0\]: sample a: 1 <image> placeholders but 2 images"
    ):
        read_ultra(path)
    with pytest.raises(DataError, match="is a folder"):
        read_ultra(tmp_path)
    (hospital / "images" / "r1_1.png").unlink()
    with pytest.raises(DataError, match=r"test\.zh\.jsonl report r1: image .*r1_1\.png does not exist"):
        load_dataset(f"reports:{hospital}")
    with (hospital / "test.zh.jsonl").open("a", encoding="utf-8") as fh:
        fh.write("{not json\n")
    samples, problems = load_dataset_lenient(f"reports:{hospital}")
    assert {s.meta["report_id"] for s in samples} == {"r0"}
    assert [p.where.rsplit("/", 1)[1] for p in problems] == ["test.zh.jsonl:3", "test.zh.jsonl report r1"]


# -------------------------------------------------------------------------- conversion, specs


def test_to_eval_sample_places_one_placeholder_per_image(tmp_path):
    (report,) = [s for s in read_openi_zh(_openi(tmp_path)) if len(s.images) == 2]
    rec = to_eval_sample(report)
    check_sample(rec)
    human = rec["conversations"][0]["value"]
    assert human.count(IMAGE_TOKEN) == len(rec["images"]) == 2 and human.endswith(OPENI_QUESTION)
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in rec["images"])
    assert (rec["site"], rec["site_cue"], rec["valid"], rec["findings"]) == (None, None, None, report.answer)
    assert (rec["report_id"], rec["task"], rec["answer_type"], rec["dataset"]) == (
        "162",
        "qa",
        OPEN,
        "openi-zh",
    )
    assert rec["meta"] == {"image_ids": ["162_1", "162_2"]}
    slake = to_eval_sample(read_slake(_slake(tmp_path))[0], image_root=tmp_path)
    assert slake["images"] == ["Slake1.0/imgs/xmlab1/source.jpg"] and slake["findings"] == ""
    json.dumps(slake)  # serialisable as written by the eval runner


def test_sample_validation():
    with pytest.raises(DataError, match="answer_type 'yes' is not OPEN or CLOSED"):
        VQASample("a", ["x.png"], "q?", "a", "yes", "en", "d", "test")
    with pytest.raises(DataError, match="has no images"):
        VQASample("a", [], "q?", "a", OPEN, "en", "d", "test")
    with pytest.raises(DataError, match="holds <image>"):
        VQASample("a", ["x.png"], "<image> q?", "a", OPEN, "en", "d", "test")


def test_spec_parsing_and_errors(tmp_path):
    assert parse_spec("slake:/d/Slake1.0?split=test&lang=zh") == (
        "slake",
        "/d/Slake1.0",
        {"split": "test", "lang": "zh"},
    )
    assert parse_spec("ultra:/a b/eval.test.json") == ("ultra", "/a b/eval.test.json", {})
    with pytest.raises(
        DataError, match="unknown dataset scheme 'coco'.*known schemes: " + ", ".join(READERS)
    ):
        load_dataset("coco:/x")
    with pytest.raises(DataError, match="bad dataset spec '/just/a/path'.*SCHEME:PATH"):
        load_dataset("/just/a/path")
    with pytest.raises(DataError, match="unknown option 'lang' for vqa-rad.*accepts: split, check_images"):
        load_dataset(f"vqa-rad:{tmp_path}?lang=en")
    with pytest.raises(DataError, match="option 'seed'.*expected an integer, got 'x'"):
        load_dataset(f"reports:{tmp_path}?seed=x")
    with pytest.raises(DataError, match="option 'check_images'.*true/false"):
        load_dataset(f"slake:{tmp_path}?check_images=maybe")
    with pytest.raises(DataError, match="bad options"):
        load_dataset(f"slake:{tmp_path}?split")
