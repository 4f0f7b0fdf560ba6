"""Golden tests for eval/metrics.py: hand-computed English and Chinese cases in both modes.

Every expected number is worked out by hand in the comment next to it (n-gram counts,
brevity penalty, means x 100); no test computes its expectation with the library under test,
nltk or sacrebleu. nltk and sacrebleu appear only where the test pins their behaviour or
cross-checks our own strict BLEU implementation on random inputs.
"""

from __future__ import annotations

import math
import random
import sys
import warnings

import pytest

from llava_ultra.errors import ConfigError, DataError
from llava_ultra.eval import metrics as m
from llava_ultra.sites import FINDING_TYPES, SITES

TINY = sys.float_info.min  # 2.2250738585072014e-308: nltk's stand-in for a zero n-gram precision


def one(pred, ref, kind="OPEN", lang="en", mode="strict", **kw):
    return m.score_samples([pred], [ref], [kind], [lang], mode=mode, **kw)[0]


def close(a, b, rel=1e-12):
    return math.isclose(a, b, rel_tol=rel, abs_tol=0.0)


# ------------------------------------------------------------------ llava-med normalisation


def test_llava_med_punctuation_rule():
    # "/" has no space next to it -> replaced by a space.
    assert m.llava_med_normalize("left/right") == "left right"
    # ", " occurs -> every comma deleted (not replaced).
    assert m.llava_med_normalize("yes, left") == "yes left"
    # "(" has a space before it -> deleted; ")" and "-" have none -> spaces.
    assert m.llava_med_normalize("left-lung (upper)") == "left lung upper"
    # digit,comma,digit anywhere -> EVERY mark is deleted, so "/" glues the words together.
    assert m.llava_med_normalize("1,000 left/right") == "1000 leftright"


def test_llava_med_period_strip_caps_at_32():
    # 40 periods none followed by a digit: re.UNICODE (== 32) passed as `count` deletes 32, 8 stay.
    assert m.llava_med_normalize("." * 40 + "x") == "." * 8 + "x"
    # a period before a digit is kept
    assert m.llava_med_normalize("1.5 cm.") == "1.5 cm"


def test_llava_med_numbers_articles_contractions():
    assert m.llava_med_normalize("the two nodules") == "2 nodules"
    assert m.llava_med_normalize("none") == "0"
    assert m.llava_med_normalize("it isnt a cyst") == "it isn't cyst"
    assert m.llava_med_normalize("dont") == "don't"


def test_period_cap_and_double_normalisation_in_scores():
    # pred = 40 periods + " lung", ref "lung".
    # First pass (used by BLEU) leaves "........ lung" -> tokens ["........", "lung"]:
    #   BLEU-1 = 1 match / 2 tokens = 0.5 (BP = 1, hypothesis longer).
    # EM/F1 normalise again and delete the last 8 periods -> ["lung"]: EM = 1/1, F1 = 1.
    row = one("." * 40 + " lung", "lung", mode="llava-med")
    assert row["bleu_1"] == 0.5
    assert row["exact_match"] == 1.0 and row["f1"] == 1.0


# ------------------------------------------------------------------ open questions, English


def test_their_exact_match_is_not_exact():
    # "the left lung is normal" -> "left lung is normal" (4 tokens); ref "left lung".
    # llava-med EM = |{left, lung}| / 4 = 0.5; tp = 2, fp = 2 (is, normal), fn = 0
    #   -> P = 0.5, R = 1, F1 = 2*0.5*1/1.5 = 2/3.
    row = one("The left lung is normal.", "left lung", mode="llava-med")
    assert row["exact_match"] == 0.5
    assert row["precision"] == 0.5 and row["recall"] == 1.0 and close(row["f1"], 2 / 3)
    # strict: not equal -> EM 0; same token overlap -> same P/R/F1 here.
    row = one("The left lung is normal.", "left lung")
    assert row["exact_match"] == 0.0
    assert row["precision"] == 0.5 and row["recall"] == 1.0 and close(row["f1"], 2 / 3)
    # strict EM is true equality after normalisation (case, punctuation, articles).
    assert one("The Left lung.", "left lung")["exact_match"] == 1.0


