"""A scripted OpenAI-compatible endpoint on 127.0.0.1 for the LLM client, generator and judge tests.

`ScriptedLLM` answers `POST /v1/.../chat/completions` (Azure deployment paths too), records every request it receives (path,
headers, query, JSON body) and replies according to a script: a queue of actions consumed one per
request (an HTTP error status with headers, a delay longer than the client's timeout, a hold until
the test releases it, or a fixed reply), falling back to a `responder(body) -> content` function.
It runs the standard library's ThreadingHTTPServer in a daemon thread.
"""

from __future__ import annotations

import json
import socket
import threading
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest


def _text(body: dict[str, Any]) -> str:
    parts = []
    for m in body.get("messages", []):
        c = m.get("content")
        parts.append(c if isinstance(c, str) else " ".join(p.get("text", "") for p in c))
    return "\n".join(parts)


class ScriptedLLM:
    """OpenAI-compatible chat endpoint with a request log and a reply script."""

    def __init__(self, responder: Callable[[dict[str, Any]], str] | None = None) -> None:
        self.requests: list[dict[str, Any]] = []
        self.script: deque[dict[str, Any]] = deque()
        self.responder = responder or (lambda body: "ok")
        self.model_name: str | None = None  # served model name; None echoes the requested one
        self.max_tokens_limit: int | None = None  # like our server's Limits.max_output_tokens
        self.reject: Callable[[dict[str, Any]], str | None] = lambda body: None
        """A 400 with this message for requests it returns one for (e.g. a prompt too long)."""
        self.inflight = 0
        self.max_inflight = 0
        self.release = threading.Event()
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                owner._handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    # what the server received
    def bodies(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r["body"] for r in self.requests]

    def received_text(self) -> str:
        return "\n".join(_text(b) for b in self.bodies())

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length", 0))
        raw = h.rfile.read(length)
        url = urlparse(h.path)
        body = json.loads(raw)
        with self._lock:
            self.requests.append(
                {"path": url.path, "query": parse_qs(url.query), "headers": dict(h.headers), "body": body}
            )
            action = self.script.popleft() if self.script else {}
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            if action.get("hold"):
                self.release.wait(30)
            if action.get("delay"):
                threading.Event().wait(action["delay"])
            if not url.path.startswith("/v1/") or not url.path.endswith("/chat/completions"):
                self._send(h, 404, {"error": {"message": f"no route {url.path}"}})
            elif self.max_tokens_limit is not None and (body.get("max_tokens") or 0) > self.max_tokens_limit:
                message = (  # our server's wording (serve/engine.py)
                    f"max_tokens={body['max_tokens']} is above this server's limit of "
                    f"{self.max_tokens_limit} tokens"
                )
                self._send(h, 400, {"error": {"message": message, "param": "max_tokens"}})
            elif self.reject(body):
                self._send(h, 400, {"error": {"message": self.reject(body), "type": "invalid_request_error"}})
            elif action.get("status"):
                self._send(
                    h,
                    action["status"],
                    {"error": {"message": action.get("message", "scripted")}},
                    action.get("headers", {}),
                )
            else:
                content = action["content"] if "content" in action else self.responder(body)
                self._send(h, 200, self._completion(body, content))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test)
        finally:
            with self._lock:
                self.inflight -= 1

    def _completion(self, body: dict[str, Any], content: str) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-{len(self.requests)}",
            "object": "chat.completion",
            "model": self.model_name or body.get("model"),
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
            ],
            "usage": {
                "prompt_tokens": len(_text(body)),
                "completion_tokens": len(content),
                "total_tokens": len(_text(body)) + len(content),
            },
        }

    @staticmethod
    def _send(
        h: BaseHTTPRequestHandler, status: int, payload: Any, headers: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    def __enter__(self) -> ScriptedLLM:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def llm_server():
    with ScriptedLLM() as server:
        yield server


@pytest.fixture
def dead_url():
    """A 127.0.0.1 URL nothing listens on."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}/v1"
