"""The OpenAI-compatible server, tested over real HTTP (uvicorn on 127.0.0.1) with the official
`openai` client, plus a bounded hypothesis fuzz of the chat endpoint against the ASGI app."""

from __future__ import annotations

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from llava_ultra.serve.app import ServerSettings, create_app
from llava_ultra.serve.engine import Engine, Limits, Message, SamplingParams
from llava_ultra.serve.schemas import ChatCompletion, ChatCompletionChunk
from tests.serve.conftest import API_KEY, MODEL_NAME, frames, png_data_url


def client(server, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=60)


def user(text: str, images=()) -> dict:
    if not images:
        return {"role": "user", "content": text}
    parts = [{"type": "image_url", "image_url": {"url": png_data_url(im)}} for im in images]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def test_models_health_openapi_and_page(server):
    assert [m.id for m in client(server).models.list().data] == [MODEL_NAME]
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL_NAME
    spec = httpx.get(f"{server.url}/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/models", "/health"} <= set(spec["paths"])
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    assert "ReadableStream" in page.text or "getReader" in httpx.get(f"{server.url}/static/app.js").text


def test_two_images_non_streaming_equals_engine_greedy(server, engine):
    images = frames(2, seed=21)
    expected = engine.generate([Message("user", "胆囊内可见什么？", images)], SamplingParams(max_tokens=12))
    resp = client(server).chat.completions.create(
        model=MODEL_NAME, messages=[user("胆囊内可见什么？", images)], max_tokens=12, temperature=0
    )
    ChatCompletion.model_validate(resp.model_dump())
    assert resp.choices[0].message.content == expected.text
    assert resp.choices[0].finish_reason == expected.finish_reason
    assert resp.usage.prompt_tokens == expected.prompt_tokens
    selection = resp.model_extra["selection"]
    assert selection["num_images"] == 2 and selection["chosen"] == expected.selection.chosen
    assert selection["scores"] == pytest.approx(expected.selection.scores, abs=1e-5)


def test_streaming_equals_engine_greedy(server, engine):
    images = frames(3, seed=22)
    expected = engine.generate(
        [Message("user", "Describe the frames.", images)], SamplingParams(max_tokens=20)
    )
    stream = client(server).chat.completions.create(
        model=MODEL_NAME,
        messages=[user("Describe the frames.", images)],
        max_completion_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk.model_dump())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # it streamed
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason][-1]
    assert final.choices[0].finish_reason == expected.finish_reason
    assert final.model_extra["selection"]["chosen"] == expected.selection.chosen
    assert chunks[-1].usage.completion_tokens == expected.completion_tokens


