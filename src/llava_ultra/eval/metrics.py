"""Med-VQA answer metrics in two named modes: `llava-med` (compatibility) and `strict`.

What this file owns: turning (prediction, reference, answer type, language) into per-sample
scores and their means x 100, plus a corpus-level sacreBLEU column and a bootstrap CI helper.
Every function here is pure (jieba's tokenizer is the only state: built once, lazily, quietly).

Modes (see docs/metrics.md for each formula in words):

- `llava-med` reproduces LLaVA-Med v1.0.0 (`llava/eval/run_eval.py` + `eval_metrics/` at commit
  b9a98a7, the `v1.0.0` tag) exactly, quirks included: VQA-style normalisation applied once for
  BLEU and closed questions and twice for EM/F1 (their metric functions re-normalise already
  normalised text), a period-strip capped at 32 deletions (`re.UNICODE` passed as `count`),
  "exact match" = |unique reference words found in the prediction| / |prediction tokens|,
  precision/recall from word counts where true positives are counted on the prediction side,
  nltk 3.10.4 `sentence_bleu` without smoothing and single-order BLEU-1/2/3 weights, "open
  accuracy" (the candidate answer with the highest word overlap with the prediction, first
  maximum wins, must equal the reference), and closed questions scored by v1.0.0's rule: a hit
  needs "yes" or "no" as a substring of the prediction ("nodule" and "normal" contain "no") and
  the reference as a substring; every other closed question is a miss. Empty references and
  empty predictions are scored like any other text, as v1.0.0 does. Earlier LLaVA-Med rules
  stay available as closed variants named by the file and commit they reproduce (see
  CLOSED_VARIANTS). Tokens are whitespace-split by default, so a Chinese answer is one token;
  `tokenizer="jieba"|"char"` keeps their formulas but feeds them real Chinese tokens
  (LLaVA-Ultra's "we tokenize answers").
- `strict`: normalised-string exact match, SQuAD-style multiset token precision/recall/F1,
  cumulative BLEU-n with exponential smoothing and effective order (sacreBLEU's sentence-level
  semantics, so a perfect short answer scores 100), and closed questions decided by yes/no
  cues with word boundaries plus Chinese synonyms read as jieba tokens (是/有/存在 ... vs
  否/没有/未见 ...). An uncertain answer (不确定, "I am not sure") is neither yes nor no, and a
  negation cue in the prediction that the reference lacks (不均匀 vs 均匀) makes a closed hit
  impossible. Chinese is tokenised with jieba plus `resources/medical_dict.txt` (default) or by
  characters.

nltk's unsmoothed BLEU substitutes `sys.float_info.min` for an n-gram order with no matches and
warns each time; that value (~1e-308, or ~1e-154 inside the uniform 4-gram mean) is what
LLaVA-Med's numbers contain, so we keep it and silence only that warning. When not even a
unigram matches nltk returns exactly 0.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import unicodedata
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError
from ..vocab import medical_terms

MODES = ("llava-med", "strict")
TOKENIZERS = ("whitespace", "jieba", "char")
LANGUAGES = ("zh", "en")
# Closed-question rules of llava-med mode, named by the LLaVA-Med file and commit they reproduce;
# the first is v1.0.0 (the `v1.0.0` tag) and the default.
CLOSED_VARIANTS = ("run_eval@b9a98a7", "run_eval@ad758b6", "run_eval_batch@ad758b6")
DEFAULT_CLOSED_VARIANT = CLOSED_VARIANTS[0]
RENAMED_CLOSED_VARIANTS = {"substring": "run_eval_batch@ad758b6", "legacy": "run_eval@ad758b6"}
METRIC_KEYS = ("exact_match", "f1", "precision", "recall", "bleu", "bleu_1", "bleu_2", "bleu_3")
# llava-med mode's candidate-set match of open answers (None in strict mode)
OPEN_ACCURACY = "open_accuracy"

DEFAULT_TOKENIZERS: dict[str, dict[str, str]] = {
    "llava-med": {"zh": "whitespace", "en": "whitespace"},
    "strict": {"zh": "jieba", "en": "whitespace"},
}
BLEU_VARIANTS = {
    "llava-med": "nltk 3.10.4 sentence_bleu, no smoothing; bleu = uniform 4-gram, "
    "bleu_1/2/3 = single-order n-gram precision x brevity penalty",
    "strict": "cumulative BLEU-n (uniform weights over orders 1..n; bleu = BLEU-4), "
    "exp smoothing (Chen & Cherry 2014 method 3), effective order",
}
CLOSED_DESCRIPTIONS = {
    "run_eval@b9a98a7": "LLaVA-Med v1.0.0 run_eval.py (b9a98a7): hit if the prediction contains 'yes' or "
    "'no' as a substring and the normalised reference as a substring; every other closed question is a "
    "miss, all in the denominator",
    "run_eval@ad758b6": "LLaVA-Med run_eval.py as first released (ad758b6, before b9a98a7's fix): needs "
    "'yes' or 'no' as a substring, then hit if the reference is a substring; gated misses are dropped "
    "from the denominator",
    "run_eval_batch@ad758b6": "LLaVA-Med run_eval_batch.py (ad758b6, unchanged at b9a98a7): hit if the "
    "normalised reference is a substring of the prediction",
    "strict": "yes/no cue with word boundaries (Chinese: jieba tokens and synonyms; uncertainty is neither); "
    "other closed answers: reference tokens appear contiguously in the prediction tokens and the "
    "prediction has no negation or uncertainty cue the reference lacks",
}

# Answer-type spellings seen in SLAKE / VQA-RAD (OPEN, CLOSED) and PathVQA (other, number, yes/no).
_ANSWER_TYPES = {"open": "open", "other": "open", "number": "open", "closed": "closed", "yes/no": "closed"}

# --------------------------------------------------------------------------------------------
# LLaVA-Med / VQA-eval normalisation tables (the official VQA evaluation script's tables, which
# LLaVA-Med's glossary.py reuses). Keys with capitals ("Im", "Ive", ...) can never match after
# lower-casing; they are kept so the table is the same as theirs.
# --------------------------------------------------------------------------------------------
_CONTRACTION_PAIRS = """
aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've
couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've
hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's
howd:how'd howll:how'll hows:how's Id've:I'd've I'dve:I'd've Im:I'm Ive:I've isnt:isn't itd:it'd
itd've:it'd've it'dve:it'd've itll:it'll let's:let's maam:ma'am mightnt:mightn't
mightnt've:mightn't've mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've
neednt:needn't notve:not've oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at
'ow'sat:'ow's'at shant:shan't shed've:she'd've she'dve:she'd've she's:she's shouldve:should've
shouldnt:shouldn't shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd
somebodyd've:somebody'd've somebody'dve:somebody'd've somebodyll:somebody'll somebodys:somebody's
someoned:someone'd someoned've:someone'd've someone'dve:someone'd've someonell:someone'll
someones:someone's somethingd:something'd somethingd've:something'd've
something'dve:something'd've somethingll:something'll thats:that's thered:there'd
thered've:there'd've there'dve:there'd've therere:there're theres:there's theyd:they'd
theyd've:they'd've they'dve:they'd've theyll:they'll theyre:they're theyve:they've twas:'twas
wasnt:wasn't wed've:we'd've we'dve:we'd've weve:we've werent:weren't whatll:what'll
whatre:what're whats:what's whatve:what've whens:when's whered:where'd wheres:where's
whereve:where've whod:who'd whod've:who'd've who'dve:who'd've wholl:who'll whos:who's
whove:who've whyll:why'll whyre:why're whys:why's wont:won't wouldve:would've wouldnt:wouldn't
wouldnt've:wouldn't've wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll y'allll:y'all'll
yall'd've:y'all'd've y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've
you'dve:you'd've youll:you'll youre:you're youve:you've
"""
LLAVA_MED_CONTRACTIONS: dict[str, str] = dict(pair.split(":", 1) for pair in _CONTRACTION_PAIRS.split())
LLAVA_MED_NUMBER_WORDS: dict[str, str] = {
    word: str(i)
    for i, word in enumerate(
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    )
} | {"none": "0"}
_ARTICLES = frozenset({"a", "an", "the"})
LLAVA_MED_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")  # fmt: skip
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# Theirs is "(?!<=\d)(\.)(?!\d)": the first group is a mistyped look-behind that, placed before a
# ".", can never fail, so the pattern is "a period not followed by a digit".
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
LLAVA_MED_PERIOD_CAP = int(re.UNICODE)  # 32: they pass re.UNICODE as sub()'s `count`

_CACHE = 1 << 17


@functools.lru_cache(maxsize=_CACHE)
def llava_med_normalize(text: str) -> str:
    """LLaVA-Med's `normalize_word`: punctuation, periods (max 32), numbers, articles, contractions.

    For each punctuation mark: if the text has it next to a space, or has digit,comma,digit
    anywhere, the mark is deleted; otherwise it becomes a space (checks look at the input text).
    """
    digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in LLAVA_MED_PUNCT:
        if digit_comma or (mark + " ") in text or (" " + mark) in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    out = _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=LLAVA_MED_PERIOD_CAP)
    words = []
    for word in out.lower().split():
        word = LLAVA_MED_NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(LLAVA_MED_CONTRACTIONS.get(word, word))
    return " ".join(words).replace(",", "")


# --------------------------------------------------------------------------------------------
# Strict normalisation, languages, tokenizers
# --------------------------------------------------------------------------------------------
_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_CJK_CHAR = re.compile(f"[{_CJK}]")
_LATIN_WORD = re.compile(r"[A-Za-z]+")
_SPACE_NEXT_TO_CJK = re.compile(f"(?<=[{_CJK}])\\s+|\\s+(?=[{_CJK}])")
_CHAR_TOKEN = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+")
_STRICT_NUMBER_WORDS = {k: v for k, v in LLAVA_MED_NUMBER_WORDS.items() if k != "none"}


def detect_language(text: str, threshold: float = 0.3) -> str:
    """'zh' when CJK characters make up at least `threshold` of (CJK chars + Latin words), else 'en'.

    Counting Latin *words* rather than letters keeps "TI-RADS 4类" style answers balanced; text
    with neither (digits, punctuation, empty) is 'en'.
    """
    cjk = len(_CJK_CHAR.findall(text))
    latin = len(_LATIN_WORD.findall(text))
    if cjk == 0:
        return "en"
    return "zh" if cjk / (cjk + latin) >= threshold else "en"


def check_language(code: str, text: str = "") -> str:
    """Return 'zh' or 'en' for `code` ('auto' detects from `text`); raise DataError otherwise."""
    if code == "auto":
        return detect_language(text)
    if code not in LANGUAGES:
        raise DataError(f"unknown language code {code!r}; use one of: {', '.join(LANGUAGES)} (or 'auto')")
    return code


def _strict_char(ch: str) -> str:
    cat = unicodedata.category(ch)
    return " " if cat[0] in "PS" else ch


@functools.lru_cache(maxsize=_CACHE)
def normalize_strict(text: str, language: str) -> str:
    """Strict-mode normal form: NFKC, lower case, punctuation and symbols removed.

    Kept: decimal points and hyphens between letters/digits ("1.5", "ti-rads", "x-ray");
    thousands commas are joined ("1,000" -> "1000"); apostrophes are deleted ("isn't" -> "isnt").
    English also maps zero..ten to digits and drops a/an/the. Chinese drops spaces next to CJK
    characters so "甲状腺 结节" equals "甲状腺结节".
    """
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"(?<=\d),(?=\d)", "", text)
    text = re.sub(r"['\u2019]", "", text)
    protected = re.sub(r"(?<=\d)\.(?=\d)", "\x00", text)
    protected = re.sub(r"(?<=\w)-(?=\w)", "\x01", protected)
    cleaned = "".join(_strict_char(ch) if ch not in "\x00\x01" else ch for ch in protected)
    cleaned = cleaned.replace("\x00", ".").replace("\x01", "-")
    words = cleaned.split()
    if language == "en":
        words = [_STRICT_NUMBER_WORDS.get(w, w) for w in words if w not in _ARTICLES]
        return " ".join(words)
    return _SPACE_NEXT_TO_CJK.sub("", " ".join(words))


@functools.cache
def _jieba_tokenizer() -> Any:
    """One jieba Tokenizer with the medical user dictionary; its init log lines are silenced."""
    import jieba

    tk = jieba.Tokenizer()
    previous = jieba.default_logger.level
    jieba.default_logger.setLevel(logging.WARNING)
    try:
        tk.initialize()
        for word, freq, tag in medical_terms():
            for form in {word, word.lower()}:
                tk.add_word(form, freq, tag)
    finally:
        jieba.default_logger.setLevel(previous)
    return tk


@functools.lru_cache(maxsize=_CACHE)
def tokenize(text: str, tokenizer: str) -> tuple[str, ...]:
    """Split already-normalised `text` with 'whitespace', 'jieba' (+ medical dict) or 'char'.

    'char' makes each CJK character a token and keeps runs of other non-space characters whole.
    """
    if tokenizer == "whitespace":
        return tuple(text.split())
    if tokenizer == "jieba":
        return tuple(tok for tok in _jieba_tokenizer().cut(text) if tok.strip())
    if tokenizer == "char":
        return tuple(_CHAR_TOKEN.findall(text))
    raise ConfigError(f"unknown tokenizer {tokenizer!r}; use one of: {', '.join(TOKENIZERS)}")


def resolve_tokenizers(mode: str, tokenizer: str | Mapping[str, str] | None) -> dict[str, str]:
    """Per-language tokenizer names: mode defaults, overridden by a name (all languages) or a map."""
    if mode not in MODES:
        raise ConfigError(f"unknown metric mode {mode!r}; use one of: {', '.join(MODES)}")
    chosen = dict(DEFAULT_TOKENIZERS[mode])
    if isinstance(tokenizer, str):
        chosen = dict.fromkeys(LANGUAGES, tokenizer)
    elif tokenizer is not None:
        for lang, name in tokenizer.items():
            if lang not in LANGUAGES:
                raise ConfigError(
                    f"tokenizer map has unknown language {lang!r}; use keys from: {', '.join(LANGUAGES)}"
                )
            chosen[lang] = name
    for name in chosen.values():
        if name not in TOKENIZERS:
            raise ConfigError(f"unknown tokenizer {name!r}; use one of: {', '.join(TOKENIZERS)}")
    return chosen


def tokenizer_label(tokenizers: Mapping[str, str]) -> str:
    """The report's tokenizer name, e.g. 'zh=jieba+medical_dict,en=whitespace'."""
    names = {k: (v + "+medical_dict" if v == "jieba" else v) for k, v in tokenizers.items()}
    return ",".join(f"{lang}={names[lang]}" for lang in LANGUAGES)


