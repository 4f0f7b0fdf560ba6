"""Remove personal information from Chinese and English report text.

`scrub_text` is a pure function (text in, text and what was found out) used on every report
before it leaves the machine, e.g. before an LLM call. It replaces, with typed placeholders:

- names after a label (姓名/患者/患儿/家属/母亲.../医师/审核/记录..., Name:/Patient:/Reported by/
  Mr./Dr./Prof.) in every usual English order (John Smith, Smith, John, SMITH^JOHN, J. Smith,
  particles), and Chinese names of any length, compound surnames and `·` names before titles and
  honorifics (先生/女士/老师/主任/教授...) or before sex and age (张三，男，45岁);
- resident ID numbers with or without separators (6-8-4), 15/18-digit numbers after 身份证,
  passports, SSNs;
- phone numbers: Chinese mobiles and landlines, international (+CC ...) and US formats, and any
  number after 电话/手机/Tel/Phone/call;
- record numbers after 住院号(为/码)/门诊号/病历号/检查编号/就诊卡/MRN#/Accession/Visit... labels;
- birth dates before or after the date (出生日期/生于/...出生/DOB/Birthday/born), in digits,
  Chinese numerals, month names, or year only (exam dates are kept);
- addresses after labels or in the 省/市/区/路/号 and "123 Main Street" shapes; e-mails, URLs, IPv4.

Design choices. Rules are regular expressions anchored on labels wherever a bare pattern would
hit medical content: a name is only taken after a label or before a title, never guessed from
free text. Where a label is weak (患者 followed directly by text, "Patient" without a colon) the
candidate must start with a common surname (or be capitalised words not in a stop list) and its
given name must hold no character typical of report prose nor a listed clinical word, so
"患者无明显诱因...", "患儿高热3天" and "Patient presents with..." stay intact. Measurements, ages,
grades and exam dates are never matched. All rules run on the original text; a rejected match is
retried one character later (so 患儿母亲徐静 finds 母亲 + 徐静); overlaps are resolved by rule
priority, so reported spans refer to the input.

This is the core-layer text scrubber, so the LLM client (`llm/`) can scrub without importing the
data layer; its placeholders live in `llava_ultra.vocab`. Report files and the measurement of the
scrubber on a labelled corpus are in `data/scrub.py`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from .vocab import PLACEHOLDERS

_HAN = "\u4e00-\u9fff"
_CJK_RE = re.compile(f"[{_HAN}]")

# Common single-character surnames that are not also everyday report words (于, 和, 常, 单, 文,
# 安, 明, 查 (检查医师) ... are left out on purpose), and compound surnames.
_SURNAMES = (
    "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘蒋蔡余杜叶程苏魏吕丁"
    "任沈姚卢姜崔钟谭陆汪范金石廖贾夏韦付方白邹孟熊秦邱江尹薛闫段雷侯龙陶黎贺顾毛郝龚邵万钱严覃武戴"
    "莫孔汤康施牛樊葛邢齐乔伍庞颜倪庄聂章鲁岳翟殷詹申欧耿兰焦俞柳甘祝尚符舒阮柯纪梅童凌毕季裴霍涂苗"
    "谷盛翁冉骆蓝游辛靳柴蒙鲍华喻祁蒲滕屈饶牟艾尤穆农卓缪麦褚娄窦戚岑景党宫费卜冷晏席卫柏宗瞿桂佟"
    "臧闵苟邬卞姬仇栾隋刁荣巫寇桑郎甄丛仲虞敖巩佘池麻苑迟邝"
)
_COMPOUND_SURNAMES = (
    "欧阳|司马|上官|诸葛|东方|皇甫|尉迟|公孙|慕容|令狐|长孙|宇文|司徒|夏侯|轩辕|端木|独孤|南宫|"
    "西门|百里|呼延|赫连|澹台|濮阳|太史|申屠|闻人|司空|钟离|完颜"
)
_SURNAME_RE = rf"(?:{_COMPOUND_SURNAMES}|[{_SURNAMES}])"
# Characters frequent in report prose and rare in given names: a candidate holding any of them
# is text, not a name.
_PROSE_CHARS = set(
    "无未见不适诉述因于有及和为在经示发现病史症状痛疼后次个伴行术查检声结节囊肿腺肝胆肾脏宫乳区部侧"
    "叶极内外下左右约可能考虑议随访复情况稳定出院入治疗自来今近曾已既往主的了是由血压疸毒炎癌瘤块"
    "热咳嗽呕吐泻晕乏力瘦肿胀酸麻痒闷悸喘抽搐疹尿便频急孕胎产经量多低重轻度性型级类期"
    "回声弱等均匀清晰糙张规则样线摆属径位意显常例资岁男女床号科室签字名同意陪诉告知请班诊管治修习任"
    "才食饮睡眠"
)
# Clinical words that start with a surname character; never a name, whatever follows them.
_CLINICAL_ZH = (
    "高热",
    "高烧",
    "高回声",
    "高血压",
    "黄疸",
    "黄体",
    "毛糙",
    "毛发",
    "张力",
    "张口",
    "余肝",
    "余未见",
    "方位",
    "方便",
    "常规",
    "任意",
    "明显",
    "石样",
    "白线",
    "白带",
    "钟摆",
    "金属",
    "孔径",
    "严重",
    "包块",
    "江河",
    "管壁",
    "付费",
    "齐全",
    "尚可",
    "尚清",
    "程度",
    "甘油",
    "章节",
    "史密斯",
    "强回声",
    "超声",
    "大小",
    "谢谢",
    "感谢",
)
# Words that end a Chinese name when written without punctuation (姓名张三性别男).
_ZH_NAME_END = (
    r"(?=[^" + _HAN + r"·]|$|性别|年龄|男|女|科室|床号|住院|门诊|病历|检查|电话|身份|出生|民族|职业|婚|岁"
    r"|签字|签名|同意|陪同|代诉|告知|先生|女士|小姐|老师|医生|医师|主任|教授|因|就诊|复查|来院|于\d|行[^\d])"
)
_ZH_NAME = r"(?P<v>[" + _HAN + r"]{2,4}?(?:·[" + _HAN + r"]{1,8})?)" + _ZH_NAME_END
_MINORITY = rf"(?P<v>[{_HAN}]{{2,5}}·[{_HAN}]{{2,6}})"
_SEP = r"\s*(?:[（(](?:签字|签名|盖章)[)）])?\s*[:：]\s*"
_OPT_SEP = r"\s*[:：]?\s*"
_ANCHOR_WORDS = [
    "患者",
    "病人",
    "患儿",
    "家属",
    "联系人",
    "陪同",
    "告知",
    "通知",
    "谢谢",
    "感谢",
    "转诊自",
    "来自",
]
_AFTER_WEAK = "|".join(f"(?<={w})" for w in _ANCHOR_WORDS)  # words a titled name may follow
_TITLES_ZH = (
    r"先生|女士|小姐|阿姨|大爷|大妈|奶奶|爷爷|叔叔|老人|老师|同志|同学|医生|医师|大夫|护士长|护士|主任|"
    r"教授|院长|老板|师傅"
)

_EN_CAP = r"(?:[A-Z][a-z]+(?:['-][A-Za-z][a-z]+)*|(?:Mc|Mac|O')[A-Z][a-z]+|[A-Z]'[A-Z]{2,}|[A-Z]{2,}(?:['-][A-Z]+)*)"
_EN_PARTICLE = r"(?:van|der|den|de|von|da|di|du|le|la|bin|al)"
_EN_SURNAME = (
    rf"(?:{_EN_CAP}(?:\s(?:{_EN_PARTICLE}\s)*{_EN_CAP})?|{_EN_PARTICLE}(?:\s{_EN_PARTICLE})*\s{_EN_CAP})"
)
_EN_INITIAL = r"[A-Z]\."
_EN_NAME = (
    r"(?P<v>"
    r"[A-Za-z][A-Za-z'-]*(?:\^[A-Za-z'-]*)+"  # DICOM PN: LAST^FIRST^MIDDLE
    rf"|(?:(?:{_EN_CAP}|{_EN_PARTICLE})\s(?:{_EN_PARTICLE}\s)*)?{_EN_CAP},\s?{_EN_CAP}(?:\s[A-Z]\.?)?(?![A-Za-z])"  # Last, First
    rf"|{_EN_INITIAL}\s?(?:{_EN_INITIAL}\s?)?{_EN_SURNAME}"  # J. Smith
    rf"|{_EN_CAP}(?:\s{_EN_INITIAL})?(?:\s{_EN_SURNAME})?"  # First (M.) Last, or one word
    r")(?![A-Za-z])"
)
# Capitalised words that follow a label without being a name.
_EN_STOP = {
    "ID", "No", "Name", "Number", "History", "Age", "Sex", "Gender", "Information", "Info", "Record",
    "Records", "Is", "Was", "Has", "Had", "The", "With", "Presents", "Presented", "Denies", "Reports",
    "Unknown", "Male", "Female", "M", "F", "Anonymous", "Not", "None", "Consent", "Data", "Details",
    "Identifier", "Study", "Report", "Mr", "Mrs", "Ms", "Dr", "Date", "DOB", "Birth", "Born", "Tel",
    "Phone", "Mobile", "Admission", "Hospital", "Patient", "Physician", "Exam", "Medical", "MRN",
    "Fasting", "For", "Routine", "Screening", "In", "On", "At", "Of", "And", "Or",
    "Outpatient", "Inpatient", "Follow", "Follow-up", "Known", "Status", "Type", "Sample", "Test", "N/A",
    "NA", "Withheld", "Redacted", "Pending", "See", "Above", "Below", "Same", "Self", "Refused",
    "Unable", "Tolerated", "Well", "Stable", "Improved", "Declined", "Consented", "Fasted", "Prepped",
    "Thyroid", "Liver", "Renal", "Kidney", "Breast", "Pelvic", "Abdominal", "Abdomen", "Carotid", "Cardiac",
    "Obstetric", "Vascular", "Venous", "Arterial", "Scrotal", "Testicular", "Neck", "Chest", "Protocol",
    "Ultrasound", "US", "Doppler", "Echo", "Echocardiogram", "Examination", "Procedure", "Scan",
}  # fmt: skip

_EN_CREDENTIALS = {
    "MD",
    "DO",
    "PhD",
    "RN",
    "RDMS",
    "RVT",
    "RDCS",
    "RT",
    "MBBS",
    "FRCR",
    "MSc",
    "BSc",
    "NP",
    "PA",
}

_MONTH = r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec)[a-z]*\.?"
_DATE = (
    r"(?P<v>\d{4}\s*[-/.年]\s*\d{1,2}(?:\s*[-/.月]\s*\d{1,2}(?:\s*日)?|\s*月)?"
    r"|\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}"
    r"|(?:19|20)\d{6}(?!\d)"
    rf"|\d{{1,2}}[-\s]{_MONTH}[-\s,]*\d{{4}}"
    rf"|{_MONTH}\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}}"
    rf"|{_MONTH}\s+\d{{4}}"
    r"|\d{1,2}月\d{1,2}日"
    r"|[〇零一二三四五六七八九]{4}年[一二三四五六七八九十]{1,3}月(?:[一二三四五六七八九十]{1,3}日)?"
    r"|(?:19|20)\d{2}年)"
)


@dataclass(frozen=True)
class _Rule:
    kind: str
    pattern: re.Pattern[str]
    accept: Callable[[str], str | None] = lambda s: s  # returns the part to replace, or None


def _is_clinical_zh(s: str) -> bool:
    return any(w in s for w in _CLINICAL_ZH)


def _surname_len(s: str) -> int:
    """Length of the surname `s` starts with (2 compound, 1 single), 0 when it starts with none."""
    if s[:2] in _COMPOUND_SURNAMES.split("|"):
        return 2
    return 1 if s[:1] and s[0] in _SURNAMES else 0


def _weak_zh_name(s: str) -> str | None:
    if "·" in s:
        return s
    n = _surname_len(s)
    return s if n and not (set(s[n:]) & _PROSE_CHARS) and not _is_clinical_zh(s) else None


def _no_prose(s: str) -> str | None:
    if "·" in s:
        return s
    return None if set(s[_surname_len(s) :]) & _PROSE_CHARS or _is_clinical_zh(s) else s


def _titled_zh_name(s: str) -> str | None:
    """Surname (+ up to two given characters) before 先生/女士/主任...: keep it unless clinical."""
    n = _surname_len(s)
    return None if not n or _is_clinical_zh(s) or set(s[n:]) & _PROSE_CHARS else s


def _en_name(s: str) -> str | None:
    words = re.split(r"[\s^,]+", s.strip())
    initial = re.match(r"[A-Z]\.\s?[A-Z]", s) is not None  # F. Chen: "F" is an initial here
    if not words or (words[0].rstrip(".") in _EN_STOP and not initial):
        return None
    if "," in s and s.rsplit(",", 1)[1].strip().rstrip(".") in _EN_CREDENTIALS:
        s = s.rsplit(",", 1)[0]  # "Grace Zhang, MD": the part after the comma is a degree
        if "," not in s and "^" not in s:
            return _en_name(s)
    if "^" in s or "," in s:
        return s.rstrip(", ")
    while words and (words[-1] in _EN_STOP or words[-1] in _EN_CREDENTIALS):
        words.pop()
    if not words:
        return None
    return s[: s.index(words[-1]) + len(words[-1])]


def _has_digit(s: str) -> str | None:
    return s if any(c.isdigit() for c in s) else None


def _seven_digits(s: str) -> str | None:
    return s if sum(c.isdigit() for c in s) >= 7 else None


def _id_digits(s: str) -> str | None:
    digits = sum(c.isdigit() or c in "Xx" for c in s)
    return s if digits in (15, 18) else None


def _strip_trailing(s: str) -> str | None:
    s = s.rstrip(".,;:!?)]}>'\"，。；：")
    return s or None


def _address(s: str) -> str | None:
    s = _strip_trailing(s.rstrip()) or ""
    return s if any(c.isdigit() for c in s) or len(s) >= 6 else None


def _c(p: str, flags: int = 0) -> re.Pattern[str]:
    return re.compile(p, flags)


_ZH_NAME_LABEL = r"受检者姓名|患者姓名|病人姓名|孕妇姓名|姓\s*名|名\s*字|受检人"
_ZH_STAFF = (
    r"(?:主治|报告|审核|检查|超声|诊断|操作|申请|送检|开单|会诊|转诊|接诊|主诊|经治|复核)(?:医师|医生)|医师|医生|大夫|检查者|"
    r"报告者|记录者|审核者|审核人|签名|技师|操作者|联系人|紧急联系人|陪同人|监护人|复核|核对|记录|录入|"
    r"打字|书写|诊断医师|申请医生|申请医师|主诊|报告人|检查人|诊断者|送检医生|开单医生"
)
_ZH_WEAK = (
    r"患者|病人|患儿|受检者|被检者|受检人|就诊者|就诊人|家属|孕妇|产妇|老人|丈夫|妻子|父亲|母亲|儿子|女儿|"
    r"配偶|陪诊人|陪诊|其子|其女|其夫|其妻|其母|其父|之子|之女"
)
_EN_STRONG = (
    r"(?i:patient(?:'s)?\s+name|name|physician|doctor|sonographer|radiologist|operator|pt|attending|"
    r"consultant|technologist|referring\s+physician|referring\s+doctor|patient|pt\s+name|next\s+of\s+kin|contact\s+person|"
    r"ordering\s+(?:provider|physician)|provider|signed|interpreting\s+physician|resident|fellow)"
)
_EN_BY = (
    r"(?i:reported|signed|examined|reviewed|dictated|read|performed|scanned|verified|approved|interpreted|"
    r"referred|requested|ordered|transcribed|confirmed)\s+by"
)
_RECORD_LABELS = (
    r"(?:住院|门诊|病历|病案|检查|登记|影像|超声|就诊|就诊卡|医保卡|医保|社保|放射|病理|申请单|申请|流水|报告|"
    r"预约|标本)(?:号|编号)(?:码)?|"
    r"(?:门诊|住院)ID|就诊卡|医保卡|社保卡|ID号|编号|"
    r"(?<![A-Za-z])(?i:MRN\s*#?|MR\s*(?:No\.?|#)|Visit\s+(?:No\.?|Number|#|ID)|Encounter(?:\s+(?:No\.?|Number|#|ID))?|Medical\s+Record\s+(?:No\.?|Number|#)|Hospital\s+(?:No\.?|Number|#)|"
    r"Admission\s+(?:No\.?|Number|#)|Inpatient\s+(?:No\.?|Number|#)|Outpatient\s+(?:No\.?|Number|#)|"
    r"Patient\s+ID|Accession\s+(?:No\.?|Number|#)|Case\s+(?:No\.?|Number|#)|Exam\s+(?:No\.?|Number|#)|"
    r"Record\s+(?:No\.?|Number|#)|Acc(?:ession)?\s*#|Accession(?=\s*[:：])|Acc\.?\s*No\.?|ID\s*No\.?|ID(?=\s*[:：#]))"
)
_BIRTH_BEFORE = (
    r"(?:出生日期|出生年月日|出生年月|出生于|出生|生于|生日|诞生于|"
    r"(?<![A-Za-z])(?i:D\.?O\.?B\.?|date\s+of\s+birth|birth\s*date|birthday|born(?:\s+on|\s+in)?)|(?<![A-Za-z])b\.)"
)
_ADDRESS_LABELS = (
    r"现住址|家庭住址|户籍地址|联系地址|通讯地址|住址|地址|家住|现住|居住于|居住地|"
    r"(?<![A-Za-z])(?i:home\s+address|address|addr\.?|lives\s+at|resides\s+at|residing\s+at)"
)
_PROVINCES = (
    "河北|山西|辽宁|吉林|黑龙江|江苏|浙江|安徽|福建|江西|山东|河南|湖北|湖南|广东|海南|四川|贵州|云南|陕西|"
    "甘肃|青海|台湾|内蒙古|广西|西藏|宁夏|新疆"
)
_ZH_ADDRESS = (
    rf"(?P<v>(?:(?:{_PROVINCES})(?:省|自治区|壮族自治区|回族自治区|维吾尔自治区)?)?[{_HAN}]{{2,4}}市"
    rf"(?:[{_HAN}]{{1,6}}[区县])?"
    rf"[{_HAN}\dA-Za-z]{{0,16}}?(?:路|街|道|巷|弄|村|大道)\d+号(?:院|小区)?(?:\d+(?:栋|幢|弄|号楼|楼|单元|号|室|层))*)"
)
_EN_STREET = (
    r"(?P<v>\d{1,5}\s(?:[A-Z][a-z]+\s){1,3}(?:Street|St|Avenue|Ave|Road|Rd|Lane|Ln|Boulevard|Blvd|Drive|Dr|"
    r"Court|Ct|Way|Place|Pl|Terrace)\.?(?:,\s?(?:Apt|Unit|Suite|Flat)\.?\s?\w+)?(?:,\s?[A-Z][a-z]+(?:\s[A-Z][a-z]+)*"
    r"(?:,\s?[A-Z]{2}(?:\s\d{5})?)?)?)"
)
_IP = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"

# In priority order: earlier rules win where matches overlap.
_RULES: tuple[_Rule, ...] = (
    _Rule(
        "url",
        _c(r"(?P<v>(?:https?://|ftp://|www\.)[^\s，。；、（）()<>\"'“”\u4e00-\u9fff]+)", re.IGNORECASE),
        _strip_trailing,
    ),
    _Rule("email", _c(r"(?P<v>[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,})")),
    _Rule("ip", _c(rf"(?<![\d.])(?P<v>{_IP}\.{_IP}\.{_IP}\.{_IP}(?::\d{{1,5}})?)(?![\d]|\.\d)")),
    _Rule(
        "id_number",
        _c(
            r"(?<![0-9A-Za-z])(?P<v>\d{6}[-\s]?(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])"
            r"[-\s]?\d{3}[\dXx])(?![0-9A-Za-z])"
        ),
    ),
    _Rule(
        "id_number",
        _c(
            r"(?:公民身份号码|身份证(?:号码|号)?|证件号(?:码)?|(?<![A-Za-z])(?i:ID\s*card|resident\s+ID|national\s+ID))"
            r"\s*(?:号码)?(?:为|是)?\s*[:：#]?\s*(?P<v>[\dXx][\dXx\s-]{13,22}[\dXx])(?![0-9A-Za-z])"
        ),
        _id_digits,
    ),
    _Rule(
        "id_number",
        _c(
            r"(?:(?<![A-Za-z])(?i:SSN|social\s+security(?:\s+(?:no\.?|number))?)\s*[:#]?\s*)?(?<![\d-])(?P<v>\d{3}-\d{2}-\d{4})(?![\d-])"
        ),
    ),
    _Rule(
        "id_number",
        _c(
            r"(?:护照|(?<![A-Za-z])(?i:passport))\s*(?:号码|号|No\.?|Number|#)?\s*[:：]?\s*(?P<v>[A-Za-z]{1,2}\d{6,9})(?![0-9A-Za-z])"
        ),
    ),
    _Rule("birth_date", _c(_BIRTH_BEFORE + r"\s*(?:为|是)?\s*[:：]?\s*" + _DATE, re.IGNORECASE)),
    _Rule("birth_date", _c(_DATE + r"\s*(?=出生|生[，,\s(（人]|生$|诞生)")),
    _Rule(
        "record_number",
        _c(
            rf"(?:{_RECORD_LABELS})\s*(?:为|是)?\s*[:：#]?\s*(?P<v>[A-Za-z]{{0,4}}-?[A-Za-z0-9][A-Za-z0-9\-_/]{{2,}})"
        ),
        _has_digit,
    ),
    _Rule(
        "phone",
        _c(
            r"(?:联系电话|联系方式|家属电话|电话号码|手机号码|手机号|电话|手机|座机|请拨打|拨打|致电|"
            r"(?<![A-Za-z])(?i:tel\.?|telephone|phone|mobile|cell|contact\s+number|call|fax))\s*(?:为|是)?\s*[:：]?\s*"
            r"(?P<v>\+?\(?\+?\d[\d()]*(?:[-\s.]\(?\d[\d()]*){0,4})"
        ),
        _seven_digits,
    ),
    _Rule("phone", _c(r"(?<!\d)(?<!\d\.)(?P<v>(?:(?:\+|00)86[-\s]?)?1[3-9]\d(?:[-\s]?\d{4}){2})(?!\d|\.\d)")),
    # any international number: + country code, optional (area), groups of digits
    _Rule(
        "phone",
        _c(r"(?<![\w+])(?P<v>\+\d{1,3}[-\s]?(?:\(\d{1,4}\)[-\s]?)?\d{2,4}(?:[-\s]\d{2,4}){1,4})(?!\d)"),
        _seven_digits,
    ),
    _Rule(
        "phone",
        _c(r"(?<!\d)(?<!\d\.)(?P<v>(?:\(0\d{2,3}\)|0\d{2,3})[-\s]?(?:\d{7,8}|\d{3,4}[-\s]\d{4}))(?!\d|\.\d)"),
    ),
    _Rule("phone", _c(r"(?<![\d.])(?P<v>(?:\+1[-\s])?\(?[2-9]\d{2}\)?[-\s.]\d{3}[-\s.]\d{4})(?![\d]|\.\d)")),
    _Rule(
        "address",
        _c(rf"(?:{_ADDRESS_LABELS})\s*(?:为|是)?\s*[:：]?\s*(?P<v>[^，。；;\n]+?)(?=[，。；;\n]|\.\s|\.$|$)"),
        _address,
    ),
    _Rule("address", _c(_ZH_ADDRESS)),
    _Rule("address", _c(_EN_STREET)),
    _Rule("name", _c(rf"(?:{_ZH_NAME_LABEL}){_OPT_SEP}{_MINORITY}")),
    _Rule(
        "name",
        _c(rf"(?:{_ZH_NAME_LABEL}){_SEP}(?P<v>[{_HAN}]\s{{1,2}}[{_HAN}]{{1,2}})(?![{_HAN}])"),
        _no_prose,
    ),
    _Rule("name", _c(rf"(?:{_ZH_NAME_LABEL}){_OPT_SEP}{_ZH_NAME}"), _no_prose),
    _Rule("name", _c(rf"(?:{_ZH_STAFF}){_SEP}{_MINORITY}")),
    _Rule("name", _c(rf"(?:{_ZH_STAFF}){_SEP}{_ZH_NAME}"), _no_prose),
    # staff label without a colon (检查医师 汪志强): the candidate must look like a name
    _Rule("name", _c(rf"(?:{_ZH_STAFF})\s*{_ZH_NAME}"), _weak_zh_name),
    _Rule("name", _c(rf"(?:{_ZH_STAFF}|{_ZH_WEAK})\s*{_MINORITY}")),
    _Rule("name", _c(rf"(?:{_ZH_WEAK}){_SEP}{_ZH_NAME}"), _no_prose),
    # weak label without colon: only when punctuation or a demographic or action cue follows the
    # candidate (患者张三，女，45岁; 家属李四签字), and the candidate starts with a surname and
    # holds no report-prose character (患儿高热，stays)
    _Rule(
        "name",
        _c(
            rf"(?:{_ZH_WEAK})\s*{_ZH_NAME}"
            rf"(?=[，,、。;；\s(（)）]|$|男|女|性别|年龄|\d{{1,3}}岁|签字|签名|同意|陪同|代诉|告知|因|于\d|来|就诊|复查|行)"
        ),
        _weak_zh_name,
    ),
    # a surname and up to two given characters before a title or honorific (张先生, 欧阳娜娜女士,
    # 请曹志强先生); anchored on a non-Han character or a verb so that the whole name is taken
    _Rule(
        "name",
        _c(
            rf"(?:(?<=[^{_HAN}·])|^|(?<=[请经由与和及给致向让叫称嘱对被])|{_AFTER_WEAK})"
            rf"(?P<v>{_SURNAME_RE}[{_HAN}]{{0,2}}?)(?={_TITLES_ZH})"
        ),
        _titled_zh_name,
    ),
    _Rule("name", _c(rf"{_MINORITY}(?={_TITLES_ZH})")),
    _Rule(
        "name",
        _c(
            rf"(?:^|(?<=[\s，。；]))(?P<v>{_SURNAME_RE}[{_HAN}]{{1,2}})(?=[（(]\s*(?:住院|门诊|病历|病案|ID|MRN))"
        ),
        _titled_zh_name,
    ),
    # a name opening a line or clause, followed by sex and age: 上官婉儿，女，35岁
    _Rule(
        "name",
        _c(
            rf"(?:^|(?<=[\s，。；]))(?P<v>{_SURNAME_RE}[{_HAN}]{{1,2}})(?=[，,、\s]*(?:男|女)[，,、\s]*\d{{1,3}}岁)"
        ),
        _titled_zh_name,
    ),
    _Rule("name", _c(rf"(?<![A-Za-z])(?<![A-Za-z]\s){_EN_STRONG}(?:{_SEP}|\s+-\s+){_EN_NAME}"), _en_name),
    _Rule("name", _c(rf"(?<![A-Za-z]){_EN_BY}\s*[:：]?\s*(?:Dr\.?\s+)?{_EN_NAME}"), _en_name),
    _Rule(
        "name",
        _c(
            rf"(?<![A-Za-z])(?i:patient)\s+(?P<v>{_EN_CAP}(?:\s{_EN_INITIAL})?(?:\s{_EN_SURNAME}))(?![A-Za-z])"
        ),
        _en_name,
    ),
    _Rule("name", _c(rf"(?<![A-Za-z])(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof|Madam|Sir)\.?\s+{_EN_NAME}"), _en_name),
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
        pos = 0
        while (m := rule.pattern.search(text, pos)) is not None:
            value = rule.accept(m.group("v"))
            if not value:
                # Retry one character later: a rejected match must not hide an overlapping one
                # (患儿母亲徐静: "患儿 + 母亲徐静" is rejected, "母亲 + 徐静" is a name).
                pos = m.start() + 1
                continue
            pos = max(m.end(), m.start() + 1)
            start = m.start("v") + len(value) - len(value.lstrip())
            end = m.start("v") + len(value.rstrip())
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
