"""Offline batch inference: a JSONL of requests -> a JSONL of answers with selection info.

Input, one JSON object per line:

    {"id": "r1", "images": ["frames/a.png", "frames/b.png"], "question": "胆囊内可见什么？"}
    {"id": "r2", "messages": [{"role": "user", "content": "..."}, ...], "images": [...]}

Image paths are relative to the input file's folder; with `messages` the images belong to the first
user turn. Optional per line: `max_tokens`, `temperature`, `top_p`, `stop`, `seed` (defaults from
the command line). Output lines, in input order:

    {"id": "r1", "answer": "...", "finish_reason": "stop", "selection": {"num_images": 2,
     "chosen": [1], "scores": [...]}, "prompt_tokens": 171, "completion_tokens": 12}

Requests go through the same `Engine` as the server, up to `window` at a time, so they are
micro-batched. A bad line (invalid JSON, missing fields, an unreadable image, a limit exceeded, a
repeated id) is skipped, counted and listed with its line number; it never stops the run. The run
is `ok` while the bad fraction stays within `max_bad_fraction`.
"""

from __future__ import annotations

import collections
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import DataError, LlavaUltraError
from .engine import ChatResult, Engine, Handle, Message, QueueListener, SamplingParams
from .images import load_image_path

OPTIONAL = ("max_tokens", "temperature", "top_p", "stop", "seed")


@dataclass
class PredictSummary:
    """What a predict run did."""

    data: Path
    out: Path
    lines: int = 0
    answered: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)
    """(line number, reason) of every skipped line."""
    seconds: float = 0.0
    max_bad_fraction: float = 0.1

    @property
    def bad_fraction(self) -> float:
        return len(self.bad) / self.lines if self.lines else 0.0

    @property
    def ok(self) -> bool:
        return self.bad_fraction <= self.max_bad_fraction

    def render(self, max_listed: int | None = 20) -> str:
        rate = self.answered / self.seconds if self.seconds else 0.0
        lines = [
            f"predict: {self.answered} of {self.lines} requests answered -> {self.out} "
            f"({self.seconds:.1f} s, {rate:.2f} requests/s)",
            f"bad lines: {len(self.bad)} ({self.bad_fraction:.1%}; allowed {self.max_bad_fraction:.1%})",
        ]
        shown = self.bad if max_listed is None else self.bad[:max_listed]
        lines += [f"  line {n}: {reason}" for n, reason in shown]
        if len(shown) < len(self.bad):
            lines.append(f"  ... {len(self.bad) - len(shown)} more")
        return "\n".join(lines)


def parse_line(
    record: Any, base: Path, engine: Engine, defaults: SamplingParams
) -> tuple[str, list[Message], SamplingParams]:
    """One input record -> (id, messages, params); DataError names what is wrong."""
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    rid = record.get("id")
    if not isinstance(rid, str | int) or isinstance(rid, bool) or rid == "":
        raise DataError("missing 'id' (a string or integer)")
    paths = record.get("images", [])
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise DataError("'images' must be a list of file paths")
    images = [load_image_path(base / p, engine.limits, f"image {p}") for p in paths]
    if "question" in record:
        if not isinstance(record["question"], str) or not record["question"].strip():
            raise DataError("'question' must be a non-empty string")
        messages = [Message("user", record["question"], images)]
    elif "messages" in record:
        raw = record["messages"]
        if not isinstance(raw, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in raw
        ):
            raise DataError('\'messages\' must be a list of {"role": ..., "content": "text"} objects')
        messages = [Message(m["role"], m["content"]) for m in raw]
        first_user = next((m for m in messages if m.role == "user"), None)
        if first_user is None:
            raise DataError("'messages' has no user message")
        first_user.images = images
    else:
        raise DataError("give a 'question' or 'messages'")
    overrides = {k: record[k] for k in OPTIONAL if k in record}
    if isinstance(overrides.get("stop"), str):
        overrides["stop"] = (overrides["stop"],)
    elif "stop" in overrides:
        overrides["stop"] = tuple(overrides["stop"] or ())
    try:
        params = replace(defaults, **overrides)
    except TypeError as exc:
        raise DataError(f"bad sampling field: {exc}") from exc
    return str(rid), messages, params


def run_predict(
    engine: Engine,
    data: str | Path,
    out: str | Path,
    params: SamplingParams | None = None,
    *,
    window: int | None = None,
    max_bad_fraction: float = 0.1,
) -> PredictSummary:
    """Answer every request in `data`, writing answers to `out` in input order."""
    data, out = Path(data), Path(out)
    if not data.is_file():
        raise DataError(f"--data {data} does not exist; pass a JSONL file of requests")
    defaults = params or SamplingParams()
    window = window or 4 * engine.max_batch_size
    summary = PredictSummary(data=data, out=out, max_bad_fraction=max_bad_fraction)
    out.parent.mkdir(parents=True, exist_ok=True)
    seen: dict[str, int] = {}
    in_flight: collections.deque[tuple[int, str, Handle, QueueListener]] = collections.deque()
    start = time.perf_counter()

    def drain_one(sink: Any) -> None:
        n, rid, _, listener = in_flight.popleft()
        try:
            *_, result = listener.events()
        except LlavaUltraError as exc:
            summary.bad.append((n, f"id {rid}: {exc}"))
            return
        except Exception as exc:  # a model failure on one request must not end the run
            summary.bad.append((n, f"id {rid}: the model failed: {type(exc).__name__}: {exc}"))
            return
        assert isinstance(result, ChatResult)
        row = {
            "id": rid,
            "answer": result.text,
            "finish_reason": result.finish_reason,
            "selection": result.selection.to_dict() if result.selection else None,
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
        }
        sink.write(json.dumps(row, ensure_ascii=False) + "\n")
        summary.answered += 1

    with data.open(encoding="utf-8") as src, out.open("w", encoding="utf-8") as sink:
        for n, line in enumerate(src, start=1):
            if not line.strip():
                continue
            summary.lines += 1
            try:
                rid, messages, line_params = parse_line(json.loads(line), data.parent, engine, defaults)
                if rid in seen:
                    raise DataError(f"id {rid!r} repeats line {seen[rid]}; ids must be unique")
                prepared = engine.prepare(messages, line_params)
                listener = QueueListener()
                handle = engine.submit(prepared, listener)
            except json.JSONDecodeError as exc:
                summary.bad.append((n, f"not valid JSON ({exc})"))
                continue
            except LlavaUltraError as exc:
                summary.bad.append((n, str(exc)))
                continue
            seen[rid] = n
            in_flight.append((n, rid, handle, listener))
            while len(in_flight) >= window:
                drain_one(sink)
        while in_flight:
            drain_one(sink)
    summary.bad.sort()
    summary.seconds = time.perf_counter() - start
    return summary
