"""Fixtures for model tests; the builders live in tests/helpers.py so other packages can reuse them."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from tests.helpers import tiny_model, tiny_tokenizer


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def model():
    return tiny_model()


IMAGE_ID = 100


@pytest.fixture(scope="module")
def llava_folder(tmp_path_factory):
    """A tiny llava-hf LlavaForConditionalGeneration saved to disk, as transformers' own tests build it."""
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            image_size=30,
            patch_size=6,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            projection_dim=32,
        ),
        text_config=LlamaConfig(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        image_token_index=IMAGE_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    folder = tmp_path_factory.mktemp("llava_hf")
    LlavaForConditionalGeneration(config).eval().save_pretrained(folder)
    return folder
