"""Rule-based findings extractor for our report language (zh and en): text -> structured facts.

What this file owns: the findings vocabulary (finding types, their synonyms, sides, location
parts, negation cues) with a user extension file, `extract_findings` (an answer -> `Fact`s: type,
side, location part, size in cm, negated or not), and the ground truth of a report or eval
sample as the same `Fact`s (structured SynthUS meta when present, else the report text).

How a text is read (docs/metrics.md "Hallucination" gives the same in words):
1. Sentences end at 。！？；;!? newlines and a period not inside a number; clauses end at
   ，,：: and at 'but / however / whereas / while / 但', and in English before 'and a/an/one'
   (so "a nodule in the right lobe and a cyst in the left lobe" is two clauses).
2. In each clause, finding terms are matched leftmost-longest (无回声区 is a cyst before 无 can be
   a negation; "hyperechoic mass" is a stone, not a generic mass); Chinese terms are substrings,
   English terms whole words with an optional plural 's'/'es'.
3. A finding is negated when a negation cue (未见, 无, 没有, no, without, ...) stands before it
   in its clause, or (English) a 'is not seen'-style phrase follows it before the next finding.
   无回声 (anechoic), 不除外 and 'cannot be excluded' are masked first: they negate nothing.
   A negated generic word (异常, 占位性病变, lesion, abnormality) states that no finding of any
   type is present (type `ANY`); a generic word without negation states no finding at all.
4. Sides (左/右/双侧, left/right/bilateral), location parts (上极, upper pole, 外上象限, ...) and
   sizes (1.2cm×0.8cm, 12 mm, 1.2 by 0.8 cm) attach to one finding of the same sentence: within a
   clause, Chinese attaches to the next finding (location comes first: 右叶见一结节) and English
   to the previous one (a nodule in the right lobe), each falling back to the other direction; a
   clause with no finding gives its locations to the next finding of the sentence (右叶上极，见一
   结节) and its sizes to the previous one (结节，大小约1.0cm×0.8cm), with the same fallback.

Notable choices:
- Rules, not a model: every decision can be read in this file and pinned by a golden test, and
  the vocabulary follows the report style a user writes (`load_vocabulary(path)` adds terms from
  a JSON/YAML file; nothing is removed).
- Facts are per mention; `merge_facts` folds the mentions of one finding (the findings sentence
  and the diagnosis both name it) into one fact when their attributes do not conflict.
- The SynthUS location keys (`right_lobe_upper`, `left_upper_outer`, `gallbladder`, ...) map to
  (side, part) by `location_key_facts`, the same parts the text rules produce; a test checks the
  text rules against every SynthUS location phrase and finding template in both languages.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .metrics import detect_language

ANY = "any"
"""The type of a negated generic statement ('未见明显异常', 'no lesion'): no finding of any type."""
LANGUAGES = ("zh", "en")
SIDES = ("left", "right", "bilateral")

# --------------------------------------------------------------------------------- vocabulary

DEFAULT_VOCABULARY: dict[str, Any] = {
    # finding type -> language -> terms (synonyms). The keys are the SynthUS finding types.
    "findings": {
        "cyst": {
            "zh": ["囊肿", "囊性结节", "囊性病灶", "囊性占位", "无回声区", "无回声团", "纳氏囊肿"],
            "en": [
                "cyst",
                "cystic nodule",
                "cystic lesion",
                "anechoic area",
                "anechoic lesion",
                "Nabothian cyst",
            ],
        },
        "nodule": {
            "zh": [
                "结节",
                "实性结节",
                "低回声结节",
                "实性低回声结节",
                "实性占位",
                "低回声团",
                "肌瘤",
                "实性肿块",
            ],
            "en": [
                "nodule",
                "solid nodule",
                "hypoechoic nodule",
                "solid hypoechoic nodule",
                "solid mass",
                "hypoechoic mass",
                "leiomyoma",
                "fibroid",
            ],
        },
        "calcification": {
            "zh": ["钙化", "钙化灶", "钙化斑", "强回声光点", "点状强回声", "强回声斑", "强回声灶"],
            "en": [
                "calcification",
                "calcified focus",
                "hyperechoic focus",
                "echogenic focus",
                "microcalcification",
            ],
        },
        "stone": {
            "zh": ["结石", "强回声团", "胆石"],
            "en": ["stone", "calculus", "calculi", "hyperechoic mass", "echogenic mass", "gallstone"],
        },
    },
    # words that name no finding type: negated, they rule out every type (未见明显异常)
    "generic": {
        "zh": ["异常", "占位性病变", "占位", "病变", "病灶", "肿块", "异常回声"],
        "en": ["abnormality", "abnormalities", "lesion", "space-occupying lesion", "mass", "focal lesion"],
    },
    "sides": {
        "left": {"zh": ["左侧", "左"], "en": ["left"]},
        "right": {"zh": ["右侧", "右"], "en": ["right"]},
        "bilateral": {"zh": ["双侧", "两侧", "双"], "en": ["bilateral", "both"]},
    },
    # location part -> terms; the keys are what `location_key_facts` makes of SynthUS locations
    "parts": {
        "upper": {"zh": ["上极"], "en": ["upper pole", "superior pole"]},
        "middle": {"zh": ["中部", "中极"], "en": ["middle portion", "mid portion", "middle part", "middle"]},
        "lower": {"zh": ["下极"], "en": ["lower pole", "inferior pole"]},
        "isthmus": {"zh": ["峡部"], "en": ["isthmus"]},
        "upper_outer": {"zh": ["外上象限"], "en": ["upper outer quadrant"]},
        "lower_outer": {"zh": ["外下象限"], "en": ["lower outer quadrant"]},
        "upper_inner": {"zh": ["内上象限"], "en": ["upper inner quadrant"]},
        "lower_inner": {"zh": ["内下象限"], "en": ["lower inner quadrant"]},
        "gallbladder": {"zh": ["胆囊"], "en": ["gallbladder"]},
        "anterior_wall": {"zh": ["前壁"], "en": ["anterior wall"]},
        "posterior_wall": {"zh": ["后壁"], "en": ["posterior wall"]},
        "fundus": {"zh": ["宫底"], "en": ["fundus", "uterine fundus"]},
        "cervix": {"zh": ["宫颈"], "en": ["cervix", "cervical"]},
        "mitral_annulus": {"zh": ["二尖瓣环"], "en": ["mitral annulus", "mitral annular"]},
        "tricuspid_annulus": {"zh": ["三尖瓣环"], "en": ["tricuspid annulus", "tricuspid annular"]},
    },
    # cues before a finding in its clause
    "negations": {
        "zh": ["未见", "未探及", "未发现", "未显示", "没有", "无", "未", "否认", "排除"],
        "en": [
            "no",
            "not",
            "without",
            "negative for",
            "absence of",
            "absent",
            "free of",
            "ruled out",
            "none",
        ],
    },
    # English phrases after a finding ('a nodule is not seen')
    "negations_after": {
        "zh": [],
        "en": [
            "is not seen",
            "are not seen",
            "was not seen",
            "were not seen",
            "is not identified",
            "are not identified",
            "is not detected",
            "are not detected",
            "is not visible",
            "are not visible",
            "is absent",
            "are absent",
            "is not present",
            "are not present",
            "is ruled out",
            "is excluded",
        ],
    },
    # masked before looking for negation cues: they contain a cue but negate nothing
    "not_negations": {
        "zh": ["无回声", "不除外", "不排除", "无法排除"],
        "en": ["cannot be excluded", "cannot be ruled out", "not excluded", "no change"],
    },
}
SECTIONS = tuple(DEFAULT_VOCABULARY)
_KEYED = ("findings", "sides", "parts")  # key -> language -> terms; the others: language -> terms


def _terms(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, str) and t.strip() for t in value):
        raise ConfigError(f"findings vocabulary {where}: give a list of non-empty strings, got {value!r}")
    return [t.strip() for t in value]


def _check_lang(lang: Any, where: str) -> str:
    if lang not in LANGUAGES:
        raise ConfigError(f"findings vocabulary {where}: language {lang!r} is not one of: zh, en")
    return str(lang)


class Vocabulary:
    """Terms per section and language; regexes are compiled once per language on first use."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self.data = data
        self._compiled: dict[str, dict[str, Any]] = {}

    @property
    def types(self) -> tuple[str, ...]:
        """The finding types, in vocabulary order."""
        return tuple(self.data["findings"])

    def terms(self, ftype: str, language: str) -> list[str]:
        """The terms of a finding type in `language` (the first is its plain name)."""
        return list(self.data["findings"].get(ftype, {}).get(language, []))

    def compiled(self, language: str) -> dict[str, Any]:
        if language not in self._compiled:
            self._compiled[language] = self._compile(language)
        return self._compiled[language]

    def _compile(self, lang: str) -> dict[str, Any]:
        def alternation(terms: Iterable[str], plural: bool = False) -> re.Pattern[str] | None:
            terms = sorted(set(terms), key=lambda t: (-len(t), t))
            if not terms:
                return None
            body = "|".join(re.escape(t) for t in terms)
            if lang == "en":
                suffix = "(?:s|es)?" if plural else ""
                return re.compile(rf"(?<![a-z0-9])(?:{body}){suffix}(?![a-z0-9])", re.IGNORECASE)
            return re.compile(body)

        def lookup(section: str) -> dict[str, str]:
            return {t.lower(): key for key, per in self.data[section].items() for t in per.get(lang, [])}

        types = lookup("findings")
        generic = {t.lower(): ANY for t in self.data["generic"].get(lang, [])}
        return {
            "terms": {**generic, **types},
            "finding": alternation([*types, *generic], plural=True),
            "sides": lookup("sides"),
            "side": alternation(lookup("sides")),
            "parts": lookup("parts"),
            "part": alternation(lookup("parts")),
            "neg": alternation(self.data["negations"].get(lang, [])),
            "neg_after": alternation(self.data["negations_after"].get(lang, [])),
            "mask": alternation(self.data["not_negations"].get(lang, [])),
        }

    def key_of(self, lang: str, section: str, matched: str) -> str:
        """The key a matched term belongs to ('结节' -> 'nodule'); English plurals fold back."""
        table = self.compiled(lang)[section]
        low = matched.lower()
        for candidate in (low, low[:-1], low[:-2]):
            if candidate in table:
                return table[candidate]
        raise KeyError(matched)


