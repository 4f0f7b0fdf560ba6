"""`llava-ultra score --mode llava-med` against LLaVA-Med v1.0.0's own rules, on its own file formats.

The expected numbers come from `v100_evaluate` below: LLaVA-Med v1.0.0's `llava/eval/run_eval.py`
and `llava/eval/eval_metrics/` (commit b9a98a7, the `v1.0.0` tag) re-implemented here from their
source, statement by statement, without importing anything from llava_ultra. Their VQA
normalisation tables are long; only the entries this fixture exercises are copied (number words,
articles, two contractions), which is enough for the fixture's answers to normalise as theirs do.

The fixture is LLaVA-Med-shaped: `test.json` ground truth with integer ids, `image`,
`conversations` (one record with their misspelt `conversatons`) and `answer_type`; empty
reference answers (VQA-RAD's released file has 49); Chinese closed answers (v1.0.0 scores them
0: they hold neither "yes" nor "no"); a candidate file `{"0": [...]}` with an integer in it; and a
predictions JSONL in another order than the ground truth (paired by id; v1.0.0 needs the same order,
so the reference sorts them first).
"""

from __future__ import annotations

import collections
import json
import re

import pytest
from nltk.translate.bleu_score import sentence_bleu
from typer.testing import CliRunner

from llava_ultra.cli import app

# run_eval.py silences every warning (nltk warns for each zero n-gram order)
pytestmark = pytest.mark.filterwarnings("ignore:\\s*The hypothesis contains 0 counts")

# ----------------------------------------------------------- LLaVA-Med v1.0.0, re-implemented

_MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
               "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip
_CONTRACTIONS = {"isnt": "isn't", "dont": "don't"}  # the entries the fixture uses
_ARTICLES = ["a", "an", "the"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]  # fmt: skip


def normalize_word(token):
    out = token
    for p in _PUNCT:
        if (p + " " in token or " " + p in token) or (re.search(_COMMA_STRIP, token) is not None):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    token = _PERIOD_STRIP.sub("", out, re.UNICODE)  # their positional argument is `count`
    words = []
    for word in token.lower().split():
        word = _MANUAL_MAP.setdefault(word, word)
        if word not in _ARTICLES:
            words.append(word)
    words = [_CONTRACTIONS.get(w, w) for w in words]
    return " ".join(words).replace(",", "")


def split_sentence(sentence, n):
    words = collections.defaultdict(int)
    tokens = sentence.lower().strip().split()
    for i in range(len(tokens) - n + 1):
        gram = " ".join(tokens[i : i + n])
        if gram:
            words[gram] += 1
    return words


def calculate_exactmatch(candidate, reference):
    candidate_words = split_sentence(normalize_word(candidate), 1)
    reference_words = split_sentence(normalize_word(reference), 1)
    count = sum(1 for w in reference_words if w in candidate_words)
    total = sum(candidate_words[w] for w in candidate_words)
    return 0 if total == 0 else count / total


def calculate_f1score(candidate, reference):
    candidate_words = split_sentence(normalize_word(candidate), 1)
    reference_words = split_sentence(normalize_word(reference), 1)
    tp = fp = fn = 0
    for word in set(candidate_words) | set(reference_words):
        if word in candidate_words and word in reference_words:
            tp += candidate_words[word]
        elif word in candidate_words:
            fp += candidate_words[word]
        else:
            fn += reference_words[word]
    if len(candidate_words) == 0 or len(reference_words) == 0:
        return 0, 0, 0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    if tp == 0:
        return 0, 0, 0
    return 2 * precision * recall / (precision + recall), precision, recall


def calculate_appearance_with_normalization(prediction, reference, candidate_set):
    prediction_words = split_sentence(normalize_word(prediction), 1)
    reference = normalize_word(reference)
    similarities, normalised = [], []
    for answer in candidate_set["0"]:
        if isinstance(answer, int):
            answer = str(answer)
        answer = normalize_word(answer)
        normalised.append(answer)
        answer_words = split_sentence(answer, 1)
        count = sum(1 for w in prediction_words if w in answer_words)
        similarities.append(0.0 if len(answer_words) == 0 else count / len(answer_words))
    final = normalised[similarities.index(max(similarities))]
    return 1.0 if final == reference else 0.0


