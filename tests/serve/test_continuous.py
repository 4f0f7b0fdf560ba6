"""Continuous batching in the engine (`Engine(batching='continuous')`), in fp32 on CPU.

Requests join the running batch between decode steps and leave when they end. Answers must equal
one-at-a-time serving token for token, whatever else runs beside them; a cancelled request frees its
slot; a request that breaks the model fails alone; one too long for a slot runs alone.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest
import torch

from llava_ultra.serve.engine import ChatResult, Engine, Message, SamplingParams
from tests.helpers import tiny_images
from tests.serve.conftest import LIMITS

QUESTIONS = [
    "胆囊内可见什么？",
    "Is the liver normal in size?",
    "甲状腺结节的边界清楚吗？",
    "请描述超声所见。",
]


def request(i: int) -> list[Message]:
    return [Message("user", QUESTIONS[i % 4] * (1 + i % 3), tiny_images(i % 4, seed=20 + i))]


class Recorder:
    """A listener that keeps every event and the time the result came."""

    def __init__(self) -> None:
        self.events: list = []
        self.done = threading.Event()
        self.finished_at: float | None = None

    def __call__(self, event) -> None:
        self.events.append(event)
        if isinstance(event, ChatResult | BaseException):
            self.finished_at = time.monotonic()
            self.done.set()

    def result(self, timeout: float = 60):
        assert self.done.wait(timeout), "no result in time"
        final = self.events[-1]
        if isinstance(final, BaseException):
            raise final
        assert "".join(e for e in self.events[:-1]) == final.text  # the stream adds up
        return final


@pytest.fixture(scope="module")
def alone(checkpoint):
    with Engine.from_checkpoint(checkpoint, limits=LIMITS, max_batch_size=1, batching="micro") as eng:
        yield eng


@pytest.fixture(scope="module")
def continuous(checkpoint):
    with Engine.from_checkpoint(checkpoint, limits=LIMITS, max_batch_size=4, batching="continuous") as eng:
        yield eng


def wait_started(handle, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while handle.first_token_at is None:
        assert time.monotonic() < deadline, "request never started"
        time.sleep(0.005)


def test_requests_joining_mid_decode_get_one_at_a_time_answers(continuous, alone):
    max_tokens = [40, 24, 6, 30, 12, 18, 9]
    params = [SamplingParams(max_tokens=n) for n in max_tokens]
    expected = [alone.generate(request(i), params[i]) for i in range(len(params))]
    assert any(e.finish_reason == "length" for e in expected)
    steps_before = continuous.stats["steps"]
    recorders = [Recorder() for _ in params]
    first = [continuous.submit(continuous.prepare(request(i), params[i]), recorders[i]) for i in range(2)]
    wait_started(first[0])
    wait_started(first[1])
    late = [continuous.submit(continuous.prepare(request(i), params[i]), recorders[i]) for i in range(2, 5)]
    for handle in late:
        wait_started(handle)
    rest = [continuous.submit(continuous.prepare(request(i), params[i]), recorders[i]) for i in range(5, 7)]
    got = [r.result() for r in recorders]
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert (g.text, g.finish_reason, g.completion_tokens) == (
            e.text,
            e.finish_reason,
            e.completion_tokens,
        ), i
        assert g.selection == e.selection, i
    # the late ones started while the first was still decoding, and the short one left first
    assert all(h.first_token_at < recorders[0].finished_at for h in late)
    assert recorders[2].finished_at < recorders[0].finished_at
    assert rest[0].first_token_at is not None
    assert continuous.stats["largest_batch"] == 4
    assert continuous.stats["steps"] - steps_before < sum(max_tokens)  # rows shared steps


def test_seeded_sampling_matches_one_at_a_time(continuous, alone):
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=7)
    expected = alone.generate(request(1), params)
    noise = [Recorder() for _ in range(2)]
    for i, rec in enumerate(noise):
        continuous.submit(continuous.prepare(request(i + 2), SamplingParams(max_tokens=20)), rec)
    assert continuous.generate(request(1), params) == expected
    for rec in noise:
        rec.result()


def test_cancel_frees_the_slot(checkpoint):
    with Engine.from_checkpoint(checkpoint, limits=LIMITS, max_batch_size=1, batching="continuous") as eng:
        long_rec, short_rec = Recorder(), Recorder()
        long = eng.submit(eng.prepare(request(1), SamplingParams(max_tokens=48)), long_rec)
        wait_started(long)
        short = eng.submit(eng.prepare(request(2), SamplingParams(max_tokens=5)), short_rec)
        time.sleep(0.05)
        assert short.first_token_at is None  # the only slot is busy
        long.cancel()
        result = short_rec.result()
        assert result.completion_tokens <= 5
        assert eng.stats["cancelled"] == 1
        assert not long_rec.done.is_set()  # a cancelled request gets no result (its client is gone)
        again = eng.generate(request(3), SamplingParams(max_tokens=4))
        assert again.completion_tokens <= 4


def test_a_request_that_breaks_the_model_fails_alone(continuous, alone):
    good = [Recorder() for _ in range(2)]
    bad = Recorder()
    params = SamplingParams(max_tokens=10)
    prepared = continuous.prepare(request(1), params)
    inputs = dict(prepared.inputs, pixel_values_clip=torch.zeros(1, 3, 7, 7))  # not the encoder's size
    handles = [continuous.submit(continuous.prepare(request(i), params), good[i]) for i in range(2)]
    continuous.submit(replace(prepared, inputs=inputs), bad)
    assert bad.done.wait(30) and isinstance(bad.events[-1], Exception)
    for i, rec in enumerate(good):
        assert rec.result() == alone.generate(request(i), params)
    assert all(h.finished for h in handles)


def test_requests_longer_than_a_slot_or_without_room_still_match(checkpoint, alone):
    """2 slots of 210 columns for prompts of 162-266 tokens (the default system prompt is long): the
    second request is longer than the first's window, so the columns shift; two requests do not fit
    a slot at all and run alone; the rest wait for room. Every answer equals one-at-a-time."""
    with Engine.from_checkpoint(
        checkpoint, limits=LIMITS, max_batch_size=2, batching="continuous", slot_tokens=210
    ) as eng:
        params = [SamplingParams(max_tokens=n) for n in (30, 8, 25, 16, 40)]
        prepared = [eng.prepare(request(i), p) for i, p in enumerate(params)]
        needs = [p.inputs["input_ids"].shape[1] + p.params.max_tokens - 1 for p in prepared]
        assert sum(n > 210 for n in needs) == 2
        recs = [Recorder() for _ in params]
        for p, rec in zip(prepared, recs, strict=True):
            eng.submit(p, rec)
        got = [r.result() for r in recs]
        assert got == [alone.generate(request(i), p) for i, p in enumerate(params)]
        assert eng.stats["shifts"] >= 1


def test_an_engine_built_under_inference_mode_serves(checkpoint, alone):
    """The slot cache is allocated by the constructor, which may run under inference_mode (as in
    benchmarks/gpu_suite.py); the worker thread, outside it, must still be able to write it."""
    with torch.inference_mode():
        engine = Engine.from_checkpoint(checkpoint, limits=LIMITS, max_batch_size=2, batching="continuous")
    with engine:
        recs = [Recorder() for _ in range(2)]
        for i, rec in enumerate(recs):
            engine.submit(engine.prepare(request(i), SamplingParams(max_tokens=8)), rec)
        assert [r.result() for r in recs] == [
            alone.generate(request(i), SamplingParams(max_tokens=8)) for i in range(2)
        ]