# --------------------------------------------------------------------------------------------
# LLaVA-Med per-sample metrics (inputs: token sequences after their normalisation)
# --------------------------------------------------------------------------------------------
_NLTK_WEIGHTS = [(0.25, 0.25, 0.25, 0.25), (1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0)]


def llava_med_exact_match(pred: Sequence[str], ref: Sequence[str]) -> float:
    """|unique reference words present in the prediction| / |prediction tokens| (0 if no tokens)."""
    if not pred:
        return 0.0
    pred_set = set(pred)
    return sum(1 for word in set(ref) if word in pred_set) / len(pred)


def llava_med_prf(pred: Sequence[str], ref: Sequence[str]) -> tuple[float, float, float]:
    """(f1, precision, recall) with tp/fp counted on the prediction side and fn on the reference side."""
    if not pred or not ref:
        return 0.0, 0.0, 0.0
    pc, rc = Counter(pred), Counter(ref)
    tp = sum(n for w, n in pc.items() if w in rc)
    fp = sum(n for w, n in pc.items() if w not in rc)
    fn = sum(n for w, n in rc.items() if w not in pc)
    if tp == 0:
        return 0.0, 0.0, 0.0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2 * precision * recall / (precision + recall), precision, recall


def llava_med_bleu(pred: Sequence[str], ref: Sequence[str]) -> tuple[float, float, float, float]:
    """(bleu, bleu_1, bleu_2, bleu_3) from one nltk `sentence_bleu` call, no smoothing.

    Callers scoring many samples should silence nltk's zero-count warning once around the
    loop (see `score_samples`); this function does not touch the warnings filters.
    """
    from nltk.translate.bleu_score import sentence_bleu

    scores = sentence_bleu([list(ref)], list(pred), weights=_NLTK_WEIGHTS)
    return tuple(float(s) for s in scores)  # type: ignore[return-value]