def _merge(base: dict[str, Any], extra: Mapping[str, Any], source: str) -> dict[str, Any]:
    unknown = [k for k in extra if k not in SECTIONS]
    if unknown:
        raise ConfigError(
            f"{source}: unknown vocabulary section(s) {unknown}; use any of: {', '.join(SECTIONS)}"
        )
    out = json.loads(json.dumps(base))
    for section, value in extra.items():
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: section {section!r} must be a mapping")
        if section in _KEYED:
            for key, per in value.items():
                if not isinstance(per, Mapping):
                    raise ConfigError(f"{source}: {section}.{key} must map zh/en to lists of terms")
                if section == "sides" and key not in SIDES:
                    raise ConfigError(f"{source}: sides.{key}: a side is one of {', '.join(SIDES)}")
                slot = out[section].setdefault(str(key), {})
                for lang, terms in per.items():
                    where = f"{source}: {section}.{key}.{lang}"
                    _check_lang(lang, where)
                    slot[lang] = list(dict.fromkeys([*slot.get(lang, []), *_terms(terms, where)]))
        else:
            for lang, terms in value.items():
                where = f"{source}: {section}.{lang}"
                _check_lang(lang, where)
                out[section][lang] = list(dict.fromkeys([*out[section].get(lang, []), *_terms(terms, where)]))
    if ANY in out["findings"]:
        raise ConfigError(f"{source}: {ANY!r} is reserved for generic statements; name the finding type")
    return out


