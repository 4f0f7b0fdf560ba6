"""Tests for resumable batch jobs: crash and resume, torn lines, fingerprints, per-item failures."""

from __future__ import annotations

import json

import pytest

from llava_ultra.errors import DataError
from llava_ultra.llm.batch import read_journal, run_batch
from llava_ultra.llm.client import ChatClient, ClientConfig


class Crash(RuntimeError):
    pass


def test_crash_then_resume_requests_only_the_rest(llm_server, tmp_path):
    """A job dies at item 6 of 10; the re-run sends exactly items 6..9 (no cache involved)."""
    journal = tmp_path / "out.jsonl"
    items = [(f"item{i}", f"question {i}") for i in range(10)]
    llm_server.responder = lambda body: "answer to " + body["messages"][-1]["content"]
    cfg = ClientConfig(base_url=llm_server.url, model="m")

    with ChatClient(cfg) as client:

        def dies_at_6(q: str) -> dict:
            if q == "question 6":
                raise Crash("killed")
            return {"answer": client.chat([{"role": "user", "content": q}]).content}

        with pytest.raises(Crash):
            run_batch(items, dies_at_6, journal, concurrency=1)
    assert len(llm_server.requests) == 6
    done, _ = read_journal(journal)
    assert sorted(done) == [f"item{i}" for i in range(6)]

    with ChatClient(cfg) as client:
        result = run_batch(
            items, lambda q: {"answer": client.chat([{"role": "user", "content": q}]).content}, journal
        )
    asked = [b["messages"][-1]["content"] for b in llm_server.bodies()[6:]]
    assert sorted(asked) == [f"question {i}" for i in range(6, 10)]
    assert result.resumed == 6 and result.new == 4 and len(result.records) == 10
    assert result.records["item9"]["answer"] == "answer to question 9"


def test_torn_last_line_is_cut_and_redone(tmp_path):
    journal = tmp_path / "j.jsonl"
    journal.write_text('{"key": "a", "fingerprint": "", "v": 1}\n{"key": "b", "finger', encoding="utf-8")
    calls = []
    result = run_batch([("a", 1), ("b", 2)], lambda x: calls.append(x) or {"v": x}, journal)
    assert calls == [2] and result.torn_lines == 1
    lines = journal.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["key"] for line in lines] == ["a", "b"]


def test_changed_fingerprint_is_redone(tmp_path):
    journal = tmp_path / "j.jsonl"
    run_batch([("a", 1)], lambda x: {"v": x}, journal, fingerprint=lambda x: "model-A")
    calls = []
    result = run_batch(
        [("a", 1)], lambda x: calls.append(x) or {"v": x}, journal, fingerprint=lambda x: "model-B"
    )
    assert calls == [1] and result.resumed == 0 and result.records["a"]["fingerprint"] == "model-B"


def test_data_errors_are_counted_not_journaled(tmp_path):
    journal = tmp_path / "j.jsonl"

    def work(x: int) -> dict:
        if x % 3 == 0:
            raise DataError(f"bad item {x}")
        return {"v": x}

    result = run_batch([(str(i), i) for i in range(7)], work, journal, concurrency=3)
    assert result.failed == {"0": "bad item 0", "3": "bad item 3", "6": "bad item 6"}
    assert sorted(read_journal(journal)[0]) == ["1", "2", "4", "5"]
    again = run_batch([(str(i), i) for i in range(7)], work, journal)
    assert again.resumed == 4 and set(again.failed) == {"0", "3", "6"}
