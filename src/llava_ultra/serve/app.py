"""The OpenAI-compatible HTTP server (FastAPI) in front of an `Engine`, and the web page.

Routes: `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/chat/completions` (plain JSON or
`stream: true` server-sent events), `GET /health`, `GET /openapi.json` (+ `/docs`), `GET /` (the
web page, a client of the same chat API) and `/static/*`.

Notable choices:
- Every error, ours or FastAPI's (validation 422s become 400s, unknown routes, bodies too large,
  crashes), is answered in OpenAI's format `{"error": {"message", "type", "param", "code"}}` with
  the message naming the problem (values echoed back are cut short); the web page shows that
  message as it is.
- One pure-ASGI middleware (`Guard`) sits in front of everything: URL above `MAX_URL_BYTES` -> 414,
  headers above `MAX_HEADER_BYTES` -> 431, then auth for `/v1/`, then the body (408 if it takes
  longer than `body_timeout_s` to arrive). The body limit
  (`body_limit`) is counted on the bytes as they arrive, so it holds for chunked uploads too: past
  the limit the request gets 413 at once and uvicorn discards the rest of the upload without
  buffering it (the connection stays usable, no reset). uvicorn runs with the h11 protocol and a
  2 MiB header buffer (`uvicorn_config`), so 1 MB of headers still gets its 431, not a reset.
- The request path does nothing heavy on the event loop: JSON parsing, validation, image decoding,
  tokenising and image preprocessing run in worker threads (at most `preprocess_concurrency` at
  once), and text length is checked before anything tokenises it; `/health` always answers.
- Auth runs before the body is read (so an unauthenticated caller learns nothing, not even whether
  its JSON was valid); the key is compared in constant time. `/`, `/health` and the OpenAPI
  document are public; the web page asks for the key and sends it as a Bearer token.
- A client that disconnects cancels its request, streamed or not: its row in the running batch
  ends at the next decoding step (or it never starts, if it was still queued). A streamed answer
  that fails midway ends with a `data: {"error": ...}` event (the `openai` client raises it).
- OpenAI fields that would change the answer and that this server does not implement (`logprobs`,
  `tools`, `response_format` other than text, penalties, `logit_bias`, `n` > 1) get a 400 naming
  the field; a temperature below `GREEDY_BELOW` (1e-5) is greedy.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from .engine import (
    GREEDY_BELOW,
    ChatResult,
    Engine,
    Event,
    Limits,
    Message,
    Prepared,
    RequestError,
    SamplingParams,
    check_text_size,
    clip_text,
)
from .images import ImagePolicy, load_image_url
from .schemas import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ErrorResponse,
    Health,
    ImagePart,
    ModelCard,
    ModelList,
    TextPart,
)

STATIC = resources.files("llava_ultra") / "serve" / "static"
ERROR_TYPES = {401: "authentication_error", 404: "invalid_request_error", 503: "server_error"}
MAX_URL_BYTES = 8 * 2**10
"""Request target (path + query) longer than this -> 414."""
MAX_HEADER_BYTES = 64 * 2**10
"""All request headers together longer than this -> 431."""
PROTOCOL_BUFFER_BYTES = 2 * 2**20
"""uvicorn/h11 buffers at most this much of a request line + headers; beyond, h11 answers 400 and
closes. Above MAX_URL_BYTES / MAX_HEADER_BYTES so that oversized heads get their 414 / 431."""


@dataclass(frozen=True)
class ServerSettings:
    """How the app presents the engine."""

    model_name: str
    """The id clients pass as `model`."""
    api_key: str | None = None
    """When set, /v1/ routes need `Authorization: Bearer <api_key>`."""
    image_policy: ImagePolicy = field(default_factory=ImagePolicy)
    """Where images may come from besides data URLs."""
    body_timeout_s: float = 60.0
    """A request body must arrive within this many seconds (else 408): a slow upload cannot hold
    the server's body buffer forever."""
    preprocess_concurrency: int = 4
    """Requests parsed, decoded and preprocessed at the same time (each in a worker thread); the
    server's transient memory is at most this many times the per-request bound (docs/serving.md)."""