_DEFAULT: Vocabulary | None = None


def default_vocabulary() -> Vocabulary:
    """The built-in vocabulary (SynthUS report style, zh and en)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Vocabulary(_merge(DEFAULT_VOCABULARY, {}, "built-in"))
    return _DEFAULT


def load_vocabulary(path: str | Path | None = None, extra: Mapping[str, Any] | None = None) -> Vocabulary:
    """The built-in vocabulary extended by a JSON/YAML file (`path`) and/or a mapping (`extra`).

    Both have the layout of `DEFAULT_VOCABULARY`; their terms are added (nothing is removed), and
    new finding types or location parts become known. Errors name the file and the bad entry.
    """
    if path is None and not extra:
        return default_vocabulary()
    data = json.loads(json.dumps(DEFAULT_VOCABULARY))
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"findings vocabulary {p} not found; pass a JSON or YAML file")
        text = p.read_text(encoding="utf-8")
        try:
            if p.suffix.lower() in (".yaml", ".yml"):
                import yaml

                loaded = yaml.safe_load(text) or {}
            else:
                loaded = json.loads(text)
        except Exception as exc:  # noqa: BLE001 - both parsers' errors end up here
            raise ConfigError(f"findings vocabulary {p} cannot be parsed ({exc})") from None
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"findings vocabulary {p}: expected a mapping of sections")
        data = _merge(data, loaded, str(p))
    if extra:
        data = _merge(data, extra, "vocabulary extension")
    return Vocabulary(data)


# -------------------------------------------------------------------------------------- facts


@dataclass(frozen=True)
class Fact:
    """One finding as stated: its type (or `ANY`), whether it is denied, where, and how large."""

    type: str
    negated: bool = False
    side: str | None = None
    """'left', 'right', 'bilateral' or None (not stated)."""
    part: str | None = None
    """Location part key ('upper', 'upper_outer', 'gallbladder', ...) or None."""
    size_cm: tuple[float, ...] | None = None
    """Dimensions in cm as written (mm converted), or None."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "negated": self.negated,
            "side": self.side,
            "part": self.part,
            "size_cm": list(self.size_cm) if self.size_cm else None,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Fact:
        size = d.get("size_cm")
        return cls(
            type=str(d["type"]),
            negated=bool(d.get("negated", False)),
            side=d.get("side"),
            part=d.get("part"),
            size_cm=tuple(float(x) for x in size) if size else None,
        )