def v100_evaluate(gt, pred, candidate):
    """run_eval.py's evaluate(): the ten printed numbers, x 100."""
    closed, bleus, exact, f1s, open_hit = [], collections.defaultdict(list), [], [], []
    for gt_item, pred_item in zip(gt, pred, strict=True):
        conv = gt_item["conversations"] if "conversations" in gt_item else gt_item["conversatons"]
        gt_value = normalize_word(conv[1]["value"].lower())
        pred_value = normalize_word(pred_item["text"].lower())
        if gt_item["answer_type"] == "OPEN":
            open_hit.append(calculate_appearance_with_normalization(pred_value, gt_value, candidate))
            exact.append(calculate_exactmatch(pred_value, gt_value))
            f1s.append(calculate_f1score(pred_value, gt_value))
            ref, hyp = [str(gt_value).lower().split()], str(pred_value).lower().split()
            bleus["bleu"].append(sentence_bleu(references=ref, hypothesis=hyp))
            for n, w in ((1, (1, 0, 0, 0)), (2, (0, 1, 0, 0)), (3, (0, 0, 1, 0))):
                bleus[n].append(sentence_bleu(references=ref, hypothesis=hyp, weights=w))
        elif gt_item["answer_type"] == "CLOSED":
            if "yes" in pred_value or "no" in pred_value:
                closed.append(1 if gt_value in pred_value else 0)
            else:
                closed.append(0)

    def mean(xs):
        return sum(xs) / len(xs)

    return {
        "exact_match": mean(exact) * 100,
        "f1": mean([f[0] for f in f1s]) * 100,
        "precision": mean([f[1] for f in f1s]) * 100,
        "recall": mean([f[2] for f in f1s]) * 100,
        "bleu": mean(bleus["bleu"]) * 100,
        "bleu_1": mean(bleus[1]) * 100,
        "bleu_2": mean(bleus[2]) * 100,
        "bleu_3": mean(bleus[3]) * 100,
        "open_accuracy": mean(open_hit) * 100,
        "closed_accuracy": (sum(closed) / len(closed) if closed else 0.0) * 100,
    }


# ------------------------------------------------------------------------------ the fixture

# (id, answer_type, reference, prediction)
ROWS = [
    (10, "CLOSED", "yes", "Yes, there is airspace consolidation."),
    (12, "CLOSED", "no", "There is no evidence of an aortic aneurysm."),
    (13, "CLOSED", "no", "The nodule is seen."),  # "no" inside "nodule": the gate passes, "no" is found
    (14, "CLOSED", "yes", "No."),  # passes the gate, misses: counted as 0 in v1.0.0
    (15, "CLOSED", "yes", "I'm sorry, I cannot see the image."),  # no gate: 0
    (16, "CLOSED", "", "Yes"),  # empty reference: a substring of everything
    (17, "CLOSED", "", "I can't tell"),  # empty reference but no yes/no: 0
    (18, "CLOSED", "是", "是的"),  # Chinese: no "yes"/"no" anywhere -> 0
    (19, "CLOSED", "否", "没有"),
    (20, "CLOSED", "有", "有，可见结节"),
    (30, "OPEN", "right lung", "The right lung."),
    (31, "OPEN", "left kidney", "It is in the left kidney, not the right lung"),
    (32, "OPEN", "2", "two"),
    (33, "OPEN", "CT", "CT scan of the abdomen"),
    (34, "OPEN", "", "pleural effusion"),  # empty references: EM/F1/BLEU 0, open accuracy by argmax
    (35, "OPEN", "", "xyz"),  # no overlap with any candidate: the first candidate wins
    (36, "OPEN", "pleural effusion", "it isnt pleural effusion"),
    (37, "OPEN", "axial", ""),  # empty prediction
    (38, "OPEN", "肝脏", "肝脏"),
    (39, "OPEN", "liver", "Liver; (hepatic) lobe - right/left"),
]
CANDIDATES = {"0": ["", "right lung", "left kidney", 2, "CT", "pleural effusion", "axial", "liver", "肝脏"]}


