"""One client for OpenAI-compatible chat endpoints (OpenAI, Azure OpenAI, vLLM, SGLang, ours).

What this file owns: turning chat messages into one HTTP request and a `ChatResult`, with
everything a reproducible, cheap and safe batch needs around that one request.

Notable choices:
- One send path. `ChatClient.chat` scrubs every message text with `llava_ultra.scrub.scrub_text`,
  and the request body, the cache key, the dry-run printout and the body on the wire are all
  built from that scrubbed copy; nothing else in the package builds a request. Non-text content
  parts (images) are refused: only text leaves the machine.
- Transport, retries, timeouts and Azure come from the official `openai` SDK
  (`chat.completions.with_raw_response.create`, so the reply's exact JSON is what the cache
  stores): `max_retries = max_attempts - 1`; the SDK retries 408, 409, 429 and 5xx replies,
  timeouts and connection errors with exponential backoff and jitter (0.5 s doubling up to 8 s),
  and a `Retry-After` / `retry-after-ms` header of up to 2 minutes replaces the backoff. Other
  4xx replies fail at once. With `api_version` the client is `openai.AzureOpenAI` (`api-key`
  header, `api-version` query; a base URL without `/deployments/NAME` gets `/deployments/MODEL`
  added). Without an API key the auth header is omitted (local servers). Attempts are counted
  with an httpx request hook, so `Usage.retries` is exact.
- Every failure that ends a request raises `LLMError` naming the URL: an unreachable or
  misconfigured endpoint stops a batch loudly instead of being counted as bad items. A 400 / 413 /
  422 reply is about this one request (too long, filtered, malformed) and raises its subclass
  `RequestRejected`, which batch callers may record as a failed item.
- Reply length sized to the endpoint: when a 400 / 422 reply says `max_tokens` does not fit (our
  own server, vLLM, SGLang and OpenAI all say how much does), the request is re-sent once or twice
  with the largest `max_tokens` that fits, and a server-wide cap is remembered for later requests.
  The cache key keeps the requested value, so a re-run hits the cache. Counted in the usage lines.
- Cache: SQLite (WAL; one connection per thread; safe across threads and processes) keyed by
  sha256 of the canonical JSON of (model, scrubbed messages, sampling parameters, caller extra
  such as a judge repeat index). The base URL and API key are not in the key, so the same model
  behind another URL hits the same entries. Only successful replies are stored.
- Concurrency: a semaphore bounds in-flight requests per client, whatever the caller's threads.
- Accounting: prompt/completion tokens from each reply's `usage`, priced per model from
  `PRICES` (USD per 1M tokens, longest-prefix match on the model name; override per run).
- Dry run: prints the exact request (URL, non-secret headers, JSON body) that would be sent and
  sends nothing; cache hits are served as usual because they would not be sent either (the cache
  is opened read-only and never created). The usage lines then give an estimate for what was
  printed: prompt tokens counted from the scrubbed text (`estimate_tokens`: one token per CJK
  character, one per 4 other characters, 4 per message), reply tokens at most `max_tokens` each,
  and the cost of that at the model's price (an upper bound for the replies).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import sys
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import openai

from ..errors import ConfigError, LlavaUltraError
from ..scrub import scrub_text

DEFAULT_KEY_ENVS = ("LLAVA_ULTRA_LLM_API_KEY", "OPENAI_API_KEY")
RETRY_STATUSES = frozenset({408, 409, 429})
"""Statuses the SDK retries (with every 5xx); after its last try they end in "failed N time(s)"."""
# USD per 1M (input, output) tokens: public list prices (mid 2025); check your provider's page.
# Matched by the longest prefix of the model name, so dated snapshots inherit their family's price.
PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4-turbo": (10.00, 30.00),
    "gpt-3.5-turbo": (0.50, 1.50),
    "deepseek-chat": (0.27, 1.10),
}


class LLMError(LlavaUltraError):
    """The endpoint is unreachable, refused the request, or kept failing after every retry."""


class RequestRejected(LLMError):
    """The endpoint refused this one request (HTTP 400, 413 or 422: too long, filtered, malformed);
    other requests may well succeed, so a batch can record the item and go on."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