def test_text_only_multi_turn_and_stop(server, engine):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is the examination site?"},
        {"role": "assistant", "content": "Liver ultrasound."},
        {"role": "user", "content": "Anything else?"},
    ]
    expected = engine.generate(
        [Message(m["role"], m["content"]) for m in messages], SamplingParams(max_tokens=16)
    )
    resp = client(server).chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=16)
    assert resp.choices[0].message.content == expected.text
    assert resp.model_extra.get("selection") is None
    stop = expected.text[4:6]
    assert stop
    cut = client(server).chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=16, stop=stop
    )
    assert cut.choices[0].message.content == expected.text[: expected.text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client(server).chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=16, stop=[stop], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == cut.choices[0].message.content


def test_sixteen_concurrent_requests_are_batched_and_correct(server, engine):
    def request(i):
        text = f"问题 {i}: 甲状腺结节？" if i % 2 else f"question {i}"
        return text, frames(i % 4, seed=100 + i), 3 + i % 4

    batches_before = engine.stats["batches"]

    def ask(i):
        text, images, max_tokens = request(i)
        resp = client(server).chat.completions.create(
            model=MODEL_NAME, messages=[user(text, images)], max_tokens=max_tokens
        )
        return resp.choices[0].message.content, (resp.model_extra.get("selection") or {}).get("chosen")

    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    print(f"16 concurrent: {time.perf_counter() - t0:.2f} s")
    assert engine.stats["batches"] - batches_before < 16
    for i, (text, chosen) in enumerate(answers):
        question, images, max_tokens = request(i)
        alone = engine.generate([Message("user", question, images)], SamplingParams(max_tokens=max_tokens))
        assert text == alone.text, i
        assert chosen == (alone.selection.chosen if alone.selection else None)


def test_auth_rejects_missing_and_wrong_keys(auth_server):
    for key in (None, "wrong-key"):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        resp = httpx.post(f"{auth_server.url}/v1/chat/completions", content=b"{bad json", headers=headers)
        assert resp.status_code == 401
        assert resp.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(auth_server, "wrong-key").models.list()
    ok = client(auth_server, API_KEY).chat.completions.create(
        model=MODEL_NAME, messages=[user("hi")], max_tokens=3
    )
    assert ok.choices[0].message.content is not None
    assert httpx.get(f"{auth_server.url}/health").status_code == 200


def _png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _bad_requests() -> list[tuple[str, dict | bytes, int, str]]:
    """(name, body, expected status, text the error message must contain)."""
    good = frames(1)[0]
    png = _png_bytes(good)
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8))

    def req(**kw):
        return {"model": MODEL_NAME, "messages": [user("q")], "max_tokens": 4} | kw

    def image_req(url):
        return req(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}])

    return [
        ("invalid json", b'{"model": "tiny-ultra", "messages": [', 400, "not valid JSON"),
        ("empty body", b"", 400, "body"),
        ("NaN", b'{"model": "tiny-ultra", "messages": [], "temperature": NaN}', 400, "invalid request"),
        ("unknown model", req(model="gpt-4o"), 404, "does not exist"),
        ("missing messages", {"model": MODEL_NAME}, 400, "messages"),
        ("empty messages", req(messages=[]), 400, "messages"),
        ("bad content type", req(messages=[{"role": "user", "content": 5}]), 400, "content"),
        ("non-image data url", image_req("data:text/plain;base64,aGVsbG8="), 400, "not an image"),
        ("truncated base64", image_req(png_data_url(good)[:-7]), 400, "base64"),
        (
            "truncated image",
            image_req("data:image/png;base64," + base64.b64encode(png[: len(png) // 2]).decode()),
            400,
            "truncated",
        ),
        ("oversized image bytes", image_req(png_data_url(noise)), 400, "bytes"),
        (
            "oversized image pixels",
            image_req(png_data_url(noise.convert("L").point(lambda v: 0))),
            400,
            "pixels",
        ),
        ("too many images", req(messages=[user("q", frames(5))]), 400, "5 images"),
        ("remote url", image_req("http://example.com/frame.png"), 400, "not allowed"),
        ("file url", image_req("file:///etc/passwd"), 400, "not allowed"),
        ("max_tokens over limit", req(max_tokens=49), 400, "max_tokens=49"),
        ("n=2", req(n=2), 400, "n=2"),
        ("temperature", req(temperature=5), 400, "temperature"),
        (
            "assistant last",
            req(messages=[user("q"), {"role": "assistant", "content": "a"}]),
            400,
            "last message",
        ),
        ("placeholder injection", req(messages=[user("<image> hi")]), 400, "placeholder"),
        ("huge body", b"x" * 3_000_000, 413, "limit"),
    ]


def test_bad_input_gets_openai_errors_and_the_server_keeps_serving(server, engine):
    expected = engine.generate([Message("user", "still there?")], SamplingParams(max_tokens=5)).text
    for name, body, status, text in _bad_requests():
        if isinstance(body, bytes):
            resp = httpx.post(
                f"{server.url}/v1/chat/completions",
                content=body,
                headers={"Content-Type": "application/json"},
                timeout=30,
            )
        else:
            resp = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
        assert resp.status_code == status, (name, resp.text)
        error = resp.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, name
        assert text in error["message"], (name, error["message"])
        answer = client(server).chat.completions.create(
            model=MODEL_NAME, messages=[user("still there?")], max_tokens=5
        )
        assert answer.choices[0].message.content == expected, name
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/chat/completions", 405)):
        resp = httpx.request(method, f"{server.url}{path}")
        assert resp.status_code == status and "message" in resp.json()["error"]


def test_remote_images_only_from_allowed_hosts(engine, tmp_path):
    """Opt-in remote fetches, served by a local http.server; other hosts stay refused."""
    import http.server
    import threading

    (tmp_path / "f.png").write_bytes(_png_bytes(frames(1, seed=5)[0]))

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args):
            super().__init__(*args, directory=str(tmp_path))

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/f.png"
    from llava_ultra.serve.images import ImagePolicy

    policy = ImagePolicy(allow_remote=True, allowed_hosts=("127.0.0.1",), allowed_dirs=(tmp_path,))
    app = create_app(engine, ServerSettings(model_name=MODEL_NAME, image_policy=policy))
    try:
        with TestClient(app) as tc:
            for image_url in (url, (tmp_path / "f.png").as_uri()):
                body = {
                    "model": MODEL_NAME,
                    "messages": [
                        {"role": "user", "content": [{"type": "image_url", "image_url": image_url}]}
                    ],
                    "max_tokens": 3,
                }
                resp = tc.post("/v1/chat/completions", json=body)
                assert resp.status_code == 200, resp.text
                assert resp.json()["selection"]["num_images"] == 1
            body["messages"][0]["content"][0]["image_url"] = "http://localhost:1/f.png"
            resp = tc.post("/v1/chat/completions", json=body)
            assert resp.status_code == 400 and "--allowed-hosts" in resp.json()["error"]["message"]
    finally:
        httpd.shutdown()


# ------------------------------------------------------------------------------------------ fuzz

PNG_URL = png_data_url(frames(1, seed=9)[0])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
urls = st.sampled_from(
    [PNG_URL, PNG_URL[:-9], "data:text/plain;base64,aGk=", "data:image/png;base64,!!", "http://x/a.png", ""]
) | st.text(max_size=20)
parts = (
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=30)})
    | st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": urls})})
    | st.fixed_dictionaries({"type": st.just("image_url"), "image_url": urls})
    | json_values
)
messages = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "assistant", "system", "developer", "tool"]) | json_values,
        "content": st.text(max_size=40) | st.lists(parts, max_size=3) | json_values,
    }
)
bodies = st.fixed_dictionaries(
    {
        "model": st.sampled_from([MODEL_NAME, MODEL_NAME, "other"]) | json_values,
        "messages": st.lists(messages, min_size=1, max_size=4) | json_values,
    },
    optional={
        "temperature": st.floats(-1, 3, allow_nan=False) | json_values,
        "top_p": st.floats(-0.5, 1.5, allow_nan=False) | json_values,
        "max_tokens": st.integers(-2, 80) | json_values,
        "max_completion_tokens": st.integers(-2, 80),
        "stop": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=6) | json_values,
        "seed": st.integers(-5, 2**70) | json_values,
        "n": st.integers(-1, 3) | json_values,
        "stream": st.booleans() | json_values,
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | json_values,
    },
)

