"""The OpenAI-compatible HTTP server (FastAPI) in front of an `Engine`, and the web page.

Routes: `GET /v1/models`, `POST /v1/chat/completions` (plain JSON or `stream: true` server-sent
events), `GET /health`, `GET /openapi.json` (+ `/docs`), `GET /` (the web page, a client of the
same chat API) and `/static/*`.

Notable choices:
- Every error, ours or FastAPI's (validation 422s become 400s, unknown routes, bodies too large,
  crashes), is answered in OpenAI's format `{"error": {"message", "type", "param", "code"}}` with
  the message naming the problem; the web page shows that message as it is.
- Validation happens before anything is queued: a bad request never reaches the model, and the
  server keeps serving. Image decoding (and the opt-in remote fetches) run in a worker thread so
  the event loop stays responsive.
- Auth is a middleware in front of every `/v1/` route (so an unauthenticated caller learns nothing,
  not even whether its JSON was valid); the key is compared in constant time. `/`, `/health` and
  the OpenAPI document are public; the web page asks for the key and sends it as a Bearer token.
- A streamed answer that fails midway ends with a `data: {"error": ...}` event (the `openai`
  client raises it); a client that disconnects cancels its row in the running batch.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from .engine import ChatResult, Engine, Event, Limits, Message, RequestError, SamplingParams
from .images import ImagePolicy, load_image_url
from .schemas import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ErrorResponse,
    Health,
    ImagePart,
    ModelList,
    TextPart,
)

STATIC = resources.files("llava_ultra") / "serve" / "static"
ERROR_TYPES = {401: "authentication_error", 404: "invalid_request_error", 503: "server_error"}


@dataclass(frozen=True)
class ServerSettings:
    """How the app presents the engine."""

    model_name: str
    """The id clients pass as `model`."""
    api_key: str | None = None
    """When set, /v1/ routes need `Authorization: Bearer <api_key>`."""
    image_policy: ImagePolicy = field(default_factory=ImagePolicy)
    """Where images may come from besides data URLs."""


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
    message = f"the model failed on this request ({type(exc).__name__}: {exc}); see the server log"
    return 500, error_body(500, message, None, "internal_error")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "not JSON")
        return f"the request body is not valid JSON ({detail}); send a JSON object", None
    if not loc and first.get("type") == "missing":
        return "the request body is missing; send a JSON object with 'model' and 'messages'", None
    parts = []
    for err in errors[:3]:
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 3} more problems)" if len(errors) > 3 else ""
    return "invalid request: " + "; ".join(parts) + more, ".".join(loc) or None


def to_messages(body: ChatCompletionRequest, limits: Limits, policy: ImagePolicy) -> list[Message]:
    """OpenAI messages -> engine messages, decoding (and checking) every image."""
    n_images = sum(
        isinstance(part, ImagePart)
        for msg in body.messages
        if isinstance(msg.content, list)
        for part in msg.content
    )
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
            else:
                url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
                images.append(load_image_url(url, limits, policy, f"messages[{i}].content[{j}].image_url"))
        out.append(Message(role, "\n".join(texts), images))
    return out


def to_params(body: ChatCompletionRequest) -> SamplingParams:
    if body.n not in (None, 1):
        raise RequestError(f"n={body.n} is not supported; this server returns one choice (n=1)", param="n")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if body.max_tokens is not None and max_tokens != body.max_tokens:
        raise RequestError(
            f"max_tokens={body.max_tokens} and max_completion_tokens={body.max_completion_tokens} "
            f"disagree; send one of them",
            param="max_tokens",
        )
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature if body.temperature is not None else 0.0,
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
    max_body = limits.max_images * (limits.max_image_bytes * 4 // 3 + 64) + 2**20

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Any:
        if request.url.path.startswith("/v1/") and settings.api_key:
            header = request.headers.get("authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token:
                return error_response(
                    401,
                    "missing API key: send the header 'Authorization: Bearer <key>' (the key given to "
                    "`llava-ultra serve --api-key`)",
                    code="invalid_api_key",
                )
            if not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
                return error_response(401, "incorrect API key", code="invalid_api_key")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > max_body:
            return error_response(
                413,
                f"the request body is {int(length)} bytes, above this server's limit of {max_body} bytes "
                f"(max {limits.max_images} images of {limits.max_image_bytes} bytes); send fewer or "
                f"smaller images",
                code="request_too_large",
            )
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param, "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"{exc.detail}: {request.method} {request.url.path}"
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

    errors = {s: {"model": ErrorResponse} for s in (400, 401, 404, 413, 500, 503)}

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
        return {
            "object": "list",
            "data": [
                {"id": settings.model_name, "object": "model", "created": created, "owned_by": "llava-ultra"}
            ],
        }

    @app.post(
        "/v1/chat/completions",
        responses={
            200: {
                "model": ChatCompletion,
                "description": "The answer; with stream=true, text/event-stream of ChatCompletionChunk "
                "events ending with `data: [DONE]`.",
                "content": {"text/event-stream": {"schema": ChatCompletionChunk.model_json_schema()}},
            },
            **errors,
        },
    )
    async def chat_completions(body: ChatCompletionRequest) -> Any:
        if body.model != settings.model_name:
            raise APIError(
                404,
                f"model {body.model!r} does not exist on this server; use {settings.model_name!r} "
                f"(GET /v1/models)",
                param="model",
                code="model_not_found",
            )
        params = to_params(body)
        messages = await run_in_threadpool(to_messages, body, limits, settings.image_policy)
        prepared = engine.prepare(messages, params)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        handle = engine.submit(prepared, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        reply_id = f"chatcmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _sse(events, handle, reply_id, now, settings.model_name, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            while not isinstance(event := await events.get(), ChatResult | BaseException):
                pass
        finally:
            handle.cancel()
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