ITEM_STATUSES = frozenset({400, 413, 422})
# How endpoints say that max_tokens does not fit; each gives the largest value that does.
_CAP_PATTERNS = (  # a limit on every request's reply length (remembered)
    re.compile(r"max_tokens=\d+ is above this server's limit of (\d+) tokens"),  # ours
    re.compile(r"supports at most (\d+) completion tokens"),  # OpenAI
)
_ROOM_PATTERNS = (  # the room this request's prompt leaves in the context
    re.compile(r"ask for at most (\d+) tokens"),  # ours
)
_CONTEXT_PATTERNS = (  # (context, prompt) -> room = context - prompt
    re.compile(
        r"maximum context length is (\d+) tokens\. However, you requested \d+ tokens \((\d+) in the messages"
    ),
    re.compile(r"maximum context length is (\d+) tokens and your request has (\d+) input tokens"),  # vLLM
)
_CJK = re.compile(r"[\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uff00-\uffef]")


def estimate_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    """Prompt tokens of chat `messages`, estimated without the model's tokenizer: one per CJK
    character, one per 4 other characters, 4 per message (role and separators). Within about 25%
    of GPT-4o's tokenizer on our report prompts; used for dry-run estimates only."""
    total = 0
    for message in messages:
        content = message.get("content")
        text = (
            content if isinstance(content, str) else " ".join(str(p.get("text", "")) for p in content or [])
        )
        cjk = len(_CJK.findall(text))
        total += 4 + cjk + -(-(len(text) - cjk) // 4)
    return total


def fitting_max_tokens(error: str) -> tuple[int | None, bool]:
    """From an endpoint's error text: the largest max_tokens that fits (None when the error is about
    something else) and whether that limit holds for every request (a server cap)."""
    for pattern in _CAP_PATTERNS:
        if m := pattern.search(error):
            return int(m.group(1)), True
    for pattern in _ROOM_PATTERNS:
        if m := pattern.search(error):
            return int(m.group(1)), False
    for pattern in _CONTEXT_PATTERNS:
        if m := pattern.search(error):
            return int(m.group(1)) - int(m.group(2)), False
    return None, False


# --------------------------------------------------------------------------------- config


@dataclass
class ClientConfig:
    """Where and how to send chat requests."""

    base_url: str
    """Endpoint root ending before `/chat/completions`, e.g. `https://api.openai.com/v1`,
    `http://127.0.0.1:8000/v1`, `https://RES.openai.azure.com/openai/deployments/DEPLOYMENT`."""
    model: str
    """Model name sent in every request and part of the cache key; pin a dated snapshot."""
    api_key_env: tuple[str, ...] = DEFAULT_KEY_ENVS
    """Environment variables tried in order for the API key; none set = no auth header (local servers)."""
    api_version: str | None = None
    """Azure `api-version` query value; when set the key goes in an `api-key` header."""
    timeout: float = 60.0
    """Seconds per HTTP request (connect + read)."""
    max_attempts: int = 5
    """Tries per request, the first one included (the SDK's max_retries + 1)."""
    concurrency: int = 4
    """Most requests in flight at once."""
    cache: Path | None = None
    """SQLite file for replies; None disables caching."""
    dry_run: bool = False
    """Print what would be sent, send nothing."""
    temperature: float = 0.0
    """Sampling temperature (0 for judging)."""
    max_tokens: int | None = 1024
    """Reply length cap sent with each request (None: the server's default)."""
    json_mode: bool = False
    """Send `response_format: {"type": "json_object"}` (OpenAI, vLLM, SGLang)."""
    price: tuple[float, float] | None = None
    """(input, output) USD per 1M tokens; None looks the model up in `PRICES`."""

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"LLM base URL {self.base_url!r} is not an http(s) URL; pass e.g. "
                "--base-url http://127.0.0.1:8000/v1 or https://api.openai.com/v1"
            )
        if not self.model.strip():
            raise ConfigError("LLM model name is empty; pass the model (e.g. --model gpt-4o-2024-08-06)")
        if isinstance(self.api_key_env, str):
            self.api_key_env = tuple(n.strip() for n in self.api_key_env.split(",") if n.strip())
        if self.timeout <= 0:
            raise ConfigError(f"LLM timeout must be positive seconds, got {self.timeout}")
        if self.max_attempts < 1 or self.concurrency < 1:
            raise ConfigError(
                f"LLM max_attempts ({self.max_attempts}) and concurrency ({self.concurrency}) must be >= 1"
            )
        if self.cache is not None:
            self.cache = Path(self.cache)
        if self.price is not None:
            if len(self.price) != 2 or min(self.price) < 0:
                raise ConfigError(
                    f"price {self.price}: give USD per 1M input and output tokens, e.g. --price 0.15,0.60"
                )
            self.price = (float(self.price[0]), float(self.price[1]))

    def api_key(self) -> str | None:
        for name in self.api_key_env:
            if os.environ.get(name):
                return os.environ[name]
        return None