def test_repeated_words_counted_on_prediction_side():
    # pred "lung lung", ref "lung". llava-med: tp = pred count of "lung" = 2, fp = fn = 0
    #   -> P = R = F1 = 1; EM = 1 unique ref word / 2 tokens = 0.5.
    row = one("lung lung", "lung", mode="llava-med")
    assert (row["precision"], row["recall"], row["f1"], row["exact_match"]) == (1.0, 1.0, 1.0, 0.5)
    # strict (multiset): overlap 1 -> P = 1/2, R = 1, F1 = 2/3.
    row = one("lung lung", "lung")
    assert row["precision"] == 0.5 and row["recall"] == 1.0 and close(row["f1"], 2 / 3)


def test_bleu_single_order_vs_cumulative_hand_checked():
    # pred "nodule in right lung seen" (5), ref "small nodule in left lung" (5); BP = 1.
    # 1-grams: nodule, in, lung match -> 3/5; 2-grams: "nodule in" -> 1/4;
    # 3-grams: 0/3; 4-grams: 0/2.
    row = one("nodule in right lung seen", "small nodule in left lung", mode="llava-med")
    # llava-med: single order, no smoothing; a zero order becomes float_info.min in nltk.
    assert close(row["bleu_1"], 0.6) and close(row["bleu_2"], 0.25)
    assert close(row["bleu_3"], TINY)  # exp(ln TINY) == TINY up to rounding
    # uniform 4-gram: exp(0.25 * (ln .6 + ln .25 + 2 ln TINY)) = 0.15**0.25 * TINY**0.5 ~ 9.28e-155
    assert close(row["bleu"], 0.15**0.25 * TINY**0.5, rel=1e-9)
    # EM = 3 unique ref words found / 5 tokens; tp 3, fp 2, fn 2 -> P = R = F1 = 0.6.
    assert close(row["exact_match"], 0.6) and close(row["f1"], 0.6)

    # strict: cumulative, exp smoothing: k-th zero order gets 1/(2^k * n-grams).
    row = one("nodule in right lung seen", "small nodule in left lung")
    assert close(row["bleu_1"], 0.6)
    assert close(row["bleu_2"], math.sqrt(0.6 * 0.25))  # 0.3873
    assert close(row["bleu_3"], (0.6 * 0.25 * (1 / 6)) ** (1 / 3))  # p3 = 1/(2*3); 0.2924
    assert close(row["bleu"], (0.6 * 0.25 * (1 / 6) * (1 / 8)) ** 0.25)  # p4 = 1/(4*2); 0.2364


def test_perfect_short_answer():
    # "left lung" vs itself: llava-med BLEU-3 has no trigram at all -> TINY; BLEU-4 mean
    # = exp(0.25 * 2 ln TINY) = TINY**0.5 ~ 1.49e-154. Strict uses effective order -> 1.0.
    row = one("left lung", "left lung", mode="llava-med")
    assert (row["bleu_1"], row["bleu_2"]) == (1.0, 1.0) and close(row["bleu_3"], TINY)
    assert close(row["bleu"], TINY**0.5, rel=1e-9)
    row = one("left lung", "left lung")
    assert [row[k] for k in m.METRIC_KEYS] == [1.0] * 8


def test_contractions_and_number_words():
    # llava-med: "it isnt enlarged" -> "it isn't enlarged"; ref "isn't" -> EM = 1/3.
    assert close(one("it isnt enlarged", "isn't", mode="llava-med")["exact_match"], 1 / 3)
    # llava-med: "two nodules" -> "2 nodules"; ref "2" -> EM = 1/2. "none" -> "0" -> EM 1.
    assert one("two nodules", "2", mode="llava-med")["exact_match"] == 0.5
    assert one("none", "0", mode="llava-med")["exact_match"] == 1.0
    # strict: apostrophes dropped both sides, zero..ten -> digits, but "none" stays a word.
    assert one("Isn't.", "isnt")["exact_match"] == 1.0
    assert one("Two", "2")["exact_match"] == 1.0
    assert one("none", "0")["exact_match"] == 0.0


# ------------------------------------------------------------------ open questions, Chinese

ZH_PRED, ZH_REF = "甲状腺右叶低回声结节", "甲状腺结节"


def test_chinese_whitespace_tokens_in_llava_med_mode():
    # Whitespace split makes each answer ONE token, and they differ: everything is 0
    # (nltk returns exactly 0 when not even a unigram matches).
    row = one(ZH_PRED, ZH_REF, lang="zh", mode="llava-med")
    assert [row[k] for k in m.METRIC_KEYS] == [0.0] * 8


