"""Tiny random-init models, tokenizers and images for tests (shared by every test package).

Everything here is built offline in well under a second: a byte-level BPE trained on a few
bilingual sentences, and an `UltraModel` with the real classes (CLIPVisionModel, SamVisionModel,
LlamaForCausalLM) at toy sizes: CLIP 32 px / patch 8 -> 4x4 = 16 visual tokens, SAM 32 px / patch 4
-> 8x8 grid pooled to 4x4, LLM hidden 32 with 2 layers. Dotted overrides change any field, e.g.
`tiny_model_config(**{"selector.mode": "none", "sam.enabled": False})`.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from PIL import Image

from llava_ultra.config import ModelConfig, apply_overrides, model_config_from_dict
from llava_ultra.model.tokenizer import build_tiny_tokenizer
from llava_ultra.model.ultra import UltraModel, build_model

TINY_TEXTS = [
    "肝脏大小正常，形态规则，包膜光滑，实质回声均匀。",
    "胆囊内见一强回声团，后方伴声影，随体位改变移动。",
    "甲状腺右叶见一低回声结节，边界清，形态规则。",
    "The liver is normal in size with a smooth capsule and homogeneous echotexture.",
    "A hyperechoic focus with posterior acoustic shadowing is seen in the gallbladder.",
    "USER: What is the examination site? ASSISTANT: Liver ultrasound.",
]

TINY_VOCAB = 320


def tiny_model_dict() -> dict[str, Any]:
    """The raw dict of the tests' tiny model config (SAM on, selection 'feature+attention')."""
    return {
        "vision": {
            "inline": {
                "image_size": 32,
                "patch_size": 8,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
            },
            "image_size": 32,
            "patch_size": 8,
        },
        "sam": {
            "enabled": True,
            "inline": {
                "image_size": 32,
                "patch_size": 4,
                "hidden_size": 16,
                "output_channels": 16,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "mlp_dim": 32,
                "window_size": 4,
                "global_attn_indexes": [1],
                "initializer_range": 0.02,
            },
            "image_size": 32,
        },
        "fusion": {"align": "pool", "projector_type": "mlp2x_gelu", "alpha_init": 0.5},
        "selector": {"mode": "feature+attention", "top_m": 1, "attn_layers": 1, "kd_weight": 1.0},
        "llm": {
            "inline": {
                "model_type": "llama",
                "vocab_size": TINY_VOCAB,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "max_position_embeddings": 256,
                "pad_token_id": 0,
                "bos_token_id": 1,
                "eos_token_id": 2,
            }
        },
        "image_token_id": 4,
    }


def tiny_model_config(**overrides: Any) -> ModelConfig:
    """The tiny `ModelConfig` with dotted overrides relative to the model section."""
    data = tiny_model_dict()
    apply_overrides(data, overrides, root=ModelConfig)
    return model_config_from_dict(data)


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    """A byte-level BPE over TINY_TEXTS (at most TINY_VOCAB tokens; `<image>` has id 4). Do not mutate."""
    return build_tiny_tokenizer(TINY_TEXTS * 4, vocab_size=TINY_VOCAB)


def tiny_model(seed: int = 0, **overrides: Any) -> UltraModel:
    """A random-init tiny `UltraModel` in eval mode (deterministic for a seed)."""
    torch.manual_seed(seed)
    return build_model(tiny_model_config(**overrides), tiny_tokenizer()).eval()


def tiny_images(n: int, size: int = 40, seed: int = 0) -> list[Image.Image]:
    """n random RGB images (non-square when size is a pair), deterministic for a seed."""
    rng = np.random.default_rng(seed)
    h, w = (size, size) if isinstance(size, int) else size
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(n)]


def tiny_batch(model: UltraModel, counts: list[int], prompt: str = "<image>\n肝脏?", seed: int = 0) -> dict:
    """A generate/forward batch with `counts[b]` images for sample b, built by `prepare_inputs`."""
    images = tiny_images(sum(counts), seed=seed)
    groups, start = [], 0
    for k in counts:
        groups.append(images[start : start + k])
        start += k
    prompts = [prompt if k else prompt.replace(model.config.image_token, "") for k in counts]
    return model.prepare_inputs(tiny_tokenizer(), prompts, groups)


def instruct_sample(k: int = 2, answer: str = "肝脏超声。", sid: str = "s1") -> dict:
    """One instruction sample with k image placeholders (a zh site answer, an en findings turn)."""
    return {
        "id": sid,
        "images": [f"img{i}.png" for i in range(k)],
        "conversations": [
            {"from": "human", "value": "\n".join(["<image>"] * k + ["What is the examination site?"])},
            {"from": "gpt", "value": answer},
            {"from": "human", "value": "Describe it."},
            {"from": "gpt", "value": "The liver is normal."},
        ],
        "findings": "The liver is normal in size.",
        "valid": [True] * k,
    }
