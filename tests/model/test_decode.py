"""Static-cache and compiled decoding (model/decode.py) against the dynamic path, in fp32 on CPU.

The batch mixes 3 images, 1 image and no image, so rows are left-padded by different amounts. The
inductor compile of the step takes about a minute on a shared 2-core CPU, so its test runs with
LLAVA_ULTRA_INDUCTOR_TESTS=1; the default tests compile through the 'aot_eager' backend, which
traces the same step with dynamo (graph breaks, in-place cache writes) without generating code.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from llava_ultra.errors import ConfigError
from llava_ultra.model.decode import SlotDecoder, model_prefill
from tests.helpers import tiny_images, tiny_model, tiny_tokenizer

PROMPTS = ["<image>\n肝脏大小正常吗?", "<image>\n胆囊?", "The liver is normal in size with a smooth capsule?"]
GREEDY = {"max_new_tokens": 20, "eos_token_id": []}


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=1)


@pytest.fixture(scope="module")
def batch(model):
    images = [tiny_images(3, seed=2), tiny_images(1, seed=3), []]
    out = model.prepare_inputs(tiny_tokenizer(), PROMPTS, images)
    assert len(set(out["attention_mask"].sum(1).tolist())) == 3  # three different padding amounts
    return out


@pytest.fixture(scope="module")
def dynamic(model, batch):
    return model.generate(**batch, **GREEDY)


def test_static_cache_gives_the_dynamic_greedy_tokens(model, batch, dynamic):
    static = model.generate(**batch, **GREEDY, cache="static")
    assert static.sequences == dynamic.sequences
    assert all(len(s) == 20 for s in static.sequences)
    assert static.selection.indices == dynamic.selection.indices
    assert (static.stats.cache, static.stats.compiled, static.stats.steps) == ("static", False, 19)
    assert dynamic.stats.cache == "dynamic" and dynamic.stats.prefill_s > 0


def test_static_cache_keeps_eos_and_stop_strings(model, batch, dynamic):
    tok = tiny_tokenizer()
    eos = dynamic.sequences[1][5]
    kwargs = {"max_new_tokens": 20, "eos_token_id": eos, "tokenizer": tok}
    a, b = model.generate(**batch, **kwargs), model.generate(**batch, **kwargs, cache="static")
    assert a.sequences == b.sequences and a.texts == b.texts
    assert len(b.sequences[1]) <= 5


def test_compiled_step_gives_the_same_tokens_and_reports_its_warmup(model, batch, dynamic):
    first = model.generate(**batch, **GREEDY, cache="static", compile="aot_eager")
    assert first.sequences == dynamic.sequences
    assert first.stats.compiled and first.stats.fallback is None
    assert first.stats.warmup_s > 0
    again = model.generate(**batch, **GREEDY, cache="static", compile="aot_eager")
    assert again.sequences == dynamic.sequences
    assert again.stats.compiled and again.stats.warmup_s == 0  # the built step was reused


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("LLAVA_ULTRA_INDUCTOR_TESTS") != "1",
    reason="inductor compiles the step for about a minute on a 2-core CPU; set LLAVA_ULTRA_INDUCTOR_TESTS=1",
)
def test_inductor_compiled_step_gives_the_same_tokens(model, batch, dynamic):
    out = model.generate(**batch, **GREEDY, cache="static", compile=True)
    assert out.stats.compiled and out.sequences == dynamic.sequences


def test_a_failing_compiler_falls_back_with_one_warning(batch, dynamic):
    model = tiny_model(seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = model.generate(**batch, **GREEDY, cache="static", compile="no_such_backend")
        b = model.generate(**batch, **GREEDY, cache="static", compile="no_such_backend")
    assert a.sequences == b.sequences == dynamic.sequences
    assert not a.stats.compiled and "no_such_backend" in a.stats.fallback
    assert sum("compiling the decode step failed" in str(w.message) for w in caught) == 1


def test_bad_settings_name_the_fix(model, batch):
    with pytest.raises(ConfigError, match="cache='paged'.*dynamic, static"):
        model.generate(**batch, cache="paged")
    with pytest.raises(ConfigError, match="needs cache='static'"):
        model.generate(**batch, compile=True)


def test_slot_decoder_rows_join_mid_decode_and_match_alone(model):
    """Three requests through 2 slots of a 68-column cache: A (52 prompt tokens) and B (17) start,
    C (25) joins when A leaves; the columns must shift left to make room for C's 12 steps, and every
    row equals its own batch-1 generate."""
    tok = tiny_tokenizer()
    prompts = ["<image>\n甲状腺右叶见一低回声结节，边界清?", "胆囊内见一强回声团?", "<image>\n肝脏?"]
    images = [tiny_images(1, seed=6), [], tiny_images(2, seed=5)]
    steps = [6, 14, 12]
    inputs = [model.prepare_inputs(tok, [p], [im]) for p, im in zip(prompts, images, strict=True)]
    alone = [
        model.generate(**x, max_new_tokens=n + 1, eos_token_id=[]).sequences[0]
        for x, n in zip(inputs, steps, strict=True)
    ]
    width = max(x["input_ids"].shape[1] for x in inputs)
    assert [x["input_ids"].shape[1] for x in inputs] == [52, 17, 25]
    dec = SlotDecoder(model.llm, slots=2, max_len=width + 16)
    got: dict[int, list[int]] = {}
    slot_of: dict[int, int] = {}
    waiting = [0, 1, 2]
    shifted = False
    with torch.no_grad():
        while waiting or slot_of:
            if len(slot_of) == 2 and not dec.waits:
                assert not dec.room(60, 40)  # cannot fit beside the two live rows: it must wait
            if waiting and dec.free() is not None:
                r = waiting[0]
                t_before = dec.kv.t
                if dec.room(inputs[r]["input_ids"].shape[1], steps[r]):
                    waiting.pop(0)
                    shifted |= bool(slot_of) and dec.kv.t < t_before
                    logits, cache, _, mask = model_prefill(model, inputs[r])
                    slot = dec.free()
                    dec.admit(slot, cache, mask, steps[r])
                    slot_of[r] = slot
                    got[r] = [int(logits.argmax(-1))]
            if not slot_of:
                continue
            logits = dec.step({s: got[r][-1] for r, s in slot_of.items()})
            for r, s in list(slot_of.items()):
                got[r].append(int(logits[s].argmax()))
                if len(got[r]) == steps[r] + 1:
                    dec.release(s)
                    del slot_of[r]
    assert [got[r] for r in range(3)] == alone
    assert shifted  # the third request needed the columns shifted left
    assert dec.waits == 1 and dec.shifts == 1