# ----------------------------------------------------------------------------------- splitting

_SENTENCE = re.compile(r"[。！？；;!?\n]+|\.(?!\d)")
_CLAUSE = {
    "zh": re.compile(r"[，,：:]|但是|但|然而"),
    "en": re.compile(
        r"[，,：:]|\b(?:but|however|whereas|while)\b|\band\b(?=\s+(?:a|an|one|two|another|\d)\b)",
        re.IGNORECASE,
    ),
}
_NUM = r"\d+(?:\.\d+)?"
_UNIT = r"(?:cm|mm|厘米|毫米)(?![a-z])"
_SEP = r"\s*(?:[×xX*＊]|by)\s*"
_SIZE = re.compile(
    rf"(?<![0-9A-Za-z.])({_NUM})\s*({_UNIT})?(?:{_SEP}({_NUM})\s*({_UNIT})?)?(?:{_SEP}({_NUM})\s*({_UNIT})?)?",
    re.IGNORECASE,
)


def parse_sizes(text: str) -> list[tuple[int, tuple[float, ...]]]:
    """(position, dimensions in cm) of every measurement with a unit: '1.2cm×0.8cm', '12 mm',
    '1.2 x 0.8 cm' (a number without its own unit takes the next unit to its right)."""
    out = []
    for m in _SIZE.finditer(text):
        groups = m.groups()
        nums = [groups[i] for i in (0, 2, 4)]
        units = [groups[i] for i in (1, 3, 5)]
        if not any(units):
            continue
        dims = []
        for i, num in enumerate(nums):
            if num is None:
                continue
            unit = next((u for u in units[i:] if u), None)
            if unit is None:  # '1.2 cm × 3' : a trailing number without unit is not a size
                continue
            value = float(num) / (10.0 if unit.lower() in ("mm", "毫米") else 1.0)
            dims.append(round(value, 4))
        if dims:
            out.append((m.start(), tuple(dims)))
    return out


def _masked(text: str, pattern: re.Pattern[str] | None) -> str:
    """`text` with the matches of `pattern` replaced by spaces (positions are kept)."""
    if pattern is None:
        return text
    return pattern.sub(lambda m: " " * len(m.group(0)), text)


def _split(pattern: re.Pattern[str], text: str) -> list[tuple[int, str]]:
    """Pieces of `text` between the matches of `pattern`, with their start offsets."""
    out, start = [], 0
    for m in pattern.finditer(text):
        out.append((start, text[start : m.start()]))
        start = m.end()
    out.append((start, text[start:]))
    return [(s, t) for s, t in out if t.strip()]


# ---------------------------------------------------------------------------------- extraction


@dataclass
class _Mention:
    pos: int  # offset in the sentence
    clause: int
    type: str
    negated: bool
    sides: list[str]
    parts: list[str]
    sizes: list[tuple[float, ...]]


