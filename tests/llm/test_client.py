"""Tests for the OpenAI-compatible client: retries, timeouts, cache, scrubbing, dry run, accounting.

Retries and timeouts are the openai SDK's; these tests check their behaviour against a real local
HTTP server (what is retried, how long the client waits, what is counted), not their internals.
"""

from __future__ import annotations

import io
import threading
import time

import pytest

from llava_ultra.errors import ConfigError
from llava_ultra.llm.client import (
    ChatClient,
    ClientConfig,
    LLMError,
    ReplyCache,
    RequestRejected,
    cache_key,
    estimate_tokens,
    fitting_max_tokens,
    parse_price,
    price_for,
    scrub_messages,
)

MSG = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a cyst?"}]
PLANTED = "患者张三，男，52岁，身份证号110101199003071234。Patient: John Smith. 甲状腺右叶见低回声结节，大小约1.2×0.8cm。"
SECRETS = ("张三", "John Smith", "110101199003071234")


def client(url: str, **kw) -> ChatClient:
    return ChatClient(ClientConfig(base_url=url, model="test-model", **kw))


def test_429_then_success_honours_retry_after(llm_server):
    # Retry-After: 1 s, longer than the SDK's first backoff (at most 0.5 s): the wait shows which won
    llm_server.script.extend([{"status": 429, "headers": {"Retry-After": "1"}}, {"content": "fine"}])
    t0 = time.monotonic()
    with client(llm_server.url) as c:
        result = c.chat(MSG)
    assert result.content == "fine" and time.monotonic() - t0 >= 1.0
    assert len(llm_server.requests) == 2
    assert c.usage.retries == 1 and c.usage.sent == 1


def test_retry_after_ms_replaces_the_backoff(llm_server):
    llm_server.script.extend([{"status": 503, "headers": {"retry-after-ms": "50"}}, {"content": "fine"}])
    t0 = time.monotonic()
    with client(llm_server.url) as c:
        assert c.chat(MSG).content == "fine"
    assert time.monotonic() - t0 < 0.3  # 50 ms, not the SDK's 0.375-0.5 s first backoff
    assert c.usage.retries == 1


def test_500_then_success_backs_off(llm_server):
    llm_server.script.extend([{"status": 500}, {"status": 502}, {"content": "fine"}])
    t0 = time.monotonic()
    with client(llm_server.url) as c:
        assert c.chat(MSG).content == "fine"
    assert len(llm_server.requests) == 3 and c.usage.retries == 2
    assert time.monotonic() - t0 >= 0.375 + 0.75  # two exponential waits (0.5 s, 1 s, minus <= 25 % jitter)


def test_timeout_then_success(llm_server):
    llm_server.script.extend([{"delay": 1.5, "content": "too late"}, {"content": "fine"}])
    with client(llm_server.url, timeout=0.3) as c:
        assert c.chat(MSG).content == "fine"
    assert len(llm_server.requests) == 2
    assert c.usage.retries == 1


def test_retries_exhausted_raise_naming_the_url(llm_server):
    llm_server.script.extend([{"status": 503}] * 3)
    with client(llm_server.url, max_attempts=3) as c, pytest.raises(LLMError, match="failed 3 time") as err:
        c.chat(MSG)
    assert llm_server.url in str(err.value) and "HTTP 503" in str(err.value)
    assert len(llm_server.requests) == 3


def test_client_errors_are_not_retried(llm_server):
    llm_server.script.append({"status": 401})
    with client(llm_server.url) as c, pytest.raises(LLMError, match="API key"):
        c.chat(MSG)
    assert len(llm_server.requests) == 1


def test_unreachable_endpoint_is_a_loud_error(dead_url):
    with client(dead_url, max_attempts=2) as c, pytest.raises(LLMError, match="failed 2 time") as err:
        c.chat(MSG)
    assert dead_url in str(err.value) and "connection failed" in str(err.value)
    assert c.usage.retries == 1