def llava_med_closed_hit(pred: str, ref: str, variant: str = DEFAULT_CLOSED_VARIANT) -> int | None:
    """1/0 for a closed question on normalised text, by the named LLaVA-Med rule.

    'run_eval@b9a98a7' (v1.0.0): 1 only when 'yes' or 'no' is a substring of `pred` and `ref` is
    a substring of `pred`, else 0. 'run_eval@ad758b6': the same gate, but a gated miss returns
    None (the script appended nothing, so the sample left the denominator). 'run_eval_batch@ad758b6':
    1 when `ref` is a substring of `pred`.
    """
    variant = check_closed_variant(variant)
    if variant == "run_eval_batch@ad758b6":
        return int(ref in pred)
    gated = "yes" in pred or "no" in pred
    if not gated:
        return 0
    if ref in pred:
        return 1
    return None if variant == "run_eval@ad758b6" else 0


def check_closed_variant(variant: str) -> str:
    """`variant` if it is one of CLOSED_VARIANTS; a ConfigError naming the new name for old ones."""
    if variant in CLOSED_VARIANTS:
        return variant
    if variant in RENAMED_CLOSED_VARIANTS:
        raise ConfigError(
            f"closed_variant {variant!r} was renamed after the LLaVA-Med commit it reproduces: use "
            f"{RENAMED_CLOSED_VARIANTS[variant]!r} (LLaVA-Med v1.0.0 itself is {DEFAULT_CLOSED_VARIANT!r})"
        )
    raise ConfigError(f"unknown closed_variant {variant!r}; use one of: {', '.join(CLOSED_VARIANTS)}")


