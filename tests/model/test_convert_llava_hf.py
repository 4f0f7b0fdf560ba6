"""The llava-hf loader (`model.convert`): our model with a transformers LLaVA's weights gives its
logits and its greedy tokens, and the loader is strict."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlavaForConditionalGeneration

from llava_ultra.errors import CheckpointError
from llava_ultra.model.convert import load_llava_hf_weights, model_config_from_llava_hf
from llava_ultra.model.ultra import build_model
from tests.model.conftest import IMAGE_ID

N_PATCHES = 25  # 30 px / patch 6 -> 5 x 5


def _llava_inputs(batch: int = 1):
    g = torch.Generator().manual_seed(1)
    text = torch.randint(3, 90, (batch, 6), generator=g)
    ids = torch.cat([text[:, :2], torch.full((batch, N_PATCHES), IMAGE_ID), text[:, 2:]], dim=1)
    pixels = torch.randn(batch, 3, 30, 30, generator=g)
    return ids, pixels


def test_parity_with_transformers_llava(llava_folder):
    reference = LlavaForConditionalGeneration.from_pretrained(llava_folder).eval()
    ours = build_model(model_config_from_llava_hf(llava_folder)).eval()
    load_llava_hf_weights(ours, llava_folder)
    assert ours.sam is None and ours.config.selector.mode == "none"

    ids, pixels = _llava_inputs(batch=2)
    with torch.no_grad():
        want = reference(input_ids=ids, pixel_values=pixels).logits
        got = ours(input_ids=ids, pixel_values_clip=pixels, image_counts=[1, 1]).logits
    assert (want - got).abs().max().item() <= 1e-5

    ids, pixels = ids[:1], pixels[:1]
    ref_tokens = reference.generate(
        input_ids=ids,
        pixel_values=pixels,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=8,
        do_sample=False,
    )[0, ids.shape[1] :].tolist()
    ref_tokens = ref_tokens[: ref_tokens.index(2)] if 2 in ref_tokens else ref_tokens  # ours drops EOS
    got_tokens = ours.generate(
        ids, pixel_values_clip=pixels, image_counts=[1], max_new_tokens=8, eos_token_id=2
    )
    assert got_tokens.sequences[0] == ref_tokens
    assert len(ref_tokens) > 0


def test_llava_loader_is_strict(llava_folder, tmp_path):
    state = load_file(str(llava_folder / "model.safetensors"))
    del state["multi_modal_projector.linear_2.weight"]
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((llava_folder / "config.json").read_text())
    model = build_model(model_config_from_llava_hf(tmp_path))
    with pytest.raises(CheckpointError, match=r"fusion\.clip_projector\.linear_2\.weight.*extra\.weight"):
        load_llava_hf_weights(model, tmp_path)
