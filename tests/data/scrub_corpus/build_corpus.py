"""Build the labelled scrubber corpus: `phi.jsonl` (snippets with PHI spans) and `clean.jsonl`.

Run `python tests/data/scrub_corpus/build_corpus.py` to regenerate (deterministic, seed 0); the
JSONL files are committed and are what the tests and `docs/data.md` measure (a test checks the
committed files are exactly what this script writes).

The folder also holds hand-written snippets, not generated: sets A, B, C (`handwritten_a/b/c.jsonl`,
`handwritten_clean.jsonl`, `handwritten_clean_c.jsonl`), each written after the rules of its time
and measured once before any rule was changed for it (docs/data.md gives those first figures),
then fixed and made part of the corpus; and set D (`handwritten_d.jsonl`,
`handwritten_clean_d.jsonl`), written after the current rules and never tuned on: the held-out
estimate for unseen phrasing. Do not change rules for D; write a new set instead.

Honest caveat: the snippets are synthetic, written by the same people as the rules; recall here
is an upper bound for real exports. Add real (de-identified and re-planted) lines when you can.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent

SURNAMES = list(
    "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘蒋蔡余杜叶程苏魏吕丁任沈姚卢姜崔钟谭陆汪范金石廖贾夏韦付方白邹孟熊秦邱江尹薛闫段雷侯龙陶黎贺顾毛郝龚邵万钱严覃武戴"
)
COMPOUND = [
    "欧阳",
    "司马",
    "上官",
    "诸葛",
    "东方",
    "皇甫",
    "尉迟",
    "公孙",
    "慕容",
    "令狐",
    "长孙",
    "宇文",
    "司徒",
    "夏侯",
    "端木",
    "南宫",
    "西门",
    "呼延",
    "申屠",
    "钟离",
]
GIVEN1 = list("伟芳娜敏静丽强磊军洋勇艳杰娟涛明超霞平刚桂英华慧建国晓红玉兰志宇浩然欣怡婷雪琳鹏飞")
GIVEN2 = [
    "秀英",
    "建国",
    "志强",
    "子轩",
    "梓涵",
    "雨桐",
    "浩然",
    "欣怡",
    "一诺",
    "思远",
    "海燕",
    "玉兰",
    "桂芳",
    "晓东",
    "春生",
    "丽华",
    "文博",
    "嘉怡",
    "俊杰",
    "淑珍",
    "国庆",
    "美玲",
    "天佑",
    "明轩",
]
MINORITY = ["阿依古丽·买买提", "买买提·艾力", "古丽娜·吐尔逊", "扎西·多吉", "艾尔肯·热合曼"]
EN_FIRST = [
    "John",
    "Mary",
    "James",
    "Patricia",
    "Robert",
    "Jennifer",
    "Michael",
    "Linda",
    "David",
    "Susan",
    "Emily",
    "Daniel",
    "Sarah",
    "Thomas",
    "Karen",
    "Wei",
    "Fang",
    "Min",
    "Jun",
    "Xiaoming",
    "Anne-Marie",
    "Sean",
    "Chloe",
    "Oliver",
    "Grace",
]
EN_LAST = [
    "Smith",
    "Johnson",
    "Williams",
    "Brown",
    "Jones",
    "Miller",
    "Davis",
    "Garcia",
    "Wilson",
    "Anderson",
    "Taylor",
    "Thomas",
    "Moore",
    "O'Brien",
    "McDonald",
    "Zhang",
    "Wang",
    "Li",
    "Chen",
    "Liu",
    "Nguyen",
    "Kowalski",
    "Schmidt",
    "Van der Berg",
    "Lee",
]
AREA = ["110101", "310104", "330106", "440305", "510107", "420111", "320102", "370202"]
STREETS_ZH = [
    "幸福路",
    "人民路",
    "解放大道",
    "南京东路",
    "文三路",
    "中山北路",
    "建设街",
    "科技园路",
    "长安街",
    "和平巷",
]
CITIES_ZH = [
    ("北京市", "朝阳区"),
    ("上海市", "黄浦区"),
    ("浙江省杭州市", "西湖区"),
    ("广东省深圳市", "南山区"),
    ("湖北省武汉市", "洪山区"),
    ("四川省成都市", "武侯区"),
    ("江苏省南京市", "鼓楼区"),
]
STREETS_EN = [
    "Main Street",
    "Oak Avenue",
    "Elm St",
    "Maple Road",
    "Park Lane",
    "Sunset Boulevard",
    "High Street",
    "Cedar Drive",
    "Lincoln Ave",
    "Church Rd",
]
CITIES_EN = [
    "Springfield",
    "Boston, MA 02115",
    "London",
    "Toronto, ON",
    "Austin, TX 78701",
    "Manchester",
    "Seattle, WA",
]

rng = random.Random(0)


def pick(seq):
    return rng.choice(seq)


def zh_name(kind: str | None = None) -> str:
    kind = kind or pick(["1+1", "1+2", "1+2", "c+1", "c+2", "min", "1+1"])
    if kind == "1+1":
        return pick(SURNAMES) + pick(GIVEN1)
    if kind == "1+2":
        return pick(SURNAMES) + pick(GIVEN2)
    if kind == "c+1":
        return pick(COMPOUND) + pick(GIVEN1)
    if kind == "c+2":
        return pick(COMPOUND) + pick(GIVEN2)
    return pick(MINORITY)


def birth() -> tuple[int, int, int]:
    return rng.randint(1935, 2020), rng.randint(1, 12), rng.randint(1, 28)


def resident_id() -> str:
    y, m, d = birth()
    body = f"{pick(AREA)}{y:04d}{m:02d}{d:02d}{rng.randint(0, 999):03d}"
    return body + pick("0123456789X")


def mobile() -> str:
    return f"1{pick('3456789')}{rng.randint(0, 9)}{rng.randint(0, 99999999):08d}"


def zh_phone() -> str:
    m = mobile()
    return pick(
        [
            m,
            m,
            f"{m[:3]} {m[3:7]} {m[7:]}",
            f"{m[:3]}-{m[3:7]}-{m[7:]}",
            f"+86 {m[:3]} {m[3:7]} {m[7:]}",
            f"+86-{m}",
            f"0{rng.randint(10, 999)}-{rng.randint(2000000, 89999999)}",
            f"(0{rng.randint(10, 99)}){rng.randint(20000000, 89999999)}",
            f"0571-{rng.randint(80000000, 89999999)}",
        ]
    )


def en_phone() -> str:
    a, b, c = rng.randint(201, 989), rng.randint(200, 999), rng.randint(1000, 9999)
    return pick(
        [
            f"({a}) {b}-{c}",
            f"+1 {a}-{b}-{c}",
            f"{a}-{b}-{c}",
            f"{a}.{b}.{c}",
            f"+86 {mobile()}",
            mobile(),
            f"+44 20 7946 {c:04d}",
        ]
    )


def record_no() -> str:
    n = rng.randint(10000, 99999999)
    return pick(
        [
            f"ZY{n}",
            f"MZ{n}",
            str(n),
            f"{n:08d}",
            f"US{2018 + rng.randint(0, 7)}{rng.randint(1000, 9999)}",
            f"H-{n}",
            f"2023-{rng.randint(100, 99999):05d}",
            f"A{rng.randint(100, 99999)}",
            f"ACC{n}",
        ]
    )


def zh_date(y: int, m: int, d: int, style: int | None = None) -> str:
    style = rng.randint(0, 6) if style is None else style
    return [
        f"{y}年{m}月{d}日",
        f"{y}-{m:02d}-{d:02d}",
        f"{y}.{m:02d}.{d:02d}",
        f"{y}/{m}/{d}",
        f"{y}年{m:02d}月{d:02d}日",
        f"{y}{m:02d}{d:02d}",
        f"{y}年{m}月",
    ][style]


MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]


def en_date(y: int, m: int, d: int) -> str:
    mon = MONTHS[m - 1]
    return pick(
        [
            f"{m:02d}/{d:02d}/{y}",
            f"{y}-{m:02d}-{d:02d}",
            f"{mon} {d}, {y}",
            f"{d} {mon} {y}",
            f"{d:02d}-{mon[:3]}-{y}",
            f"{d}.{m}.{y}",
            f"{mon[:3]} {d} {y}",
        ]
    )


def en_name(order: str | None = None) -> str:
    f, last = pick(EN_FIRST), pick(EN_LAST)
    order = order or pick(["fl", "fl", "lf", "LF", "fml", "il"])
    if order == "fl":
        return f"{f} {last}"
    if order == "lf":
        return f"{last}, {f}"
    if order == "LF":
        return f"{last.upper()}^{f.upper()}"
    if order == "fml":
        return f"{f} {pick('ABCDEJKMRT')}. {last}"
    return f"{f[0]}. {last}"


SEX = ["男", "女"]
FINDINGS_ZH = [
    "甲状腺右叶见0.8cm×0.6cm低回声结节，边界清，TI-RADS 3类。",
    "肝脏形态大小正常，实质回声均匀。",
    "胆囊壁毛糙，腔内见强回声伴声影。",
    "左乳外上象限见1.2×0.9cm低回声团，BI-RADS 4a类。",
    "双肾大小正常，集合系统未见分离。",
    "子宫前位，内膜厚0.8cm，回声均匀。",
    "左室舒张末内径52mm，EF 62%。",
]
FINDINGS_EN = [
    "A 1.2 x 0.8 cm hypoechoic nodule in the right lobe, TI-RADS 4.",
    "The liver is normal in size with homogeneous echotexture.",
    "Gallbladder wall is thickened with a positive sonographic Murphy sign.",
    "Simple cyst in the left breast at 2 o'clock, BI-RADS 2.",
    "No hydronephrosis. Right kidney 10.5 cm.",
    "LVEF 60%, no regional wall motion abnormality.",
]


def fz() -> str:
    return pick(FINDINGS_ZH)


def fe() -> str:
    return pick(FINDINGS_EN)


def phi_snippets() -> list[dict]:
    out: list[dict] = []

    def add(lang: str, text: str, *phi: tuple[str, str]) -> None:
        for _kind, value in phi:
            assert value in text, (value, text)
        out.append({"id": f"p{len(out):04d}", "lang": lang, "text": text, "phi": [list(p) for p in phi]})

    # ---- Chinese names: labels, weak labels with demographics, titles and honorifics of any length
    zh_name_templates = [
        "姓名：{n}  性别：{s}  年龄：{a}岁",
        "姓名 {n} 性别 {s}",
        "姓名{n}性别{s}年龄{a}岁",
        "患者{n}，{s}，{a}岁，因颈部肿物就诊。",
        "患者：{n}，{s}，体检发现乳腺结节。",
        "患儿{n}，{s}，{a}岁，发热3天。",
        "受检者姓名：{n}",
        "报告医师：{n}",
        "审核医生：{n}  记录者：{n2}",
        "检查医师 {n}，{d}",
        "{n}先生，请于3个月后复查。",
        "{n}女士，检查结果已告知。",
        "{n}老师的甲状腺超声报告。",
        "联系人：{n}（患者之女）",
        "家属{n}签字同意。",
        "主治医师：{n}；超声所见如下。",
        "{n}主任会诊意见：随访。",
        "经{n}教授审核。",
        "患者姓名：{n}；{f}",
        "病人：{n}，{s}，{a}岁。",
    ]
    for i in range(70):
        t = zh_name_templates[i % len(zh_name_templates)]
        n, n2 = zh_name(), zh_name()
        text = t.format(n=n, n2=n2, s=pick(SEX), a=rng.randint(1, 90), d=fz(), f=fz())
        phi = [("name", n)] + ([("name", n2)] if "{n2}" in t else [])
        add("zh", text, *phi)
    for title in ["先生", "女士", "小姐", "阿姨", "大爷", "老师", "同志", "医生", "护士长", "主任"]:
        s = pick(SURNAMES + COMPOUND)
        add("zh", f"{s}{title}，{fz()}", ("name", s))
        n = zh_name(pick(["1+2", "c+2", "c+1"]))
        add("zh", f"请{n}{title}到3号诊室。", ("name", n))

    # ---- English names in all usual orders, with titles and honorifics
    en_templates = [
        ("Patient: {n}, {a} y/o {sx}.", None),
        ("Patient {n} was examined in the supine position.", "fl"),
        ("Name: {n}", None),
        ("Name: {n}  Sex: {sx1}  Age: {a}", None),
        ("Patient name: {n}. {f}", None),
        ("Mr. {n} presents for follow-up.", "fl"),
        ("Mrs {n} reports left breast pain.", "fl"),
        ("Ms. {last} declined the biopsy.", None),
        ("Dr. {last} reviewed the images.", None),
        ("Reported by: {n}, MD", None),
        ("Signed by {n}, RDMS", None),
        ("Referring physician: Dr. {n}", "fml"),
        ("Sonographer: {n}", "il"),
        ("Pt: {n}. {f}", "lf"),
        ("Patient: {n}; DOB withheld.", "LF"),
        ("Prof. {n} was consulted.", "fl"),
        ("Attending: {n}, MD", None),
        ("Examined by: {n}", None),
    ]
    for i in range(60):
        t, order = en_templates[i % len(en_templates)]
        n, last = en_name(order), pick(EN_LAST)
        text = t.format(
            n=n, last=last, a=rng.randint(18, 90), sx=pick(["male", "female"]), sx1=pick("MF"), f=fe()
        )
        add("en", text, ("name", last if "{last}" in t else n))

    # ---- ID numbers (with separators)
    for _ in range(30):
        rid = resident_id()
        sep = pick(["", "", " ", "-"])
        shown = rid if not sep else f"{rid[:6]}{sep}{rid[6:14]}{sep}{rid[14:]}"
        t = pick(
            [
                "身份证号：{v}",
                "身份证号码为{v}，",
                "身份证 {v}",
                "证件号码：{v}",
                "（身份证{v}）",
                "ID card: {v}",
                "ID No. {v}",
                "Resident ID {v} on file.",
            ]
        )
        add(
            "zh" if "身份" in t or "证件" in t or "（" in t else "en", t.format(v=shown), ("id_number", shown)
        )

    # ---- phones
    for i in range(40):
        if i % 2:
            v = zh_phone()
            t = pick(
                [
                    "电话：{v}",
                    "手机{v}",
                    "联系电话：{v}",
                    "家属电话 {v}",
                    "手机号码为{v}。",
                    "请拨打{v}预约复查。",
                    "联系方式：{v}（本人）",
                ]
            )
            add("zh", t.format(v=v), ("phone", v))
        else:
            v = en_phone()
            t = pick(
                [
                    "Tel: {v}",
                    "Phone {v}",
                    "call {v} to book",
                    "Mobile: {v}",
                    "Contact number: {v}.",
                    "Cell {v}",
                ]
            )
            add("en", t.format(v=v), ("phone", v))

    # ---- record numbers in all usual phrasings
    zh_rec = [
        "住院号：{v}",
        "住院号为{v}，",
        "住院号 {v}",
        "门诊号：{v}",
        "门诊号是{v}",
        "病历号：{v}",
        "病案号 {v}",
        "ID号：{v}",
        "检查号：{v}",
        "超声号 {v}",
        "登记号：{v}",
        "影像号{v}",
        "就诊卡号：{v}",
        "住院号码：{v}",
    ]
    en_rec = [
        "MRN: {v}",
        "MRN {v}",
        "Medical record number: {v}",
        "Hospital No. {v}",
        "Accession No.: {v}",
        "Inpatient number {v}",
        "Patient ID: {v}",
        "Case No. {v}",
        "MR# {v}",
        "Admission No. {v}",
    ]
    for i in range(50):
        v = record_no()
        if i % 2:
            add("zh", pick(zh_rec).format(v=v) + fz(), ("record_number", v))
        else:
            add("en", pick(en_rec).format(v=v) + " " + fe(), ("record_number", v))

    # ---- birth dates, every common phrasing
    zh_dob = [
        "出生日期：{v}",
        "出生日期 {v}",
        "生于{v}",
        "{v}出生",
        "出生于{v}，",
        "生日：{v}",
        "出生年月：{v}",
        "{v}生，{s}",
        "出生：{v}",
        "生日{v}",
    ]
    en_dob = [
        "DOB: {v}",
        "D.O.B. {v}",
        "Date of birth: {v}",
        "born on {v}",
        "Birthday: {v}",
        "born {v}",
        "Birth date {v}",
        "Date of Birth {v}",
    ]
    for i in range(44):
        y, m, d = birth()
        if i % 2:
            t = pick(zh_dob)
            v = zh_date(y, m, d, 6 if "年月" in t else None)
            add("zh", t.format(v=v, s=pick(SEX)) + "，" + fz(), ("birth_date", v))
        else:
            v = en_date(y, m, d)
            add("en", pick(en_dob).format(v=v) + ". " + fe(), ("birth_date", v))

    # ---- addresses
    for i in range(20):
        if i % 2:
            prov, dist = pick(CITIES_ZH)
            v = f"{prov}{dist}{pick(STREETS_ZH)}{rng.randint(1, 999)}号" + pick(
                [
                    "",
                    f"{rng.randint(1, 30)}栋{rng.randint(101, 2505)}室",
                    f"{rng.randint(1, 99)}弄{rng.randint(1, 40)}号",
                ]
            )
            t = pick(["住址：{v}", "家住{v}，", "现住址 {v}", "地址：{v}。", "居住于{v}。"])
            add("zh", t.format(v=v), ("address", v))
        else:
            v = (
                f"{rng.randint(1, 9999)} {pick(STREETS_EN)}"
                + pick(["", f", Apt {rng.randint(1, 40)}{pick('ABC')}"])
                + f", {pick(CITIES_EN)}"
            )
            t = pick(["Address: {v}", "Lives at {v}.", "Home address: {v}", "Resides at {v}."])
            add("en", t.format(v=v), ("address", v))

    # ---- e-mails, URLs, IPs
    for i in range(12):
        user = pick(["zhangsan", "li.si", "wang_wu88", "mary.smith", "j.brown", "patient123"])
        v = f"{user}@{pick(['example.com', 'hospital.org.cn', 'qq.com', '163.com', 'mail.example.co.uk'])}"
        add(
            "zh" if i % 2 else "en",
            pick(["邮箱 {v}", "Email: {v}", "联系邮箱：{v}", "contact {v}"]).format(v=v),
            ("email", v),
        )
    for i in range(10):
        v = pick(
            [
                f"https://pacs.hospital{rng.randint(1, 9)}.cn/viewer?study={rng.randint(10000, 99999)}",
                f"http://10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}/report/{rng.randint(100, 999)}",
                f"www.renai-hospital{rng.randint(1, 9)}.com/patient/{rng.randint(1000, 9999)}",
            ]
        )
        add(
            "zh" if i % 2 else "en",
            pick(["影像链接：{v}", "Images: {v}", "see {v} for the loop", "报告地址 {v}"]).format(v=v),
            ("url", v),
        )
    for i in range(10):
        v = f"{pick(['192.168', '10.12', '172.16'])}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
        add(
            "zh" if i % 2 else "en",
            pick(["工作站IP：{v}", "uploaded from {v}", "IP address {v}", "来源主机 {v}"]).format(v=v),
            ("ip", v),
        )

    # ---- mixed lines: several kinds together, as a header of a report
    for _ in range(25):
        n, v, p = zh_name(), record_no(), zh_phone()
        y, m, d = birth()
        dob = zh_date(y, m, d, rng.randint(0, 5))
        add(
            "zh",
            f"姓名：{n} 性别：{pick(SEX)} 出生日期：{dob} 住院号：{v} 电话：{p} {fz()}",
            ("name", n),
            ("birth_date", dob),
            ("record_number", v),
            ("phone", p),
        )
        en, ev, ep = en_name(), record_no(), en_phone()
        edob = en_date(*birth())
        add(
            "en",
            f"Name: {en}  DOB: {edob}  MRN: {ev}  Tel: {ep}. {fe()}",
            ("name", en),
            ("birth_date", edob),
            ("record_number", ev),
            ("phone", ep),
        )
    return out


VOCAB_ZH = [
    "低回声",
    "高回声",
    "等回声",
    "无回声",
    "强回声",
    "声影",
    "结节",
    "囊肿",
    "钙化",
    "微钙化",
    "血流信号",
    "甲状腺",
    "右叶",
    "左叶",
    "峡部",
    "肝脏",
    "胆囊",
    "胆总管",
    "胰腺",
    "脾脏",
    "肾脏",
    "输尿管",
    "膀胱",
    "前列腺",
    "子宫",
    "附件",
    "卵巢",
    "内膜",
    "乳腺",
    "腋窝",
    "淋巴结",
    "门静脉",
    "下腔静脉",
    "颈动脉",
    "斑块",
    "狭窄",
    "积液",
    "腹水",
    "黄疸",
    "发热",
    "咳嗽",
    "腹痛",
    "呕吐",
    "腹泻",
    "乏力",
    "消瘦",
    "头晕",
    "毛糙",
    "张力",
    "余肝",
    "高血压",
    "糖尿病",
    "桥本甲状腺炎",
    "毒性弥漫性甲状腺肿",
    "脂肪肝",
    "肝硬化",
    "胆囊炎",
    "胆结石",
    "肾结石",
    "肾积水",
    "子宫肌瘤",
    "卵巢囊肿",
    "乳腺增生",
    "纤维腺瘤",
    "边界清",
    "边界不清",
    "形态规则",
    "纵横比",
    "彩色多普勒",
    "舒张末",
    "射血分数",
    "二尖瓣",
    "三尖瓣",
    "主动脉瓣",
    "室间隔",
    "心包积液",
    "墨菲征",
    "肝右叶",
    "包膜",
    "实质",
    "回声均匀",
    "后方回声增强",
    "方位",
    "常规",
    "任意",
    "明显",
    "宫颈",
    "宫腔",
    "孕囊",
    "胎心",
    "羊水",
    "双顶径",
    "股骨长",
    "颈项透明层",
    "阑尾",
    "肠系膜",
    "腹股沟",
    "疝",
    "睾丸",
    "精索",
]
VOCAB_EN = [
    "hypoechoic",
    "hyperechoic",
    "isoechoic",
    "anechoic",
    "nodule",
    "cyst",
    "calcification",
    "microcalcification",
    "vascularity",
    "thyroid",
    "isthmus",
    "liver",
    "gallbladder",
    "common bile duct",
    "pancreas",
    "spleen",
    "kidney",
    "ureter",
    "bladder",
    "prostate",
    "uterus",
    "ovary",
    "endometrium",
    "breast",
    "axilla",
    "lymph node",
    "portal vein",
    "carotid",
    "plaque",
    "stenosis",
    "ascites",
    "jaundice",
    "fever",
    "cough",
    "Murphy sign",
    "Graves disease",
    "Hashimoto thyroiditis",
    "Doppler",
    "Bosniak",
    "Couinaud",
    "Morison pouch",
    "Douglas",
    "Baker cyst",
    "Wilms tumor",
    "Crohn disease",
    "Bethesda",
    "TI-RADS",
    "BI-RADS",
    "O-RADS",
    "LI-RADS",
    "Child-Pugh",
    "resistive index",
    "peak systolic velocity",
    "ejection fraction",
    "mitral valve",
    "aortic valve",
    "pericardial effusion",
    "hepatomegaly",
    "splenomegaly",
    "hydronephrosis",
    "cholelithiasis",
    "cholecystitis",
    "fibroadenoma",
    "steatosis",
    "cirrhosis",
    "appendicitis",
    "hernia",
    "testis",
    "varicocele",
    "Patient",
    "Presents",
    "Madelung",
    "Riedel",
    "Turner",
    "Marfan",
    "Alzheimer",
    "Parkinson",
    "Glisson capsule",
    "Treitz",
    "Bartholin cyst",
    "Nabothian cyst",
]


def clean_snippets() -> list[dict]:
    zh = [
        "患儿发热3天，咳嗽伴呕吐，腹部超声未见明显异常。",
        "患儿高热2天，右下腹压痛，阑尾区见管状低回声，外径0.8cm。",
        "患儿黄疸1周，胆总管内径0.3cm，肝内胆管未见扩张。",
        "患者黄疸3天，肝脏形态饱满，实质回声增粗。",
        "患者张口受限1月，腮腺区未见明显占位。",
        "患者高血压病史5年，颈动脉左侧分叉处见强回声斑块，大小1.2×0.3cm。",
        "患者常规体检，甲状腺右叶见0.5cm×0.4cm无回声区，TI-RADS 2类。",
        "患者毛发稀疏、乏力，甲状腺弥漫性肿大，血流信号丰富，考虑毒性弥漫性甲状腺肿。",
        "病人情况稳定，双侧颈部未见异常肿大淋巴结。",
        "患者无明显诱因出现右上腹痛2天，墨菲征阳性。",
        "胆囊壁毛糙，厚约0.4cm，腔内见多个强回声，后伴声影，最大1.1cm。",
        "胆囊张力增高，大小9.8×4.2cm。",
        "余肝实质回声均匀，门静脉内径1.1cm。",
        "肝右叶见2.3×1.8cm高回声团，边界清，形态规则，考虑血管瘤。",
        "左乳外上象限见1.2×0.9cm低回声结节，纵横比>1，边界不清，BI-RADS 4b类。",
        "右乳10点钟方位距乳头2cm见0.6×0.4cm无回声，BI-RADS 2类。",
        "双侧腋窝未见异常肿大淋巴结。",
        "双肾大小形态正常，左肾集合系统分离1.2cm，考虑轻度肾积水。",
        "右肾下极见0.5cm强回声，后伴声影，考虑肾结石。",
        "膀胱充盈良好，壁光滑，腔内未见异常回声。",
        "前列腺大小4.5×3.8×3.2cm，内腺增大，回声不均。",
        "子宫前位，大小5.2×4.6×4.0cm，肌层回声均匀，内膜厚0.8cm。",
        "子宫后壁见3.1×2.8cm低回声团，边界清，考虑子宫肌瘤。",
        "左侧卵巢见4.2×3.5cm无回声，壁薄光滑，O-RADS 2类。",
        "宫内见孕囊，可见胎心搏动，头臀长2.1cm，相当于孕8周5天。",
        "双顶径9.2cm，股骨长7.1cm，羊水指数12cm，胎盘成熟度II级。",
        "颈项透明层厚度1.5mm。",
        "左室舒张末内径52mm，射血分数62%，室间隔厚10mm。",
        "二尖瓣前叶舒张期呈城垛样改变，三尖瓣少量反流。",
        "主动脉瓣流速1.6m/s，心包腔内见少量积液，深约0.5cm。",
        "甲状腺双叶回声减低不均，呈网格样改变，考虑桥本甲状腺炎。",
        "肝脏大小正常，包膜光滑，实质回声细密增强，后方回声衰减，考虑脂肪肝。",
        "脾厚4.8cm，肋下可及，考虑脾大。",
        "胰腺显示不清，受肠气干扰。",
        "腹腔内见游离液性暗区，深约3.2cm。",
        "右侧腹股沟区见疝囊，内容物为肠管，站立位增大。",
        "左侧精索静脉内径2.8mm，Valsalva试验可见反流。",
        "检查日期：2023-05-01，建议6个月后复查。",
        "2024年3月5日检查所见与前片比较无明显变化。",
        "CDFI：RI 0.65，PSV 35.2cm/s，EDV 12.1cm/s。",
        "阑尾区未见明显异常，肠系膜淋巴结稍大，最大1.0×0.5cm。",
        "宫颈前唇见多个无回声，最大0.6cm，考虑纳氏囊肿。",
        "Bosniak II类肾囊肿，大小2.0cm。",
        "肝硬化声像图，门静脉高压，脾大，腹水。",
        "患者糖尿病10年，下肢动脉多发斑块形成。",
        "病人术后复查，手术区未见明显复发征象。",
        "患者方便时复查甲状腺及颈部淋巴结。",
        "医生建议随访复查。",
        "超声医师建议结合临床。",
        "任意切面未见明显血流信号。",
        "高回声区内见点状强回声，考虑微钙化。",
        "黄体囊肿可能，建议月经干净后复查。",
        "毛细血管瘤可能。",
        "余未见明显异常。",
        "常规检查：心脏结构及功能未见异常。",
        "孔径0.2cm的小囊肿。",
        "钟摆样运动消失。",
        "金属伪像干扰，显示欠清。",
        "石样强回声，考虑胆囊结石充满型。",
        "白线疝可能，建议进一步检查。",
        "史密斯骨折术后复查（左腕）。",
        "高血压3级，极高危。",
        "患者发热伴寒战，肝右叶见4.5cm混合回声，考虑肝脓肿。",
        "患儿腹泻2天，肠管壁增厚，肠系膜淋巴结肿大。",
        "患儿呕吐，幽门肌层厚0.45cm，幽门管长1.8cm，考虑肥厚性幽门狭窄。",
        "患儿哭闹，右下腹见“同心圆”征，考虑肠套叠。",
        "患者咳嗽咳痰，胸腔积液深约4cm。",
        "患者消瘦3月，胰头区见2.8cm低回声团，胰管扩张。",
        "患者头晕，椎动脉血流速度减低。",
        "患者腹痛，胆囊增大，壁增厚呈“双边征”。",
        "病人：无不适，来院复查。",
        "患者：体检。",
        "姓名：（空）",
        "甲状腺左叶下极见0.3cm高回声，TI-RADS 3类，建议1年后复查。",
        "颈部III区见淋巴结，大小1.5×0.8cm，皮髓质分界不清。",
        "乳头后方导管扩张，内径0.3cm。",
        "卵巢体积增大，内见多个小卵泡，每侧>12个，考虑多囊卵巢。",
        "孕妇羊水偏少，AFI 6cm。",
        "胎儿脐血流S/D 2.8。",
        "颈动脉内中膜厚度1.1mm。",
        "下肢深静脉血流通畅，加压可闭合。",
        "肾动脉阻力指数0.72。",
        "三尖瓣反流速度2.8m/s，估测肺动脉收缩压36mmHg。",
    ]
    en = [
        "The patient presents with right upper quadrant pain and a positive sonographic Murphy sign.",
        "Patient presents with fever and cough for 3 days.",
        "Patient History: hypertension. Study name: Thyroid Ultrasound. Exam date: 2023-05-01.",
        "Patient: Female, 45 years. Thyroid: normal.",
        "Diffusely enlarged hypervascular thyroid consistent with Graves disease.",
        "Heterogeneous hypoechoic thyroid with fibrous septa, suggestive of Hashimoto thyroiditis.",
        "Color Doppler shows internal vascularity; resistive index 0.65, peak systolic velocity 35.2 cm/s.",
        "Bosniak IIF cyst in the upper pole of the left kidney, 2.1 cm.",
        "Lesion in Couinaud segment VII measuring 2.3 x 1.8 cm.",
        "Small amount of free fluid in Morison pouch and the pouch of Douglas.",
        "Baker cyst in the right popliteal fossa, 3.4 x 1.2 cm.",
        "Solid renal mass in a child, Wilms tumor cannot be excluded.",
        "Bowel wall thickening in the terminal ileum, known Crohn disease.",
        "Thyroid nodule TI-RADS 4, FNA recommended; Bethesda category to follow.",
        "BI-RADS 3, short-interval follow-up in 6 months.",
        "O-RADS 2 simple cyst, 3.1 cm.",
        "LI-RADS 3 observation in segment VI.",
        "Child-Pugh class B cirrhosis with splenomegaly and ascites.",
        "LVEF 60%, mitral valve prolapse with mild regurgitation.",
        "Aortic valve peak velocity 1.5 m/s; no pericardial effusion.",
        "Hepatomegaly, liver span 18 cm, with diffuse steatosis.",
        "Mild hydronephrosis of the right kidney; cholelithiasis without cholecystitis.",
        "Well-circumscribed oval hypoechoic mass consistent with fibroadenoma, 1.8 x 1.1 x 0.9 cm.",
        "Left varicocele with reflux on Valsalva; testis normal in size.",
        "Tender blind-ending tubular structure, 8 mm, consistent with appendicitis.",
        "Reducible umbilical hernia containing fat.",
        "Follow-up in 6 months; 3 nodules, largest 12 x 9 x 8 mm.",
        "Hospital course unremarkable.",
        "Age: 45. Sex: F. Left lobe 0.6 cm hypoechoic nodule, RI 0.65, PSV 35.2 cm/s.",
        "Exam date 2024-03-05, compared with 2023-09-01: stable.",
        "Madelung deformity is not assessed on ultrasound.",
        "Riedel lobe of the liver, a normal variant.",
        "Findings typical of Turner syndrome: streak ovaries.",
        "Marfan syndrome: aortic root 4.2 cm.",
        "History of Alzheimer and Parkinson disease; carotid study for dizziness.",
        "Glisson capsule is smooth.",
        "The ligament of Treitz region is obscured by bowel gas.",
        "Bartholin cyst, 2.2 cm, on the left.",
        "Multiple Nabothian cysts in the cervix.",
        "Patient Presents For Routine Screening.",
        "Patient denies pain. No focal lesion.",
        "Patient is fasting; gallbladder well distended.",
        "Name: not recorded.",
        "Dr. ordered a follow-up scan in 3 months.",
        "Spleen 11 cm, normal echotexture.",
        "Common bile duct 4 mm, no intrahepatic ductal dilatation.",
        "Portal vein hepatopetal flow, velocity 18 cm/s.",
        "Carotid intima-media thickness 0.9 mm, no plaque, no stenosis.",
        "Ovary volume 12 mL with more than 12 follicles.",
        "Crown-rump length 2.1 cm, fetal heart rate 160 bpm.",
        "Biparietal diameter 9.2 cm, femur length 7.1 cm, AFI 12 cm.",
        "Nuchal translucency 1.5 mm.",
        "Prostate volume 32 mL, median lobe protrusion.",
        "Bladder wall smooth, post-void residual 20 mL.",
        "Axillary lymph node with preserved fatty hilum, 1.0 cm.",
        "Jaundice with dilated intrahepatic bile ducts; Courvoisier gallbladder.",
        "Positive McBurney point tenderness.",
        "Virchow node not enlarged.",
        "Kasabach-Merritt phenomenon is not suspected; small hemangioma.",
        "Budd-Chiari syndrome excluded: hepatic veins patent.",
        "Klatskin tumor not seen; hilar ducts normal.",
        "Stage 2 pressure, Grade II diastolic dysfunction.",
        "Spectral Doppler: S/D ratio 2.8 in the umbilical artery.",
        "Renal artery resistive index 0.72, acceleration time 60 ms.",
        "Tricuspid regurgitation velocity 2.8 m/s, estimated PASP 36 mmHg.",
        "Simple cyst of Morgagni, 0.5 cm.",
        "Von Hippel-Lindau disease: multiple renal cysts.",
        "Peyronie plaque 0.8 cm at the dorsal shaft.",
        "Hashimoto pattern without nodules.",
    ]
    out = []
    for text in zh:
        out.append({"id": f"c{len(out):04d}", "lang": "zh", "text": text})
    for text in en:
        out.append({"id": f"c{len(out):04d}", "lang": "en", "text": text})
    # Dense sentences built from the vocabulary itself, so every listed word is exercised.
    for i in range(0, len(VOCAB_ZH), 4):
        words = VOCAB_ZH[i : i + 4]
        out.append(
            {
                "id": f"c{len(out):04d}",
                "lang": "zh",
                "text": f"所见：{'、'.join(words)}，大小{1 + i % 5}.{i % 10}cm。",
            }
        )
    for i in range(0, len(VOCAB_EN), 4):
        words = VOCAB_EN[i : i + 4]
        out.append(
            {
                "id": f"c{len(out):04d}",
                "lang": "en",
                "text": f"Findings: {', '.join(words)}; size {1 + i % 5}.{i % 10} cm.",
            }
        )
    return out


def main(out: Path = HERE) -> None:
    rng.seed(0)
    phi, clean = phi_snippets(), clean_snippets()
    with (out / "phi.jsonl").open("w", encoding="utf-8") as fh:
        for row in phi:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    with (out / "clean.jsonl").open("w", encoding="utf-8") as fh:
        for row in clean:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    with (out / "vocab.json").open("w", encoding="utf-8") as fh:
        json.dump({"zh": VOCAB_ZH, "en": VOCAB_EN}, fh, ensure_ascii=False, indent=0)
        fh.write("\n")
    print(f"{len(phi)} PHI snippets, {len(clean)} clean snippets")


if __name__ == "__main__":
    main()