good_parts = st.fixed_dictionaries(
    {"type": st.just("text"), "text": st.text(max_size=30)}
) | st.fixed_dictionaries(
    {
        "type": st.just("image_url"),
        "image_url": st.fixed_dictionaries({"url": st.sampled_from([PNG_URL] * 4) | urls}),
    }
)
plausible = st.fixed_dictionaries(
    {
        "model": st.just(MODEL_NAME),
        "messages": st.lists(
            st.fixed_dictionaries(
                {
                    "role": st.sampled_from(["user", "user", "assistant", "system"]),
                    "content": st.text(max_size=30) | st.lists(good_parts, min_size=1, max_size=3),
                }
            ),
            max_size=4,
        ).map(lambda ms: [*ms, {"role": "user", "content": "肝脏?"}]),
    },
    optional={
        "temperature": st.sampled_from([0, 0.0, 0.7, 1.3]),
        "top_p": st.sampled_from([0.5, 1.0]),
        "max_tokens": st.integers(1, 5),
        "stop": st.text(min_size=1, max_size=3),
        "seed": st.integers(0, 1000),
        "stream": st.booleans(),
    },
)


@pytest.fixture(scope="module")
def fuzz_client(checkpoint):
    limits = Limits(max_images=3, max_image_bytes=50_000, max_image_pixels=128 * 128, max_output_tokens=4)
    with (
        Engine.from_checkpoint(checkpoint, limits=limits, max_wait_ms=0) as eng,
        TestClient(create_app(eng, ServerSettings(model_name=MODEL_NAME))) as tc,
    ):
        yield tc


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(body=st.one_of(plausible, plausible, bodies, json_values))
def test_fuzzed_chat_requests_never_give_5xx(fuzz_client, body):
    resp = fuzz_client.post(
        "/v1/chat/completions", content=json.dumps(body), headers={"content-type": "application/json"}
    )
    assert resp.status_code < 500, resp.text
    event(f"status {resp.status_code}")
    if resp.status_code >= 400:
        assert resp.json()["error"]["message"]
    elif resp.headers["content-type"].startswith("text/event-stream"):
        assert resp.text.rstrip().endswith("data: [DONE]"), resp.text
    else:
        ChatCompletion.model_validate(resp.json())
