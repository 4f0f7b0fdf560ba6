"""eval/findings.py: golden extractions of hand-written zh/en answers, SynthUS agreement, vocabulary files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_ultra.data.synth import LOCATIONS, SynthConfig, plan_report, report_texts
from llava_ultra.errors import ConfigError
from llava_ultra.eval.findings import (
    ANY,
    Fact,
    extract_findings,
    facts_from_meta,
    load_vocabulary,
    location_key_facts,
    merge_facts,
    parse_sizes,
    truth_facts,
)


def facts(text: str, lang: str | None = None, vocab=None) -> list[tuple]:
    return [(f.type, f.negated, f.side, f.part, f.size_cm) for f in extract_findings(text, lang, vocab)]


# ----------------------------------------------------------------------------------- negation


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("未见结节。", [("nodule", True, None, None, None)]),
        (
            "甲状腺未见明显结节及钙化。",
            [("nodule", True, None, None, None), ("calcification", True, None, None, None)],
        ),
        ("双肾未探及结石。", [("stone", True, "bilateral", None, None)]),
        ("未见明显异常。", [(ANY, True, None, None, None)]),
        ("未见明显占位性病变。", [(ANY, True, None, None, None)]),
        # 无回声区 is a cyst (anechoic area), not a negation; 不除外 hedges, it does not deny
        ("右肾见一无回声区。", [("cyst", False, "right", None, None)]),
        (
            "左叶低回声结节，不除外钙化。",
            [("nodule", False, "left", None, None), ("calcification", False, None, None, None)],
        ),
        ("No nodule is seen.", [("nodule", True, None, None, None)]),
        # one negation covers the list; the location goes to the nearest finding before it (en)
        (
            "There are no stones or cysts in the right kidney.",
            [("stone", True, None, None, None), ("cyst", True, "right", None, None)],
        ),
        ("A nodule is not seen in the left lobe.", [("nodule", True, "left", None, None)]),
        (
            "A hypoechoic nodule without calcification.",
            [("nodule", False, None, None, None), ("calcification", True, None, None, None)],
        ),
        ("No obvious abnormality of the thyroid.", [(ANY, True, None, None, None)]),
        ("A calcification cannot be excluded.", [("calcification", False, None, None, None)]),
        # a generic word without negation states no finding
        ("病灶边界清晰。", []),
    ],
)
def test_negation(text, expected):
    assert facts(text) == expected


def test_negation_stays_in_its_clause():
    assert facts("右叶未见结节，左叶见一囊肿。") == [
        ("nodule", True, "right", None, None),
        ("cyst", False, "left", None, None),
    ]
    assert facts("No nodule is seen, but a cyst is present in the left lobe.") == [
        ("nodule", True, None, None, None),
        ("cyst", False, "left", None, None),
    ]


# ----------------------------------------------------------------------------------- synonyms


@pytest.mark.parametrize(
    ("text", "ftype"),
    [
        ("见一强回声光点。", "calcification"),
        ("可见点状强回声，后伴声影。", "calcification"),
        ("胆囊内见强回声团。", "stone"),
        ("子宫前壁肌瘤。", "nodule"),
        ("囊性结节 TI-RADS 2类", "cyst"),
        ("An echogenic focus with a posterior acoustic shadow.", "calcification"),
        ("Multiple calculi are seen.", "stone"),
        ("An anechoic area is seen.", "cyst"),
        ("A hyperechoic mass with an arc-shaped surface.", "stone"),
        ("Fibroids of the uterus.", "nodule"),
        ("Two NODULES.", "nodule"),
    ],
)
def test_synonyms(text, ftype):
    assert [f.type for f in extract_findings(text)] == [ftype]


# ------------------------------------------------------------------- sides, locations, sizes


def test_side_location_and_size_attach_to_their_finding():
    zh = "甲状腺右叶上极见一大小约1.2cm×0.8cm的低回声结节，边界清，CDFI：未见明显血流信号。"
    assert facts(zh) == [("nodule", False, "right", "upper", (1.2, 0.8))]
    en = (
        "A hypoechoic nodule measuring approximately 1.2 cm × 0.8 cm is seen in the upper pole of the "
        "right thyroid lobe, well-defined; CDFI: no obvious blood flow signal."
    )
    assert facts(en) == [("nodule", False, "right", "upper", (1.2, 0.8))]
    # size in the next clause (zh), location before the finding (en), mm converted
    assert facts("左乳外上象限可见一无回声区，大小约8mm×6mm，形态规则。") == [
        ("cyst", False, "left", "upper_outer", (0.8, 0.6))
    ]
    assert facts("In the lower pole of the left kidney there is a stone of about 0.6 by 0.4 cm.") == [
        ("stone", False, "left", "lower", (0.6, 0.4))
    ]


def test_several_findings_in_one_sentence():
    zh = "甲状腺右叶见一结节，大小约1.2cm×0.8cm，左叶见一囊肿，大小约0.5cm×0.4cm。"
    assert facts(zh) == [
        ("nodule", False, "right", None, (1.2, 0.8)),
        ("cyst", False, "left", None, (0.5, 0.4)),
    ]
    en = "A 1.2 cm nodule in the upper pole of the right lobe and a 0.5 cm cyst in the lower pole of the left lobe."
    assert facts(en) == [
        ("nodule", False, "right", "upper", (1.2,)),
        ("cyst", False, "left", "lower", (0.5,)),
    ]
    assert facts("右肾结石及左肾囊肿，未见钙化。") == [
        ("stone", False, "right", None, None),
        ("cyst", False, "left", None, None),
        ("calcification", True, None, None, None),
    ]


def test_parse_sizes_and_merge():
    assert parse_sizes("大小约1.2cm×0.8cm") == [(3, (1.2, 0.8))]
    assert parse_sizes("12 x 8 mm, TI-RADS 3, 2 lesions") == [(0, (1.2, 0.8))]
    assert parse_sizes("1.5厘米") == [(0, (1.5,))]
    merged = merge_facts(
        extract_findings(
            "右叶上极见一结节，大小约1.0cm×0.8cm。诊断：甲状腺右叶上极实性结节。左叶结节。", "zh"
        )
    )
    assert merged == [Fact("nodule", False, "right", "upper", (1.0, 0.8)), Fact("nodule", False, "left")]


# ------------------------------------------------------------------------ SynthUS ground truth


def test_location_keys_and_meta():
    assert location_key_facts("right_lobe_upper") == ("right", "upper")
    assert location_key_facts("left_upper_outer") == ("left", "upper_outer")
    assert location_key_facts("right_lobe") == ("right", None)
    assert location_key_facts("gallbladder") == (None, "gallbladder")
    assert facts_from_meta({"finding_type": "none"}) == []
    assert facts_from_meta({"split": "test"}) is None
    meta = {"finding_type": "cyst", "location": "left_middle", "size_cm": [0.5, 0.4]}
    assert facts_from_meta(meta) == [Fact("cyst", False, "left", "middle", (0.5, 0.4))]
    assert truth_facts({"meta": meta, "findings": "右肾结石。"}) == (
        [Fact("cyst", False, "left", "middle", (0.5, 0.4))],
        "meta",
    )
    assert truth_facts({"findings": "右肾结石。", "language": "zh"}) == (
        [Fact("stone", False, "right")],
        "text",
    )
    assert truth_facts({"conversations": []}) == ([], "none")


@pytest.mark.parametrize("site", sorted(LOCATIONS))
def test_every_synthus_location_phrase_reads_back(site):
    for key, (zh, en) in LOCATIONS[site].items():
        side, part = location_key_facts(key)
        assert facts(f"{zh}见一结节。", "zh") == [("nodule", False, side, part, None)], (site, key, zh)
        assert facts(f"A nodule is seen in the {en}.", "en") == [("nodule", False, side, part, None)], (
            site,
            key,
            en,
        )


def test_extractor_agrees_with_synthus_meta_on_every_template():
    """The text rules read SynthUS findings and diagnoses exactly as the structured meta says."""
    cfg = SynthConfig(reports=160, seed=5, image_size=64)
    seen = set()
    for i in range(cfg.reports):
        for report in report_texts(plan_report(cfg, i)):
            gold = facts_from_meta(report.meta)
            got = merge_facts(
                [f for f in extract_findings(report.findings, report.language) if not f.negated]
            )
            assert [f for f in got if f.type != ANY] == gold, (report.findings, gold)
            diag = merge_facts(
                [f for f in extract_findings(report.diagnosis, report.language) if not f.negated]
            )
            assert [(f.type, f.side, f.part) for f in diag if f.type != ANY] == [
                (g.type, g.side, g.part) for g in gold
            ]
            seen.add((report.site, report.meta["finding_type"], report.language))
    assert len(seen) >= 30  # every site, most finding types, both languages


# --------------------------------------------------------------------------------- vocabulary


def test_vocabulary_file_extends_the_built_in_terms(tmp_path: Path):
    path = tmp_path / "vocab.yaml"
    path.write_text(
        "findings:\n"
        "  polyp: {zh: [息肉], en: [polyp]}\n"
        "  nodule: {en: [hypoechoic lesion]}\n"
        "parts:\n"
        "  neck: {zh: [胆囊颈], en: [gallbladder neck]}\n",
        encoding="utf-8",
    )
    vocab = load_vocabulary(path)
    assert "polyp" in vocab.types and "nodule" in vocab.types
    assert facts("胆囊颈见一息肉。", "zh", vocab) == [("polyp", False, None, "neck", None)]
    assert facts("A hypoechoic lesion in the left lobe.", "en", vocab) == [
        ("nodule", False, "left", None, None)
    ]
    assert facts("A hypoechoic lesion in the left lobe.", "en") == []  # built-in: generic, no finding
    js = tmp_path / "v.json"
    js.write_text(json.dumps({"negations": {"en": ["no sign of"]}}), encoding="utf-8")
    assert facts("No sign of stones.", "en", load_vocabulary(js)) == [("stone", True, None, None, None)]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"organs": {}}, "unknown vocabulary section"),
        ({"findings": {"cyst": {"fr": ["kyste"]}}}, "language 'fr'"),
        ({"findings": {"cyst": {"en": [""]}}}, "non-empty strings"),
        ({"sides": {"middle": {"en": ["mid"]}}}, "a side is one of"),
        ({"findings": {"any": {"en": ["thing"]}}}, "reserved"),
    ],
)
def test_vocabulary_errors_name_the_entry(tmp_path: Path, content, message):
    path = tmp_path / "v.json"
    path.write_text(json.dumps(content), encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        load_vocabulary(path)
    with pytest.raises(ConfigError, match="not found"):
        load_vocabulary(tmp_path / "missing.json")