class OpenCandidates:
    """LLaVA-Med v1.0.0's "open accuracy" candidate set, prepared once for many predictions.

    Their `calculate_appearance_with_normalization`: every candidate answer is normalised once;
    the similarity of a candidate to a prediction is |unique prediction words in the candidate|
    / |unique candidate words| (0 for a candidate without words); the candidate with the highest
    similarity wins, the first one on ties (all-zero similarities pick the first candidate);
    the prediction scores 1 when that candidate equals the normalised reference. An inverted
    index over candidate words gives the same argmax without scanning every candidate.
    """

    def __init__(self, normalised: Sequence[str]) -> None:
        if not normalised:
            raise DataError(
                "the open-accuracy candidate set is empty; pass a candidate file with answers "
                '(LLaVA-Med\'s {"0": [answers]}) or score a set with open questions'
            )
        self.texts = list(normalised)
        self.sizes = [len(set(t.split())) for t in self.texts]
        self.index: dict[str, list[int]] = {}
        for i, text in enumerate(self.texts):
            for word in set(text.split()):
                self.index.setdefault(word, []).append(i)

    def best(self, pred_words: Sequence[str]) -> str:
        """The normalised candidate LLaVA-Med's argmax picks for a prediction's words."""
        counts: Counter[int] = Counter()
        for word in set(pred_words):
            for i in self.index.get(word, ()):
                counts[i] += 1
        best_i, best_sim = 0, 0.0
        for i in sorted(counts):
            sim = counts[i] / self.sizes[i]
            if sim > best_sim:
                best_i, best_sim = i, sim
        return self.texts[best_i]


def open_candidates(answers: Sequence[Any], tokenizers: Mapping[str, str] | None = None) -> OpenCandidates:
    """Candidate answers (LLaVA-Med's candidate file values, or the open references) prepared for
    `score`. Integers become strings as in LLaVA-Med; anything else that is not a string is an error."""
    tokenizers = tokenizers or DEFAULT_TOKENIZERS["llava-med"]
    texts = []
    for i, answer in enumerate(answers):
        if isinstance(answer, int) and not isinstance(answer, bool):
            answer = str(answer)
        if not isinstance(answer, str):
            raise DataError(
                f"open-accuracy candidate {i} is {type(answer).__name__} ({answer!r}), not a string; "
                "candidates must be answer texts"
            )
        tok = tokenizers[detect_language(answer)]
        # theirs: normalize_word(candidate), without the lower() applied to answers (it lower-cases inside)
        texts.append(
            llava_med_normalize(answer) if tok == "whitespace" else _llava_med_first_pass(answer, tok)
        )
    return OpenCandidates(texts)


# --------------------------------------------------------------------------------------------
# Strict per-sample metrics
# --------------------------------------------------------------------------------------------
def strict_prf(pred: Sequence[str], ref: Sequence[str]) -> tuple[float, float, float]:
    """(f1, precision, recall) over the multiset intersection of tokens (SQuAD); 0 if a side is empty."""
    if not pred or not ref:
        return 0.0, 0.0, 0.0
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0, 0.0, 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall), precision, recall


def _ngram_stats(pred: Sequence[str], ref: Sequence[str], max_order: int) -> tuple[list[int], list[int]]:
    correct, total = [], []
    for n in range(1, max_order + 1):
        hyp = Counter(tuple(pred[i : i + n]) for i in range(len(pred) - n + 1))
        rc = Counter(tuple(ref[i : i + n]) for i in range(len(ref) - n + 1))
        correct.append(sum(min(c, rc[g]) for g, c in hyp.items()))
        total.append(max(len(pred) - n + 1, 0))
    return correct, total


