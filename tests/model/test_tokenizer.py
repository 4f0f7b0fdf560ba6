"""Tiny tokenizer and conversation formats."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from llava_ultra.errors import ConfigError, DataError
from llava_ultra.model.tokenizer import (
    SPECIAL_TOKENS,
    build_tiny_tokenizer,
    load_tokenizer,
    prefix_scheme,
    render_conversation,
    render_prompt,
    set_prefix_scheme,
    tokenizer_image_token_ids,
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


def test_prefix_scheme_round_trip_and_errors(tmp_path):
    from tests.model.test_convert_parity import (
        PROMPT,
        sentencepiece_like,
        tokenizer_image_token,
        write_tokenizer,
    )

    raw = sentencepiece_like()
    write_tokenizer(raw, tmp_path / "src", legacy=False)
    tok = load_tokenizer(tmp_path / "src")
    assert prefix_scheme(tok) == "first"  # what transformers builds from legacy=false
    tok.add_tokens(["<image>"], special_tokens=True)
    set_prefix_scheme(tok, "always")
    image_id = tok.convert_tokens_to_ids("<image>")
    want = tokenizer_image_token(PROMPT, lambda s: raw.encode(s).ids, bos_id=1)
    assert tokenizer_image_token_ids(tok, PROMPT) == want  # LLaVA's per-piece tokenisation
    for i in range(3):  # save / load / save ...: the scheme and the ids survive
        tok.save_pretrained(tmp_path / f"t{i}")
        tok = load_tokenizer(tmp_path / f"t{i}")
        assert prefix_scheme(tok) == "always"
        assert [-200 if t == image_id else t for t in tok(PROMPT).input_ids] == want

    with pytest.raises(
        ConfigError, match=r"unknown Metaspace prepend scheme 'sometimes'; use always, first or never"
    ):
        set_prefix_scheme(tok, "sometimes")
    byte_level = tiny_tokenizer()
    assert prefix_scheme(byte_level) is None
    with pytest.raises(
        ConfigError,
        match=r"has no Metaspace pre-tokenizer; the prefix scheme applies to sentencepiece-style \(LLaMA / Mistral\)",
    ):
        set_prefix_scheme(byte_level, "always")
    (tmp_path / "t2" / "tokenizer_config.json").write_bytes(b"\xff{")
    with pytest.raises(ConfigError, match=r"no tokenizer could be loaded from|is not valid UTF-8 JSON"):
        load_tokenizer(tmp_path / "t2")
