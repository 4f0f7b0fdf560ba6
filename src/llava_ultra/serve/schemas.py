"""Pydantic models of the OpenAI-compatible HTTP API (requests, responses, errors).

They document the API in `/openapi.json` and validate requests; a validation failure becomes a 400
in OpenAI's error format (see app.py). Fields that would change the answer and that we do not
implement (`logprobs`, `tools`, `response_format` other than text, penalties, `logit_bias`, `n` > 1,
...) are declared here so that app.py can refuse them with a 400 naming the field; fields without
effect on the answer (`user`, `metadata`, `store`, ...) are accepted and ignored. Responses carry one extra
field, `selection` (which image the model looked at, with every image's score); OpenAI clients
keep unknown fields (`response.model_extra["selection"]` in the Python client).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class ImageURL(_Request):
    url: str = Field(
        description="A data:image/...;base64 URL (remote URLs only when the server allows them)."
    )
    detail: str | None = Field(None, description="Accepted and ignored.")


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ImagePart(_Request):
    type: Literal["image_url"]
    image_url: ImageURL | str


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Request):
    include_usage: bool = False


class ChatCompletionRequest(_Request):
    """POST /v1/chat/completions."""

    model: str = Field(description="The served model's id (see GET /v1/models).")
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2, description="0 (default) = greedy.")
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Alias of max_tokens.")
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = Field(None, description="Only 1 is supported.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Refused unless absent or neutral (see app.py `refuse_unsupported`):
    logprobs: bool | None = Field(None, description="Not supported: only false.")
    top_logprobs: int | None = Field(None, description="Not supported.")
    tools: list[Any] | None = Field(None, description="Not supported: only an empty list.")
    tool_choice: Any = Field(None, description="Not supported: only 'none'.")
    functions: list[Any] | None = Field(None, description="Not supported (deprecated tools).")
    function_call: Any = Field(None, description="Not supported: only 'none'.")
    response_format: dict[str, Any] | None = Field(None, description="Only {'type': 'text'}.")
    frequency_penalty: float | None = Field(None, description="Not supported: only 0.")
    presence_penalty: float | None = Field(None, description="Not supported: only 0.")
    logit_bias: dict[str, Any] | None = Field(None, description="Not supported: only {}.")
    modalities: list[Any] | None = Field(None, description="Only ['text'].")
    audio: Any = Field(None, description="Not supported.")
    prediction: Any = Field(None, description="Not supported.")
    web_search_options: Any = Field(None, description="Not supported.")


class Selection(BaseModel):
    """Which frame(s) the adaptive selector sent to the LLM (extension; absent for text-only)."""

    num_images: int
    chosen: list[int] = Field(description="0-based positions in request order, over all turns.")
    scores: list[float] | None = Field(description="The selector's score of every image.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    selection: Selection | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed answer; the last one carries finish_reason and selection."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    selection: Selection | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llava-ultra"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error, in OpenAI's format."""

    error: ErrorBody


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    queued: int
    max_batch_size: int
    requests_served: int
