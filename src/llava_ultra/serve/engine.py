"""Inference engine: load a checkpoint once, batch concurrent requests, stream tokens.

One background worker thread owns the model (eval mode, `torch.inference_mode`). Callers `prepare`
a request (validation and limits happen here, on the caller's thread, so a bad request fails at once
with a `RequestError` naming the parameter) and `submit` it. Two batching modes (`batching=`):

- 'continuous' (the default on CUDA): `max_batch_size` slots on one static KV cache
  (model/decode.py `SlotDecoder`). Between two decode steps, queued requests take free slots: each
  is prefilled alone (so its first token is exactly the one-at-a-time one) and joins the running
  batch; a request leaves its slot the step it ends (EOS, stop, length, cancel), and the next one
  takes it. Every request samples with its own rule and its own seed, so no grouping is needed. A
  prefill that fails fails its request alone; a request longer than a slot (`slot_tokens`) runs
  alone on the dynamic cache.
- 'micro' (the default elsewhere): the worker collects queued requests for up to `max_wait_ms`
  after the oldest arrived, or until `max_batch_size` are ready, and runs ONE left-padded
  `UltraModel.generate` for them; new requests wait for the whole batch to end.

Notable choices:
- Grouping by sampling parameters (micro mode): a batch shares one decoding rule, so only requests with the same
  key are batched. Every greedy request (temperature 0) shares one key, so greedy traffic batches
  fully and, thanks to left padding, batched output equals unbatched output in fp32 (bf16/fp16
  kernels reduce in batch-dependent orders, so there it need not: docs/serving.md). Sampling requests
  batch by (temperature, top_p); a request with a `seed` always runs alone, so its answer depends
  on its seed only and not on what else was in the queue. Per-request `max_tokens` and `stop`
  differ freely inside a batch: rows end individually through the model's `on_token` hook.
- Streaming: `generate`'s `on_token` hook hands each sampled token to the request's `Handle`, which
  decodes the row so far and emits only text that is final - it holds back an incomplete UTF-8
  character and any tail that could still grow into a stop string - so the concatenated deltas
  equal the non-streamed answer. A row that ends (EOS, stop, length, cancel) is finished at once,
  without waiting for the rest of its batch.
- Multi-image and multi-turn: the images of all user turns form one study; the model gets one
  image placeholder (at the start of the first user turn that carries images) and the adaptive
  selector picks among all of them. `ChatResult.selection` names the chosen image(s) by their
  position in request order and gives every image's score.
- Limits (`Limits`) are checked before anything is queued and before any large allocation: text
  characters before tokenising, images per request, pixels and aspect ratio per image (from the
  header, in images.py), prompt tokens, output tokens, prompt + output within the LLM's context,
  queue length. An image whose longer side exceeds `max_image_side` is downscaled before the model
  pads it to a square, so the padded canvas is at most `max_image_side`^2 pixels (a 16384x1024
  image used to cost a 16384^2 canvas).
- Preprocessing (tokenising, image padding/resizing/normalising) happens in `prepare`, on the
  caller's thread, one request at a time: a request whose preprocessing fails fails alone and never
  reaches a batch. The worker only stacks the prepared rows. Should a batch still fail on the model,
  every row that has not produced a token yet is retried on its own, so one bad row fails alone.
- Sampling temperatures below `GREEDY_BELOW` (1e-5, vLLM's threshold) are greedy: `logits / t`
  overflows float32 for tiny t, and such a distribution is the argmax anyway.
- The conversation template is the checkpoint's recorded `model.config.template` unless the caller
  names one (`tokenizer.default_template`: a stage-1 'plain' checkpoint gets its LLM family's chat
  format, since 'plain' drops the question), so a converted LLaVA-Med v1.5 is prompted in
  'mistral_instruct' and a LLaVA v1.5 / llava-ultra checkpoint in 'vicuna_v1' without flags.
- Default decoding is greedy (temperature 0) - reproducible answers are the norm for a medical
  assistant; pass a temperature to sample.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from ..config import TEMPLATES
from ..errors import DataError
from ..model.checkpoint import load_for_inference
from ..model.decode import SlotDecoder, eos_ids, kv_bytes_per_token, model_prefill, next_token
from ..model.selector import Selection
from ..model.tokenizer import model_template, render_prompt
from ..model.ultra import UltraModel

log = logging.getLogger(__name__)

MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256
MAX_SEED = 2**63 - 1
GREEDY_BELOW = 1e-5
"""A sampling temperature below this is treated as 0 (greedy)."""


def clip_text(value: object, limit: int = 60) -> str:
    """repr(value) (a string as it is), cut to `limit` characters: error messages never echo a huge
    input back."""
    try:
        text = value if isinstance(value, str) else repr(value)
    except ValueError:  # an integer beyond Python's str conversion limit
        return "a number too large to print"
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} characters)"


class RequestError(DataError):
    """A request the engine refuses; `param` names the offending field, `status` the HTTP status."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; anything above is refused with a clear error."""

    max_images: int = 8
    """Images per request (all turns together)."""
    max_image_bytes: int = 10 * 2**20
    """Encoded size of one image (bytes of the PNG/JPEG file)."""
    max_image_pixels: int = 4096 * 4096
    """Width x height of one image (from the header, before decoding)."""
    max_aspect_ratio: float = 20.0
    """Longer side / shorter side of one image (from the header, before decoding)."""
    max_image_side: int = 2048
    """Longer side kept: larger images are downscaled (aspect kept) before the model pads them to
    a square, so no padded canvas exceeds max_image_side^2 pixels. The encoders see at most 1024 px."""
    max_text_chars: int = 65536
    """Characters of text in one request (all messages), checked before tokenising."""
    max_prompt_tokens: int = 4096
    """Prompt length in tokens, visual tokens included."""
    max_output_tokens: int = 1024
    """Largest `max_tokens` a request may ask for (also the default, capped by the context)."""
    max_queue: int = 256
    """Requests waiting for the model; more are refused with 503 until the queue drains."""

    def __post_init__(self) -> None:
        names = ("max_images", "max_image_bytes", "max_image_pixels", "max_prompt_tokens")
        for name in (*names, "max_image_side", "max_text_chars"):
            if getattr(self, name) < 1:
                raise DataError(f"limit {name}={getattr(self, name)} must be >= 1")
        if not self.max_aspect_ratio >= 1:
            raise DataError(f"limit max_aspect_ratio={self.max_aspect_ratio} must be >= 1")
        if self.max_output_tokens < 1 or self.max_queue < 1:
            raise DataError("limits max_output_tokens and max_queue must be >= 1")