def test_chinese_jieba_tokens_in_strict_mode():
    # jieba + medical dict: pred [甲状腺, 右叶, 低回声, 结节] (4), ref [甲状腺, 结节] (2).
    assert m.tokenize(m.normalize_strict(ZH_PRED, "zh"), "jieba") == ("甲状腺", "右叶", "低回声", "结节")
    row = one(ZH_PRED, ZH_REF, lang="zh")
    # overlap 2 -> P = 2/4, R = 2/2, F1 = 2/3; EM 0.
    assert row["precision"] == 0.5 and row["recall"] == 1.0 and close(row["f1"], 2 / 3)
    assert row["exact_match"] == 0.0
    # BLEU: correct [2, 0, 0, 0] of [4, 3, 2, 1] n-grams, BP = 1 (4 >= 2).
    assert row["bleu_1"] == 0.5
    assert close(row["bleu_2"], math.sqrt(0.5 * (1 / 6)))  # p2 = 1/(2*3)
    assert close(row["bleu_3"], (0.5 * (1 / 6) * (1 / 8)) ** (1 / 3))  # p3 = 1/(4*2)
    assert close(row["bleu"], (0.5 * (1 / 6) * (1 / 8) * (1 / 8)) ** 0.25)  # p4 = 1/(8*1)


def test_chinese_char_tokens_in_strict_mode():
    # chars: pred 10, ref 5, all 5 ref chars present -> P = 0.5, R = 1.
    # bigrams: 甲状, 状腺, 结节 of 9 match -> BLEU-2 = sqrt(0.5 * 3/9).
    row = one(ZH_PRED, ZH_REF, lang="zh", tokenizer={"zh": "char"})
    assert row["precision"] == 0.5 and row["recall"] == 1.0
    assert close(row["bleu_2"], math.sqrt(0.5 / 3))


def test_llava_med_formulas_on_jieba_tokens():
    # LLaVA-Ultra's "we tokenize answers": their formulas over jieba tokens.
    # EM = 2 ref words found / 4 pred tokens; BLEU-2 has no matching bigram -> TINY.
    row = one(ZH_PRED, ZH_REF, lang="zh", mode="llava-med", tokenizer="jieba")
    assert row["exact_match"] == 0.5 and row["bleu_1"] == 0.5 and close(row["bleu_2"], TINY)


def test_chinese_strict_exact_match_ignores_spacing_and_punctuation():
    assert one("甲状腺 结节。", ZH_REF, lang="zh")["exact_match"] == 1.0
    assert one("ＴＩ－ＲＡＤＳ ４类", "ti-rads 4类", lang="zh")["exact_match"] == 1.0  # full-width


# ------------------------------------------------------------------ closed questions


BATCH, FIRST, V100 = "run_eval_batch@ad758b6", "run_eval@ad758b6", "run_eval@b9a98a7"


def test_no_substring_bug_reproduced_only_in_llava_med_mode():
    # gt "no": "nodule seen" and "normal" contain the substring "no" (LLaVA-Med issue 12).
    for pred in ("nodule seen", "normal"):
        for variant in (V100, FIRST, BATCH):
            assert one(pred, "no", "CLOSED", mode="llava-med", closed_variant=variant)["closed_hit"] == 1
        assert one(pred, "no", "CLOSED")["closed_hit"] == 0
    # strict word-boundary cues
    assert one("There is no nodule.", "no", "CLOSED")["closed_hit"] == 1
    assert one("Not enlarged", "no", "CLOSED")["closed_hit"] == 1
    assert one("Yes, it is.", "yes", "CLOSED")["closed_hit"] == 1


