"""The LLM client against our own `llava-ultra serve` app (tiny checkpoint, uvicorn on 127.0.0.1):
text-only requests work, arrive scrubbed, are cached, and a refusing server is a loud error."""

from __future__ import annotations

import pytest

pytest.importorskip("llava_ultra.serve.app")

from llava_ultra.llm.client import ChatClient, ClientConfig, LLMError, scrub_messages  # noqa: E402
from llava_ultra.serve.engine import Message, SamplingParams  # noqa: E402
from tests.serve.conftest import (  # noqa: E402, F401  (fixtures shared with tests/serve)
    API_KEY,
    MODEL_NAME,
    auth_server,
    checkpoint,
    engine,
    server,
)

TEXT = "患者张三，男，52岁，身份证号110101199003071234。肝脏大小正常。"


def test_text_only_request_arrives_scrubbed_and_is_cached(server, engine, tmp_path):  # noqa: F811
    cfg = ClientConfig(
        base_url=f"{server.url}/v1", model=MODEL_NAME, max_tokens=8, cache=tmp_path / "c.sqlite3"
    )
    with ChatClient(cfg) as client:
        reply = client.chat([{"role": "user", "content": TEXT}])
        again = client.chat([{"role": "user", "content": TEXT}])
    clean = scrub_messages([{"role": "user", "content": TEXT}])[0][0]["content"]
    assert "张三" not in clean
    expected = engine.generate([Message("user", clean)], SamplingParams(max_tokens=8))
    raw = engine.generate([Message("user", TEXT)], SamplingParams(max_tokens=8))
    # the server tokenised the scrubbed text, not the original
    assert reply.usage["prompt_tokens"] == expected.prompt_tokens != raw.prompt_tokens
    assert reply.content == expected.text and reply.served_model == MODEL_NAME
    assert again.cached and again.content == reply.content
    assert client.usage.sent == 1 and client.usage.cache_hits == 1


def test_api_key_from_env_and_refusal_is_loud(auth_server, monkeypatch):  # noqa: F811
    monkeypatch.setenv("LLAVA_ULTRA_LLM_API_KEY", API_KEY)
    cfg = ClientConfig(base_url=f"{auth_server.url}/v1", model=MODEL_NAME, max_tokens=4)
    with ChatClient(cfg) as client:
        assert isinstance(client.chat([{"role": "user", "content": "肝脏?"}]).content, str)
    monkeypatch.setenv("LLAVA_ULTRA_LLM_API_KEY", "wrong")
    with ChatClient(cfg) as client, pytest.raises(LLMError, match="401"):
        client.chat([{"role": "user", "content": "肝脏?"}])
