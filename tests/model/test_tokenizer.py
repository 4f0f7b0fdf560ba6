"""Tiny tokenizer and conversation formats."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from llava_ultra.errors import ConfigError, DataError
from llava_ultra.model.tokenizer import (
    SPECIAL_TOKENS,
    build_tiny_tokenizer,
    render_conversation,
    render_prompt,
)
from tests.helpers import TINY_TEXTS, tiny_tokenizer


def test_special_ids_and_exact_round_trip(tmp_path):
    tok = tiny_tokenizer()
    assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [0, 1, 2, 3, 4]
    text = "胆囊内见一强回声团（约1.2cm），后方伴声影。USER: ＡＢＣ"  # full-width chars survive (no NFKC)
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok("a <image> b", add_special_tokens=False).input_ids.count(4) == 1
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text).input_ids == ids and again.convert_tokens_to_ids("<image>") == 4


def test_vocab_size_bounds():
    assert len(build_tiny_tokenizer(TINY_TEXTS * 4, vocab_size=300)) <= 300
    with pytest.raises(ConfigError, match="at least 261"):
        build_tiny_tokenizer(TINY_TEXTS, vocab_size=100)
    with pytest.raises(DataError, match="no text"):
        build_tiny_tokenizer(["  "], vocab_size=300)


def test_vicuna_segments_mark_only_answers_as_targets():
    messages = [
        {"role": "user", "content": "<image>\n这是什么部位？"},
        {"role": "assistant", "content": "肝脏。"},
        {"role": "user", "content": "有无异常？"},
        {"role": "assistant", "content": "未见异常。"},
    ]
    segments = render_conversation(messages, system="SYS")
    assert "".join(s.text for s in segments) == (
        "SYS USER: <image>\n这是什么部位？ ASSISTANT: 肝脏。</s>USER: 有无异常？ ASSISTANT: 未见异常。</s>"
    )
    assert [s.text for s in segments if s.is_target] == [" 肝脏。</s>", " 未见异常。</s>"]
    assert render_prompt(messages[:3], system="SYS").endswith("USER: 有无异常？ ASSISTANT:")


def test_plain_template_for_stage_one():
    segments = render_conversation(
        [{"role": "user", "content": "<image>\ndescribe"}, {"role": "assistant", "content": "肝脏超声"}],
        "plain",
    )
    assert [(s.text, s.is_target) for s in segments] == [("<image>", False), ("肝脏超声\n", True)]


def test_bad_conversations():
    with pytest.raises(DataError, match="role 'assistant', expected 'user'"):
        render_conversation([{"role": "assistant", "content": "x"}])
    with pytest.raises(ConfigError, match="unknown conversation template 'chatml'"):
        render_conversation([{"role": "user", "content": "x"}], template="chatml")