def strict_bleu(pred: Sequence[str], ref: Sequence[str], max_order: int = 4) -> float:
    """Cumulative BLEU-`max_order`: geometric mean of orders 1..n times brevity penalty.

    An order with no matches gets precision 1 / (2^k * hyp n-grams) for the k-th such order
    (exp smoothing); orders longer than the prediction are left out (effective order). No
    match at all, or an empty prediction, is 0.
    """
    correct, total = _ngram_stats(pred, ref, max_order)
    return _bleu_from_stats(correct, total, len(pred), len(ref))


def strict_bleus(pred: Sequence[str], ref: Sequence[str]) -> tuple[float, float, float, float]:
    """(BLEU-4, BLEU-1, BLEU-2, BLEU-3) of `strict_bleu`, from one pass of n-gram counting."""
    correct, total = _ngram_stats(pred, ref, 4)
    p, r = len(pred), len(ref)
    return (
        _bleu_from_stats(correct, total, p, r),
        _bleu_from_stats(correct[:1], total[:1], p, r),
        _bleu_from_stats(correct[:2], total[:2], p, r),
        _bleu_from_stats(correct[:3], total[:3], p, r),
    )


def _bleu_from_stats(correct: Sequence[int], total: Sequence[int], pred_len: int, ref_len: int) -> float:
    if pred_len == 0 or not any(correct):
        return 0.0
    bp = 1.0 if pred_len >= ref_len else math.exp(1 - ref_len / pred_len)
    logs, smooth = [], 1.0
    for c, t in zip(correct, total, strict=True):
        if t == 0:
            break
        if c == 0:
            smooth *= 2
            logs.append(math.log(1 / (smooth * t)))
        else:
            logs.append(math.log(c / t))
    return bp * math.exp(sum(logs) / len(logs))


# Chinese yes/no is decided on jieba tokens (the strict tokenizer with the medical dictionary),
# so a cue character inside a longer word is no cue: 对侧 (contralateral), 所有 (all), 具有
# (have, as in "has the property"), 这是 (this is), 是否 (whether), 有无, 无回声 (anechoic),
# 对称 (symmetric), 无法 (unable). A Chinese closed answer leads with its verdict (是的 / 是，... /
# 对 / 有 / 否 / 不是 / 没有 / 无) or states presence (有结节 / 可见 / 存在 / 未见 / 无明显异常).
# 是 and 对 are copula / preposition inside a sentence (它是囊肿, 建议对结节随访), so they are
# cues only as the answer's first token; 有, 存在, 可见, 正确 are cues as tokens anywhere.
_ZH_YES_INITIAL = frozenset({"是", "是的", "对", "对的"})
_ZH_YES = frozenset({"有", "存在", "可见", "正确"})
_ZH_NO = frozenset(
    {"否", "不是", "没有", "无", "不存在", "未见", "未发现", "未探及", "不可见", "不对", "没", "未", "并非"}
)
# 不 splits off in jieba (不 存在, 不 可见, 不 对, 不 均匀): it negates a following yes cue, and
# as the first token it is the verdict itself (不，没有 / 不均匀 answering "is it uniform?").
_ZH_NOT = "不"
# Question words echoed from the question: the yes cue right after them is not an answer
# (是否有结节？没有 -> "no").
_ZH_QUESTION = frozenset({"是否", "有无", "是不是", "有没有"})
# A leading answer label (答案：是 / 回答：是的 / 答：否) is not part of the verdict; punctuation is
# gone after strict normalisation, so the label is stripped from the text's start before tokenising.
_ZH_ANSWER_LABEL = re.compile(r"^\s*(?:答案|回答|结论|答)\s*[:：]?\s*")
_EN_YES, _EN_NO = frozenset({"yes"}), frozenset({"no", "not"})
_EN_CUE_RE = re.compile(r"(?<![a-z0-9])(yes|no|not)(?![a-z0-9])")
# Uncertainty is neither yes nor no ("I am not sure" is not a "no"; 不确定 is not 不). Matched on
# strict-normalised text (apostrophes deleted, so "don't" is "dont"). Phrases that also describe a
# finding (不清 / 不明确 / unclear margins) are deliberately absent.
_EN_UNCERTAIN = re.compile(
    r"(?<![a-z0-9])(?:not (?:sure|certain)|unsure|uncertain|undetermined|indeterminate|"
    r"(?:dont|do not|does not|doesnt) know|"
    r"(?:cannot|can not|cant|unable to|impossible to|difficult to|hard to|not possible to) "
    r"(?:be )?(?:determine|determined|tell|say|confirm|confirmed|assess|assessed|decide|know))(?![a-z0-9])"
)
_ZH_UNCERTAIN = re.compile(
    r"(?:不|无法|不能|难以|没法|无从|不好)(?:确定|判断|判定|确认|肯定|说)|不知道|说不清|不一定"
)
# Negation cues for closed answers that are not yes/no (不均匀 vs 均匀, "not uniform" vs "uniform"):
# a cue the prediction has and the reference lacks makes a hit impossible. Chinese cues are jieba
# tokens (无回声 / 无法 / 所有 are not cues); English cues are whole words.
_EN_NEGATION = frozenset(
    {"no", "not", "non", "none", "never", "neither", "nor", "without", "cannot", "cant", "isnt", "arent",
     "wasnt", "werent", "doesnt", "dont", "didnt", "hasnt", "havent", "wont", "absent"}
)  # fmt: skip
_ZH_NEGATION = _ZH_NO | {_ZH_NOT, "非", "不能", "毋"}