def parse_price(text: str | None) -> tuple[float, float] | None:
    """'IN,OUT' (USD per 1M tokens) -> (IN, OUT); None/'' -> None."""
    if not text:
        return None
    try:
        a, b = (float(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(
            f"price {text!r} is not 'IN,OUT' (USD per 1M tokens), e.g. --price 0.15,0.60"
        ) from None
    if a < 0 or b < 0:
        raise ConfigError(f"price {text!r} is negative; give USD per 1M input and output tokens")
    return a, b


def price_for(model: str, override: tuple[float, float] | None = None) -> tuple[float, float] | None:
    """(input, output) USD per 1M tokens for `model`: the override, else the longest PRICES prefix."""
    if override is not None:
        return override
    hits = [name for name in PRICES if model.startswith(name)]
    return PRICES[max(hits, key=len)] if hits else None


# ------------------------------------------------------------------------------- scrubbing


def scrub_messages(messages: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], Counter[str]]:
    """A copy of `messages` with every text scrubbed, and what was removed (kind -> count).

    Content may be a string or a list of `{"type": "text", "text": ...}` parts; any other part
    (an image) raises LLMError: this client sends text only.
    """
    found: Counter[str] = Counter()
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "user", "assistant"):
            raise LLMError(f"message {i} has role {role!r}; use system, user or assistant")
        if isinstance(content, str):
            result = scrub_text(content)
            found.update(kind for kind, _ in result.found)
            out.append({"role": role, "content": result.text})
        elif isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, Mapping) or part.get("type") != "text":
                    raise LLMError(
                        f"message {i} has a non-text content part {part!r}; only text is sent to the LLM"
                    )
                result = scrub_text(str(part.get("text", "")))
                found.update(kind for kind, _ in result.found)
                parts.append({"type": "text", "text": result.text})
            out.append({"role": role, "content": parts})
        else:
            raise LLMError(f"message {i} content is {type(content).__name__}; give a string")
    return out, found