def test_closed_variants_named_by_llava_med_commit():
    preds = ["no", "nodule", "maybe", "left"]
    refs = ["yes", "no", "yes", "left"]
    kinds = ["CLOSED"] * 4
    langs = ["en"] * 4

    def acc(variant):
        r = m.score(preds, refs, kinds, langs, mode="llava-med", closed_variant=variant)
        return r["closed_accuracy"], r["n_closed_scored"], r["closed_variant"]

    # v1.0.0 (b9a98a7, the default): hit needs a yes/no substring AND the reference:
    # "no" vs yes -> 0; "nodule" vs no -> 1; "maybe" -> 0 (no gate); "left" -> 0 (no gate). 1/4.
    assert acc(V100) == (25.0, 4, V100)
    assert m.score(preds, refs, kinds, langs, mode="llava-med")["closed_variant"] == V100
    # ad758b6 run_eval.py: the gated miss ("no" vs yes) leaves the denominator: 1/3.
    assert acc(FIRST) == (1 / 3 * 100, 3, FIRST)  # sum / count * 100, as run_eval.py
    # run_eval_batch.py: reference substring alone: nodule, left -> 2/4.
    assert acc(BATCH) == (50.0, 4, BATCH)
    # strict: [0, 0, 0, 1]
    assert m.score(preds, refs, kinds, langs)["closed_accuracy"] == 25.0


def test_old_closed_variant_names_say_their_new_names():
    with pytest.raises(ConfigError, match=r"'legacy' was renamed .*: use 'run_eval@ad758b6'"):
        m.score(["a"], ["a"], ["CLOSED"], ["en"], mode="llava-med", closed_variant="legacy")
    with pytest.raises(ConfigError, match=r"'substring' was renamed .*: use 'run_eval_batch@ad758b6'"):
        m.score(["a"], ["a"], ["CLOSED"], ["en"], mode="llava-med", closed_variant="substring")


@pytest.mark.parametrize(
    ("pred", "ref", "batch", "strict"),
    [
        ("是的，可见结节", "是", 1, 1),  # substring hit; 是的 -> yes
        ("未见明显异常", "否", 0, 1),  # no 否 substring; 未见 -> no
        ("没有", "是", 0, 0),  # 没有 is "no", not the 有 inside it
        ("没有", "否", 0, 1),
        ("没有", "有", 1, 0),  # substring bug in Chinese: 有 is inside 没有
        ("不存在", "存在", 1, 0),
        ("无回声区", "否", 0, 0),  # 无回声 (anechoic) is not a "no"
        ("有，边界清", "有", 1, 1),
    ],
)
def test_chinese_yes_no_synonyms(pred, ref, batch, strict):
    # v1.0.0 needs "yes"/"no" in the prediction: every Chinese closed answer scores 0
    assert one(pred, ref, "CLOSED", "zh", mode="llava-med")["closed_hit"] == 0
    assert one(pred, ref, "CLOSED", "zh", mode="llava-med", closed_variant=BATCH)["closed_hit"] == batch
    assert one(pred, ref, "CLOSED", "zh")["closed_hit"] == strict


@pytest.mark.parametrize(
    ("text", "label"),
    [
        # cue characters inside longer jieba words are no cue
        ("对侧未见结节", "no"),  # 对侧 (contralateral) is not 对; 未见 -> no
        ("这是囊肿，没有结节", "no"),  # 这是 is not 是; 没有 -> no
        ("所有结节均为良性", None),  # 所有 (all) is not 有
        ("具有包膜", None),  # 具有 is not 有
        ("是否", None),  # "whether" is not 是
        ("是否有结节？没有", "no"),  # the 有 echoed after 是否 is skipped
        ("对称", None),
        ("无法确定", None),  # 无法 (unable) is not 无
        ("建议对结节随访", None),  # 对 is a preposition here, cue only when answer-initial
        ("它是囊肿，没有结节", "no"),  # 是 inside the sentence is a copula
        # normal closed answers
        ("是的", "yes"),
        ("是，可见结节", "yes"),
        ("对", "yes"),
        ("有", "yes"),
        ("右侧有结节", "yes"),
        ("可见结节", "yes"),
        ("存在", "yes"),
        ("否", "no"),
        ("没有", "no"),
        ("不是", "no"),
        ("无", "no"),
        ("不对", "no"),
        ("不存在", "no"),
        ("不可见", "no"),
        ("不均匀", "no"),  # answer-initial 不 is the verdict
        ("无明显异常", "no"),
        ("未探及血流信号", "no"),
        # a leading answer label is not part of the verdict
        ("答案：是", "yes"),
        ("回答：是的", "yes"),
        ("答：是", "yes"),
        ("答案：否", "no"),
        ("答：不是", "no"),
    ],
)
def test_strict_chinese_yes_no_reads_jieba_tokens(text, label):
    assert m.yes_no_label(m.normalize_strict(text, "zh")) == label