def is_uncertain(text: str) -> bool:
    """True when strict-normalised `text` says the answer is unknown (不确定, 无法判断, "not sure")."""
    return _EN_UNCERTAIN.search(text) is not None or _ZH_UNCERTAIN.search(text) is not None


def negation_cues(text: str) -> frozenset[str]:
    """The negation cues of strict-normalised `text`: jieba tokens in Chinese, whole words in English."""
    if _CJK_CHAR.search(text) is None:
        return frozenset(w for w in text.split() if w in _EN_NEGATION)
    return frozenset(t for t in tokenize(text, "jieba") if t in _ZH_NEGATION or t in _EN_NEGATION)


def yes_no_label(text: str) -> str | None:
    """'yes' / 'no' from the earliest yes/no cue in strict-normalised `text`, else None.

    English cues are whole words (yes; no, not) so "nodule" and "normal" are not "no". Text
    with CJK characters is read token by token (jieba + medical dictionary, whatever tokenizer
    the metrics use): no = 否, 不是, 没有, 无, 不存在, 未见, 未发现, 未探及, 不可见, 不对, 没,
    未, 并非, or 不 before a yes cue or first; yes = 有, 存在, 可见, 正确 anywhere, 是 / 是的 /
    对 / 对的 only as the first token. So 对侧未见结节 and 这是囊肿，没有结节 are "no", 所有 /
    具有 / 是否 / 有无 / 无回声 are no cue, and a yes cue echoed after 是否 / 有无 is skipped.
    An uncertain answer (`is_uncertain`: 不确定, 无法判断, "I am not sure") is None.
    """
    if is_uncertain(text):
        return None
    if _CJK_CHAR.search(text) is None:
        m = _EN_CUE_RE.search(text)
        return None if m is None else ("yes" if m.group(1) in _EN_YES else "no")
    tokens = tokenize(_ZH_ANSWER_LABEL.sub("", text), "jieba")
    for i, tok in enumerate(tokens):
        if tok in _ZH_NO or tok in _EN_NO:
            return "no"
        if tok == _ZH_NOT:
            nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
            if i == 0 or nxt in _ZH_YES or nxt in _ZH_YES_INITIAL:
                return "no"
            continue
        if i > 0 and tokens[i - 1] in _ZH_QUESTION:
            continue
        if tok in _ZH_YES or tok in _EN_YES or (i == 0 and tok in _ZH_YES_INITIAL):
            return "yes"
    return None


def _contains_run(haystack: Sequence[str], needle: Sequence[str]) -> bool:
    n = len(needle)
    return n > 0 and any(tuple(haystack[i : i + n]) == tuple(needle) for i in range(len(haystack) - n + 1))


def strict_closed_hit(
    pred_norm: str, ref_norm: str, pred_tokens: Sequence[str], ref_tokens: Sequence[str]
) -> int:
    """Yes/no references: labels must agree (an uncertain prediction has no label). Other closed
    answers ("left", "CT", 均匀): the reference tokens must appear contiguously in the prediction
    tokens, and the prediction may hold no negation cue the reference lacks (不均匀 vs 均匀, "not
    uniform" vs "uniform", 不是左侧 vs 左侧) and may not be uncertain unless the reference is."""
    ref_label = yes_no_label(ref_norm)
    if ref_label is not None:
        return int(yes_no_label(pred_norm) == ref_label)
    if negation_cues(pred_norm) - negation_cues(ref_norm):
        return 0
    if is_uncertain(pred_norm) and not is_uncertain(ref_norm):
        return 0
    return int(_contains_run(pred_tokens, ref_tokens))


# --------------------------------------------------------------------------------------------
# Batch scoring
# --------------------------------------------------------------------------------------------
def _check_inputs(
    preds: Sequence[str | None], refs: Sequence[str], answer_types: Sequence[str], languages: Sequence[str]
) -> tuple[list[str], list[str]]:
    lengths = {
        "preds": len(preds),
        "refs": len(refs),
        "answer_types": len(answer_types),
        "languages": len(languages),
    }
    if len(set(lengths.values())) != 1:
        shown = ", ".join(f"{k}={v}" for k, v in lengths.items())
        raise DataError(
            f"metric inputs have different lengths ({shown}); pass one entry per sample in each list"
        )
    types, langs = [], []
    for i, (pred, ref, kind, lang) in enumerate(zip(preds, refs, answer_types, languages, strict=True)):
        if pred is not None and not isinstance(pred, str):
            raise DataError(f"prediction {i} is {type(pred).__name__}, not a string; save answers as text")
        if not isinstance(ref, str):
            raise DataError(
                f"reference {i} is {type(ref).__name__}, not a string; check the ground-truth file"
            )
        key = str(kind).strip().lower()
        if key not in _ANSWER_TYPES:
            raise DataError(
                f"sample {i}: unknown answer type {kind!r}; use OPEN or CLOSED (also accepted: other, number, yes/no)"
            )
        types.append(_ANSWER_TYPES[key])
        try:
            langs.append(check_language(lang, ref))
        except DataError as err:
            raise DataError(f"sample {i}: {err}") from None
    return types, langs