def _write_fixture(folder):
    gt = []
    for qid, kind, ref, _ in ROWS:
        key = "conversatons" if qid == 31 else "conversations"  # their misspelling, read as they read it
        gt.append(
            {
                "id": qid,
                "image": f"synpic{qid}.jpg",
                key: [
                    {"from": "human", "value": f"<image>\nQuestion {qid}?"},
                    {"from": "gpt", "value": ref},
                ],
                "answer_type": kind,
            }
        )
    preds = [
        {"question_id": qid, "prompt": f"Question {qid}?", "text": text, "answer_id": f"a{qid}", "model_id": "m",
         "metadata": {}}
        for qid, _, _, text in ROWS
    ]  # fmt: skip
    shuffled = preds[1::2] + preds[::2]  # paired by id, not position
    (folder / "test.json").write_text(json.dumps(gt, ensure_ascii=False), encoding="utf-8")
    (folder / "answers.jsonl").write_text(
        "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in shuffled), encoding="utf-8"
    )
    (folder / "candidate.json").write_text(json.dumps(CANDIDATES, ensure_ascii=False), encoding="utf-8")
    return gt, preds


def _score(folder, *extra):
    args = ["score", str(folder / "answers.jsonl"), str(folder / "test.json"), "--mode", "llava-med"]
    result = CliRunner().invoke(app, [*args, "--bootstrap", "0", "--no-plots", *extra])
    return result


def test_every_printed_metric_equals_llava_med_v100(tmp_path):
    gt, preds = _write_fixture(tmp_path)
    want = v100_evaluate(gt, preds, CANDIDATES)
    # the fixture exercises what it claims
    # closed hits: 10, 12, 13 ("no" inside "nodule") and 16 (empty reference); 15 passes the gate
    # through "cannot" and misses; every Chinese answer is 0
    assert want["closed_accuracy"] == 4 / 10 * 100
    result = _score(
        tmp_path, "--candidates", str(tmp_path / "candidate.json"), "--out", str(tmp_path / "run")
    )
    assert result.exit_code == 0, result.output
    got = json.loads((tmp_path / "run" / "scores.json").read_text(encoding="utf-8"))
    assert {k: got[k] for k in want} == want  # to the last bit
    assert (got["n"], got["n_open"], got["n_closed"], got["n_closed_scored"]) == (20, 10, 10, 10)
    assert got["n_empty_references"] == 4 and got["n_empty_predictions"] == 1
    assert got["closed_variant"] == "run_eval@b9a98a7"
    assert got["open_accuracy_candidates"].endswith("candidate.json (9 answers)")
    report = (tmp_path / "run" / "report.md").read_text(encoding="utf-8")
    assert "empty reference answers: 4" in report and "| Open acc |" in report


