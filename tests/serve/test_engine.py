"""Engine: equals the model's own greedy decoding, batches without changing answers, streams exactly,
enforces limits with clear errors, loads both checkpoint layouts."""

from __future__ import annotations

import threading

import pytest
import torch

from llava_ultra.errors import CheckpointError
from llava_ultra.model.checkpoint import load_for_inference, save_checkpoint, save_pretrained
from llava_ultra.model.lora import TrainabilityConfig, apply_trainability
from llava_ultra.serve.engine import (
    ChatResult,
    Engine,
    Limits,
    Message,
    QueueListener,
    RequestError,
    SamplingParams,
    cut_at_stop,
    stable_prefix,
)
from tests.helpers import tiny_images, tiny_model, tiny_tokenizer
from tests.serve.conftest import LIMITS


def test_stable_prefix_holds_back_partial_characters_and_stop_prefixes():
    assert stable_prefix("abc", ()) == "abc"
    assert stable_prefix("abc\ufffd", ()) == "abc"
    assert stable_prefix("hello wor", ("world",)) == "hello "
    assert stable_prefix("hello w", ("world", "xyz")) == "hello "
    assert stable_prefix("hello", ("lo!", "o!")) == "hel"
    assert cut_at_stop("a STOP b END", ("END", "STOP")) == ("a ", True)
    assert cut_at_stop("abc", ("x",)) == ("abc", False)


def test_greedy_equals_the_models_own_generate(engine):
    model, tok = engine.model, engine.tokenizer
    msgs = [Message("user", "胆囊内可见什么？", tiny_images(3, seed=4))]
    result = engine.generate(msgs, SamplingParams(max_tokens=10))
    prepared = engine.prepare(msgs, SamplingParams(max_tokens=10))
    direct = model.generate(
        **model.prepare_inputs(tok, [prepared.prompt], [prepared.images]), max_new_tokens=10, tokenizer=tok
    )
    assert result.text == direct.texts[0]
    assert result.completion_tokens == len(direct.sequences[0])
    assert result.selection.chosen == direct.selection.indices[0]
    assert result.selection.num_images == 3
    assert result.selection.scores == pytest.approx(direct.selection.scores[0].tolist(), abs=1e-5)
    assert prepared.prompt.count("<image>") == 1
    assert prepared.prompt_tokens == int(
        model.prepare_inputs(tok, [prepared.prompt], [prepared.images])["input_ids"].shape[1]
    )


def test_stream_concatenates_to_the_answer(engine):
    msgs = [Message("user", "What is the examination site?", tiny_images(2, seed=1))]
    events = list(engine.stream(msgs, SamplingParams(max_tokens=16)))
    *deltas, final = events
    assert isinstance(final, ChatResult) and all(isinstance(d, str) for d in deltas)
    assert len(deltas) > 1 and "".join(deltas) == final.text
    assert final == engine.generate(msgs, SamplingParams(max_tokens=16))


def test_batched_requests_equal_individual_ones_with_their_own_limits_and_stops(engine):
    def request(i):
        return [Message("user", f"question {i} 肝脏", tiny_images(1 + i % 3, seed=10 + i))]

    alone = [engine.generate(request(i), SamplingParams(max_tokens=4 + i)) for i in range(6)]
    stop = alone[5].text[3:5]
    assert stop
    params = [SamplingParams(max_tokens=4 + i, stop=(stop,) if i == 5 else ()) for i in range(6)]
    batches_before = engine.stats["batches"]
    listeners = [QueueListener() for _ in range(6)]
    prepared = [engine.prepare(request(i), params[i]) for i in range(6)]
    for p, listener in zip(prepared, listeners, strict=True):
        engine.submit(p, listener)
    together = [list(listener.events(timeout=30))[-1] for listener in listeners]
    assert engine.stats["batches"] - batches_before < 6  # they were batched
    for i in range(5):
        assert together[i].text == alone[i].text
        assert together[i].completion_tokens == alone[i].completion_tokens
        assert together[i].selection.chosen == alone[i].selection.chosen
    assert together[5].text == alone[5].text[: alone[5].text.find(stop)]
    assert together[5].finish_reason == "stop"