def _empty_row(index: int, kind: str, lang: str, empty: bool, mode: str) -> dict[str, Any]:
    row: dict[str, Any] = {"index": index, "answer_type": kind, "language": lang, "empty_prediction": empty}
    row.update(dict.fromkeys(METRIC_KEYS, 0.0 if kind == "open" else None))
    row[OPEN_ACCURACY] = 0.0 if kind == "open" and mode == "llava-med" else None
    row["closed_hit"] = 0 if kind == "closed" else None
    return row


def _llava_med_first_pass(text: str, tokenizer: str) -> str:
    """Lower-case + normalise once (their run_eval.py), then re-join `tokenizer` tokens by spaces."""
    norm = llava_med_normalize(text.lower())
    return norm if tokenizer == "whitespace" else " ".join(tokenize(norm, tokenizer))


def score_samples(
    preds: Sequence[str | None],
    refs: Sequence[str],
    answer_types: Sequence[str],
    languages: Sequence[str],
    mode: str = "strict",
    tokenizer: str | Mapping[str, str] | None = None,
    closed_variant: str = DEFAULT_CLOSED_VARIANT,
    candidates: Sequence[Any] | OpenCandidates | None = None,
) -> list[dict[str, Any]]:
    """One dict per sample: index, answer_type, language, empty_prediction, empty_reference, the
    eight open-set metrics (fractions in [0, 1]; None for closed questions), open_accuracy (1/0
    for open questions in llava-med mode, else None) and closed_hit (1/0; None for open
    questions and for gated misses of 'run_eval@ad758b6').

    Strict mode scores a missing or blank prediction zero. llava-med mode scores it as the text
    "" (what v1.0.0 computes for an empty answer: zero everywhere except open accuracy, where
    the first candidate wins). `candidates` (llava-med mode) is the open-accuracy candidate set;
    None = the open references of this set, in order.
    """
    tokenizers = resolve_tokenizers(mode, tokenizer)
    check_closed_variant(closed_variant)
    if mode == "strict" and closed_variant != DEFAULT_CLOSED_VARIANT:
        raise ConfigError("closed_variant applies to mode='llava-med' only; strict mode has one closed rule")
    if mode == "strict" and candidates is not None:
        raise ConfigError("open-accuracy candidates apply to mode='llava-med' only")
    types, langs = _check_inputs(preds, refs, answer_types, languages)
    pool = None
    if mode == "llava-med" and "open" in types:
        if isinstance(candidates, OpenCandidates):
            pool = candidates
        else:
            answers = (
                [r for r, k in zip(refs, types, strict=True) if k == "open"]
                if candidates is None
                else candidates
            )
            pool = open_candidates(answers, tokenizers)
    rows = []
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"\s*The hypothesis contains 0 counts", category=UserWarning
        )
        for i, (pred, ref, kind, lang) in enumerate(zip(preds, refs, types, langs, strict=True)):
            empty = pred is None or not pred.strip()
            row = _empty_row(i, kind, lang, empty, mode)
            row["empty_reference"] = not ref.strip()
            tok = tokenizers[lang]
            if mode == "llava-med":
                row.update(_score_llava_med(pred or "", ref, kind, tok, closed_variant, pool))
            elif not empty:
                assert pred is not None
                row.update(_score_strict(pred, ref, kind, lang, tok))
            rows.append(row)
    return rows


def _score_llava_med(
    pred: str, ref: str, kind: str, tok: str, closed_variant: str, pool: OpenCandidates | None
) -> dict[str, Any]:
    p1, r1 = _llava_med_first_pass(pred, tok), _llava_med_first_pass(ref, tok)
    if kind == "closed":
        return {"closed_hit": llava_med_closed_hit(p1, r1, closed_variant)}
    # EM, F1 and open accuracy normalise their (already normalised) inputs again; BLEU does not.
    p2n, r2n = llava_med_normalize(p1), llava_med_normalize(r1)
    p2, r2 = p2n.split(), r2n.split()
    f1, precision, recall = llava_med_prf(p2, r2)
    bleu, b1, b2, b3 = llava_med_bleu(p1.split(), r1.split())
    assert pool is not None
    return {
        "exact_match": llava_med_exact_match(p2, r2),
        "f1": f1,
        "precision": precision,
        "recall": recall,
        "bleu": bleu,
        "bleu_1": b1,
        "bleu_2": b2,
        "bleu_3": b3,
        OPEN_ACCURACY: float(pool.best(p2) == r2n),
    }


def _score_strict(pred: str, ref: str, kind: str, lang: str, tok: str) -> dict[str, Any]:
    pn, rn = normalize_strict(pred, lang), normalize_strict(ref, lang)
    pt, rt = tokenize(pn, tok), tokenize(rn, tok)
    if kind == "closed":
        return {"closed_hit": strict_closed_hit(pn, rn, pt, rt)}
    f1, precision, recall = strict_prf(pt, rt)
    bleu, b1, b2, b3 = strict_bleus(pt, rt)
    return {
        "exact_match": float(bool(pn) and pn == rn),
        "f1": f1,
        "precision": precision,
        "recall": recall,
        "bleu": bleu,
        "bleu_1": b1,
        "bleu_2": b2,
        "bleu_3": b3,
    }