def test_default_candidates_are_the_open_references(tmp_path):
    gt, preds = _write_fixture(tmp_path)
    refs = [r[2] for r in ROWS if r[1] == "OPEN"]
    want = v100_evaluate(gt, preds, {"0": refs})
    result = _score(tmp_path, "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    got = json.loads((tmp_path / "run" / "scores.json").read_text(encoding="utf-8"))
    assert got["open_accuracy"] == want["open_accuracy"]
    assert got["open_accuracy_candidates"] == "the open references of this set (10 answers)"


def test_jsonl_ground_truth_and_scheme(tmp_path):
    gt, preds = _write_fixture(tmp_path)
    want = v100_evaluate(gt, preds, CANDIDATES)
    lines = tmp_path / "test.jsonl"
    lines.write_text("".join(json.dumps(g, ensure_ascii=False) + "\n" for g in gt), encoding="utf-8")
    args = ["score", str(tmp_path / "answers.jsonl"), f"llava-med:{lines}", "--mode", "llava-med"]
    args += [
        "--candidates",
        str(tmp_path / "candidate.json"),
        "--bootstrap",
        "0",
        "--out",
        str(tmp_path / "r"),
    ]
    result = CliRunner().invoke(app, [*args, "--no-plots"])
    assert result.exit_code == 0, result.output
    got = json.loads((tmp_path / "r" / "scores.json").read_text(encoding="utf-8"))
    assert {k: got[k] for k in want} == want


@pytest.mark.parametrize(
    ("variant", "closed"),
    [
        ("run_eval@b9a98a7", [1, 1, 1, 0, 0, 1, 0, 0, 0, 0]),
        # the gated misses 14 ("no" vs yes) and 15 ("cannot" holds "no") leave the denominator
        ("run_eval@ad758b6", [1, 1, 1, 1, 0, 0, 0, 0]),
        # reference substring alone: 16 and 17 (empty reference), 是 in 是的, 有 in 有，可见结节
        ("run_eval_batch@ad758b6", [1, 1, 1, 0, 0, 1, 1, 1, 0, 1]),
    ],
)
def test_closed_variants_on_the_fixture(tmp_path, variant, closed):
    _write_fixture(tmp_path)
    result = _score(tmp_path, "--closed-variant", variant, "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    got = json.loads((tmp_path / "run" / "scores.json").read_text(encoding="utf-8"))
    assert got["closed_accuracy"] == sum(closed) / len(closed) * 100
    assert got["n_closed_scored"] == len(closed)


# ------------------------------------------------------------------------------ bad inputs


def test_bad_files_are_named_with_the_fix(tmp_path):
    _write_fixture(tmp_path)
    text = (tmp_path / "answers.jsonl").read_text(encoding="utf-8")
    (tmp_path / "answers.jsonl").write_bytes(text.encode("gbk"))  # Chinese answers saved as GBK
    result = _score(tmp_path)
    assert result.exit_code != 0
    assert "predictions file" in result.output and "is not UTF-8: byte 0xca at offset" in result.output
    assert "re-save it as UTF-8, e.g. `iconv -f GBK -t UTF-8 answers.jsonl" in result.output
    (tmp_path / "answers.jsonl").write_text(text, encoding="utf-8-sig")  # a BOM is fine
    assert _score(tmp_path).exit_code == 0

    cand = tmp_path / "candidate.json"
    cand.write_bytes('{"0": ["肝脏"]}'.encode("utf-16"))
    result = _score(tmp_path, "--candidates", str(cand))
    assert (
        "candidate file" in result.output and "is not UTF-8: byte 0xff at offset 0 (line 1)" in result.output
    )
    cand.write_text('{"answers": ["a"]}')
    result = _score(tmp_path, "--candidates", str(cand))
    assert (
        """has no key "0"; LLaVA-Med's format is {"0": [answers]} (keys found: 'answers')""" in result.output
    )
    cand.write_text('{"0": ["a", 1.5]}')
    result = _score(tmp_path, "--candidates", str(cand))
    assert "open-accuracy candidate 1 is float (1.5), not a string" in result.output
    result = CliRunner().invoke(
        app,
        ["score", str(tmp_path / "answers.jsonl"), str(tmp_path / "test.json"), "--candidates", str(cand)],
    )
    assert "candidates (open accuracy) apply to --mode llava-med only" in result.output
    result = _score(tmp_path, "--closed-variant", "legacy")
    assert (
        "'legacy' was renamed after the LLaVA-Med commit it reproduces: use 'run_eval@ad758b6'"
        in result.output
    )

    gt = json.loads((tmp_path / "test.json").read_text(encoding="utf-8"))
    gt[2]["conversations"] = [{"from": "human", "value": "q"}]
    (tmp_path / "test.json").write_text(json.dumps(gt), encoding="utf-8")
    result = _score(tmp_path)
    assert "record[2] (id 13): conversations must hold a human turn and a gpt turn" in result.output
    gt[2] = dict(gt[1])
    (tmp_path / "test.json").write_text(json.dumps(gt), encoding="utf-8")
    result = _score(tmp_path)
    assert "record[2]: id 12 also at record[1]; ids must be unique" in result.output


def test_missing_and_extra_predictions_by_id(tmp_path):
    _write_fixture(tmp_path)
    lines = (tmp_path / "answers.jsonl").read_text(encoding="utf-8").splitlines(True)
    (tmp_path / "answers.jsonl").write_text("".join(lines[1:]), encoding="utf-8")  # drops id 12
    result = _score(tmp_path)
    assert (
        "19 predictions but 20 ground-truth samples: 1 ground-truth sample(s) have no prediction"
        in result.output
    )
    assert "first: ground truth [1] id=12" in result.output
    extra = json.dumps({"question_id": 99, "text": "yes"}) + "\n"
    (tmp_path / "answers.jsonl").write_text("".join(lines) + extra, encoding="utf-8")
    result = _score(tmp_path)
    assert (
        "1 prediction(s) have no ground-truth sample, first: prediction [20] question_id=99" in result.output
    )
    # --limit cuts the ground truth: the predictions beyond it are left out and counted
    result = _score(tmp_path, "--limit", "5")
    assert result.exit_code == 0, result.output
    assert "predictions without a ground-truth sample (left out): 16" in result.output