def _clause_mentions(vocab: Vocabulary, lang: str, clause: str) -> list[tuple[int, str, bool, int]]:
    """(start, type, negated, end) of every finding term in one clause."""
    c = vocab.compiled(lang)
    if c["finding"] is None:
        return []
    hits = [
        (m.start(), vocab.key_of(lang, "terms", m.group(0)), m.end()) for m in c["finding"].finditer(clause)
    ]
    # negation cues are looked for in the clause with finding terms and masked phrases blanked out
    plain = _masked(clause, c["mask"])
    for start, _, end in hits:
        plain = plain[:start] + " " * (end - start) + plain[end:]
    negs = [m.start() for m in c["neg"].finditer(plain)] if c["neg"] is not None else []
    out = []
    for i, (start, ftype, end) in enumerate(hits):
        negated = any(p < start for p in negs)
        if not negated and c["neg_after"] is not None:
            stop = hits[i + 1][0] if i + 1 < len(hits) else len(clause)
            negated = c["neg_after"].search(_masked(clause, c["mask"])[end:stop]) is not None
        out.append((start, ftype, negated, end))
    return out


def _attach(items: Sequence[int], targets: Sequence[int], forward_first: bool) -> list[int | None]:
    """For each item position, the index (into targets) of the finding it belongs to."""
    out: list[int | None] = []
    for pos in items:
        after = [i for i, t in enumerate(targets) if t > pos]
        before = [i for i, t in enumerate(targets) if t < pos]
        first = after[:1] if forward_first else before[-1:]
        second = before[-1:] if forward_first else after[:1]
        pick = first or second
        out.append(pick[0] if pick else None)
    return out


def _sentence_facts(vocab: Vocabulary, lang: str, sentence: str) -> list[Fact]:
    c = vocab.compiled(lang)
    mentions: list[_Mention] = []
    loose: list[tuple[int, int, str, Any]] = []  # (clause, pos, kind, value) in clauses without findings
    inner: list[tuple[int, int, str, Any]] = []  # the same in clauses with findings
    clauses = _split(_CLAUSE[lang], sentence)
    for ci, (offset, clause) in enumerate(clauses):
        found = _clause_mentions(vocab, lang, clause)
        for start, ftype, negated, _ in found:
            mentions.append(_Mention(offset + start, ci, ftype, negated, [], [], []))
        # blank the finding terms so their words ('calculi', '胆囊结石' keeps 胆囊) are not re-read
        rest = clause
        for start, _, _, end in found:
            rest = rest[:start] + " " * (end - start) + rest[end:]
        items: list[tuple[int, str, Any]] = []
        if c["side"] is not None:
            items += [
                (m.start(), "side", vocab.key_of(lang, "sides", m.group(0))) for m in c["side"].finditer(rest)
            ]
        if c["part"] is not None:
            items += [
                (m.start(), "part", vocab.key_of(lang, "parts", m.group(0))) for m in c["part"].finditer(rest)
            ]
        items += [(pos, "size", dims) for pos, dims in parse_sizes(rest)]
        bucket = inner if found else loose
        bucket += [(ci, offset + pos, kind, value) for pos, kind, value in items]
    if not mentions:
        return []
    zh = lang == "zh"
    by_clause: dict[int, list[int]] = {}
    for i, m in enumerate(mentions):
        by_clause.setdefault(m.clause, []).append(i)
    for ci, pos, kind, value in inner:
        idx = by_clause[ci]
        pick = _attach([pos], [mentions[i].pos for i in idx], forward_first=zh)[0]
        if pick is not None:
            _add(mentions[idx[pick]], kind, value)
    for _, pos, kind, value in loose:
        # locations before the finding they describe; sizes after it
        targets = [m.pos for m in mentions]
        pick = _attach([pos], targets, forward_first=kind != "size")[0]
        if pick is not None:
            _add(mentions[pick], kind, value)
    return [_to_fact(m) for m in mentions]


def _add(m: _Mention, kind: str, value: Any) -> None:
    {"side": m.sides, "part": m.parts, "size": m.sizes}[kind].append(value)


def _to_fact(m: _Mention) -> Fact:
    sides = set(m.sides)
    side = None
    if sides:
        side = "bilateral" if "bilateral" in sides or {"left", "right"} <= sides else sides.pop()
    part = m.parts[0] if m.parts else None
    size = m.sizes[0] if m.sizes else None
    return Fact(m.type, m.negated, side, part, size)