def test_strict_chinese_yes_no_false_cues_score_correctly():
    # substring cues would read both predictions as "yes"
    assert one("对侧未见结节", "否", "CLOSED", "zh")["closed_hit"] == 1
    assert one("这是囊肿，没有结节", "否", "CLOSED", "zh")["closed_hit"] == 1
    assert one("这是囊肿，没有结节", "是", "CLOSED", "zh")["closed_hit"] == 0
    # the rule does not depend on the metric tokenizer
    assert one("对侧未见结节", "否", "CLOSED", "zh", tokenizer="char")["closed_hit"] == 1


def test_non_yes_no_closed_answer_needs_whole_tokens_in_strict():
    assert one("cleft", "left", "CLOSED", mode="llava-med", closed_variant=BATCH)["closed_hit"] == 1
    assert one("cleft", "left", "CLOSED")["closed_hit"] == 0
    assert one("The left lobe.", "left", "CLOSED")["closed_hit"] == 1


# ------------------------------------------------------------------ batch, bad input, reports


def test_score_report_names_mode_tokenizer_and_means():
    preds = ["the left lung is normal", "nodule in right lung seen", "", "no"]
    refs = ["left lung", "small nodule in left lung", "liver", "no"]
    r = m.score(preds, refs, ["OPEN", "OPEN", "OPEN", "CLOSED"], ["en"] * 4, mode="llava-med")
    assert r["mode"] == "llava-med" and r["tokenizer"] == "zh=whitespace,en=whitespace"
    assert (r["n"], r["n_open"], r["n_closed"], r["n_empty_predictions"]) == (4, 3, 1, 1)
    # EM mean: (0.5 + 0.6 + 0) / 3 * 100 = 36.67; empty prediction scores 0 and still counts.
    assert close(r["exact_match"], (0.5 + 0.6 + 0) / 3 * 100)
    assert r["closed_accuracy"] == 100.0
    s = m.score(preds, refs, ["OPEN", "OPEN", "OPEN", "CLOSED"], ["en"] * 4)
    assert s["mode"] == "strict" and s["tokenizer"] == "zh=jieba+medical_dict,en=whitespace"
    assert "cumulative" in s["bleu_variant"] and "single-order" in r["bleu_variant"]


def test_empty_predictions_score_zero_and_are_counted():
    rows = m.score_samples([None, "  ", ""], ["yes", "liver", ""], ["CLOSED", "OPEN", "CLOSED"], ["en"] * 3)
    assert [r["empty_prediction"] for r in rows] == [True, True, True]
    assert rows[0]["closed_hit"] == 0 and rows[2]["closed_hit"] == 0  # even "" in "" is not a hit
    assert [rows[1][k] for k in m.METRIC_KEYS] == [0.0] * 8


def test_length_mismatch_names_both_lengths():
    with pytest.raises(DataError, match=r"preds=3, refs=2"):
        m.score(["a", "b", "c"], ["a", "b"], ["OPEN"] * 3, ["en"] * 3)


def test_bad_codes_are_named():
    with pytest.raises(DataError, match=r"'fr'.*zh, en"):
        m.score(["a"], ["a"], ["OPEN"], ["fr"])
    with pytest.raises(DataError, match=r"'multiple'.*OPEN or CLOSED"):
        m.score(["a"], ["a"], ["multiple"], ["en"])
    with pytest.raises(ConfigError, match=r"'exact'.*llava-med, strict"):
        m.score(["a"], ["a"], ["OPEN"], ["en"], mode="exact")
    with pytest.raises(ConfigError, match=r"'bpe'.*whitespace, jieba, char"):
        m.score(["a"], ["a"], ["OPEN"], ["en"], tokenizer="bpe")
    with pytest.raises(ConfigError, match=r"'fr'.*zh, en"):
        m.score(["a"], ["a"], ["OPEN"], ["en"], tokenizer={"fr": "char"})
    with pytest.raises(ConfigError, match="'llava-med' only"):
        m.score(["a"], ["a"], ["OPEN"], ["en"], closed_variant=FIRST)
    with pytest.raises(ConfigError, match=r"unknown closed_variant 'v2'; use one of: run_eval@b9a98a7, "):
        m.score(["a"], ["a"], ["OPEN"], ["en"], mode="llava-med", closed_variant="v2")
    with pytest.raises(ConfigError, match="candidates apply to mode='llava-med' only"):
        m.score(["a"], ["a"], ["OPEN"], ["en"], candidates=["a"])


