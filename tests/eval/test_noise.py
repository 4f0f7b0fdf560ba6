"""The noise-image check: a model that sees its images changes its output on noise; a blind one does not."""

from __future__ import annotations

import torch

from llava_ultra.eval.noise import noise_image_check
from tests.helpers import tiny_images, tiny_model, tiny_tokenizer


def test_noise_check_detects_a_blind_model():
    tok = tiny_tokenizer()
    images = tiny_images(2, size=(40, 56), seed=4)
    seeing = noise_image_check(tiny_model(), tok, images, "USER: <image> 肝脏? ASSISTANT:", max_new_tokens=4)
    assert seeing.image_matters and seeing.max_logit_diff > 1e-4

    blind = tiny_model(**{"sam.enabled": False})
    with torch.no_grad():  # a zeroed projector: the LLM gets constant visual tokens
        blind.fusion.clip_projector.linear_2.weight.zero_()
        blind.fusion.clip_projector.linear_2.bias.zero_()
    result = noise_image_check(blind, tok, images, "USER: <image> 肝脏? ASSISTANT:", max_new_tokens=4)
    assert not result.image_matters and result.max_logit_diff == 0.0 and not result.answer_changed
