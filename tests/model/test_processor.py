"""The input processor: label masking, placeholder expansion and its count check, padding, and the
same ids for a conversation at training and at inference."""

from __future__ import annotations

import numpy as np
import pytest

from llava_ultra.errors import DataError
from llava_ultra.model.processor import (
    IGNORE_INDEX,
    encode_sample,
    prepare_inputs,
    sample_prompt,
)
from tests.helpers import instruct_sample as sample
from tests.helpers import tiny_images, tiny_model_config, tiny_tokenizer


def test_labels_cover_exactly_the_answers_and_eos():
    tok, cfg = tiny_tokenizer(), tiny_model_config()
    enc = encode_sample(sample(), tok, cfg, "vicuna_v1")
    learned = [int(t) for t, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE_INDEX]
    text = tok.decode(learned)
    assert text == " 肝脏超声。</s> The liver is normal.</s>"
    assert np.array_equal(enc.labels[enc.labels != IGNORE_INDEX], enc.input_ids[enc.labels != IGNORE_INDEX])


def test_placeholders_expand_to_the_visual_tokens_that_reach_the_llm():
    tok = tiny_tokenizer()
    for overrides, k in [({}, 3), ({"selector.mode": "none", "selector.none_strategy": "all"}, 3)]:
        cfg = tiny_model_config(**overrides)
        enc = encode_sample(sample(k), tok, cfg, "vicuna_v1")
        assert int((enc.input_ids == cfg.image_token_id).sum()) == cfg.image_tokens_for(k)
        assert (enc.labels[enc.input_ids == cfg.image_token_id] == IGNORE_INDEX).all()
    # selection on: one image's tokens whatever k is; 'all': k images' tokens
    assert tiny_model_config().image_tokens_for(3) == 16
    assert (
        tiny_model_config(**{"selector.mode": "none", "selector.none_strategy": "all"}).image_tokens_for(3)
        == 48
    )


def test_plain_template_learns_the_caption_only():
    tok, cfg = tiny_tokenizer(), tiny_model_config()
    enc = encode_sample(sample(1), tok, cfg, "plain")
    learned = tok.decode(
        [int(t) for t, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE_INDEX]
    )
    assert learned == "肝脏超声。\n"


def test_placeholder_count_mismatch_is_named():
    bad = sample(2)
    bad["images"] = bad["images"][:1]
    with pytest.raises(DataError, match="2 <image> placeholders but 1 images"):
        encode_sample(bad, tiny_tokenizer(), tiny_model_config(), "vicuna_v1")


def test_inference_placeholder_count_mismatch_names_both_counts():
    tok, cfg = tiny_tokenizer(), tiny_model_config()
    images = tiny_images(2, size=24)
    with pytest.raises(DataError, match=r"prompt 1 has 2 '<image>' placeholder token\(s\) for 2 image\(s\)"):
        prepare_inputs(tok, cfg, ["<image>\nq", "<image><image>\nq"], [images, images])
    with pytest.raises(DataError, match=r"prompt 0 has 0 '<image>' placeholder token\(s\) for 1 image\(s\)"):
        prepare_inputs(tok, cfg, ["no placeholder"], [images[:1]])
    with pytest.raises(DataError, match="2 prompts but 1 image lists"):
        prepare_inputs(tok, cfg, ["a", "b"], [[]])


def test_inference_batches_are_left_padded_with_expanded_placeholders():
    tok, cfg = tiny_tokenizer(), tiny_model_config()
    images = tiny_images(3, size=24)
    batch = prepare_inputs(tok, cfg, ["<image>\nWhat is it?", "hi"], [images, []])
    assert batch["image_counts"] == [3, 0] and batch["pixel_values_clip"].shape[0] == 3
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert int((ids[0] == cfg.image_token_id).sum()) == cfg.image_tokens_for(3)
    assert int((ids[1] == cfg.image_token_id).sum()) == 0
    short = int(mask.sum(1).argmin())
    assert mask[short, -1] == 1 and mask[short, 0] == 0  # left padding: real tokens at the right end
    assert (ids[short][mask[short] == 0] == tok.pad_token_id).all()


def test_training_and_inference_give_the_prompt_the_same_ids():
    tok, cfg = tiny_tokenizer(), tiny_model_config()
    s = sample(2)
    s["conversations"] = s["conversations"][:2]
    trained = encode_sample(s, tok, cfg, "vicuna_v1")
    prompt = prepare_inputs(tok, cfg, [sample_prompt(s, cfg.image_token)], [tiny_images(2, size=24)])
    ids = prompt["input_ids"][0].numpy()
    assert np.array_equal(trained.input_ids[: len(ids)], ids)
    # everything after the prompt is the answer the model learns
    assert (trained.labels[: len(ids)] == IGNORE_INDEX).all() and (
        trained.labels[len(ids) :] != IGNORE_INDEX
    ).all()