def body_limit(limits: Limits) -> int:
    """The largest request body: `max_images` base64 images at the byte limit, `max_text_chars`
    characters JSON-escaped (at most 12 bytes each, an escaped surrogate pair), and 1 MiB for the
    JSON structure and the other fields."""
    return (
        limits.max_images * (-(-limits.max_image_bytes * 4 // 3) + 1024) + 12 * limits.max_text_chars + 2**20
    )


TOKENISER_BYTES_PER_CHAR = 2048
"""Bound on what tokenising one character costs (ids, offsets and the Python list of ids; measured
at about 1 KiB for 4-byte characters, which a byte-level BPE splits into 4 tokens)."""


def request_memory_bound(limits: Limits, clip_side: int, sam_side: int | None = None) -> int:
    """Worst-case bytes one request can make the server allocate, from the limits alone (the formula
    of docs/serving.md, "Memory per request"); `clip_side` / `sam_side` are the encoders' input sides.

    body: the raw body (a bytearray grown in place, up to 1/8 slack) and the strings parsed from it,
    9/4 * body_limit. Decoding, one image at a
    time: its base64 text and bytes (7/3 B), the decoded pixels and their RGB copy (Pillow keeps at
    most 4 bytes per pixel: 8 P) and the downscaled copy (4 K, K = min(P, L^2) pixels kept). Kept
    until answered: k images of 4 K bytes. Preprocessing: k padded canvases plus one RGB copy, each
    at most 4 min(L^2, A P) bytes, and the float32 pixel tensors twice (list and stack). Text:
    `TOKENISER_BYTES_PER_CHAR` per character."""
    b, p, k = limits.max_image_bytes, limits.max_image_pixels, limits.max_images
    side = limits.max_image_side
    kept = min(p, side * side)
    canvas = min(side * side, int(limits.max_aspect_ratio * p))
    tensors = 2 * k * 3 * 4 * (clip_side**2 + (sam_side or 0) ** 2)
    return (
        9 * body_limit(limits) // 4
        + (7 * b) // 3
        + 8 * p
        + 4 * kept
        + k * 4 * kept
        + (k + 1) * 4 * canvas
        + tensors
        + TOKENISER_BYTES_PER_CHAR * limits.max_text_chars
    )


def uvicorn_options() -> dict[str, Any]:
    """uvicorn settings the server relies on: the h11 protocol (its header buffer is bounded, unlike
    httptools') with room for `PROTOCOL_BUFFER_BYTES`, so oversized heads are answered by `Guard`."""
    return {"http": "h11", "h11_max_incomplete_event_size": PROTOCOL_BUFFER_BYTES}


def uvicorn_config(app: Any, host: str = "127.0.0.1", port: int = 8000, **kwargs: Any) -> uvicorn.Config:
    """A uvicorn.Config with `uvicorn_options()` (for servers run in a thread, e.g. by tests)."""
    return uvicorn.Config(app, host=host, port=port, **uvicorn_options(), **kwargs)


class APIError(Exception):
    """An error answered in OpenAI's format."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)


def _from_exception(exc: BaseException) -> tuple[int, dict]:
    if isinstance(exc, RequestError):
        return exc.status, error_body(exc.status, exc.message, exc.param, exc.code)
    message = f"the model failed on this request ({type(exc).__name__}: {clip_text(str(exc), 300)}); see the server log"
    return 500, error_body(500, message, None, "internal_error")


def _validation_message(errors: list[dict]) -> tuple[str, str | None]:
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "not JSON")
        return (
            f"the request body is not valid JSON ({clip_text(str(detail), 120)}); send a JSON object",
            None,
        )
    if not loc and first.get("type") == "missing":
        return "the request body is missing; send a JSON object with 'model' and 'messages'", None
    parts = []
    for err in errors[:3]:
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
        parts.append(f"{clip_text(where, 80)}: {clip_text(str(err.get('msg', 'invalid')), 200)}")
    more = f" (and {len(errors) - 3} more problems)" if len(errors) > 3 else ""
    return "invalid request: " + "; ".join(parts) + more, clip_text(".".join(loc), 80) or None


def parse_request(data: bytes | bytearray) -> ChatCompletionRequest:
    """The body of POST /v1/chat/completions -> the validated request (RequestError if invalid)."""
    if not data or data.isspace():
        raise RequestError("the request body is missing; send a JSON object with 'model' and 'messages'")
    try:
        return ChatCompletionRequest.model_validate_json(data)
    except ValidationError as exc:
        message, param = _validation_message(exc.errors(include_url=False, include_input=False))
        raise RequestError(message, param=param, code="invalid_request") from None
    except (ValueError, RecursionError) as exc:  # e.g. numbers beyond what Python converts
        raise RequestError(
            f"the request body could not be read ({type(exc).__name__}: {clip_text(str(exc), 120)})",
            code="invalid_request",
        ) from None


def refuse_unsupported(body: ChatCompletionRequest) -> None:
    """A 400 for every field that would change the answer and that this server does not implement."""

    def refuse(param: str, what: str) -> RequestError:
        return RequestError(
            f"{param}={clip_text(getattr(body, param))} is not supported by this server ({what}); "
            f"leave it out",
            param=param,
            code="unsupported_parameter",
        )

    if body.logprobs:
        raise refuse("logprobs", "it returns text without log-probabilities")
    if body.top_logprobs not in (None, 0):
        raise refuse("top_logprobs", "it returns text without log-probabilities")
    for name in ("tools", "functions"):
        if getattr(body, name):
            raise refuse(name, "no tool or function calling")
    for name in ("tool_choice", "function_call"):
        if getattr(body, name) not in (None, "none"):
            raise refuse(name, "no tool or function calling")
    if body.response_format is not None and body.response_format.get("type") != "text":
        raise refuse("response_format", "answers are plain text; only {'type': 'text'}")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(body, name) not in (None, 0):
            raise refuse(name, "no repetition penalties; only 0")
    if body.logit_bias:
        raise refuse("logit_bias", "no logit bias")
    if body.modalities is not None and list(body.modalities) != ["text"]:
        raise refuse("modalities", "text output only")
    for name in ("audio", "prediction", "web_search_options"):
        if getattr(body, name) is not None:
            raise refuse(name, "not implemented")


def to_messages(body: ChatCompletionRequest, limits: Limits, policy: ImagePolicy) -> list[Message]:
    """OpenAI messages -> engine messages, decoding (and checking) every image. Text length and the
    image count are checked before any image is decoded."""
    chars = 0
    n_images = 0
    for msg in body.messages:
        if isinstance(msg.content, str):
            chars += len(msg.content)
        elif msg.content is not None:
            texts = [len(part.text) for part in msg.content if isinstance(part, TextPart)]
            chars += sum(texts) + max(0, len(texts) - 1)  # as the engine will count them: joined by "\n"
            n_images += len(msg.content) - len(texts)
    check_text_size(chars, limits)
    if n_images > limits.max_images:  # refuse before decoding any of them
        raise RequestError(
            f"{n_images} images in this request, above this server's limit of {limits.max_images}; "
            f"send fewer frames",
            param="messages",
            code="too_many_images",
        )
    out = []
    for i, msg in enumerate(body.messages):
        role = "system" if msg.role == "developer" else msg.role
        if msg.content is None or isinstance(msg.content, str):
            out.append(Message(role, msg.content or ""))
            continue
        texts, images = [], []
        for j, part in enumerate(msg.content):
            if isinstance(part, TextPart):
                texts.append(part.text)
            elif isinstance(part, ImagePart):
                url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
                images.append(load_image_url(url, limits, policy, f"messages[{i}].content[{j}].image_url"))
        out.append(Message(role, "\n".join(texts), images))
    return out


def to_params(body: ChatCompletionRequest) -> SamplingParams:
    if body.n not in (None, 1):
        raise RequestError(
            f"n={clip_text(body.n)} is not supported; this server returns one choice (n=1)",
            param="n",
            code="unsupported_parameter",
        )
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if body.max_tokens is not None and max_tokens != body.max_tokens:
        raise RequestError(
            f"max_tokens={clip_text(body.max_tokens)} and max_completion_tokens="
            f"{clip_text(body.max_completion_tokens)} disagree; send one of them",
            param="max_tokens",
        )
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    temperature = body.temperature if body.temperature is not None else 0.0
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=0.0 if temperature < GREEDY_BELOW else temperature,
        top_p=body.top_p if body.top_p is not None else 1.0,
        stop=stop,
        seed=body.seed,
    )


def _selection(result: ChatResult) -> dict | None:
    return result.selection.to_dict() if result.selection is not None else None


def _usage(result: ChatResult) -> dict:
    total = result.prompt_tokens + result.completion_tokens
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": total,
    }


Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class Guard:
    """ASGI middleware: URL and header size limits, auth for `/v1/`, and the body limit counted as
    the bytes arrive (Content-Length or chunked). The body is read here, whole, only while it is
    within the limit (in one bytearray grown in place), and handed to the app as one message."""

    def __init__(self, app: Any, *, api_key: str | None, max_body: int, body_timeout_s: float = 60.0) -> None:
        self.app, self.api_key, self.max_body, self.body_timeout_s = app, api_key, max_body, body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self.check_head(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body:
            await self.too_large(f"{int(declared)} bytes")(scope, receive, send)
            return
        body = bytearray()
        deadline = time.monotonic() + self.body_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                del body[:]
                await error_response(
                    408,
                    f"the request body did not arrive within {self.body_timeout_s:g} s; send it faster",
                    code="request_timeout",
                )(scope, receive, send)
                return
            if message["type"] != "http.request":  # the client left before sending its body
                return
            chunk = message.get("body", b"")
            if len(body) + len(chunk) > self.max_body:
                del body[:]
                await self.too_large(f"more than {self.max_body} bytes")(scope, receive, send)
                return  # uvicorn discards the rest of the upload as it arrives
            body += chunk  # grown in place chunk by chunk: no large copy stalls the event loop
            if not message.get("more_body", False):
                break
        whole = [body]
        del body

        async def replay() -> dict[str, Any]:
            if whole:
                return {"type": "http.request", "body": whole.pop(), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def too_large(self, size: str) -> JSONResponse:
        return error_response(
            413,
            f"the request body is {size}, above this server's limit of {self.max_body} bytes (set by "
            f"the image and text limits); send fewer or smaller images or less text",
            code="request_too_large",
        )

    def check_head(self, scope: Scope) -> JSONResponse | None:
        target = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
        if target > MAX_URL_BYTES:
            return error_response(
                414,
                f"the URL is {target} bytes, above this server's limit of {MAX_URL_BYTES}",
                code="uri_too_long",
            )
        head = sum(len(k) + len(v) + 4 for k, v in scope["headers"])
        if head > MAX_HEADER_BYTES:
            return error_response(
                431,
                f"the request headers are {head} bytes, above this server's limit of {MAX_HEADER_BYTES}",
                code="headers_too_large",
            )
        if not (self.api_key and scope["path"].startswith("/v1/")):
            return None
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1").strip()
        scheme, _, token = header.partition(" ")
        hint = (
            "send the header 'Authorization: Bearer <key>' (the key given to `llava-ultra serve --api-key`)"
        )
        if not header:
            return error_response(401, f"missing API key: {hint}", code="invalid_api_key")
        if scheme.lower() != "bearer":
            return error_response(
                401,
                f"unsupported authorization scheme '{clip_text(scheme, 30)}': this server takes its API key as "
                f"a Bearer token; {hint}",
                code="invalid_api_key",
            )
        if not token.strip():
            return error_response(401, f"empty API key after 'Bearer': {hint}", code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            return error_response(401, "incorrect API key", code="invalid_api_key")
        return None


async def _disconnected(receive: Receive) -> None:
    """Return when the client has gone (the body has already been read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def create_app(engine: Engine, settings: ServerSettings) -> FastAPI:
    """The FastAPI app serving `engine` (the engine's lifetime is the caller's business)."""
    app = FastAPI(
        title="llava-ultra",
        version=__version__,
        description="OpenAI-compatible chat completions for a LLaVA-Ultra checkpoint, with multi-image "
        "requests and adaptive frame selection (`selection` field).",
    )
    limits = engine.limits
    created = int(time.time())
    app.add_middleware(
        Guard, api_key=settings.api_key, max_body=body_limit(limits), body_timeout_s=settings.body_timeout_s
    )
    preprocessing = asyncio.Semaphore(max(1, settings.preprocess_concurrency))

    @app.exception_handler(RequestValidationError)
    async def on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(list(exc.errors()))
        return error_response(400, message, param, "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"{exc.detail}: {request.method} {clip_text(request.url.path, 200)}"
        if exc.status_code == 404:
            message += "; the API lives under /v1 (GET /v1/models, POST /v1/chat/completions)"
        return error_response(exc.status_code, message, None, "not_found" if exc.status_code == 404 else None)

    @app.exception_handler(APIError)
    async def on_api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestError)
    async def on_request_error(_: Request, exc: RequestError) -> JSONResponse:
        status, body = _from_exception(exc)
        return JSONResponse(body, status_code=status)

    @app.exception_handler(Exception)
    async def on_crash(_: Request, exc: Exception) -> JSONResponse:
        status, body = _from_exception(exc)
        return JSONResponse(body, status_code=status)

    errors = {s: {"model": ErrorResponse} for s in (400, 401, 404, 408, 413, 414, 431, 500, 503)}

    def card() -> dict:
        return {"id": settings.model_name, "object": "model", "created": created, "owned_by": "llava-ultra"}

    @app.get("/health", response_model=Health)
    async def health() -> dict:
        return {
            "status": "ok",
            "model": settings.model_name,
            "queued": engine.queued,
            "max_batch_size": engine.max_batch_size,
            "requests_served": engine.stats["requests"],
        }

    @app.get("/v1/models", response_model=ModelList, responses=errors)
    async def models() -> dict:
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=errors)
    async def model(model_id: str) -> dict:
        if model_id != settings.model_name:
            raise APIError(
                404,
                f"model '{clip_text(model_id)}' does not exist on this server; use {settings.model_name!r}",
                param="model",
                code="model_not_found",
            )
        return card()

    def build(data: bytes | bytearray) -> tuple[bool, bool, Prepared]:
        """Body bytes -> (stream, include_usage, prepared request); runs in a worker thread."""
        body = parse_request(data)
        if body.model != settings.model_name:
            raise RequestError(
                f"model '{clip_text(body.model)}' does not exist on this server; use "
                f"{settings.model_name!r} (GET /v1/models)",
                param="model",
                code="model_not_found",
                status=404,
            )
        refuse_unsupported(body)
        params = to_params(body)
        messages = to_messages(body, limits, settings.image_policy)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return body.stream, include_usage, engine.prepare(messages, params)

    @app.post(
        "/v1/chat/completions",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}
                },
            }
        },
        responses={
            200: {
                "model": ChatCompletion,
                "description": "The answer; with stream=true, text/event-stream of ChatCompletionChunk "
                "events ending with `data: [DONE]`.",
                "content": {
                    "text/event-stream": {"schema": {"$ref": "#/components/schemas/ChatCompletionChunk"}}
                },
            },
            **errors,
        },
    )
    async def chat_completions(request: Request) -> Any:
        chunks = [chunk async for chunk in request.stream() if chunk]  # one, from Guard
        data = chunks.pop() if len(chunks) == 1 else b"".join(chunks)
        async with preprocessing:
            stream, include_usage, prepared = await run_in_threadpool(build, data)
        del data
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        handle = engine.submit(prepared, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        del prepared
        reply_id = f"chatcmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        if stream:
            return StreamingResponse(
                _sse(events, handle, reply_id, now, settings.model_name, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )

        async def result() -> Event:
            while not isinstance(event := await events.get(), ChatResult | BaseException):
                pass
            return event

        waiter = asyncio.ensure_future(result())
        watcher = asyncio.ensure_future(_disconnected(request.receive))
        try:
            await asyncio.wait({waiter, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            handle.cancel()  # a no-op once answered; stops the row if the client left
            for task in (waiter, watcher):
                task.cancel()
        if not waiter.done() or waiter.cancelled():  # the client is gone: nobody reads this
            return Response(status_code=499)
        event = waiter.result()
        if isinstance(event, BaseException):
            status, payload = _from_exception(event)
            return JSONResponse(payload, status_code=status)
        return {
            "id": reply_id,
            "object": "chat.completion",
            "created": now,
            "model": settings.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": event.text},
                    "finish_reason": event.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": _usage(event),
            "selection": _selection(event),
        }

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"), media_type="text/html; charset=utf-8")

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = default_openapi()
            schemas = spec.setdefault("components", {}).setdefault("schemas", {})
            for model in (ChatCompletionRequest, ChatCompletionChunk):  # referenced by hand above
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                schemas.update(schema.pop("$defs", {}))
                schemas[model.__name__] = schema
        return app.openapi_schema

    app.openapi = openapi
    return app


async def _sse(
    events: asyncio.Queue[Event], handle: Any, reply_id: str, created: int, model: str, include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events of one streamed answer."""

    def chunk(delta: dict, finish: str | None = None, **extra: Any) -> str:
        payload = {
            "id": reply_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
            **extra,
        }
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            event = await events.get()
            if isinstance(event, str):
                yield chunk({"content": event})
            elif isinstance(event, ChatResult):
                yield chunk({}, event.finish_reason, selection=_selection(event))
                if include_usage:
                    usage = {
                        "id": reply_id,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": _usage(event),
                    }
                    yield f"data: {json.dumps(usage)}\n\n"
                yield "data: [DONE]\n\n"
                return
            else:
                _, payload = _from_exception(event)
                yield f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
                return
    finally:
        handle.cancel()
