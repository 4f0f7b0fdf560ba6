"""Tests for the LLM judge: score parsing, relative scores per category, protocol, resume, loud failures."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llava_ultra.cli import app
from llava_ultra.errors import DataError
from llava_ultra.eval.judge import (
    RAW_NAME,
    SCORES_NAME,
    SYSTEM,
    normalize_category,
    pair_items,
    parse_scores,
    reference_fields,
    run_judge,
    summarize,
)
from llava_ultra.llm.client import ClientConfig, LLMError

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("8 7\nAssistant 1 is more detailed.", (8.0, 7.0)),
        ("8, 7", (8.0, 7.0)),
        ("  \n9 6.5\nbecause", (9.0, 6.5)),
        ("Assistant 1: 8\nAssistant 2: 7\nBoth are fine.", (8.0, 7.0)),
        ("Assistant 1 score: 9, Assistant 2 score: 3", (9.0, 3.0)),
        ("助手1：9分，助手2：6分", (9.0, 6.0)),
        ("**8** **6**\nexplanation", (8.0, 6.0)),
        ("8/10 7/10", (8.0, 7.0)),
        ("Scores: 10 and 2", (10.0, 2.0)),
        ("Assistant 1 gives 3 findings, Assistant 2 gives 5.\n8 7", None),  # first line has no pair
        # the first line wins over labelled numbers in the explanation
        ("8 6\nAssistant 1: 3 findings listed, Assistant 2: 1 finding only.", (8.0, 6.0)),
        ("Assistant 1: 8, Assistant 2: 6\nAssistant 1: 3 findings, Assistant 2: 1 finding.", (8.0, 6.0)),
        ("The first answer is better.", None),
        ("8", None),
        ("8 7 6", None),
        ("11 3", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_scores(reply, expected):
    assert parse_scores(reply) == expected


def test_categories_and_reference_fields():
    assert normalize_category("conv") == "conversation"
    assert normalize_category("detail") == "detailed_description"
    assert normalize_category("Complex Reasoning") == "complex_reasoning"
    assert normalize_category("qa") == "qa" and normalize_category(None) == "uncategorized"
    sample = {
        "id": "r1",
        "conversations": [
            {"from": "human", "value": "<image>\n<image>\n这是什么部位？"},
            {"from": "gpt", "value": "甲状腺超声。"},
        ],
        "findings": "右叶囊肿。",
    }
    assert reference_fields(sample) == ("这是什么部位？", "甲状腺超声。", "右叶囊肿。")
    bench = {"question_id": 3, "text": "Q?", "gpt4_answer": "A.", "fig_caption": "Cap."}
    assert reference_fields(bench) == ("Q?", "A.", "Cap.")
    with pytest.raises(DataError, match="no question/answer"):
        reference_fields({"id": "x", "question": "Q?"})


def test_pairing_by_id_reports_unmatched():
    refs = [{"id": f"q{i}", "question": "Q", "answer": "A", "category": "conv"} for i in range(3)]
    preds = [
        {"question_id": "q2", "text": "B"},
        {"question_id": "q0", "text": "C"},
        {"question_id": "zz", "text": "D"},
    ]
    pairing = pair_items(preds, refs)
    assert [(i.id, i.answer) for i in pairing.items] == [("q0", "C"), ("q2", "B")]
    assert pairing.missing_predictions == ["q1"] and pairing.unmatched_predictions == ["zz"]
    with pytest.raises(DataError, match="no prediction matches"):
        pair_items([{"question_id": "nope", "text": "x"}], refs)


def test_summarize_relative_scores_per_category_with_medians():
    per_item = {
        "a": [{"scores": [8, 6]}, {"scores": [8, 4]}, {"scores": [10, 9]}],  # median (8, 6)
        "b": [{"scores": [10, 10]}],
        "c": [{"scores": [5, 5]}],
        "d": [{"scores": None}, {"scores": None}],  # no parseable repeat: left out, counted
    }
    cats = {"a": "conversation", "b": "conversation", "c": "complex_reasoning", "d": "complex_reasoning"}
    s = summarize(per_item, cats)
    assert s["conversation"]["relative_score"] == pytest.approx(100 * 8 / 9)  # mean(6,10)/mean(8,10)
    assert s["complex_reasoning"] == {
        "items": 1,
        "unscored_items": 1,
        "reference_score": 5,
        "model_score": 5,
        "relative_score": 100.0,
    }
    assert s["overall"]["items"] == 3 and s["overall"]["unscored_items"] == 1
    assert s["overall"]["relative_score"] == pytest.approx(100 * (6 + 10 + 5) / (8 + 10 + 5))


# --------------------------------------------------------------------------- runs against a server

REFS = [
    {
        "question_id": "c1",
        "category": "conv",
        "question": "What organ?",
        "answer": "The thyroid.",
        "context": "Thyroid nodule 1.2 cm.",
    },
    {
        "question_id": "c2",
        "category": "conv",
        "question": "Any cyst?",
        "answer": "Yes, a cyst.",
        "context": "Cyst 2 cm.",
    },
    {
        "question_id": "d1",
        "category": "detail",
        "question": "Describe.",
        "answer": "A 6 mm stone.",
        "context": "Stone 6 mm.",
    },
    {
        "question_id": "x1",
        "category": "complex",
        "question": "Why?",
        "answer": "Because of shadowing.",
        "context": "Stone.",
    },
]
PREDS = [
    {"question_id": "c1", "text": "GOOD thyroid"},
    {"question_id": "c2", "text": "BAD"},
    {"question_id": "d1", "text": "GOOD stone"},
    {"question_id": "x1", "text": "UNSURE"},
]


def judge_responder(body):
    """8 for the reference; model 8 for GOOD, 4 for BAD; a reply without scores for UNSURE."""
    user = body["messages"][1]["content"]
    answer = user.split("[Assistant 2]\n")[1].split("\n")[0]
    if answer.startswith("UNSURE"):
        return "Both answers are reasonable but I cannot decide."
    return ("8 8" if answer.startswith("GOOD") else "8 4") + "\nExplanation."


def write_inputs(tmp_path: Path) -> tuple[Path, Path]:
    ref, pred = tmp_path / "ref.jsonl", tmp_path / "pred.jsonl"
    ref.write_text("".join(json.dumps(r) + "\n" for r in REFS), encoding="utf-8")
    pred.write_text("".join(json.dumps(p) + "\n" for p in PREDS), encoding="utf-8")
    return pred, ref


def test_judge_run_protocol_scores_raw_file_and_cache(llm_server, tmp_path):
    llm_server.responder = judge_responder
    pred, ref = write_inputs(tmp_path)
    out = tmp_path / "judge"
    cfg = ClientConfig(base_url=llm_server.url, model="judge-2024-01-01", cache=out / "cache.sqlite3")
    summary = run_judge(pred, ref, out, cfg, repeats=2)

    assert len(llm_server.requests) == 8  # 4 items x 2 repeats
    body = llm_server.bodies()[0]
    assert body["temperature"] == 0.0 and body["model"] == "judge-2024-01-01"
    assert body["messages"][0] == {"role": "system", "content": SYSTEM}
    user = body["messages"][1]["content"]
    assert (
        user.index("[Context]")
        < user.index("[Question]")
        < user.index("[Assistant 1]")
        < user.index("[Assistant 2]")
    )
    assert "two values" in user and "first output a single line" in user

    s = summary.scores
    assert s["conversation"]["relative_score"] == pytest.approx(100 * 6 / 8)
    assert s["detailed_description"]["relative_score"] == pytest.approx(100.0)
    assert s["complex_reasoning"]["items"] == 0 and s["complex_reasoning"]["unscored_items"] == 1
    assert s["overall"]["relative_score"] == pytest.approx(100 * (8 + 4 + 8) / 24)
    assert summary.meta["unparseable_replies"] == 2 and summary.meta["replies"] == 8

    raw = [json.loads(line) for line in (out / RAW_NAME).read_text(encoding="utf-8").splitlines()]
    assert len(raw) == 8 and {r["judge_model"] for r in raw} == {"judge-2024-01-01"}
    assert {r["served_model"] for r in raw} == {"judge-2024-01-01"}
    assert all(r["reply"] for r in raw) and sum(r["scores"] is None for r in raw) == 2
    saved = json.loads((out / SCORES_NAME).read_text(encoding="utf-8"))
    assert saved["scores"]["overall"]["items"] == 3 and saved["meta"]["temperature"] == 0.0

    # re-run: journal + cache, zero requests; with the journal gone, the cache alone still suffices
    run_judge(pred, ref, out, cfg, repeats=2)
    (out / RAW_NAME).unlink()
    again = run_judge(pred, ref, out, cfg, repeats=2)
    assert len(llm_server.requests) == 8
    assert again.scores == summary.scores


def test_judge_cli_end_to_end(llm_server, tmp_path):
    llm_server.responder = judge_responder
    pred, ref = write_inputs(tmp_path)
    args = ["judge", "--pred", str(pred), "--ref", str(ref), "--out", str(tmp_path / "j")]
    args += ["--judge-model", "judge-x", "--base-url", llm_server.url, "--price", "1,2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert re.search(r"conversation\s+2\s+8\.00\s+6\.00\s+75\.0", result.output)
    assert "unparseable judge replies: 1 of 4" in result.output and "cost: $" in result.output


def test_unreachable_judge_fails_loudly(dead_url, tmp_path):
    pred, ref = write_inputs(tmp_path)
    args = ["judge", "--pred", str(pred), "--ref", str(ref), "--out", str(tmp_path / "j")]
    args += ["--judge-model", "judge-x", "--base-url", dead_url, "--max-attempts", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert dead_url in result.output and "connection failed" in result.output
    assert not (tmp_path / "j" / SCORES_NAME).exists()
    cfg = ClientConfig(base_url=dead_url, model="m", max_attempts=1)
    with pytest.raises(LLMError):
        run_judge(pred, ref, tmp_path / "k", cfg)


def test_judge_dry_run_sends_nothing(llm_server, tmp_path):
    pred, ref = write_inputs(tmp_path)
    args = ["judge", "--pred", str(pred), "--ref", str(ref), "--out", str(tmp_path / "j")]
    args += ["--judge-model", "judge-x", "--base-url", llm_server.url, "--dry-run"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert llm_server.requests == [] and result.output.count("--- dry run: POST") == 4
    assert "nothing sent" in result.output


def test_killed_judge_resumes_where_it_stopped(llm_server, tmp_path):
    """A real `llava-ultra judge` process is killed while its 3rd request hangs; the re-run asks only the rest."""
    llm_server.responder = judge_responder
    llm_server.script.extend([{}, {}, {"hold": True}])
    pred, ref = write_inputs(tmp_path)
    out = tmp_path / "j"
    args = ["judge", "--pred", str(pred), "--ref", str(ref), "--out", str(out), "--judge-model", "judge-x"]
    args += ["--base-url", llm_server.url, "--concurrency", "1", "--no-cache"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from llava_ultra.cli import app; app()", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while len(llm_server.requests) < 3:
            assert time.monotonic() < deadline and proc.poll() is None, "judge process never reached item 3"
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait(10)
    llm_server.release.set()
    done = [json.loads(line)["id"] for line in (out / RAW_NAME).read_text(encoding="utf-8").splitlines()]
    assert done == ["c1", "c2"]

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    resumed = [b["messages"][1]["content"] for b in llm_server.bodies()[3:]]
    assert len(resumed) == 2
    assert "A 6 mm stone." in resumed[0] and "Because of shadowing." in resumed[1]
    assert "unparseable judge replies: 1 of 4" in result.output


def test_judge_with_default_max_tokens_against_a_small_context(llm_server, tmp_path):
    """A server whose context leaves the judge fewer reply tokens than the default 1024 answers
    with how many fit (our server's wording); every request is re-sent sized to fit."""
    llm_server.responder = judge_responder

    def context(body):
        if body["max_tokens"] > 300:
            return (
                f"max_tokens={body['max_tokens']} plus the prompt's 724 tokens exceeds the model's "
                "context of 1024 tokens; ask for at most 300 tokens"
            )
        return None

    llm_server.reject = context
    pred, ref = write_inputs(tmp_path)
    args = ["judge", "--pred", str(pred), "--ref", str(ref), "--out", str(tmp_path / "j")]
    args += ["--judge-model", "judge-x", "--base-url", llm_server.url, "--price", "1,2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert sorted(b["max_tokens"] for b in llm_server.bodies()) == [300] * 4 + [1024] * 4
    assert "4 request(s) sized down to the max_tokens the endpoint accepts" in result.output
    assert re.search(r"conversation\s+2\s+8\.00\s+6\.00\s+75\.0", result.output)