def test_auto_language_and_detection():
    assert m.detect_language(ZH_REF) == "zh"
    assert m.detect_language("left lung") == "en"
    assert m.detect_language("TI-RADS 4类") == "zh"  # 1 CJK char / (1 + 2 Latin words) = 0.33
    assert m.detect_language("") == "en"
    assert m.score_samples([ZH_PRED], [ZH_REF], ["OPEN"], ["auto"])[0]["language"] == "zh"


def test_sacrebleu_column():
    # en: 13a tokens as in the BLEU test above: matches [3, 1, 0, 0] of [5, 4, 3, 2], BP 1;
    # exp smoothing -> p3 = 100/(2*3), p4 = 100/(4*2): (60*25*16.67*12.5)**0.25 = 23.64.
    r = m.score(["nodule in right lung seen"], ["small nodule in left lung"], ["OPEN"], ["en"])
    assert close(r["sacrebleu"], (60 * 25 * (100 / 6) * (100 / 8)) ** 0.25, rel=1e-9)
    assert "tok:13a" in r["sacrebleu_signatures"]["en"]
    # zh: tok=zh splits characters. pred 10 chars, ref 5: 1-grams 5/10, 2-grams 3/9
    # (甲状 状腺 结节), 3-grams 1/8 (甲状腺), 4-grams 0/7 -> 100/(2*7); BP 1.
    r = m.score([ZH_PRED], [ZH_REF], ["OPEN"], ["zh"])
    assert close(r["sacrebleu"], (50 * (100 / 3) * 12.5 * (100 / 14)) ** 0.25, rel=1e-9)
    assert close(r["sacrebleu_by_language"]["zh"], r["sacrebleu"], rel=1e-9)
    assert "tok:zh" in r["sacrebleu_signatures"]["zh"]
    # both together: statistics summed over segments, each tokenised by its own language:
    # lengths 15 vs 10 (BP 1), matches [8, 4, 1, 0] of [15, 13, 11, 9] -> p4 = 100/(2*9).
    r = m.score(
        ["nodule in right lung seen", ZH_PRED],
        ["small nodule in left lung", ZH_REF],
        ["OPEN"] * 2,
        ["en", "zh"],
    )
    assert close(r["sacrebleu"], 100 * ((8 / 15) * (4 / 13) * (1 / 11) * (1 / 18)) ** 0.25, rel=1e-9)
    assert r["sacrebleu_signature"].startswith("nrefs:1|case:lc|eff:no|tok:zh(zh)+13a(en)|smooth:exp")


def test_closed_only_set_has_no_open_metrics():
    r = m.score(["yes"], ["yes"], ["CLOSED"], ["en"])
    assert r["exact_match"] is None and r["sacrebleu"] is None and r["closed_accuracy"] == 100.0


# ------------------------------------------------------------------ dependencies pinned


def test_nltk_zero_order_behaviour_is_pinned_and_silenced():
    from nltk.translate.bleu_score import sentence_bleu

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert close(sentence_bleu([["left", "lung"]], ["left", "lung"], weights=(0, 0, 1, 0)), TINY)
        assert sentence_bleu([["left"]], ["right"]) == 0  # no unigram match: exactly 0, no warning
    # one UserWarning per zero order (3-grams and 4-grams here), none for the early 0 return
    assert ["3-gram" in str(w.message) for w in caught] == [True, False]
    assert "0 counts of 4-gram" in str(caught[1].message)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        one("left lung", "left lung", mode="llava-med")
    assert caught == []


def test_strict_bleu_matches_sacrebleu_sentence_semantics():
    from sacrebleu.metrics import BLEU

    rng = random.Random(0)
    vocab = ["a", "b", "c", "d", "e"]
    for order in (1, 2, 3, 4):
        ref_metric = BLEU(tokenize="none", smooth_method="exp", effective_order=True, max_ngram_order=order)
        for _ in range(60):
            p = [rng.choice(vocab) for _ in range(rng.randint(0, 7))]
            r = [rng.choice(vocab) for _ in range(rng.randint(1, 7))]
            expected = ref_metric.sentence_score(" ".join(p), [" ".join(r)]).score
            assert math.isclose(m.strict_bleu(p, r, order) * 100, expected, rel_tol=1e-9, abs_tol=1e-9)


# ------------------------------------------------------------------ dictionary and jieba


