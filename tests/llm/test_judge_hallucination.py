"""The judge's hallucination rubric: its own prompt, pinned (name + text hash), cached, and reported in
its own files beside the LLaVA-Med rubric's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llava_ultra.cli import app
from llava_ultra.errors import DataError
from llava_ultra.eval.judge import (
    HALLUCINATION_SYSTEM,
    RAW_NAME,
    SCORES_NAME,
    SYSTEM,
    judge_messages,
    rubric_files,
    rubric_sha,
    run_judge,
)
from llava_ultra.llm.client import ClientConfig

REFS = [
    {
        "id": "a",
        "question": "描述所见。",
        "answer": "右叶结节。",
        "findings": "甲状腺右叶上极见一结节。",
        "category": "detail",
    },
    {
        "id": "b",
        "question": "Describe.",
        "answer": "No lesion.",
        "findings": "No lesion is seen.",
        "category": "detail",
    },
]
PREDS = [
    {"question_id": "a", "text": "右叶结节，伴钙化。"},
    {"question_id": "b", "text": "INVENTED a cyst in the left kidney."},
]


def responder(body: dict) -> str:
    system = body["messages"][0]["content"]
    answer = body["messages"][1]["content"].split("[Assistant 2]\n")[1]
    if system == HALLUCINATION_SYSTEM:
        return (
            "10 2" if answer.startswith("INVENTED") else "10 7"
        ) + "\nAssistant 2: calcification invented."
    return "8 6\nfine"


def write(tmp_path: Path) -> tuple[Path, Path]:
    pred, ref = tmp_path / "pred.jsonl", tmp_path / "ref.jsonl"
    pred.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in PREDS), encoding="utf-8")
    ref.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in REFS), encoding="utf-8")
    return pred, ref


def test_rubric_prompt_is_pinned_and_distinct():
    messages = judge_messages("ctx", "q", "ref", "ans", "hallucination")
    assert messages[0]["content"] == HALLUCINATION_SYSTEM
    assert "hallucinated finding" in messages[1]["content"] and "faithfulness" in messages[1]["content"]
    assert judge_messages("ctx", "q", "ref", "ans")[0]["content"] == SYSTEM
    assert rubric_sha("hallucination") != rubric_sha("llava-med") and len(rubric_sha("hallucination")) == 12
    assert rubric_files("llava-med") == (RAW_NAME, SCORES_NAME)
    with pytest.raises(DataError, match="unknown judge rubric"):
        judge_messages("c", "q", "r", "a", "vibes")


def test_hallucination_rubric_is_cached_and_reported_separately(llm_server, tmp_path: Path):
    llm_server.responder = responder
    pred, ref = write(tmp_path)
    out = tmp_path / "judge"
    cfg = ClientConfig(base_url=llm_server.url, model="judge-2024-01-01", cache=out / "cache.sqlite3")
    plain = run_judge(pred, ref, out, cfg)
    hall = run_judge(pred, ref, out, cfg, rubric="hallucination")
    assert len(llm_server.requests) == 4
    assert hall.scores["overall"]["model_score"] == pytest.approx(4.5)
    assert hall.scores["overall"]["relative_score"] == pytest.approx(45.0)
    assert plain.scores["overall"]["relative_score"] == pytest.approx(75.0)
    raw_name, scores_name = rubric_files("hallucination")
    saved = json.loads((out / scores_name).read_text(encoding="utf-8"))
    assert saved["meta"]["rubric"] == "hallucination" and saved["meta"]["rubric_sha"] == rubric_sha(
        "hallucination"
    )
    assert json.loads((out / SCORES_NAME).read_text(encoding="utf-8"))["meta"]["rubric"] == "llava-med"
    raw = [json.loads(line) for line in (out / raw_name).read_text(encoding="utf-8").splitlines()]
    assert {r["rubric"] for r in raw} == {"hallucination"} and all("invented" in r["reply"] for r in raw)
    # the reply cache serves a re-run without the journal
    (out / raw_name).unlink()
    again = run_judge(pred, ref, out, cfg, rubric="hallucination")
    assert len(llm_server.requests) == 4 and again.scores == hall.scores
    assert "rubric hallucination" in again.render() and scores_name in again.render()


def test_judge_cli_rubric_option(llm_server, tmp_path: Path):
    llm_server.responder = responder
    pred, ref = write(tmp_path)
    args = ["judge", "--pred", str(pred), "--ref", str(ref), "--out", str(tmp_path / "j")]
    args += ["--judge-model", "judge-x", "--base-url", llm_server.url, "--rubric", "hallucination"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "rubric hallucination" in result.output and "45.0" in result.output
    bad = CliRunner().invoke(app, [*args[:-1], "nonsense"])
    assert bad.exit_code == 2 and "unknown judge rubric" in bad.output