def test_cache_second_run_sends_nothing_and_ignores_base_url(llm_server, dead_url, tmp_path):
    cache = tmp_path / "cache.sqlite3"
    llm_server.responder = lambda body: "a cyst is a fluid-filled sac"
    with client(llm_server.url, cache=cache) as c:
        first = c.chat(MSG)
    assert len(llm_server.requests) == 1 and not first.cached
    # another process, another URL (nothing listening): served from the cache, zero requests
    with client(dead_url, cache=cache) as c:
        again = c.chat(MSG)
    assert again.cached and again.content == first.content and again.usage == first.usage
    assert c.usage.sent == 0 and c.usage.cache_hits == 1
    assert len(llm_server.requests) == 1
    # a different parameter or cache_extra is a different entry
    with client(llm_server.url, cache=cache) as c:
        c.chat(MSG, temperature=0.5)
        c.chat(MSG, cache_extra={"repeat": 1})
    assert len(llm_server.requests) == 3


def test_cache_is_safe_under_concurrency(llm_server, tmp_path):
    llm_server.responder = lambda body: body["messages"][-1]["content"].upper()
    with client(llm_server.url, cache=tmp_path / "c.sqlite3", concurrency=4) as c:
        threads = [
            threading.Thread(target=c.chat, args=([{"role": "user", "content": f"q{i % 8}"}],))
            for i in range(24)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert {c.chat([{"role": "user", "content": f"q{i}"}]).content for i in range(8)} == {
            f"Q{i}" for i in range(8)
        }
    assert len(c._cache) == 8


def test_planted_identifiers_never_reach_the_server(llm_server):
    messages = [
        {"role": "system", "content": "Rewrite."},
        {"role": "user", "content": PLANTED},
        {"role": "assistant", "content": [{"type": "text", "text": "Patient: John Smith"}]},
    ]
    with client(llm_server.url) as c:
        c.chat(messages)
    received = llm_server.received_text()
    for secret in SECRETS:
        assert secret not in received
    assert "[姓名]" in received and "[身份证号]" in received and "1.2×0.8cm" in received
    assert c.usage.scrubbed["name"] == 3 and c.usage.scrubbed["id_number"] == 1


def test_non_text_content_is_refused(llm_server):
    image = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    with client(llm_server.url) as c, pytest.raises(LLMError, match="only text"):
        c.chat([{"role": "user", "content": image}])
    assert llm_server.requests == []


def test_dry_run_prints_scrubbed_request_and_sends_nothing(llm_server, monkeypatch):
    monkeypatch.setenv("LLAVA_ULTRA_LLM_API_KEY", "sk-secret-value")
    out = io.StringIO()
    cfg = ClientConfig(base_url=llm_server.url, model="m", dry_run=True)
    with ChatClient(cfg, out=out) as c:
        result = c.chat([{"role": "user", "content": PLANTED}])
    printed = out.getvalue()
    assert result.content is None and result.dry_run
    assert llm_server.requests == []
    assert f"POST {llm_server.url}/chat/completions" in printed
    assert "[姓名]" in printed and "sk-secret-value" not in printed and '"Authorization": "***"' in printed
    for secret in SECRETS:
        assert secret not in printed
    assert c.usage.dry_run == 1 and c.usage.sent == 0


def test_auth_headers_bearer_and_azure(llm_server, monkeypatch):
    monkeypatch.setenv("MY_KEY", "k1")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("LLAVA_ULTRA_LLM_API_KEY", raising=False)
    with ChatClient(ClientConfig(base_url=llm_server.url, model="m", api_key_env="MY_KEY")) as c:
        c.chat(MSG)
    azure_cfg = {"api_key_env": "MY_KEY", "api_version": "2024-10-21"}
    # Azure: a base URL naming the deployment is used as is; without one the model names it
    with ChatClient(ClientConfig(base_url=f"{llm_server.url}/deployments/dep", model="m", **azure_cfg)) as c:
        c.chat(MSG)
        assert c.url == f"{llm_server.url}/deployments/dep/chat/completions"
    with ChatClient(ClientConfig(base_url=llm_server.url, model="m", **azure_cfg)) as c:
        c.chat(MSG)
    with ChatClient(ClientConfig(base_url=llm_server.url, model="m")) as c:  # no key: no auth header
        c.chat(MSG)
    plain, azure, azure_model, keyless = llm_server.requests
    headers = [{k.lower(): v for k, v in r["headers"].items()} for r in llm_server.requests]
    assert headers[0]["authorization"] == "Bearer k1" and "api-key" not in headers[0]
    assert plain["path"] == "/v1/chat/completions" and plain["query"] == {}
    for request, h, path in (
        (azure, headers[1], "/v1/deployments/dep"),
        (azure_model, headers[2], "/v1/deployments/m"),
    ):
        assert h["api-key"] == "k1" and "authorization" not in h
        assert request["query"] == {"api-version": ["2024-10-21"]}
        assert request["path"] == path + "/chat/completions"
    assert not {"authorization", "api-key"} & set(headers[3])


def test_request_body_and_usage_accounting(llm_server):
    llm_server.responder = lambda body: "xyz"
    llm_server.model_name = "test-model-2024-01-01"
    with client(llm_server.url, price=(1.0, 2.0), max_tokens=64, json_mode=True) as c:
        c.chat(MSG)
        c.chat(MSG, temperature=0.2)
    body = llm_server.bodies()[0]
    assert body["model"] == "test-model" and body["temperature"] == 0.0 and body["max_tokens"] == 64
    assert body["response_format"] == {"type": "json_object"}
    prompt = len("Be brief.\nWhat is a cyst?")
    assert c.usage.prompt_tokens == 2 * prompt and c.usage.completion_tokens == 6
    assert c.usage.cost(c.price) == pytest.approx((2 * prompt * 1.0 + 6 * 2.0) / 1e6)
    text = c.render_usage()
    assert "2 requests sent" in text and "$" in text and "answered as test-model-2024-01-01" in text


def test_concurrency_limit(llm_server):
    llm_server.script.extend([{"delay": 0.15, "content": "x"}] * 6)
    with client(llm_server.url, concurrency=2) as c:
        threads = [threading.Thread(target=c.chat, args=(MSG,)) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(llm_server.requests) == 6 and llm_server.max_inflight == 2


def test_prices_and_config_errors():
    assert price_for("gpt-4o-mini-2024-07-18") == (0.15, 0.60)
    assert price_for("gpt-4o-2024-08-06") == (2.50, 10.00)
    assert price_for("qwen2-72b") is None and price_for("qwen2-72b", (0.0, 0.0)) == (0.0, 0.0)
    assert parse_price("0.5,1.5") == (0.5, 1.5) and parse_price(None) is None
    with pytest.raises(ConfigError, match="IN,OUT"):
        parse_price("cheap")
    with pytest.raises(ConfigError, match="not an http"):
        ClientConfig(base_url="api.openai.com", model="m")
    with pytest.raises(ConfigError, match="model name is empty"):
        ClientConfig(base_url="http://x", model=" ")
    with pytest.raises(ConfigError, match="timeout"):
        ClientConfig(base_url="http://x", model="m", timeout=0)
    with pytest.raises(ConfigError, match="concurrency"):
        ClientConfig(base_url="http://x", model="m", concurrency=0)


def test_cache_key_is_canonical_and_scrubbed():
    clean, found = scrub_messages([{"role": "user", "content": "姓名：张三"}])
    assert clean == [{"role": "user", "content": "姓名：[姓名]"}] and found == {"name": 1}
    a = cache_key("m", clean, {"temperature": 0, "max_tokens": 5})
    assert a == cache_key("m", clean, {"max_tokens": 5, "temperature": 0})
    assert a != cache_key("m2", clean, {"temperature": 0, "max_tokens": 5})


# ------------------------------------------------------------- one request refused, reply length


def test_a_400_about_the_request_is_a_request_rejection_not_a_retry(llm_server):
    llm_server.reject = lambda body: "the prompt is too long" if "long" in str(body["messages"]) else None
    with client(llm_server.url) as c:
        with pytest.raises(
            RequestRejected, match="refused the request \\(HTTP 400: .*the prompt is too long"
        ) as err:
            c.chat([{"role": "user", "content": "a long report"}])
        assert err.value.status == 400 and isinstance(err.value, LLMError)
        assert c.chat(MSG).content == "ok"  # the next request is unaffected
    assert c.usage.retries == 0 and len(llm_server.requests) == 2
    llm_server.script.append({"status": 401})
    with client(llm_server.url) as c, pytest.raises(LLMError) as err:  # a setting: not per request
        c.chat(MSG)
    assert not isinstance(err.value, RequestRejected)


@pytest.mark.parametrize(
    "message, fits, server_wide",
    [
        ("max_tokens=1500 is above this server's limit of 1024 tokens", 1024, True),  # ours
        (
            "max_tokens=1024 plus the prompt's 900 tokens exceeds the model's context of 1024 tokens; "
            "ask for at most 124 tokens",  # ours
            124,
            False,
        ),
        (
            "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens "
            "(3500 in the messages, 1500 in the completion). Please reduce the length.",  # vLLM <= 0.6
            596,
            False,
        ),
        (
            "'max_tokens' or 'max_completion_tokens' is too large: 1500. This model's maximum context "
            "length is 2048 tokens and your request has 1000 input tokens (1500 > 2048 - 1000).",  # vLLM
            1048,
            False,
        ),
        (
            "max_tokens is too large: 20000. This model supports at most 16384 completion tokens, "
            "whereas you provided 20000.",  # OpenAI
            16384,
            True,
        ),
        ("the prompt is 5000 tokens, above this server's limit of 4096", None, False),
    ],
)
def test_fitting_max_tokens_reads_each_endpoints_wording(message, fits, server_wide):
    assert fitting_max_tokens(message) == (fits, server_wide)


def test_max_tokens_is_sized_to_our_servers_limit_and_remembered(llm_server):
    """Our own server caps replies at 1024 tokens; the judge's and instruct's defaults asked more."""
    llm_server.max_tokens_limit = 1024
    with client(llm_server.url, max_tokens=1500) as c:
        first = c.chat(MSG)
        second = c.chat([{"role": "user", "content": "Another question."}])
        assert first.content == second.content == "ok"
        assert c.usage.resized == 2 and c.usage.sent == 2 and c.usage.retries == 0
        assert "2 request(s) sized down to the max_tokens the endpoint accepts" in c.render_usage()
        # the cache key keeps the requested value: a re-run computes the same key
        assert first.key == c.request_key(MSG)
    assert [b["max_tokens"] for b in llm_server.bodies()] == [1500, 1024, 1024]


def test_dry_run_estimates_tokens_and_cost_and_creates_no_cache(llm_server, tmp_path):
    out = io.StringIO()
    cache = tmp_path / "cache" / "replies.sqlite3"
    cfg = ClientConfig(
        base_url=llm_server.url, model="gpt-4o-mini", dry_run=True, max_tokens=1000, cache=cache
    )
    messages = [{"role": "user", "content": "甲状腺右叶见低回声结节。" + "word " * 40}]
    with ChatClient(cfg, out=out) as c:
        c.chat(messages)
        c.chat(MSG)
        text = c.render_usage()
    assert estimate_tokens(messages) == 4 + 12 + 50  # 12 CJK characters, 200 other characters / 4
    n_in = estimate_tokens(messages) + estimate_tokens(MSG)
    assert c.usage.dry_run_prompt_tokens == n_in and c.usage.dry_run_completion_tokens == 2000
    low, high = n_in * 0.15 / 1e6, (n_in * 0.15 + 2000 * 0.60) / 1e6
    assert text.splitlines()[1:] == [
        f"  dry run estimate for the 2 printed requests: ~{n_in} tokens in + at most 2000 out; "
        f"cost ~${low:.3g} for the prompts, at most ${high:.3g} with the replies"
    ]
    assert "$0.0000" not in text and "tokens: 0 in" not in text and low > 0
    assert not cache.parent.exists()  # a dry run writes nothing, not even an empty cache


def test_dry_run_serves_an_existing_cache_read_only(llm_server, tmp_path):
    cache = tmp_path / "replies.sqlite3"
    with client(llm_server.url, cache=cache) as c:
        c.chat(MSG)
    other = [{"role": "user", "content": "Not asked before."}]
    with ChatClient(
        ClientConfig(base_url=llm_server.url, model="test-model", cache=cache, dry_run=True),
        out=io.StringIO(),
    ) as c:
        hit, printed = c.chat(MSG), c.chat(other)
        assert hit.cached and hit.content == "ok" and printed.dry_run
        assert c.usage.cache_hits == 1 and c.usage.dry_run == 1
    assert len(ReplyCache(cache)) == 1 and len(llm_server.requests) == 1