@dataclass
class Message:
    """One chat turn as the engine sees it: role ('system' | 'user' | 'assistant'), text, images."""

    role: str
    text: str
    images: list[Image.Image] = field(default_factory=list)


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings of one request (OpenAI names)."""

    max_tokens: int | None = None
    """New tokens at most; None = `Limits.max_output_tokens` capped by the context left."""
    temperature: float = 0.0
    """0 = greedy (the default); > 0 samples."""
    top_p: float = 1.0
    """Nucleus sampling mass (sampling only)."""
    stop: tuple[str, ...] = ()
    """Up to 4 strings; the answer ends before the first one produced."""
    seed: int | None = None
    """Seed for sampling; a seeded request runs in a batch of its own (reproducible)."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def batch_key(self, request_id: int) -> tuple:
        """Requests with equal keys may share a batch."""
        if self.greedy:
            return ("greedy",)
        if self.seed is not None:
            return ("seeded", request_id)
        return ("sample", self.temperature, self.top_p)


@dataclass(frozen=True)
class SelectionInfo:
    """Which image(s) of the request the selector sent to the LLM."""

    num_images: int
    chosen: list[int]
    """Positions (0-based, in request order over all turns) of the image(s) the LLM saw."""
    scores: list[float] | None
    """The selector's score of every image (None when the model does not score: mode 'none')."""

    def to_dict(self) -> dict[str, Any]:
        return {"num_images": self.num_images, "chosen": self.chosen, "scores": self.scores}


@dataclass(frozen=True)
class ChatResult:
    """A finished answer."""

    text: str
    finish_reason: str
    """'stop' (EOS or a stop string) or 'length' (max_tokens reached)."""
    selection: SelectionInfo | None
    """None for a text-only request."""
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Prepared:
    """A validated and preprocessed request, ready to queue."""

    prompt: str
    images: list[Image.Image]
    params: SamplingParams
    """With `max_tokens` resolved."""
    prompt_tokens: int
    inputs: dict[str, Any] = field(default_factory=dict, repr=False)
    """This request alone as `UltraModel.prepare_inputs` returns it (token row, pixel tensors)."""


Event = str | ChatResult | BaseException
"""What a handle's listener receives: text deltas, then one ChatResult or one exception."""