def test_medical_dictionary_covers_project_vocabulary():
    words = {w for w, _, _ in m.medical_terms()}
    assert len(words) >= 100 and {"低回声", "后方回声增强", "TI-RADS", "BI-RADS", "血流信号"} <= words
    for zh, _ in list(SITES.values()) + list(FINDING_TYPES.values()):
        tokens = m.tokenize(m.normalize_strict(zh, "zh"), "jieba")
        assert set(tokens) <= words, (zh, tokens)


def test_jieba_initialises_quietly(capfd):
    m._jieba_tokenizer.cache_clear()
    m.tokenize.cache_clear()
    assert m.tokenize("后方回声增强", "jieba") == ("后方回声增强",)
    assert capfd.readouterr().err == ""


# ------------------------------------------------------------------ bootstrap


def test_bootstrap_ci():
    assert m.bootstrap_ci([50.0] * 20) == (50.0, 50.0)
    values = [0.0] * 50 + [100.0] * 50
    lo, hi = m.bootstrap_ci(values, n=500, seed=1)
    assert lo < 50.0 < hi and lo > 35 and hi < 65  # se of the mean = 5, so ~ +-10
    assert m.bootstrap_ci(values, n=500, seed=1) == (lo, hi)
    assert all(math.isnan(x) for x in m.bootstrap_ci([]))
    with pytest.raises(ConfigError):
        m.bootstrap_ci(values, alpha=1.5)


# ------------------------------------------------------------------ strict: negation, uncertainty


@pytest.mark.parametrize(
    ("pred", "ref", "lang", "hit"),
    [
        ("不均匀", "均匀", "zh", 0),  # 不 is a cue the reference lacks
        ("均匀。", "均匀", "zh", 1),
        ("不是左侧", "左侧", "zh", 0),
        ("左侧", "左侧", "zh", 1),
        ("非均匀", "均匀", "zh", 0),
        ("无回声", "无回声", "zh", 1),  # 无回声 (anechoic) is one token, no negation
        ("not uniform", "uniform", "en", 0),
        ("Uniform.", "uniform", "en", 1),
        ("It is not on the left", "left", "en", 0),
        ("without contrast", "contrast", "en", 0),
        ("isn't left", "left", "en", 0),
        ("not enhancing", "not enhancing", "en", 1),  # the reference has the cue too
    ],
)
def test_strict_negation_cue_the_reference_lacks_is_a_miss(pred, ref, lang, hit):
    assert one(pred, ref, "CLOSED", lang)["closed_hit"] == hit


@pytest.mark.parametrize(
    ("text", "lang"),
    [
        ("不确定", "zh"),
        ("我不确定是否有结节", "zh"),
        ("无法判断", "zh"),
        ("不能确定", "zh"),
        ("难以确定有无结节", "zh"),
        ("不知道", "zh"),
        ("I am not sure.", "en"),
        ("I'm not certain", "en"),
        ("It is uncertain", "en"),
        ("I don't know", "en"),
        ("Cannot be determined from this image", "en"),
        ("unable to tell", "en"),
    ],
)
def test_strict_uncertainty_is_neither_yes_nor_no(text, lang):
    assert m.yes_no_label(m.normalize_strict(text, lang)) is None
    # so it is a miss against either answer, and a miss against a non-yes/no answer
    for ref in ("yes", "no") if lang == "en" else ("是", "否"):
        assert one(text, ref, "CLOSED", lang)["closed_hit"] == 0
    assert (
        one(
            text + (" 左侧" if lang == "zh" else " left"), "左侧" if lang == "zh" else "left", "CLOSED", lang
        )["closed_hit"]
        == 0
    )
    # v1.0.0 would read "not sure" as a "no"
    if lang == "en":
        assert one(text, "no", "CLOSED", lang, mode="llava-med")["closed_hit"] == int("no" in text.lower())


def test_strict_clear_answers_are_still_read():
    # the uncertainty phrases do not swallow findings or plain verdicts
    assert not m.is_uncertain("边界不清") and not m.is_uncertain("边界不明确")  # findings, not doubt
    assert not m.is_uncertain("margins are unclear")
    assert m.yes_no_label(m.normalize_strict("No, not enlarged", "en")) == "no"
    assert m.yes_no_label(m.normalize_strict("是的，确定有结节", "zh")) == "yes"