def extract_findings(
    text: str | None, language: str | None = None, vocab: Vocabulary | None = None
) -> list[Fact]:
    """Every finding mention in `text`, in order, as a `Fact` (see the module docstring for the rules).

    `language` 'zh' or 'en'; None detects it from the text. A negated generic statement
    ('未见明显异常', 'no abnormality') is a negated fact of type `ANY`; generic words without a
    negation are not facts.
    """
    if not text or not text.strip():
        return []
    vocab = vocab or default_vocabulary()
    lang = language if language in LANGUAGES else detect_language(text)
    facts: list[Fact] = []
    for _, sentence in _split(_SENTENCE, text):
        facts += [f for f in _sentence_facts(vocab, lang, sentence) if f.type != ANY or f.negated]
    return facts


def _compatible(a: Fact, b: Fact) -> bool:
    if a.type != b.type or a.negated != b.negated:
        return False
    return all(
        x is None or y is None or x == y
        for x, y in ((a.side, b.side), (a.part, b.part), (a.size_cm, b.size_cm))
    )


def merge_facts(facts: Sequence[Fact]) -> list[Fact]:
    """Fold mentions of one finding into one fact: same type and polarity, and every attribute
    either equal or stated by only one of them ('右叶上极见一结节…诊断：结节' is one nodule).
    Two nodules on different sides stay two facts. Order of first mention is kept."""
    out: list[Fact] = []
    for f in facts:
        for i, g in enumerate(out):
            if _compatible(f, g):
                out[i] = replace(
                    g, side=g.side or f.side, part=g.part or f.part, size_cm=g.size_cm or f.size_cm
                )
                break
        else:
            out.append(f)
    return out


# --------------------------------------------------------------------------------- ground truth


def location_key_facts(location: str | None) -> tuple[str | None, str | None]:
    """(side, part) of a SynthUS location key: 'right_lobe_upper' -> ('right', 'upper'),
    'left_upper_outer' -> ('left', 'upper_outer'), 'right_lobe' -> ('right', None),
    'gallbladder' -> (None, 'gallbladder'), 'mitral_annulus' -> (None, 'mitral_annulus')."""
    if not location:
        return None, None
    tokens = str(location).split("_")
    side = tokens[0] if tokens[0] in ("left", "right") else None
    rest = [t for t in tokens[1 if side else 0 :] if t != "lobe"]
    return side, ("_".join(rest) or None)


def facts_from_meta(meta: Mapping[str, Any]) -> list[Fact] | None:
    """Ground truth from structured fields (SynthUS report meta: `finding_type`, `location`,
    `size_cm`), or None when `meta` has no `finding_type`. 'none' gives an empty list."""
    ftype = meta.get("finding_type")
    if not isinstance(ftype, str) or not ftype:
        return None
    if ftype == "none":
        return []
    side, part = location_key_facts(meta.get("location"))
    size = meta.get("size_cm")
    return [Fact(ftype, False, side, part, tuple(float(x) for x in size) if size else None)]


def truth_facts(record: Mapping[str, Any], vocab: Vocabulary | None = None) -> tuple[list[Fact], str]:
    """The present findings of a report record or eval sample, and where they came from.

    In order: a `truth` list of fact dicts (written by `llava-ultra probes`), then structured meta
    (`finding_type`/`location`/`size_cm`, top level or under `meta`), then the report text
    (`findings` and `diagnosis` fields) read by `extract_findings`. Returns (facts, source) with
    source 'truth', 'meta', 'text' or 'none' (nothing to read: no ground truth).
    """
    meta = record.get("meta") if isinstance(record.get("meta"), Mapping) else {}
    for holder in (record, meta):
        if isinstance(holder.get("truth"), list):
            return [Fact.from_dict(d) for d in holder["truth"]], "truth"
    for holder in (record, meta):
        facts = facts_from_meta(holder)
        if facts is not None:
            return facts, "meta"
    texts = [record.get(k) or meta.get(k) for k in ("findings", "diagnosis")]
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        return [], "none"
    lang = record.get("language") if record.get("language") in LANGUAGES else None
    facts = [f for t in texts for f in extract_findings(t, lang, vocab)]
    return merge_facts([f for f in facts if not f.negated and f.type != ANY]), "text"
