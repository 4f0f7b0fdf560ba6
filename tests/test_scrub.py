"""The core text scrubber (`llava_ultra.scrub`): golden cases in Chinese and English, tricky negatives."""

from __future__ import annotations

import pytest

from llava_ultra.scrub import scrub_text

ZH_GOLDEN = [
    ("姓名：张三 性别：男 年龄：45岁", "姓名：[姓名] 性别：男 年龄：45岁"),
    ("姓名张三丰性别男", "姓名[姓名]性别男"),
    ("患者李建国，男，56岁，因颈部肿物就诊。", "患者[姓名]，男，56岁，因颈部肿物就诊。"),
    ("患者：王小明，女", "患者：[姓名]，女"),
    ("报告医师：欧阳娜娜  审核医师：王芳", "报告医师：[姓名]  审核医师：[姓名]"),
    ("张先生，请于3日后复查。", "[姓名]先生，请于3日后复查。"),
    ("身份证号：11010119900307123X，", "身份证号：[身份证号]，"),
    ("身份证 110101900307123", "身份证 [身份证号]"),
    ("手机13812345678，联系电话：0571-87654321", "手机[电话]，联系电话：[电话]"),
    ("请致电 +86 139 1234 5678 或 (010)62345678", "请致电 [电话] 或 [电话]"),
    (
        "住院号：ZY20230101 门诊号 MZ123456 病历号: 0098765",
        "住院号：[病历号] 门诊号 [病历号] 病历号: [病历号]",
    ),
    ("ID号：A00231", "ID号：[病历号]"),
    ("出生日期：1980年3月5日，检查日期：2023-05-01", "出生日期：[出生日期]，检查日期：2023-05-01"),
    ("出生年月：1975.06", "出生年月：[出生日期]"),
    ("邮箱 zhangsan@example.com", "邮箱 [邮箱]"),
]

# Medical text that must come out unchanged.
ZH_NEGATIVE = [
    "甲状腺右叶见0.8cm×0.6cm低回声结节，边界清，TI-RADS 3类，CDFI：RI 0.65。",
    "患者无明显诱因发现颈部肿物1月。",
    "患者高血压病史5年，",
    "患者黄疸3天。",
    "患者，女，45岁，体检发现。",
    "患者：无不适。",
    "医生建议随访复查。",
    "病人情况稳定，双侧颈部未见异常肿大淋巴结。",
    "检查日期：2023-05-01，检查号位于报告右上角。",
    "肝脏大小 12.5cm，门静脉内径1.1cm，胆囊 7.2×3.1cm。",
]

EN_GOLDEN = [
    ("Patient: John Smith, 45 y/o male.", "Patient: [NAME], 45 y/o male."),
    ("Patient John Smith was examined.", "Patient [NAME] was examined."),
    ("Name: ZHANG^SAN Date of birth: March 5, 1980.", "Name: [NAME] Date of birth: [DOB]."),
    ("Reported by: Dr. Emily Chen.", "Reported by: Dr. [NAME]."),
    ("MRN: 12345678. DOB: 03/05/1980.", "MRN: [MRN]. DOB: [DOB]."),
    ("Admission No. A1234567, Patient ID: P00123", "Admission No. [MRN], Patient ID: [MRN]"),
    ("Tel: +1 555-123-4567", "Tel: [PHONE]"),
    ("Call 13912345678 or +8613812345678.", "Call [PHONE] or [PHONE]."),
    ("ID card 11010119900307123X on file", "ID card [ID] on file"),
    ("Contact: li.si@hospital.org.cn", "Contact: [EMAIL]"),
    ("Mrs. Wang Fang reports pain.", "Mrs. [NAME] reports pain."),
]

EN_NEGATIVE = [
    "The patient presents with a 1.2 x 0.8 cm nodule. TI-RADS 4, BI-RADS 3.",
    "Patient History: hypertension. Study name: Thyroid Ultrasound. Exam date: 2023-05-01.",
    "Patient: Female, 45 years. thyroid: normal. Vmax 120 cm/s.",
    "Age: 45. Sex: F. Left lobe 0.6 cm hypoechoic nodule, RI 0.65, PSV 35.2 cm/s.",
    "Patient presents with right upper quadrant pain.",
    "Follow-up in 6 months; 3 nodules, largest 12 x 9 x 8 mm.",
    "Name:",
    "Hospital course unremarkable.",
]


@pytest.mark.parametrize(("text", "expected"), ZH_GOLDEN + EN_GOLDEN)
def test_golden(text, expected):
    assert scrub_text(text).text == expected


@pytest.mark.parametrize("text", ZH_NEGATIVE + EN_NEGATIVE)
def test_medical_text_is_kept(text):
    result = scrub_text(text)
    assert result.text == text and result.found == []


def test_spans_refer_to_input_and_kinds_are_counted():
    text = "姓名：张三，手机13812345678，出生日期：1980-03-05"
    result = scrub_text(text)
    assert [(kind, text[s:e]) for kind, (s, e) in result.found] == [
        ("name", "张三"),
        ("phone", "13812345678"),
        ("birth_date", "1980-03-05"),
    ]
    assert result.counts == {"name": 1, "phone": 1, "birth_date": 1}


def test_language_picks_placeholders_and_is_pure():
    text = "Patient: John Smith"
    assert scrub_text(text, "zh").text == "Patient: [姓名]"
    assert scrub_text(text, "en") == scrub_text(text, "en")
    with pytest.raises(ValueError, match="language"):
        scrub_text(text, "fr")


# The forms issue #14 found leaking or damaged, one case each.
ISSUE_CASES = [
    ("欧阳娜娜女士，请复查。", "[姓名]女士，请复查。"),  # long name before 女士
    ("请李建国先生到3号诊室。", "请[姓名]先生到3号诊室。"),
    ("报告医师：司马相如", "报告医师：[姓名]"),  # compound surname
    ("Name: Smith, John", "Name: [NAME]"),  # Surname, Given
    ("Reported by: Van der Berg, Thomas, MD", "Reported by: [NAME], MD"),
    ("患者生于1975年6月3日，", "患者生于[出生日期]，"),
    ("1980年3月5日出生，女", "[出生日期]出生，女"),
    ("Birthday: 1980/03/05", "Birthday: [DOB]"),
    ("住院号为ZY20230101，", "住院号为[病历号]，"),
    ("身份证 110101 19900307 123X", "身份证 [身份证号]"),
    ("住址：北京市朝阳区幸福路88号", "住址：[地址]"),
    ("see https://pacs.example.cn/v?s=1 from 192.168.1.20", "see [URL] from [IP]"),
]
CLINICAL_AFTER_WEAK_LABEL = [
    "患儿高热3天。",
    "患儿黄疸1周。",
    "患者张口受限。",
    "患儿发热，咳嗽。",
    "患者高血压病史。",
]


@pytest.mark.parametrize(("text", "expected"), ISSUE_CASES)
def test_issue_forms(text, expected):
    assert scrub_text(text).text == expected


@pytest.mark.parametrize("text", CLINICAL_AFTER_WEAK_LABEL)
def test_symptom_after_weak_label_is_kept(text):
    assert scrub_text(text).text == text