def test_limits_give_clear_errors(engine):
    image = tiny_images(1)[0]
    cases = [
        ([Message("user", "q", [image] * 5)], SamplingParams(), "5 images", "too_many_images"),
        ([Message("user", "q", tiny_images(1, size=300))], SamplingParams(), "pixels", "image_too_large"),
        ([Message("user", "q")], SamplingParams(max_tokens=49), "max_tokens=49", None),
        ([Message("user", "x " * 800)], SamplingParams(), "prompt is", "context_length_exceeded"),
        ([Message("user", "look <image>")], SamplingParams(), "placeholder", None),
        ([Message("user", "q"), Message("assistant", "a")], SamplingParams(), "last message", None),
        ([Message("assistant", "a"), Message("user", "q")], SamplingParams(), "first non-system", None),
        (
            [Message("user", "q"), Message("assistant", "a", [image]), Message("user", "q")],
            None,
            "only user",
            None,
        ),
        ([Message("tool", "q")], SamplingParams(), "role", None),
        ([Message("user", "q")], SamplingParams(temperature=3.0), "temperature", None),
        ([Message("user", "q")], SamplingParams(temperature="hot"), "must be a number", None),
        ([Message("user", "q")], SamplingParams(stop=("",)), "stop", None),
        ([Message("user", "q")], SamplingParams(seed=-1), "seed", None),
        ([Message("user", "\ud800")], SamplingParams(), "Unicode", None),
    ]
    for messages, params, text, code in cases:
        with pytest.raises(RequestError, match=text) as info:
            engine.prepare(messages, params)
        assert info.value.status == 400
        if code:
            assert info.value.code == code


def test_context_bounds_max_tokens():
    model = tiny_model(seed=1)  # context 256 tokens; the default system prompt takes most of it
    with Engine(model, tiny_tokenizer(), limits=Limits(max_output_tokens=500)) as eng:
        prepared = eng.prepare([Message("user", "q")])
        assert prepared.prompt_tokens + prepared.params.max_tokens == 256
        with pytest.raises(RequestError, match="context of 256"):
            eng.prepare([Message("user", "q")], SamplingParams(max_tokens=200))


def test_multi_turn_images_all_reach_the_selector(engine):
    a, b, c = tiny_images(3, seed=7)
    msgs = [
        Message("system", "你是超声科医生。"),
        Message("user", "first", [a, b]),
        Message("assistant", "ok"),
        Message("user", "second", [c]),
    ]
    prepared = engine.prepare(msgs, SamplingParams(max_tokens=3))
    assert prepared.images == [a, b, c]
    assert prepared.prompt.startswith("你是超声科医生。")
    assert prepared.prompt.index("<image>") < prepared.prompt.index("first") < prepared.prompt.index("second")
    result = engine.generate(msgs, SamplingParams(max_tokens=3))
    assert result.selection.num_images == 3 and len(result.selection.scores) == 3


def test_seeded_sampling_is_reproducible_under_load(engine):
    msgs = [Message("user", "sample", tiny_images(1, seed=3))]
    params = SamplingParams(max_tokens=12, temperature=1.5, top_p=0.9, seed=11)
    first = engine.generate(msgs, params)
    noise = [
        threading.Thread(target=engine.generate, args=(msgs, SamplingParams(max_tokens=8))) for _ in range(3)
    ]
    for t in noise:
        t.start()
    again = engine.generate(msgs, params)
    for t in noise:
        t.join()
    assert first.text == again.text
    assert engine.generate(msgs, SamplingParams(max_tokens=12, temperature=1.5, seed=12)).text != first.text


def test_cancelled_request_does_not_stop_the_engine(engine):
    listener = QueueListener()
    handle = engine.submit(engine.prepare([Message("user", "q")], SamplingParams(max_tokens=40)), listener)
    handle.cancel()
    result = engine.generate([Message("user", "q")], SamplingParams(max_tokens=3))
    assert result.completion_tokens == 3


def test_load_checkpoint_reads_both_layouts(tmp_path, checkpoint):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_for_inference(tmp_path / "missing")
    model = tiny_model(seed=2, **{"llm.inline.max_position_embeddings": 1024})
    apply_trainability(model, TrainabilityConfig(llm="lora", projectors="full"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # adapters that change the answer
    folder = save_checkpoint(model, tmp_path / "lora-free-name", tiny_tokenizer())
    loaded, tok = load_for_inference(folder)
    msgs = [Message("user", "肝脏?", tiny_images(2, seed=5))]
    params = SamplingParams(max_tokens=8)
    with Engine(loaded, tok, limits=LIMITS) as from_folder, Engine(model.eval(), tok, limits=LIMITS) as live:
        assert from_folder.generate(msgs, params) == live.generate(msgs, params)
    with pytest.raises(CheckpointError, match="tokenizer"):
        (tmp_path / "bare").mkdir()
        save_pretrained(tiny_model(seed=2), tmp_path / "bare")
        load_for_inference(tmp_path / "bare")