def aggregate(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Means x 100 of per-sample scores (None where a subset is empty) plus counts.

    Means are sum / count * 100, the same arithmetic as run_eval.py. `closed_accuracy` averages
    the counted closed samples (`n_closed_scored`, which 'run_eval@ad758b6' makes smaller);
    `open_accuracy` is None in strict mode.
    """
    open_rows = [s for s in samples if s["answer_type"] == "open"]
    closed = [
        s["closed_hit"] for s in samples if s["answer_type"] == "closed" and s["closed_hit"] is not None
    ]
    out: dict[str, Any] = {
        "n": len(samples),
        "n_open": len(open_rows),
        "n_closed": sum(1 for s in samples if s["answer_type"] == "closed"),
        "n_closed_scored": len(closed),
        "n_empty_predictions": sum(1 for s in samples if s["empty_prediction"]),
        "n_empty_references": sum(1 for s in samples if s.get("empty_reference")),
    }
    for key in METRIC_KEYS:
        out[key] = sum(s[key] for s in open_rows) / len(open_rows) * 100 if open_rows else None
    hits = [s.get(OPEN_ACCURACY) for s in open_rows]
    out[OPEN_ACCURACY] = sum(hits) / len(hits) * 100 if hits and None not in hits else None
    out["closed_accuracy"] = sum(closed) / len(closed) * 100 if closed else None
    return out


def corpus_sacrebleu(
    preds: Sequence[str | None], refs: Sequence[str], languages: Sequence[str]
) -> dict[str, Any]:
    """Corpus-level sacreBLEU (lower-cased, exp smoothing) with `tok=zh` for zh and `13a` for en.

    Returns per-language scores with their signatures, and one combined score over all
    segments (each tokenised by its own language's tokenizer; n-gram statistics summed).
    None when there is no segment. Segment statistics are extracted once and reused, via
    `_extract_corpus_statistics`, which sacreBLEU documents for exactly this kind of re-use.
    """
    import sacrebleu
    from sacrebleu.metrics import BLEU

    tok_names = {"zh": "zh", "en": "13a"}
    by_lang: dict[str, float] = {}
    signatures: dict[str, str] = {}
    all_stats: list[Any] = []
    metric = None
    for lang in LANGUAGES:
        idx = [i for i, lg in enumerate(languages) if lg == lang]
        if not idx:
            continue
        metric = BLEU(tokenize=tok_names[lang], lowercase=True, force=True)
        stats = metric._extract_corpus_statistics([preds[i] or "" for i in idx], [[refs[i] for i in idx]])
        by_lang[lang] = metric._aggregate_and_compute(stats).score
        signatures[lang] = str(metric.get_signature())
        all_stats += stats
    combined = metric._aggregate_and_compute(all_stats).score if metric is not None else None
    used = "+".join(f"{tok_names[lg]}({lg})" for lg in by_lang)
    return {
        "sacrebleu": combined,
        "sacrebleu_by_language": by_lang,
        "sacrebleu_signature": f"nrefs:1|case:lc|eff:no|tok:{used}|smooth:exp|version:{sacrebleu.__version__}",
        "sacrebleu_signatures": signatures,
    }


def score(
    preds: Sequence[str | None],
    refs: Sequence[str],
    answer_types: Sequence[str],
    languages: Sequence[str],
    mode: str = "strict",
    tokenizer: str | Mapping[str, str] | None = None,
    closed_variant: str = DEFAULT_CLOSED_VARIANT,
    candidates: Sequence[Any] | None = None,
    candidates_label: str | None = None,
) -> dict[str, Any]:
    """Score a prediction set: mode, tokenizer, variants, counts, means x 100 and sacreBLEU.

    `languages` holds 'zh', 'en' or 'auto' (detected from the reference) per sample;
    `answer_types` holds OPEN / CLOSED. sacreBLEU is computed over open questions. In llava-med
    mode `candidates` is the open-accuracy candidate set (None = the open references of this
    set); `candidates_label` says where it came from in the output.
    """
    samples = score_samples(preds, refs, answer_types, languages, mode, tokenizer, closed_variant, candidates)
    tokenizers = resolve_tokenizers(mode, tokenizer)
    result: dict[str, Any] = {
        "mode": mode,
        "tokenizer": tokenizer_label(tokenizers),
        "bleu_variant": BLEU_VARIANTS[mode],
        "closed_variant": closed_variant if mode == "llava-med" else "strict",
        "closed_rule": CLOSED_DESCRIPTIONS[closed_variant if mode == "llava-med" else "strict"],
    }
    if mode == "llava-med":
        n_cand = (
            len(candidates)
            if candidates is not None
            else sum(1 for s in samples if s["answer_type"] == "open")
        )
        where = candidates_label or (
            "given list" if candidates is not None else "the open references of this set"
        )
        result["open_accuracy_candidates"] = f"{where} ({n_cand} answers)"
    result.update(aggregate(samples))
    open_idx = [s["index"] for s in samples if s["answer_type"] == "open"]
    result.update(
        corpus_sacrebleu(
            [preds[i] for i in open_idx],
            [refs[i] for i in open_idx],
            [samples[i]["language"] for i in open_idx],
        )
    )
    return result


def bootstrap_ci(
    values: Sequence[float], n: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) interval of the mean of `values`; (nan, nan) if empty.

    Resamples are drawn in chunks so 100k values x 1000 resamples stays within ~80 MB.
    """
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must be between 0 and 1, got {alpha}; use e.g. 0.05 for a 95% interval")
    if n < 1:
        raise ConfigError(f"bootstrap needs n >= 1 resamples, got {n}")
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if arr.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    chunk = max(1, 10_000_000 // arr.size)
    means = np.concatenate(
        [
            arr[rng.integers(0, arr.size, size=(min(chunk, n - s), arr.size))].mean(axis=1)
            for s in range(0, n, chunk)
        ]
    )
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)
