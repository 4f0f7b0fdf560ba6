"""Tests for LLM-written instruction data: shipped prompts, reply parsing and checks, and
`llava-ultra instruct --generator llm` end to end against the scripted endpoint."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from llava_ultra.cli import app
from llava_ultra.data.extend import sample_extended_caption
from llava_ultra.data.instruct import make_generator
from llava_ultra.data.llm_instruct import (
    DETAIL_QUESTIONS,
    TASKS,
    LLMGenerator,
    ReplyError,
    check_extended,
    key_terms,
    load_prompt,
    parse_json_reply,
    task_turns,
    turn_problem,
)
from llava_ultra.data.samples import IMAGE_TOKEN, check_sample
from llava_ultra.errors import ConfigError
from llava_ultra.llm.client import estimate_tokens

# ------------------------------------------------------------------------------ pure parts


@pytest.mark.parametrize("language", ["zh", "en"])
@pytest.mark.parametrize("task", TASKS)
def test_shipped_few_shot_examples_pass_our_own_checks(task, language):
    prompt = load_prompt(task, language)
    assert len(prompt["examples"]) >= 2 and "JSON" in prompt["system"]
    for example in prompt["examples"]:
        report = example["report"]
        source = "\n".join((report["history"], report["findings"], report["diagnosis"]))
        turns = task_turns(task, parse_json_reply(json.dumps(example["output"], ensure_ascii=False)))
        for question, answer in turns:
            assert turn_problem(question or "-", answer, language, source) is None, answer


@pytest.mark.parametrize("language", ["zh", "en"])
def test_shipped_extend_examples_pass_our_own_checks(language):
    for example in load_prompt("extend", language)["examples"]:
        assert (
            check_extended(example["answers"], example["output"], language) == example["output"]["extended"]
        )


def test_parse_json_reply_tolerates_fences_and_prose():
    assert parse_json_reply('Sure!\n```json\n{"a": 1}\n```\nDone.') == {"a": 1}
    assert parse_json_reply('Here: {"b": [1, 2]} hope it helps') == {"b": [1, 2]}
    for bad, match in [("", "empty"), ("no json here", "no JSON object"), ('{"a": 1,,}', "not valid JSON")]:
        with pytest.raises(ReplyError, match=match):
            parse_json_reply(bad)


def test_task_turns_shapes():
    conv = {"conversation": [{"question": "<image>\nQ1", "answer": "A1"}, {"question": "Q2", "answer": "A2"}]}
    assert task_turns("conversation", conv) == [("Q1", "A1"), ("Q2", "A2")]
    assert task_turns("detailed_description", {"description": "D"}) == [("", "D")]
    assert task_turns("complex_reasoning", {"question": "Q", "answer": "A"}) == [("Q", "A")]
    with pytest.raises(ReplyError, match="conversation"):
        task_turns("conversation", {"conversation": []})
    with pytest.raises(ReplyError, match="turn 0"):
        task_turns("conversation", {"conversation": [{"question": "Q"}]})


SOURCE = "甲状腺右叶见低回声结节，大小约1.2×0.8cm，边界清。TI-RADS 3类。"


@pytest.mark.parametrize(
    ("question", "answer", "language", "reason"),
    [
        ("结节多大？", "结节大小约1.2 × 0.8 cm，边界清，呈低回声。", "zh", None),
        ("结节多大？", "报告中提到结节大小约1.2×0.8cm。", "zh", "talks about the report/caption"),
        ("描述中写了什么？", "右叶结节。", "zh", "talks about the report/caption"),
        ("结节多大？", "抱歉，我无法看到图像。", "zh", "admits not seeing the image"),
        ("结节多大？", "I cannot see the image.", "zh", "admits not seeing the image"),
        ("结节多大？", "结节大小约2.5cm。", "zh", "states a measurement not in the report (2.5cm)"),
        ("这是谁的检查？", "这是[姓名]的检查。", "zh", "carries a scrubbed placeholder"),
        ("How big?", "The caption says 1.2 x 0.8 cm.", "en", "talks about the report/caption"),
        ("How big?", "As an AI, I can't view images.", "en", "admits not seeing the image"),
        ("How big?", "It measures 1.2x0.8cm, a hypoechoic nodule.", "en", None),
        ("Describe the echo.", "", "en", "empty"),
    ],
)
def test_turn_problem(question, answer, language, reason):
    assert turn_problem(question, answer, language, SOURCE) == reason


def test_check_extended_keeps_terms_and_length():
    answers = ["右叶低回声结节，大小约1.2×0.8cm，TI-RADS 3类。"]
    assert "1.2×0.8cm" in key_terms(answers[0]) and "TI-RADS 3" in key_terms(answers[0])
    good = {"extended": ["图像显示右叶有一个低回声结节，即比周围组织暗，大小约1.2×0.8cm，评为TI-RADS 3类。"]}
    assert check_extended(answers, good, "zh") == good["extended"]
    cases = [
        ({"extended": []}, "1 answers"),
        ({"extended": ["右叶结节。"]}, "shorter"),
        ({"extended": [answers[0] * 3]}, "within 2x"),
        (
            {"extended": ["图像显示右叶有一个低回声结节，比周围组织暗，大小约一厘米多，评为TI-RADS 3类。"]},
            "1.2×0.8cm",
        ),
        ({"extended": "text"}, "one string per answer"),
    ]
    for obj, match in cases:
        with pytest.raises(ReplyError, match=match):
            check_extended(answers, obj, "zh")


def test_llm_generator_is_registered_and_validates_options(llm_server):
    gen = make_generator("llm", site_cue="with", base_url=llm_server.url, model="m", journal=None)
    assert isinstance(gen, LLMGenerator) and gen.name == "llm"
    with pytest.raises(ConfigError, match="unknown LLM task"):
        make_generator("llm", base_url=llm_server.url, model="m", tasks=("poetry",))


# ---------------------------------------------------------------------------------- end to end

REPORTS = [
    {
        "id": "r1",
        "site": "thyroid",
        "history": "患者张三，男，52岁，身份证号110101199003071234，体检发现结节。",
        "findings": "甲状腺右叶见一低回声结节，大小约1.2×0.8cm，边界清，形态规则。",
        "diagnosis": "甲状腺右叶结节，TI-RADS 3类。",
        "language": "zh",
        "images": ["img/r1_0.png", "img/r1_1.png"],
    },
    {
        "id": "r2",
        "site": "liver",
        "history": "",
        "findings": "胆囊内见一强回声团，大小约1.5cm，后方伴声影。",
        "diagnosis": "胆囊结石。",
        "language": "zh",
        "images": ["img/r2_0.png"],
    },
    {
        "id": "r3",
        "site": "kidney",
        "history": "Patient: John Smith. Flank pain.",
        "findings": "A hyperechoic focus of 6 mm with posterior acoustic shadowing in the lower pole.",
        "diagnosis": "Left renal stone.",
        "language": "en",
        "images": ["img/r3_0.png", "img/r3_1.png", "img/r3_2.png"],
    },
]
SECRETS = ("张三", "110101199003071234", "John Smith")


def _field(user: str, labels: tuple[str, ...]) -> str:
    for line in user.splitlines():
        for label in labels:
            if line.startswith(label):
                return line[len(label) :]
    raise AssertionError(f"no {labels} in {user!r}")


def fake_llm(body: dict) -> str:
    """A scripted 'LLM': valid conversations with one bad turn of each kind, a detailed description
    that is only valid after a repair request, complex reasoning that is never valid for English."""
    msgs = body["messages"]
    system, last = msgs[0]["content"], msgs[-1]["content"]
    repair = "could not be used" in last or "无法使用" in last
    if '"extended"' in system:
        zh = "扩展" in system
        return json.dumps(
            {
                "extended": [
                    a + ("（以上为图像所见。）" if zh else " This is what the image shows.")
                    for a in json.loads(last)
                ]
            },
            ensure_ascii=False,
        )
    zh = "超声所见：" in last or "超声所见：" in msgs[-3]["content"]
    report = last if not repair else msgs[-3]["content"]
    findings = _field(report, ("超声所见：", "Findings: "))
    diagnosis = _field(report, ("超声诊断：", "Impression: "))
    if '"conversation"' in system:
        if zh:
            turns = [
                ("这是哪个部位的超声？看到了什么？", "图像显示：" + findings),
                ("报告中还提到了什么？", "报告中提到了诊断。"),
                ("病灶大小有变化吗？", "较前增大，约9.9cm。"),
                ("诊断是什么？", "考虑" + diagnosis),
            ]
        else:
            turns = [
                ("What do you see?", "The image shows: " + findings),
                ("Is the kidney normal otherwise?", "The diagnosis is " + diagnosis),
                ("What does the report say?", "The report says stone."),
            ]
        return json.dumps(
            {"conversation": [{"question": q, "answer": a} for q, a in turns]}, ensure_ascii=False
        )
    if '"description"' in system:
        if not repair:
            return '{"description": "unterminated'
        return (
            "```json\n"
            + json.dumps({"description": findings + " " + diagnosis}, ensure_ascii=False)
            + "\n```"
        )
    if not zh:
        return "I think it is a stone."
    return json.dumps({"question": "为什么考虑这个诊断？", "answer": "因为" + findings}, ensure_ascii=False)


def write_reports(tmp_path):
    path = tmp_path / "data" / "train.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in REPORTS), encoding="utf-8")
    return path


def test_instruct_llm_end_to_end(llm_server, tmp_path):
    llm_server.responder = fake_llm
    reports = write_reports(tmp_path)
    out = tmp_path / "out"
    args = ["instruct", "--reports", str(reports), "--out", str(out), "--generator", "llm"]
    args += ["--llm-base-url", llm_server.url, "--llm-model", "gen-model", "--llm-concurrency", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    # per report: conv + extend, detail (+ repair) + extend, complex + extend (zh) / + repair (en)
    assert len(llm_server.requests) == 21
    received = llm_server.received_text()
    for secret in SECRETS:
        assert secret not in received
    assert "[姓名]" in received and "[NAME]" in received

    stage2 = json.loads((out / "stage2.train.json").read_text(encoding="utf-8"))
    by_id = {s["id"]: s for s in stage2}
    for sample in stage2:
        check_sample(sample)
        gpt = [t["value"] for t in sample["conversations"] if t["from"] == "gpt"]
        assert sample["generator"] == "llm" and sample["llm_model"] == "gen-model"
        assert len(sample["extended_answers"]) == len(gpt)
        joiner = "" if sample["language"] == "zh" else " "
        assert (
            sample_extended_caption(sample)
            == sample["extended_caption"]
            == joiner.join(sample["extended_answers"])
        )
        assert all(
            e.startswith(a) and len(e) > len(a) for a, e in zip(gpt, sample["extended_answers"], strict=True)
        )
        text = json.dumps(sample["conversations"], ensure_ascii=False)
        assert "报告中" not in text and "9.9cm" not in text and "report says" not in text
    conv = by_id["r1-zh-llm-conv-nocue"]["conversations"]
    assert [t["from"] for t in conv] == ["human", "gpt", "human", "gpt"]
    assert conv[0]["value"].startswith(f"{IMAGE_TOKEN}\n{IMAGE_TOKEN}\n这是哪个部位")
    assert conv[1]["value"] == "图像显示：" + REPORTS[0]["findings"]
    assert by_id["r1-zh-llm-conv-cue"]["conversations"][0]["value"].count("甲状腺") == 1
    detail = by_id["r2-zh-llm-detail-cue"]
    assert (
        detail["task"] == "detailed_description"
        and detail["conversations"][0]["value"].count(IMAGE_TOKEN) == 1
    )
    assert any(q in detail["conversations"][0]["value"] for q in DETAIL_QUESTIONS["zh"])
    assert by_id["r1-zh-llm-complex-nocue"]["task"] == "complex_reasoning"
    # the English conversation names the site ("kidney") in a question: only its cue variant is kept;
    # its complex-reasoning reply was never JSON: no sample, counted
    assert "r3-en-llm-conv-cue" in by_id and "r3-en-llm-conv-nocue" not in by_id
    assert not any(i.startswith("r3-en-llm-complex") for i in by_id)
    assert len(stage2) == 2 * 3 + 2 * 3 + 1 + 2
    assert "failed complex_reasoning replies: 1" in result.output
    assert "turns dropped (talks about the report/caption): 3" in result.output
    assert "turns dropped (states a measurement not in the report): 2" in result.output
    assert "21 requests sent" in result.output
    meta = json.loads((out / "instruct_meta.json").read_text(encoding="utf-8"))
    assert meta["generator"] == "llm" and any("21 requests sent" in n for n in meta["generator_notes"])
    # stage 1 and eval stay template-built
    assert json.loads((out / "eval.train.json").read_text(encoding="utf-8"))

    before = (out / "stage2.train.json").read_bytes()
    again = CliRunner().invoke(app, args)  # journal: nothing to do
    assert again.exit_code == 0 and len(llm_server.requests) == 21
    assert "reports resumed from the journal: 3" in again.output
    (out / "llm_journal.jsonl").unlink()
    third = CliRunner().invoke(app, args)  # no journal, the reply cache answers everything
    assert third.exit_code == 0 and len(llm_server.requests) == 21
    assert re.search(r"0 requests sent, 21 cache hits", third.output)
    assert (out / "stage2.train.json").read_bytes() == before


def test_instruct_llm_dry_run_sends_nothing(llm_server, tmp_path):
    """Every request is printed (the three tasks and their three rewrites per report), the estimate
    counts all of them, and nothing is written: no instruction files, journal or cache."""
    reports = write_reports(tmp_path)
    args = ["instruct", "--reports", str(reports), "--out", str(tmp_path / "o"), "--generator", "llm"]
    args += ["--llm-base-url", llm_server.url, "--llm-model", "gpt-4o-mini", "--llm-dry-run"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert llm_server.requests == []
    blocks = result.output.split("--- dry run: POST")[1:]
    assert len(blocks) == 18  # 3 reports x 3 tasks, each with its extended-answer rewrite
    bodies = [json.loads(b[b.index("\n{") : b.index("\n}\n") + 2]) for b in blocks]
    rewrites = [b for b in bodies if '"extended"' in b["messages"][0]["content"]]
    assert len(rewrites) == 9 and all(
        "unknown" in r["messages"][-1]["content"] or "未知" in r["messages"][-1]["content"] for r in rewrites
    )
    for secret in SECRETS:
        assert secret not in result.output
    assert "18 printed by dry run (nothing sent)" in result.output
    n_in = sum(estimate_tokens(b["messages"]) for b in bodies) + 9 * 1500  # + the unknown answers
    assert f"dry run estimate for the 18 printed requests: ~{n_in} tokens in + at most {18 * 1500} out" in (
        result.output
    )
    assert re.search(r"cost ~\$0\.0\d+ for the prompts, at most \$0\.0\d+ with the replies", result.output)
    assert "tokens: 0 in" not in result.output and "cost: $0.0000" not in result.output
    assert f"dry run: nothing written to {tmp_path / 'o'}" in result.output
    assert not (tmp_path / "o").exists()


def refuse_report(findings: str):
    """The endpoint refuses (HTTP 400) every request about the report with these findings."""

    def reject(body):
        text = json.dumps(body["messages"][-1], ensure_ascii=False)
        return "the prompt is too long for this model" if findings[:8] in text else None

    return reject


def test_instruct_goes_on_past_a_report_the_endpoint_refuses(llm_server, tmp_path):
    llm_server.responder = fake_llm
    llm_server.reject = refuse_report(REPORTS[1]["findings"])
    reports = write_reports(tmp_path)
    out = tmp_path / "out"
    args = ["instruct", "--reports", str(reports), "--out", str(out), "--generator", "llm"]
    args += ["--llm-base-url", llm_server.url, "--llm-model", "gen-model", "--llm-concurrency", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "requests refused by the endpoint (HTTP 400/413/422): 3" in result.output
    assert (
        "1 reports without stage-2 samples (the generator failed on them; their captions and eval QA are kept):"
        in (result.output)
    )
    assert (
        "    report r2: the LLM gave no usable output for any task: conversation: the endpoint refused the "
        f"request: {llm_server.url}/chat/completions refused the request (HTTP 400: " in result.output
    )
    stage2 = json.loads((out / "stage2.train.json").read_text(encoding="utf-8"))
    assert {s["report_id"] for s in stage2} == {"r1", "r3"}  # the others were generated
    for name in ("stage1", "eval"):  # the refused report is still in the template-built files
        samples = json.loads((out / f"{name}.train.json").read_text(encoding="utf-8"))
        assert {s["report_id"] for s in samples} == {"r1", "r2", "r3"}, name
    meta = json.loads((out / "instruct_meta.json").read_text(encoding="utf-8"))
    assert meta["bad"] == [] and [b["where"] for b in meta["no_stage2"]] == ["report r2"]
    assert meta["splits"]["train"]["reports"] == 3


def test_instruct_stops_when_the_endpoint_refuses_everything(llm_server, tmp_path):
    llm_server.reject = lambda body: "response_format is not supported by this model"
    reports = write_reports(tmp_path)
    args = ["instruct", "--reports", str(reports), "--out", str(tmp_path / "o"), "--generator", "llm"]
    args += ["--llm-base-url", llm_server.url, "--llm-model", "m", "--llm-concurrency", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "the endpoint refused the first 5 requests and accepted none, so the problem is a setting" in (
        result.output
    )
    assert "response_format is not supported" in result.output and "Traceback" not in result.output
    assert len(llm_server.requests) == 5


def test_instruct_against_a_server_capping_replies_at_1024_tokens(llm_server, tmp_path):
    """Our own server caps max_tokens at 1024; instruct asks 1500 by default and is sized down."""
    llm_server.responder = fake_llm
    llm_server.max_tokens_limit = 1024
    reports = write_reports(tmp_path)
    out = tmp_path / "out"
    args = ["instruct", "--reports", str(reports), "--out", str(out), "--generator", "llm"]
    args += ["--llm-base-url", llm_server.url, "--llm-model", "gen-model", "--llm-concurrency", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    sizes = [b["max_tokens"] for b in llm_server.bodies()]
    assert sizes[:2] == [1500, 1024] and set(sizes[2:]) == {1024}  # learned once, then sent sized
    assert len(sizes) == 21 + 1 and "21 requests sent" in result.output
    assert "21 request(s) sized down to the max_tokens the endpoint accepts" in result.output
    assert len(json.loads((out / "stage2.train.json").read_text(encoding="utf-8"))) == 15


def test_instruct_llm_needs_an_endpoint(tmp_path, monkeypatch):
    monkeypatch.delenv("LLAVA_ULTRA_LLM_BASE_URL", raising=False)
    reports = write_reports(tmp_path)
    args = ["instruct", "--reports", str(reports), "--out", str(tmp_path / "o"), "--generator", "llm"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "--llm-base-url" in result.output


def test_instruct_llm_unreachable_endpoint_aborts(dead_url, tmp_path):
    reports = write_reports(tmp_path)
    args = ["instruct", "--reports", str(reports), "--out", str(tmp_path / "o"), "--generator", "llm"]
    args += ["--llm-base-url", dead_url, "--llm-model", "m", "--llm-max-attempts", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and dead_url in result.output