def cache_key(model: str, messages: Sequence[Mapping[str, Any]], params: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of (model, messages, params): base-URL independent."""
    blob = json.dumps(
        {"model": model, "messages": messages, "params": params},
        ensure_ascii=False,
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------- cache


class ReplyCache:
    """SQLite table key -> (request JSON, response JSON); one connection per thread, WAL mode."""

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self._local = threading.local()
        if read_only:  # dry run: serve what is there, create and write nothing
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._conn() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, model TEXT, "
                "request TEXT NOT NULL, response TEXT NOT NULL, created REAL NOT NULL)"
            )

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None and self.read_only:
            conn = sqlite3.connect(f"{self.path.absolute().as_uri()}?mode=ro", uri=True, timeout=60.0)
            self._local.conn = conn
        elif conn is None:
            conn = sqlite3.connect(self.path, timeout=60.0)
            conn.execute("PRAGMA journal_mode=WAL")
            self._local.conn = conn
        return conn

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            row = self._conn().execute("SELECT response FROM replies WHERE key = ?", (key,)).fetchone()
        except sqlite3.OperationalError:
            if not self.read_only:
                raise
            return None  # read-only (dry run) on a file without the table: nothing cached
        return json.loads(row[0]) if row else None

    def put(self, key: str, model: str, request: Mapping[str, Any], response: Mapping[str, Any]) -> None:
        if self.read_only:
            return
        with self._conn() as conn:  # one transaction: the row is written whole or not at all
            conn.execute(
                "INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?, ?)",
                (
                    key,
                    model,
                    json.dumps(request, ensure_ascii=False),
                    json.dumps(response, ensure_ascii=False),
                    time.time(),
                ),
            )

    def __len__(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM replies").fetchone()[0]


# ------------------------------------------------------------------------------ accounting


@dataclass
class Usage:
    """Counters for one client; thread-safe through `add`."""

    sent: int = 0
    cache_hits: int = 0
    dry_run: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    cached_completion_tokens: int = 0
    resized: int = 0
    """Requests re-sent with a smaller max_tokens that fits the endpoint."""
    dry_run_prompt_tokens: int = 0
    """Estimated prompt tokens of the requests a dry run printed (`estimate_tokens`)."""
    dry_run_completion_tokens: int = 0
    """At most this many reply tokens for them (their max_tokens; 0 where none was set)."""
    dry_run_unbounded: int = 0
    """Printed requests without a max_tokens (their reply length is the server's choice)."""
    scrubbed: Counter[str] = field(default_factory=Counter)
    served_models: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: Any) -> None:
        with self._lock:
            for name, value in counts.items():
                if name in ("scrubbed", "served_models"):
                    getattr(self, name).update(value)
                else:
                    setattr(self, name, getattr(self, name) + value)

    def _render_estimate(self, model: str, price: tuple[float, float] | None) -> str:
        n_in, n_out = self.dry_run_prompt_tokens, self.dry_run_completion_tokens
        line = f"  dry run estimate for the {self.dry_run} printed requests: ~{n_in} tokens in + at most {n_out} out"
        if self.dry_run_unbounded:
            line += f" ({self.dry_run_unbounded} without max_tokens not included)"
        if price is None:
            return line + f"; cost unknown (no price for {model!r}; pass --price IN,OUT)"
        low, high = n_in * price[0] / 1e6, (n_in * price[0] + n_out * price[1]) / 1e6
        return line + f"; cost ~{_usd(low)} for the prompts, at most {_usd(high)} with the replies"

    def cost(self, price: tuple[float, float] | None) -> float | None:
        if price is None:
            return None
        return (self.prompt_tokens * price[0] + self.completion_tokens * price[1]) / 1e6

    def render(self, model: str, price: tuple[float, float] | None) -> str:
        lines = [
            f"llm {model}: {self.sent} requests sent, {self.cache_hits} cache hits, {self.retries} retries"
            + (f", {self.dry_run} printed by dry run (nothing sent)" if self.dry_run else ""),
            f"  tokens: {self.prompt_tokens} in + {self.completion_tokens} out"
            f" (cache hits saved {self.cached_prompt_tokens} in + {self.cached_completion_tokens} out)",
        ]
        if self.resized:
            lines.append(
                f"  {self.resized} request(s) sized down to the max_tokens the endpoint accepts (its stated limits)"
            )
        if self.dry_run and not self.sent:  # nothing was sent: the estimate replaces the $0 lines
            if self.cache_hits:
                lines[1] = (
                    f"  cache hits saved {self.cached_prompt_tokens} in + {self.cached_completion_tokens} out"
                )
            else:
                del lines[1]
            lines.append(self._render_estimate(model, price))
        else:
            cost = self.cost(price)
            if cost is None:
                lines.append(
                    f"  cost: unknown (no price for {model!r}; pass --price IN,OUT in USD per 1M tokens)"
                )
            else:
                lines.append(f"  cost: ${cost:.4f} at ${price[0]}/1M in, ${price[1]}/1M out")
        if self.scrubbed:
            kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.scrubbed.items()))
            lines.append(f"  scrubbed before sending (occurrences over all requests): {kinds}")
        served = {m for m in self.served_models if m != model}
        if served:
            lines.append(f"  note: the endpoint answered as {', '.join(sorted(served))} (requested {model})")
        return "\n".join(lines)


def _usd(amount: float) -> str:
    """Dollars with 4 decimals, or 3 significant digits below a cent (never a misleading $0.0000)."""
    return f"${amount:.4f}" if amount >= 0.01 or amount == 0 else f"${amount:.3g}"


@dataclass(frozen=True)
class ChatResult:
    """One reply: content is None in dry-run mode."""

    content: str | None
    key: str
    served_model: str | None = None
    usage: dict[str, int] = field(default_factory=dict)
    cached: bool = False
    dry_run: bool = False


# ---------------------------------------------------------------------------------- client


class _Attempts(threading.local):
    """HTTP requests sent by the current thread's `chat` call (an httpx request hook counts them)."""

    n = 0


