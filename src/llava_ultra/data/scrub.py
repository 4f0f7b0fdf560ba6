"""Remove personal information from Chinese and English report text.

`scrub_text` is a pure function (text in, text and what was found out) used on every report
before it leaves the machine, e.g. before an LLM call. It replaces, with typed placeholders:

- names after a label (姓名/患者/病人/医师..., Name:/Patient:/Physician:, Mr./Dr.), plus
  Chinese surname + 先生/女士;
- 18-digit Chinese resident ID numbers (17 digits + digit/X), and 15/18-digit numbers after 身份证;
- phone numbers: Chinese mobiles (1[3-9] + 9 digits, optional +86), landlines with an area code,
  and any number after 电话/手机/Tel/Phone;
- hospital numbers after 住院号/门诊号/病历号/ID号/MRN/Admission No. and similar labels;
- dates of birth after 出生日期/出生年月/DOB/Date of birth (exam dates are kept);
- e-mail addresses.

Design choices. Rules are regular expressions anchored on labels wherever a bare pattern would
hit medical content: a name is only taken after a label, never guessed from free text. Where a
label is weak (患者 followed directly by text, "Patient" without a colon) the candidate must start
with a common surname (or be two capitalised words) and contain no character typical of report
prose, so "患者无明显诱因..." and "Patient presents with..." stay intact. Measurements, ages,
TI-RADS/BI-RADS grades and exam dates are never matched. All rules run on the original text;
overlaps are resolved by rule priority, so reported spans refer to the input.

`scrub_file` applies it to a reports file (`llava-ultra scrub IN OUT`).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import DataError

# kind -> (Chinese placeholder, English placeholder)
PLACEHOLDERS: dict[str, tuple[str, str]] = {
    "name": ("[姓名]", "[NAME]"),
    "id_number": ("[身份证号]", "[ID]"),
    "phone": ("[电话]", "[PHONE]"),
    "record_number": ("[病历号]", "[MRN]"),
    "birth_date": ("[出生日期]", "[DOB]"),
    "email": ("[邮箱]", "[EMAIL]"),
}

_HAN = "\u4e00-\u9fff"
_CJK_RE = re.compile(f"[{_HAN}]")

# Common single-character surnames that are not also everyday report words (于, 和, 常, 单, 文,
# 安, 明 ... are left out on purpose), and compound surnames.
_SURNAMES = (
    "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘蒋蔡余杜叶程苏魏吕丁"
    "任沈姚卢姜崔钟谭陆汪范金石廖贾夏韦付方白邹孟熊秦邱江尹薛闫段雷侯龙陶黎贺顾毛郝龚邵万钱严覃武戴"
    "莫孔汤康施牛樊葛邢齐乔伍庞颜倪庄聂章鲁岳翟殷詹申欧耿兰焦俞柳甘祝尚符舒阮柯纪梅童凌毕季裴霍涂苗"
    "谷盛翁冉骆蓝游辛靳柴蒙鲍华喻祁蒲滕屈饶牟艾尤穆农卓缪麦褚娄窦戚岑景党宫费卜冷晏席卫柏宗瞿桂佟"
    "臧闵苟邬卞姬仇栾隋刁荣巫寇桑郎甄丛仲虞敖巩佘池查麻苑迟邝"
)
_COMPOUND_SURNAMES = (
    "欧阳|司马|上官|诸葛|东方|皇甫|尉迟|公孙|慕容|令狐|长孙|宇文|司徒|夏侯|轩辕|端木|独孤|南宫|"
    "西门|百里|呼延|赫连|澹台|濮阳|太史|申屠|闻人|司空|钟离|完颜"
)
# Characters frequent in report prose and rare in given names: a weak-label candidate holding
# any of them is text, not a name.
_PROSE_CHARS = set(
    "无未见不适诉述因于有及和为在经示发现病史症状痛疼后次个伴行术查检超声结节囊肿腺肝胆肾脏宫乳区部侧"
    "叶极内外下左右约可能考虑议随访复情况稳定出院入治疗自来今近曾已既往主的了是由血压疸毒炎癌瘤块"
)
# Words that end a Chinese name when written without punctuation (姓名张三性别男).
_ZH_NAME_END = (
    r"(?=[^" + _HAN + r"·]|$|性别|年龄|男|女|科室|床号|住院|门诊|病历|检查|电话|身份|出生|民族|职业|婚|岁)"
)
_ZH_NAME = r"(?P<v>[" + _HAN + r"]{2,4}?(?:·[" + _HAN + r"]{1,8})?)" + _ZH_NAME_END
_SEP = r"\s*[:：]\s*"

_EN_WORD = r"(?:[A-Z][a-z]+(?:[-'][A-Za-z][a-z]+)*|[A-Z]{2,})"
_EN_NAME3 = rf"(?P<v>{_EN_WORD}(?:[ ^]{_EN_WORD}){{0,2}})(?![A-Za-z])"
_EN_NAME23 = rf"(?P<v>{_EN_WORD}(?:[ ^]{_EN_WORD}){{1,2}})(?![A-Za-z])"
# Capitalised words that follow "Patient"/"Name" without being a name.
_EN_STOP = {
    "ID", "No", "Name", "Number", "History", "Age", "Sex", "Gender", "Information", "Info", "Record",
    "Records", "Is", "Was", "Has", "Had", "The", "With", "Presents", "Presented", "Denies", "Reports",
    "Unknown", "Male", "Female", "M", "F", "Anonymous", "Not", "None", "Consent", "Data", "Details",
    "Identifier", "Study", "Report", "Mr", "Mrs", "Ms", "Dr", "Date", "DOB", "Birth", "Born", "Tel",
    "Phone", "Mobile", "Admission", "Hospital", "Patient", "Physician", "Exam", "Medical", "MRN",
}  # fmt: skip

_MONTH = r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec)[a-z]*\.?"
_DATE = (
    r"(?P<v>\d{4}\s*[-/.年]\s*\d{1,2}(?:\s*[-/.月]\s*\d{1,2}\s*日?|\s*月)?"
    r"|\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}"
    r"|\d{8}(?!\d)"
    rf"|(?:\d{{1,2}}(?:st|nd|rd|th)?\s+)?{_MONTH}\s+(?:\d{{1,2}}(?:st|nd|rd|th)?,?\s+)?\d{{4}})"
)


@dataclass(frozen=True)
class _Rule:
    kind: str
    pattern: re.Pattern[str]
    accept: Callable[[str], str | None] = lambda s: s  # returns the part to replace, or None


def _weak_zh_name(s: str) -> str | None:
    starts = s[:2] in _COMPOUND_SURNAMES.split("|") or s[0] in _SURNAMES
    return s if starts and not (set(s) & _PROSE_CHARS) else None


def _no_prose(s: str) -> str | None:
    return None if set(s) & _PROSE_CHARS else s


def _en_name(s: str) -> str | None:
    words = re.split(r"[ ^]", s)
    if words[0] in _EN_STOP:
        return None
    while words and words[-1] in _EN_STOP:
        words.pop()
    return " ".join(words) if words else None


def _has_digit(s: str) -> str | None:
    return s if any(c.isdigit() for c in s) else None


def _seven_digits(s: str) -> str | None:
    return s if sum(c.isdigit() for c in s) >= 7 else None


def _c(p: str, flags: int = 0) -> re.Pattern[str]:
    return re.compile(p, flags)


_ZH_NAME_LABEL = r"姓名|名字"
_ZH_STAFF = r"医师|医生|大夫|检查者|报告者|记录者|审核者|签名|技师|操作者"
_ZH_WEAK = r"患者|病人|患儿|受检者|被检者|就诊者"
_EN_STRONG = (
    r"(?i:patient(?:'s)?\s+name|name|physician|doctor|sonographer|radiologist|operator|"
    r"reported\s+by|signed\s+by|examined\s+by|referring\s+physician|patient)"
)
_RECORD_LABELS = (
    r"住院号|门诊号|病历号|病案号|ID号|检查号|登记号|影像号|超声号|就诊号|就诊卡号|医保卡号|医保号|社保号|"
    r"(?<![A-Za-z])(?i:MRN|MR\s*No\.?|Medical\s+Record\s+(?:No\.?|Number)|Hospital\s+(?:No\.?|Number)|"
    r"Admission\s+(?:No\.?|Number)|Inpatient\s+(?:No\.?|Number)|Outpatient\s+(?:No\.?|Number)|"
    r"Patient\s+ID|Accession\s+(?:No\.?|Number)|Case\s+(?:No\.?|Number)|ID\s*No\.?|ID(?=\s*[:：#]))"
)

# In priority order: earlier rules win where matches overlap.
_RULES: tuple[_Rule, ...] = (
    _Rule("email", _c(r"(?P<v>[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,})")),
    _Rule("id_number", _c(r"(?<![0-9A-Za-z])(?P<v>\d{17}[\dXx])(?![0-9A-Za-z])")),
    _Rule("id_number", _c(r"身份证(?:号码|号)?\s*[:：]?\s*(?P<v>\d{15}(?:\d{2}[\dXx])?)(?![0-9A-Za-z])")),
    _Rule(
        "birth_date",
        _c(
            r"(?:出生(?:日期|年月日|年月)?于?|生日|(?i:D\.?O\.?B\.?|date\s+of\s+birth|birth\s*date|born(?:\s+on)?))"
            r"\s*[:：]?\s*" + _DATE,
            re.IGNORECASE,
        ),
    ),
    _Rule(
        "record_number",
        _c(rf"(?:{_RECORD_LABELS})\s*[:：#]?\s*(?P<v>[A-Za-z0-9][A-Za-z0-9\-_/]{{2,}})"),
        _has_digit,
    ),
    _Rule(
        "phone",
        _c(
            r"(?:联系电话|联系方式|电话|手机|(?<![A-Za-z])(?i:tel\.?|telephone|phone|mobile|cell))\s*[:：]?\s*"
            r"(?P<v>\+?\(?\d[\d()]*(?:[-\s]\(?\d[\d()]*){0,4})"
        ),
        _seven_digits,
    ),
    _Rule("phone", _c(r"(?<!\d)(?<!\d\.)(?P<v>(?:(?:\+|00)86[-\s]?)?1[3-9]\d(?:[-\s]?\d{4}){2})(?!\d|\.\d)")),
    _Rule("phone", _c(r"(?<!\d)(?<!\d\.)(?P<v>(?:\(0\d{2,3}\)|0\d{2,3})[-\s]?\d{7,8})(?!\d|\.\d)")),
    _Rule("name", _c(rf"(?:{_ZH_NAME_LABEL})(?:{_SEP})?{_ZH_NAME}")),
    _Rule("name", _c(rf"(?:{_ZH_STAFF}){_SEP}{_ZH_NAME}")),
    _Rule("name", _c(rf"(?:{_ZH_WEAK}){_SEP}{_ZH_NAME}"), _no_prose),
    # weak label without colon: only when a demographic cue follows (患者张三，女，45岁)
    _Rule(
        "name",
        _c(rf"(?:{_ZH_WEAK})\s*{_ZH_NAME}(?=[，,、\s(（]*(?:男|女|性别|年龄|\d{{1,3}}岁))"),
        _weak_zh_name,
    ),
    _Rule(
        "name",
        _c(rf"(?P<v>(?:{_COMPOUND_SURNAMES}|[{_SURNAMES}])[{_HAN}]?)(?=先生|女士|小姐)"),
        _weak_zh_name,
    ),
    _Rule("name", _c(rf"(?<![A-Za-z])(?<![A-Za-z]\s){_EN_STRONG}{_SEP}{_EN_NAME3}"), _en_name),
    _Rule("name", _c(rf"(?<![A-Za-z])(?i:patient)\s+{_EN_NAME23}"), _en_name),
    _Rule("name", _c(rf"(?<![A-Za-z])(?:Mr|Mrs|Ms|Miss|Dr)\.?\s+{_EN_NAME3}"), _en_name),
)


@dataclass(frozen=True)
class ScrubResult:
    """Scrubbed text and what was removed: `(kind, (start, end))` spans in the *input* text."""

    text: str
    found: list[tuple[str, tuple[int, int]]] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        return dict(Counter(kind for kind, _ in self.found))


def scrub_text(text: str, language: str | None = None) -> ScrubResult:
    """Replace personal information in `text` with typed placeholders.

    `language` ('zh' or 'en') picks the placeholder language; None picks Chinese when the text
    contains Chinese characters. Pure function: same input, same output.
    """
    if language not in (None, "zh", "en"):
        raise ValueError(f"language must be 'zh', 'en' or None, got {language!r}")
    zh = language == "zh" or (language is None and _CJK_RE.search(text) is not None)
    taken: list[tuple[int, int, str]] = []
    for rule in _RULES:
        for m in rule.pattern.finditer(text):
            value = rule.accept(m.group("v"))
            if not value:
                continue
            start = m.start("v")
            end = start + len(value)
            if all(end <= s or start >= e for s, e, _ in taken):
                taken.append((start, end, rule.kind))
    taken.sort()
    out: list[str] = []
    pos = 0
    for start, end, kind in taken:
        out.append(text[pos:start])
        out.append(PLACEHOLDERS[kind][0 if zh else 1])
        pos = end
    out.append(text[pos:])
    return ScrubResult("".join(out), [(kind, (start, end)) for start, end, kind in taken])


# ----------------------------------------------------------------------------- report files


@dataclass
class ScrubFileSummary:
    """Outcome of `scrub_file`: counts by kind, reports changed, unreadable lines (line, error)."""

    src: str
    dst: str
    reports: int
    changed: int
    counts: dict[str, int]
    problems: list[tuple[int, str]]

    @property
    def ok(self) -> bool:
        return not self.problems

    def render(self) -> str:
        kinds = ", ".join(f"{k}: {n}" for k, n in sorted(self.counts.items())) or "nothing found"
        lines = [
            f"scrubbed {self.reports} report(s) from {self.src} -> {self.dst}; {self.changed} changed",
            f"replaced: {kinds}",
        ]
        if self.problems:
            lines.append(f"skipped {len(self.problems)} unreadable line(s) (not written; fix and re-run):")
            lines += [f"  {self.src}:{line}: {msg}" for line, msg in self.problems]
        return "\n".join(lines)


def _scrub_value(value: Any, language: str, counts: Counter[str]) -> Any:
    if isinstance(value, str):
        result = scrub_text(value, language)
        counts.update(kind for kind, _ in result.found)
        return result.text
    if isinstance(value, list):
        return [_scrub_value(v, language, counts) for v in value]
    if isinstance(value, dict):
        return {k: _scrub_value(v, language, counts) for k, v in value.items()}
    return value


def scrub_file(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> ScrubFileSummary:
    """Scrub history, findings, diagnosis and string values in meta of every report in `src`.

    Writes `dst` (.jsonl or .csv); unreadable lines are listed in the summary, not written.
    """
    from .reports import read_reports_lenient, write_reports

    if Path(src).resolve() == Path(dst).resolve():
        raise DataError(f"output {dst} is the input file; write the scrubbed copy to a new path")
    reports, problems = read_reports_lenient(src)
    counts: Counter[str] = Counter()
    out, changed = [], 0
    for r in reports:
        before = sum(counts.values())
        new = replace(
            r,
            history=_scrub_value(r.history, r.language, counts),
            findings=_scrub_value(r.findings, r.language, counts),
            diagnosis=_scrub_value(r.diagnosis, r.language, counts),
            meta=_scrub_value(r.meta, r.language, counts),
        )
        changed += sum(counts.values()) > before
        out.append(new)
    write_reports(dst, out)
    return ScrubFileSummary(str(src), str(dst), len(reports), changed, dict(counts), problems)