def check_text_size(chars: int, limits: Limits) -> None:
    """Refuse a request with more text than `limits.max_text_chars` (before anything tokenises it)."""
    if chars > limits.max_text_chars:
        raise RequestError(
            f"the messages hold {chars} characters of text, above this server's limit of "
            f"{limits.max_text_chars}; shorten the conversation",
            param="messages",
            code="context_length_exceeded",
        )


def check_image_shape(width: int, height: int, limits: Limits, where: str) -> None:
    """Refuse an image above the pixel or aspect-ratio limit (from its size alone)."""
    if width * height > limits.max_image_pixels:
        raise RequestError(
            f"{where} is {width}x{height} = {width * height} pixels, above this server's limit of "
            f"{limits.max_image_pixels}; downscale it",
            param=where,
            code="image_too_large",
        )
    if width < 1 or height < 1 or max(width, height) > limits.max_aspect_ratio * min(width, height):
        raise RequestError(
            f"{where} is {width}x{height}, an aspect ratio above this server's limit of "
            f"{limits.max_aspect_ratio:g}:1; crop it",
            param=where,
            code="image_aspect_ratio",
        )


def fitted_size(width: int, height: int, limits: Limits) -> tuple[int, int]:
    """(w, h) scaled down so that the longer side is `limits.max_image_side` (unchanged if it is
    already within); the shorter side is rounded up, so the aspect ratio never grows."""
    side = max(width, height)
    if side <= limits.max_image_side:
        return width, height
    short = min(limits.max_image_side, math.ceil(min(width, height) * limits.max_image_side / side))
    return (limits.max_image_side, short) if width >= height else (short, limits.max_image_side)


def fit_image(image: Image.Image, limits: Limits) -> Image.Image:
    """`image` itself if its longer side is within `limits.max_image_side`, else a downscaled RGB
    copy (Lanczos): the model pads to a square of the longer side, so this bounds that canvas."""
    size = fitted_size(*image.size, limits)
    if size == image.size:
        return image
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Text before the first occurrence of any stop string, and whether one occurred."""
    cuts = [text.find(s) for s in stops if s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def stable_prefix(text: str, stops: Sequence[str]) -> str:
    """The part of a growing answer that can no longer change: without a trailing incomplete
    character (decoded as U+FFFD) and without a tail that could be the start of a stop string."""
    text = text.rstrip("\ufffd")
    keep = len(text)
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                keep = min(keep, len(text) - n)
                break
    return text[:keep]


class Handle:
    """One submitted request: receives its tokens from the worker and tells its listener."""

    def __init__(
        self,
        prepared: Prepared,
        listener: Callable[[Event], None],
        tokenizer: PreTrainedTokenizerBase,
        request_id: int,
    ) -> None:
        self.prepared = prepared
        self.request_id = request_id
        self.key = prepared.params.batch_key(request_id)
        self.arrived = time.monotonic()
        self._listener = listener
        self._tokenizer = tokenizer
        self._tokens: list[int] = []
        self._sent = ""
        self.selection: SelectionInfo | None = None
        self.cancelled = False
        self.finished = False
        self.dropped = False  # generation stopped because the request was cancelled (client gone)
        self.first_token_at: float | None = None
        """time.monotonic() of this request's first sampled token (time to first token - arrived)."""

    @property
    def started(self) -> bool:
        """Whether this request has received a token (it can no longer be rerun unseen)."""
        return bool(self._tokens) or bool(self._sent)

    def cancel(self) -> None:
        """Stop generating for this request (the client went away); its row ends at the next step."""
        self.cancelled = True

    def _emit(self, event: Event) -> None:
        try:
            self._listener(event)
        except Exception:  # a listener that cannot take events any more: stop working for it
            log.exception("request %d: listener failed; cancelling", self.request_id)
            self.cancelled = True

    def _decode(self) -> str:
        return self._tokenizer.decode(self._tokens, skip_special_tokens=True)

    def on_token(self, token: int, ended: bool) -> bool:
        """Take one sampled token; True when this request is done."""
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        if self.finished:
            return True
        if self.cancelled:
            self.finished = self.dropped = True
            return True
        if ended:  # EOS
            self.finish("stop")
            return True
        self._tokens.append(token)
        text, stopped = cut_at_stop(self._decode(), self.prepared.params.stop)
        if stopped:
            self.finish("stop")
            return True
        if len(self._tokens) >= self.prepared.params.max_tokens:
            self.finish("length")
            return True
        safe = stable_prefix(text, self.prepared.params.stop)
        if len(safe) > len(self._sent) and safe.startswith(self._sent):
            self._emit(safe[len(self._sent) :])
            self._sent = safe
        return False

    def finish(self, reason: str) -> None:
        """Send the rest of the text and the final result."""
        if self.finished:
            return
        self.finished = True
        text, _ = cut_at_stop(self._decode(), self.prepared.params.stop)
        if text.startswith(self._sent) and len(text) > len(self._sent):
            self._emit(text[len(self._sent) :])
        self._emit(
            ChatResult(
                text=text,
                finish_reason=reason,
                selection=self.selection,
                prompt_tokens=self.prepared.prompt_tokens,
                completion_tokens=len(self._tokens),
            )
        )

    def fail(self, exc: BaseException) -> None:
        if not self.finished:
            self.finished = True
            self._emit(exc)