class ChatClient:
    """Chat completions with scrubbing, caching, a concurrency cap and accounting, sent through the
    `openai` SDK (which owns retries, timeouts and Azure)."""

    def __init__(self, config: ClientConfig, *, out: TextIO | None = None) -> None:
        self.config = config
        self.usage = Usage()
        self.out = out if out is not None else sys.stdout
        self._slots = threading.Semaphore(config.concurrency)
        self._print_lock = threading.Lock()
        self._cache: ReplyCache | None = None
        if config.cache is not None and not config.dry_run:
            self._cache = ReplyCache(config.cache)
        elif config.cache is not None and Path(config.cache).is_file():
            self._cache = ReplyCache(config.cache, read_only=True)
        self._max_tokens_cap: int | None = None
        """A reply-length limit the endpoint stated for every request (learned from a 4xx)."""
        self._attempts = _Attempts()
        self._key = config.api_key()
        self._sdk = self._make_sdk()

    def _make_sdk(self) -> openai.OpenAI:
        """The SDK client; no network until the first request (a dry run never sends one)."""

        def count(_request: Any) -> None:
            self._attempts.n += 1

        common: dict[str, Any] = {
            "base_url": self.config.base_url,
            # The SDK insists on a key; without one the auth header is omitted per request.
            "api_key": self._key or "no-key",
            "timeout": self.config.timeout,
            "max_retries": self.config.max_attempts - 1,
            "http_client": openai.DefaultHttpxClient(event_hooks={"request": [count]}),
        }
        if self.config.api_version:
            return openai.AzureOpenAI(api_version=self.config.api_version, **common)
        return openai.OpenAI(**common)

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sdk.close()

    @property
    def url(self) -> str:
        """Where requests go: the base URL's /chat/completions (Azure: under /deployments/MODEL
        unless the base URL names a deployment), as the SDK builds it."""
        base = self.config.base_url.rstrip("/")
        if self.config.api_version and "/deployments" not in base:
            base += f"/deployments/{self.config.model}"
        return base + "/chat/completions"

    @property
    def price(self) -> tuple[float, float] | None:
        return price_for(self.config.model, self.config.price)

    def render_usage(self) -> str:
        return self.usage.render(self.config.model, self.price)

    def _params(self, temperature: float | None, max_tokens: int | None) -> dict[str, Any]:
        params: dict[str, Any] = {
            "temperature": self.config.temperature if temperature is None else temperature
        }
        limit = self.config.max_tokens if max_tokens is None else max_tokens
        if limit is not None:
            params["max_tokens"] = limit
        if self.config.json_mode:
            params["response_format"] = {"type": "json_object"}
        return params

    def request_key(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        temperature: float | None = None,
        max_tokens: int | None = None,
        cache_extra: Mapping[str, Any] | None = None,
    ) -> str:
        """The cache key `chat` would use for these arguments (scrubbing included)."""
        clean, _ = scrub_messages(messages)
        params = self._params(temperature, max_tokens)
        return cache_key(
            self.config.model, clean, {**params, **({"extra": dict(cache_extra)} if cache_extra else {})}
        )

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        temperature: float | None = None,
        max_tokens: int | None = None,
        cache_extra: Mapping[str, Any] | None = None,
    ) -> ChatResult:
        """Send `messages` (scrubbed first) and return the reply; the only way out of the machine.

        `cache_extra` goes into the cache key only (e.g. {"repeat": 2} for independent judge
        repeats); it is never sent.
        """
        clean, found = scrub_messages(messages)
        params = self._params(temperature, max_tokens)
        key = cache_key(
            self.config.model, clean, {**params, **({"extra": dict(cache_extra)} if cache_extra else {})}
        )
        body = {"model": self.config.model, "messages": clean, **params}
        self.usage.add(scrubbed=found)
        if self._cache is not None:
            hit = self._cache.get(key)
            if hit is not None:
                usage = _usage_of(hit)
                self.usage.add(
                    cache_hits=1,
                    cached_prompt_tokens=usage.get("prompt_tokens", 0),
                    cached_completion_tokens=usage.get("completion_tokens", 0),
                )
                return ChatResult(_content_of(hit, self.url), key, hit.get("model"), usage, cached=True)
        if self.config.dry_run:
            self._print_request(body)
            limit = body.get("max_tokens")
            self.usage.add(
                dry_run=1,
                dry_run_prompt_tokens=estimate_tokens(clean),
                dry_run_completion_tokens=limit or 0,
                dry_run_unbounded=0 if limit else 1,
            )
            return ChatResult(None, key, dry_run=True)
        with self._slots:
            reply = self._send(body)
        usage = _usage_of(reply)
        content = _content_of(reply, self.url)
        self.usage.add(
            sent=1,
            prompt_tokens=usage.get("prompt_tokens", 0),
            completion_tokens=usage.get("completion_tokens", 0),
            served_models=[reply.get("model") or self.config.model],
        )
        if self._cache is not None:
            self._cache.put(key, self.config.model, body, reply)
        return ChatResult(content, key, reply.get("model"), usage)

    def _auth_header(self) -> str:
        return "api-key" if self.config.api_version else "Authorization"

    def _print_request(self, body: Mapping[str, Any]) -> None:
        query = f"?api-version={self.config.api_version}" if self.config.api_version else ""
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers[self._auth_header()] = "***"
        text = json.dumps(body, ensure_ascii=False, indent=2)
        with self._print_lock:
            print(f"--- dry run: POST {self.url}{query}", file=self.out)
            print(f"headers: {json.dumps(headers)}", file=self.out)
            print(text, file=self.out, flush=True)

    def _post(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """One SDK call (its own retries included); the single network call site."""
        omit = {} if self._key else {self._auth_header(): openai.Omit()}
        raw = self._sdk.chat.completions.with_raw_response.create(**body, extra_headers=omit)
        try:
            payload = raw.http_response.json()
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            raise LLMError(
                f"{self.url} answered HTTP 200 with a body that is not a JSON object: "
                f"{raw.http_response.text[:200]!r}; is this an OpenAI-compatible /chat/completions endpoint?"
            )
        return payload

    def _send(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """POST `body` (already scrubbed); sizes max_tokens down to what the endpoint accepts."""
        body = dict(body)
        cap = self._max_tokens_cap
        if cap is not None and body.get("max_tokens") is not None and body["max_tokens"] > cap:
            body["max_tokens"] = cap
            self.usage.add(resized=1)
        for resizes in range(3):
            self._attempts.n = 0
            try:
                return self._post(body)
            except openai.APIStatusError as exc:
                status, message = exc.status_code, _error_message(exc.response)
                last = f"HTTP {status}: {exc.response.text[:300]}"
                if status in ITEM_STATUSES:
                    fits, server_wide = fitting_max_tokens(message)
                    asked = body.get("max_tokens")
                    if fits is not None and fits >= 1 and asked is not None and fits < asked and resizes < 2:
                        body["max_tokens"] = fits  # not a failure of the endpoint: sized to fit
                        if server_wide:
                            self._max_tokens_cap = fits
                        self.usage.add(resized=1)
                        continue
                    raise RequestRejected(
                        f"{self.url} refused the request ({last}); {_hint(status)}", status
                    ) from None
                if status not in RETRY_STATUSES and status < 500:
                    raise LLMError(f"{self.url} refused the request ({last}); {_hint(status)}") from None
                raise self._exhausted(last) from None
            except openai.APITimeoutError:
                raise self._exhausted(f"timed out after {self.config.timeout}s") from None
            except openai.APIConnectionError as exc:
                cause = exc.__cause__ or exc
                raise self._exhausted(f"connection failed ({type(cause).__name__}: {cause})") from None
            finally:
                self.usage.add(retries=max(0, self._attempts.n - 1))
        raise AssertionError("unreachable: the loop returns or raises")

    def _exhausted(self, last: str) -> LLMError:
        return LLMError(
            f"LLM endpoint {self.url} failed {max(1, self._attempts.n)} time(s); last error: {last}. "
            "Check that the server is running and the URL is right (--base-url / --llm-base-url), "
            "or raise --max-attempts / --timeout"
        )


def _error_message(response: Any) -> str:
    """The `error.message` of an OpenAI-style error body, else the body's text."""
    try:
        payload = response.json()
        message = payload["error"]["message"] if isinstance(payload.get("error"), dict) else payload["error"]
        return str(message)
    except (ValueError, KeyError, TypeError, AttributeError):
        return response.text


def _hint(status: int) -> str:
    if status in (401, 403):
        return (
            "set the API key in one of "
            + ", ".join(DEFAULT_KEY_ENVS)
            + " (or the variable named by --api-key-env)"
        )
    if status == 404:
        return "check the base URL (it should end before /chat/completions) and the model / deployment name"
    return "check the model name and request parameters"


def _usage_of(reply: Mapping[str, Any]) -> dict[str, int]:
    usage = reply.get("usage") or {}
    return {
        k: int(usage[k])
        for k in ("prompt_tokens", "completion_tokens")
        if isinstance(usage.get(k), int | float)
    }


def _content_of(reply: Mapping[str, Any], url: str) -> str:
    try:
        content = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise LLMError(
            f"{url} replied without choices[0].message.content: {json.dumps(reply)[:300]}; "
            "is this an OpenAI-compatible chat endpoint?"
        ) from None
    return content if isinstance(content, str) else ""