class QueueListener:
    """A listener that collects events in a thread-safe queue, for synchronous callers."""

    def __init__(self) -> None:
        self.queue: queue.Queue[Event] = queue.Queue()

    def __call__(self, event: Event) -> None:
        self.queue.put(event)

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Deltas, then the ChatResult; an exception event is raised."""
        while True:
            event = self.queue.get(timeout=timeout)
            if isinstance(event, BaseException):
                raise event
            yield event
            if isinstance(event, ChatResult):
                return


def pick_device(name: str = "auto") -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; anything else is returned as given."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


class Engine:
    """Serve one model to many concurrent callers. Use as a context manager or call `close()`."""

    def __init__(
        self,
        model: UltraModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        limits: Limits | None = None,
        max_batch_size: int = 8,
        max_wait_ms: float = 5.0,
        template: str | None = None,
        system: str | None = None,
        batching: str = "auto",
        slot_tokens: int | None = None,
        compile: bool | str = False,
    ) -> None:
        """`template` None: the checkpoint's recorded one (see `tokenizer.default_template`).

        `batching`: 'continuous' (requests join and leave a running batch of `max_batch_size` slots
        token by token, on a static KV cache of `slot_tokens` columns per slot; `compile` compiles
        its step), 'micro' (queued requests form one `generate` batch that runs to its end), or
        'auto' (continuous on CUDA, micro elsewhere). `slot_tokens` None: the prompt + output limits,
        capped by the LLM's context and, on a GPU, by half its free memory; a request that does not
        fit a slot runs alone. The slot cache is allocated here, once."""
        if batching not in ("auto", "continuous", "micro"):
            raise DataError(f"batching={batching!r} is not a mode; use auto, continuous or micro")
        if max_batch_size < 1:
            raise DataError(f"max_batch_size={max_batch_size} must be >= 1")
        if max_wait_ms < 0:
            raise DataError(f"max_wait_ms={max_wait_ms} must be >= 0")
        if template is not None and template not in TEMPLATES:
            raise DataError(f"unknown template {template!r}; use one of {', '.join(TEMPLATES)}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.limits = limits or Limits()
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.template = template or model_template(model)
        self.system = system
        context = getattr(model.llm.config.get_text_config(), "max_position_embeddings", None)
        self.context_tokens: int | None = int(context) if context else None
        room = self.limits.max_prompt_tokens + self.limits.max_output_tokens
        self.slot_tokens = slot_tokens or min(room, self.context_tokens or room)
        if slot_tokens is None and batching != "micro" and model.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(model.device)
            fits = int(0.5 * free) // (max_batch_size * kv_bytes_per_token(model.llm))
            self.slot_tokens = min(self.slot_tokens, fits)
        if self.slot_tokens < 2:
            raise DataError(f"slot_tokens={self.slot_tokens} must be >= 2")
        self.compile = compile
        self._decoder: SlotDecoder | None = None
        if batching in ("auto", "continuous"):
            batching = self._continuous_or_micro(batching, model)
        self.batching = batching
        self.stats = {
            "requests": 0,
            "batches": 0,
            "largest_batch": 0,
            "tokens": 0,
            "cancelled": 0,
            "steps": 0,
            "warmup_s": 0.0,
            "shifts": 0,
            "waits": 0,
        }
        self._ids = itertools.count()
        self._pending: collections.deque[Handle] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        loop = self._loop_continuous if batching == "continuous" else self._loop
        self._worker = threading.Thread(target=loop, name="llava-ultra-engine", daemon=True)
        self._worker.start()

    def _continuous_or_micro(self, batching: str, model: UltraModel) -> str:
        """Allocate the slot cache for continuous batching; 'auto' falls back to micro-batching off
        CUDA, or (with a warning) when the cache cannot be allocated or would hold < 256 tokens a slot."""
        if batching == "auto" and model.device.type != "cuda":
            return "micro"
        why = None
        if batching == "auto" and self.slot_tokens < 256:
            why = f"only {self.slot_tokens} tokens per slot fit in memory"
        else:
            try:
                self._decoder = SlotDecoder(
                    model.llm, self.max_batch_size, self.slot_tokens, compile=self.compile
                )
            except torch.OutOfMemoryError as exc:
                why = f"its {self.max_batch_size} x {self.slot_tokens}-token KV cache does not fit ({exc})"
        if why is None:
            return "continuous"
        message = f"continuous batching: {why}; lower max_batch_size or slot_tokens, or use batching='micro'"
        if batching == "continuous":
            raise DataError(message)
        log.warning("%s; serving with micro-batching", message)
        return "micro"

    @classmethod
    def from_checkpoint(
        cls, folder: str | Path, device: str | None = None, dtype: str | None = None, **kwargs: Any
    ) -> Engine:
        """Load `folder` once (`model.checkpoint.load_for_inference`) and start the worker."""
        model, tokenizer = load_for_inference(folder, device=device, dtype=dtype)
        return cls(model, tokenizer, **kwargs)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker; requests still queued fail with an error."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._worker.join(timeout=60)

    @property
    def queued(self) -> int:
        return len(self._pending)

    # ----------------------------------------------------------------------------- validation

    def check_image(self, image: Image.Image, where: str) -> None:
        """Refuse an image above the pixel or aspect-ratio limit."""
        check_image_shape(*image.size, self.limits, where)

    def prepare(self, messages: Sequence[Message], params: SamplingParams | None = None) -> Prepared:
        """Validate a conversation and its settings and render the prompt (RequestError if refused)."""
        params = self._check_params(params or SamplingParams())
        check_text_size(sum(len(m.text) if isinstance(m.text, str) else 0 for m in messages), self.limits)
        system_parts, turns, images = [], [], []
        image_turn = None
        token = self.model.config.image_token
        for i, msg in enumerate(messages):
            where = f"messages[{i}]"
            try:
                msg.text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise RequestError(
                    f"{where}.content is not valid Unicode ({exc.reason}); send UTF-8 text",
                    param=f"{where}.content",
                ) from exc
            if token in msg.text:
                raise RequestError(
                    f"{where}.content contains the reserved image placeholder {token!r}; remove it - "
                    f"images go in image_url content parts",
                    param=f"{where}.content",
                )
            if msg.role == "system":
                if msg.images:
                    raise RequestError(f"{where}: a system message cannot carry images", param=where)
                system_parts.append(msg.text)
                continue
            if msg.role not in ("user", "assistant"):
                raise RequestError(
                    f"{where}.role={msg.role!r} is not supported; use system, user or assistant",
                    param=f"{where}.role",
                )
            if msg.images and msg.role != "user":
                raise RequestError(f"{where}: only user messages can carry images", param=where)
            for j, image in enumerate(msg.images):
                self.check_image(image, f"{where} image {j}")
            if turns and turns[-1]["role"] == msg.role:  # consecutive same-role turns merge
                turns[-1]["content"] = f"{turns[-1]['content']}\n{msg.text}"
            else:
                turns.append({"role": msg.role, "content": msg.text})
            if msg.images and image_turn is None:
                image_turn = len(turns) - 1
            images.extend(fit_image(image, self.limits) for image in msg.images)
        if not turns:
            raise RequestError("messages holds no user message; add one", param="messages")
        if turns[0]["role"] != "user":
            raise RequestError(
                "the first non-system message must come from the user", param="messages[0].role"
            )
        if turns[-1]["role"] != "user":
            raise RequestError(
                "the last message must come from the user (the assistant answers it)", param="messages"
            )
        if len(images) > self.limits.max_images:
            raise RequestError(
                f"{len(images)} images in this request, above this server's limit of "
                f"{self.limits.max_images}; send fewer frames",
                param="messages",
                code="too_many_images",
            )
        if image_turn is not None:
            turns[image_turn]["content"] = f"{token}\n{turns[image_turn]['content']}"
        system = "\n".join(system_parts) if system_parts else self.system
        prompt = render_prompt(turns, self.template, system, token)
        ids = self.tokenizer(prompt).input_ids
        n_prompt = len(ids) - ids.count(self.model.config.image_token_id)
        n_prompt += self.model.config.image_tokens_for(len(images))
        if n_prompt > self.limits.max_prompt_tokens:
            raise RequestError(
                f"the prompt is {n_prompt} tokens (images included), above this server's limit of "
                f"{self.limits.max_prompt_tokens}; shorten the conversation or send fewer images",
                param="messages",
                code="context_length_exceeded",
            )
        room = self.limits.max_output_tokens
        if self.context_tokens is not None:
            room = min(room, self.context_tokens - n_prompt)
        if room < 1:
            raise RequestError(
                f"the prompt is {n_prompt} tokens and fills the model's context of {self.context_tokens} "
                f"tokens; shorten the conversation",
                param="messages",
                code="context_length_exceeded",
            )
        if params.max_tokens is None:
            params = replace(params, max_tokens=room)
        elif self.context_tokens is not None and n_prompt + params.max_tokens > self.context_tokens:
            raise RequestError(
                f"max_tokens={params.max_tokens} plus the prompt's {n_prompt} tokens exceeds the model's "
                f"context of {self.context_tokens} tokens; ask for at most {room} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        inputs = self.model.prepare_inputs(self.tokenizer, [prompt], [images])
        return Prepared(prompt=prompt, images=images, params=params, prompt_tokens=n_prompt, inputs=inputs)

    def _check_params(self, p: SamplingParams) -> SamplingParams:
        def bad(param: str, message: str) -> RequestError:
            return RequestError(f"{param}={clip_text(getattr(p, param))} {message}", param=param)

        for name in ("temperature", "top_p"):
            value = getattr(p, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
                raise bad(name, "must be a number")
        if p.seed is not None and (isinstance(p.seed, bool) or not isinstance(p.seed, int)):
            raise bad("seed", "must be an integer")
        if isinstance(p.stop, str) or not isinstance(p.stop, tuple | list):
            raise bad("stop", "must be a list of strings")
        if p.max_tokens is not None:
            if isinstance(p.max_tokens, bool) or not isinstance(p.max_tokens, int) or p.max_tokens < 1:
                raise bad("max_tokens", "must be a positive integer")
            if p.max_tokens > self.limits.max_output_tokens:
                raise bad(
                    "max_tokens", f"is above this server's limit of {self.limits.max_output_tokens} tokens"
                )
        if not 0 <= p.temperature <= 2:
            raise bad("temperature", "must be between 0 and 2 (0 = greedy)")
        if not 0 < p.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if len(p.stop) > MAX_STOP_STRINGS or any(
            not isinstance(s, str) or not 0 < len(s) <= MAX_STOP_CHARS for s in p.stop
        ):
            raise bad(
                "stop",
                f"must be at most {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_CHARS} characters",
            )
        if p.seed is not None and not 0 <= p.seed <= MAX_SEED:
            raise bad("seed", f"must be an integer in [0, {MAX_SEED}]")
        if 0 < p.temperature < GREEDY_BELOW:
            p = replace(p, temperature=0.0)
        return p

    # ------------------------------------------------------------------------------ submitting

    def submit(self, prepared: Prepared, listener: Callable[[Event], None]) -> Handle:
        """Queue a prepared request; `listener` gets its events on the worker thread."""
        handle = Handle(prepared, listener, self.tokenizer, next(self._ids))
        with self._cv:
            if self._closed:
                raise RequestError("the engine is shut down", code="engine_closed", status=503)
            if len(self._pending) >= self.limits.max_queue:
                raise RequestError(
                    f"the server is busy ({len(self._pending)} requests queued); retry shortly",
                    code="server_busy",
                    status=503,
                )
            self._pending.append(handle)
            self._cv.notify_all()
        return handle

    def stream(
        self, messages: Sequence[Message], params: SamplingParams | None = None
    ) -> Iterator[str | ChatResult]:
        """Text deltas as they are produced, then the ChatResult (blocking; for scripts and the CLI)."""
        listener = QueueListener()
        handle = self.submit(self.prepare(messages, params), listener)
        try:
            yield from listener.events()
        finally:
            handle.cancel()

    def generate(self, messages: Sequence[Message], params: SamplingParams | None = None) -> ChatResult:
        """The finished answer to one conversation (blocking)."""
        *_, result = self.stream(messages, params)
        assert isinstance(result, ChatResult)
        return result

    # ---------------------------------------------------------------------------------- worker

    def _take_batch(self) -> list[Handle] | None:
        """Block until a batch is due; None when closed."""
        with self._cv:
            while True:
                while not self._pending and not self._closed:
                    self._cv.wait()
                if self._closed:
                    for handle in self._pending:
                        handle.fail(RequestError("the engine shut down", code="engine_closed", status=503))
                    self._pending.clear()
                    return None
                key = self._pending[0].key
                ready = sum(h.key == key for h in self._pending)
                wait = self._pending[0].arrived + self.max_wait - time.monotonic()
                if ready >= self.max_batch_size or wait <= 0:
                    break
                self._cv.wait(timeout=wait)
            batch, rest = [], collections.deque()
            for handle in self._pending:
                (batch if handle.key == key and len(batch) < self.max_batch_size else rest).append(handle)
            self._pending = rest
            return batch

    def _loop(self) -> None:
        while (batch := self._take_batch()) is not None:
            live = [h for h in batch if not h.cancelled]
            if live:
                self.stats["requests"] += len(live)
                self._run_isolated(live)

    def _run_isolated(self, batch: list[Handle]) -> None:
        """Run a batch; if it fails, retry alone every row that has not produced a token yet, so a
        row that breaks the model fails alone and the rest of its batch completes."""
        try:
            self._run(batch)
        except Exception as exc:  # a bug or a runtime failure: report it, keep serving
            log.exception("batch of %d requests failed", len(batch))
            if len(batch) == 1:
                batch[0].fail(exc)
                return
            for handle in batch:
                if handle.finished or handle.cancelled:
                    continue
                if handle.started:  # its text has begun; it cannot be restarted invisibly
                    handle.fail(exc)
                else:
                    self._run_isolated([handle])

    def _stack(self, batch: list[Handle]) -> dict[str, Any]:
        """The prepared rows of `batch` as one left-padded `generate` batch."""
        rows = [h.prepared.inputs["input_ids"][0] for h in batch]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(rows), width), pad, dtype=rows[0].dtype)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, row in enumerate(rows):
            input_ids[b, width - len(row) :] = row
            attention_mask[b, width - len(row) :] = 1
        out: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "image_counts": [len(h.prepared.images) for h in batch],
        }
        for key in ("pixel_values_clip", "pixel_values_sam"):
            parts = [h.prepared.inputs.get(key) for h in batch]
            parts = [t for t in parts if t is not None]
            out[key] = torch.cat(parts) if parts else None
        return out

    def _run(self, batch: list[Handle]) -> None:
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
        params = batch[0].prepared.params
        inputs = self._stack(batch)

        def on_selection(selection: Selection) -> None:
            for b, handle in enumerate(batch):
                _set_selection(handle, selection, b)

        def on_token(b: int, token: int, ended: bool) -> bool:
            return self._feed(batch[b], token, ended)

        with torch.inference_mode():
            self.model.generate(
                **inputs,
                max_new_tokens=max(h.prepared.params.max_tokens for h in batch),
                do_sample=not params.greedy,
                temperature=params.temperature if not params.greedy else 1.0,
                top_p=params.top_p,
                seed=params.seed,
                tokenizer=self.tokenizer,
                on_selection=on_selection,
                on_token=on_token,
            )
        for handle in batch:  # rows the loop ended without telling us (cancelled ones)
            handle.finish("length")

    # ---------------------------------------------------------------------- continuous batching

    def _take_joiners(self, free: int, live: bool) -> list[Handle] | None:
        """Up to `free` queued requests (blocking only while nothing runs); None when closed and idle."""
        with self._cv:
            while not self._pending and not live and not self._closed:
                self._cv.wait()
            if self._closed:
                for handle in self._pending:
                    handle.fail(RequestError("the engine shut down", code="engine_closed", status=503))
                self._pending.clear()
                return None if not live else []
            return [self._pending.popleft() for _ in range(min(free, len(self._pending)))]

    def _loop_continuous(self) -> None:
        """Requests join free slots between decode steps and leave as soon as they end. Each joiner is
        prefilled alone (so its first token is one-at-a-time exact), then one step decodes a token for
        every live slot (model/decode.py `SlotDecoder`)."""
        eos = eos_ids(None, self.tokenizer, self.model.llm)
        dec = self._decoder
        assert dec is not None
        rows: dict[int, tuple[Handle, int, torch.Generator | None]] = {}  # slot -> (handle, last token, rng)
        while True:
            joiners = self._take_joiners(self.max_batch_size - len(rows), bool(rows))
            if joiners is None:
                return
            for n, handle in enumerate(joiners):
                if handle.cancelled:
                    continue
                try:
                    length = int(handle.prepared.inputs["input_ids"].shape[1])
                    steps = handle.prepared.params.max_tokens - 1
                    if not dec.fits(length, steps):  # longer than a slot: alone, on the dynamic cache
                        self.stats["requests"] += 1
                        self._run_isolated([handle])
                        continue
                    if not dec.room(length, steps):  # wait for live rows to finish
                        with self._cv:
                            self._pending.extendleft(reversed(joiners[n:]))
                        break
                    self.stats["requests"] += 1
                    self._join(dec, rows, handle, steps, eos)
                except Exception as exc:  # a bug in scheduling this request: it fails alone
                    log.exception("request %d could not join the batch", handle.request_id)
                    handle.fail(exc)
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(rows))
            for slot, (handle, _, _) in list(rows.items()):
                if handle.cancelled or handle.finished:
                    self._leave(dec, rows, slot)
            if not rows:
                continue
            try:
                with torch.inference_mode():
                    logits = dec.step({slot: last for slot, (_, last, _) in rows.items()})
            except Exception as exc:  # the shared step failed: every live row has started, so all fail
                log.exception("decode step with %d live requests failed", len(rows))
                for slot, (handle, _, _) in list(rows.items()):
                    handle.fail(exc)
                    self._leave(dec, rows, slot)
                continue
            self.stats["steps"] += 1
            self.stats["warmup_s"] = dec.warmup_s
            self.stats["shifts"], self.stats["waits"] = dec.shifts, dec.waits
            for slot, (handle, _, rng) in list(rows.items()):
                token = self._sample(handle, logits[slot : slot + 1], rng)
                if self._feed(handle, token, token in eos):
                    self._leave(dec, rows, slot)
                else:
                    rows[slot] = (handle, token, rng)

    def _join(
        self,
        dec: SlotDecoder,
        rows: dict[int, tuple[Handle, int, torch.Generator | None]],
        handle: Handle,
        steps: int,
        eos: set[int],
    ) -> None:
        """Prefill one request, hand it its first token, and give it a slot if it goes on."""
        self.stats["batches"] += 1
        params = handle.prepared.params
        try:
            with torch.inference_mode():
                logits, cache, selection, mask = model_prefill(self.model, handle.prepared.inputs)
            _set_selection(handle, selection, 0)
            rng = None
            if params.seed is not None:
                rng = torch.Generator(device=self.model.device).manual_seed(params.seed)
            token = self._sample(handle, logits, rng)
        except Exception as exc:  # this request alone breaks the model: it fails alone
            log.exception("request %d failed in prefill", handle.request_id)
            handle.fail(exc)
            return
        if self._feed(handle, token, token in eos):
            return
        slot = dec.free()
        dec.admit(slot, cache, mask, steps)
        rows[slot] = (handle, token, rng)

    def _leave(self, dec: SlotDecoder, rows: dict, slot: int) -> None:
        handle, _, _ = rows.pop(slot)
        dec.release(slot)
        if handle.cancelled and not handle.finished:
            handle.finished = handle.dropped = True
            self.stats["cancelled"] += 1

    @staticmethod
    def _sample(handle: Handle, logits: torch.Tensor, rng: torch.Generator | None) -> int:
        """(1, V) fp32 logits -> this request's next token, by its own decoding rule."""
        p = handle.prepared.params
        return int(next_token(logits, not p.greedy, p.temperature or 1.0, p.top_p, rng)[0])

    def _feed(self, handle: Handle, token: int, ended: bool) -> bool:
        """Give a sampled token to its handle (both batching modes); True when the request is done."""
        self.stats["tokens"] += 1
        try:
            done = handle.on_token(token, ended)
        except Exception as exc:  # this row's bookkeeping failed: end it alone
            log.exception("request %d failed while decoding", handle.request_id)
            handle.fail(exc)
            return True
        if handle.dropped:
            self.stats["cancelled"] += 1
        return done


def _set_selection(handle: Handle, selection: Selection, b: int) -> None:
    """Record row `b` of a selection as `handle`'s chosen images (text-only requests: none)."""
    k = len(handle.prepared.images)
    if k:
        scores = selection.scores[b, :k].tolist() if selection.scores is not None else None
        handle.selection = SelectionInfo(k, list(selection.indices[b]), scores)
