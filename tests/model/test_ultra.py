"""The assembled model: losses, placeholders, generation, dtype policy, building from folders.
(Parity with transformers' LLaVA: test_convert_llava_hf.py; checkpoint folders: test_checkpoint.py.)"""

from __future__ import annotations

import pytest
import torch

from llava_ultra.errors import ConfigError, DataError
from llava_ultra.model.ultra import (
    build_model,
    resolve_dtype,
)
from tests.helpers import tiny_batch, tiny_images, tiny_model, tiny_model_config, tiny_tokenizer


def test_forward_losses_and_selection_shapes():
    model = tiny_model().train()
    batch = tiny_batch(model, [3, 2])
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == model.config.image_token_id, -100)
    findings = tiny_tokenizer()(["肝脏大小正常", "gallbladder focus"], padding=True, return_tensors="pt")
    out = model(
        **batch, labels=labels, findings_ids=findings.input_ids, findings_mask=findings.attention_mask
    )
    assert out.logits.shape[:2] == batch["input_ids"].shape
    assert out.kd_loss is not None and out.kd_loss.item() >= 0
    torch.testing.assert_close(out.loss, out.lm_loss + model.config.selector.kd_weight * out.kd_loss)
    assert [len(i) for i in out.selection.indices] == [1, 1]
    assert out.selection.scores.shape == (2, 3) and out.selection.scores[1, 2] == float("-inf")
    assert out.selection.teacher.shape == (2, 3)
    out.loss.backward()
    assert model.selector.score_head.weight.grad.abs().sum() > 0
    assert model.fusion.alpha_logit.grad is not None
    assert all(p.grad is None for p in model.clip.parameters())  # frozen
    assert not model.clip.training and not model.sam.training  # frozen encoders stay in eval mode


def test_labelled_positions_only_loss_equals_the_full_logits_loss():
    """Training's return_logits=False: same loss, same gradients, same hidden states, no logits."""
    model = tiny_model(**{"selector.straight_through": False})
    batch = tiny_batch(model, [3, 2])
    ids = batch["input_ids"]
    labels = ids.masked_fill(ids == model.config.image_token_id, -100)
    labels[:, : ids.shape[1] // 2] = -100  # a prompt that is not learned from
    labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
    results = []
    for full in (True, False):
        model.zero_grad(set_to_none=True)
        out = model(**batch, labels=labels, output_hidden_states=True, return_logits=full)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (full, g_full), (fast, g_fast) = results
    assert full.logits is not None and fast.logits is None
    torch.testing.assert_close(fast.loss, full.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast.hidden_states, full.hidden_states)
    assert g_full.keys() == g_fast.keys() and len(g_full) > 0
    for name in g_full:
        torch.testing.assert_close(g_fast[name], g_full[name], rtol=1e-5, atol=1e-6, msg=name)
    # nothing labelled: a zero loss that still backpropagates
    none = model(**batch, labels=torch.full_like(labels, -100), return_logits=False)
    assert none.lm_loss.item() == 0.0 and none.lm_loss.requires_grad


def test_selected_frame_is_the_one_the_llm_sees():
    model = tiny_model()
    batch = tiny_batch(model, [4])
    with torch.no_grad():
        out = model(**batch)
        best = int(out.selection.scores[0].argmax())
        assert out.selection.indices == [[best]]
        only = {k: v for k, v in batch.items()}
        only["pixel_values_clip"] = batch["pixel_values_clip"][best : best + 1]
        only["pixel_values_sam"] = batch["pixel_values_sam"][best : best + 1]
        only["image_counts"] = [1]
        alone = model(**only)
    torch.testing.assert_close(out.logits, alone.logits)


def test_clip_only_scoring_matches_a_reference_and_runs_sam_on_the_chosen_frames_only():
    full = tiny_model()
    cheap = tiny_model(**{"selector.score_features": "clip"})
    cheap.load_state_dict(full.state_dict())
    batch = tiny_batch(cheap, [4, 1, 3])
    sam_batches = []
    cheap.sam.register_forward_hook(lambda _m, _i, out: sam_batches.append(out.last_hidden_state.shape[0]))
    with torch.no_grad():
        out = cheap(**batch)
        # reference: the scorer over the CLIP projector's tokens of every frame, argmax per sample
        v = cheap.config.vision
        from llava_ultra.model.vision import clip_tokens

        h1 = cheap.fusion.clip_projector(
            clip_tokens(cheap.clip, batch["pixel_values_clip"], v.select_layer, v.select_feature)
        )
        ref = cheap.selector.score(h1)
        want = [[int(ref[a:b].argmax())] for a, b in ((0, 4), (4, 5), (5, 8))]
        assert out.selection.indices == want
        assert sam_batches == [3]  # one SAM call over the 3 chosen frames, not all 8
        # the LLM sees exactly the fused features of the chosen frames
        flat = torch.tensor([0 + want[0][0], 4, 5 + want[2][0]])
        fused = cheap.encode_images(batch["pixel_values_clip"][flat], batch["pixel_values_sam"][flat])
        torch.testing.assert_close(out.image_features, fused)
    # training: the straight-through gradient reaches the scorer through the CLIP-only scores
    cheap.train()
    cheap.selector.score_head.weight.grad = None
    cheap(**batch, labels=batch["input_ids"]).loss.backward()
    assert cheap.selector.score_head.weight.grad.abs().sum() > 0


def test_supervised_selector_loss_enters_the_total_only_when_asked():
    model = tiny_model(**{"selector.supervised_weight": 0.5}).train()
    batch = tiny_batch(model, [3, 2])
    valid = torch.tensor([1, 0, 0, 1, 1])  # sample 0 informative; sample 1 all valid (no signal)
    out = model(**batch, labels=batch["input_ids"], frame_valid=valid)
    assert out.kd_loss is None  # no findings text in this batch: no teacher
    sup = out.loss - out.lm_loss  # = 0.5 * cross-entropy towards frame 0 of sample 0
    assert sup.item() > 0
    none = model(**batch, labels=batch["input_ids"])  # no labels: no supervised term
    torch.testing.assert_close(none.loss, none.lm_loss)
    model.eval()  # never outside training
    ev = model(**batch, labels=batch["input_ids"], frame_valid=valid)
    assert ev.kd_loss is None and torch.equal(ev.loss, ev.lm_loss)


def test_image_count_mismatch_names_both_counts():
    model = tiny_model()
    batch = tiny_batch(model, [2])
    ids = batch["input_ids"]
    batch["input_ids"] = torch.cat([ids, torch.full((1, 3), model.config.image_token_id)], dim=1)
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    with pytest.raises(
        DataError, match=r"19 image placeholder tokens.*1 selected image\(s\) x 16 tokens = 16"
    ):
        model(**batch)
    with pytest.raises(DataError, match=r"add up to 3 images but pixel_values_clip holds 2"):
        model(**tiny_batch(model, [2]) | {"image_counts": [3]})


def test_none_mode_all_images_reach_the_llm():
    model = tiny_model(**{"selector.mode": "none", "selector.none_strategy": "all"})
    batch = tiny_batch(model, [3, 1])
    assert int((batch["input_ids"][0] == model.config.image_token_id).sum()) == 3 * 16
    with torch.no_grad():
        out = model(**batch)
    assert out.selection.indices == [[0, 1, 2], [0]] and out.kd_loss is None


def test_none_mode_random_frame_is_reproducible_and_batch_independent():
    model = tiny_model(**{"selector.mode": "none", "selector.none_strategy": "random"})
    batch = tiny_batch(model, [5, 3, 1])
    assert int((batch["input_ids"][0] == model.config.image_token_id).sum()) == 16  # one image
    with torch.no_grad():
        out = model(**batch)
        again = model(**batch)
        # the same sample alone (its images only) gets the same frame at eval
        alone = tiny_batch(model, [5])
        assert model(**alone).selection.indices[0] == out.selection.indices[0]
    assert out.selection.indices == again.selection.indices
    assert [len(i) for i in out.selection.indices] == [1, 1, 1] and out.selection.indices[2] == [0]
    assert all(0 <= i[0] < k for i, k in zip(out.selection.indices, [5, 3, 1], strict=True))
    # the frame is filled in as the LLM input: same logits as sending that frame alone
    pick = out.selection.indices[0][0]
    single = alone | {
        "pixel_values_clip": alone["pixel_values_clip"][pick : pick + 1],
        "pixel_values_sam": alone["pixel_values_sam"][pick : pick + 1],
        "image_counts": [1],
    }
    with torch.no_grad():
        torch.testing.assert_close(model(**single).logits, model(**alone).logits)
    # while training, draws come from torch's seeded RNG: they vary and are reproducible
    model.train()
    draws = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        draws.append([tuple(model.selector.fixed_choice([8] * 16)[b]) for b in range(16)])
    assert draws[0] == draws[1] and draws[0] != draws[2]
    assert len({d for d in draws[0]}) > 1


def test_batched_greedy_equals_unbatched():
    model = tiny_model(seed=3)
    tok = tiny_tokenizer()
    prompts = ["<image>\n肝脏大小?", "USER: <image> What is the examination site? ASSISTANT:"]
    images = [tiny_images(2, seed=1), tiny_images(1, seed=2)]
    together = model.generate(**model.prepare_inputs(tok, prompts, images), max_new_tokens=6, eos_token_id=[])
    for i in range(2):
        alone = model.generate(
            **model.prepare_inputs(tok, prompts[i : i + 1], images[i : i + 1]),
            max_new_tokens=6,
            eos_token_id=[],
        )
        assert alone.sequences[0] == together.sequences[i]
        assert alone.selection.indices[0] == together.selection.indices[i]
    assert all(len(s) == 6 for s in together.sequences)


def test_generation_cache_matches_full_forward():
    """Greedy tokens from the KV-cache loop equal argmax of a full forward over prompt + answer."""
    model = tiny_model(seed=5)
    batch = tiny_batch(model, [2])
    out = model.generate(**batch, max_new_tokens=5, eos_token_id=[])
    ids = torch.cat([batch["input_ids"], torch.tensor([out.sequences[0]])], dim=1)
    with torch.no_grad():
        logits = model(**(batch | {"input_ids": ids, "attention_mask": torch.ones_like(ids)})).logits
    prompt_len = batch["input_ids"].shape[1]
    assert logits[0, prompt_len - 1 : -1].argmax(-1).tolist() == out.sequences[0]


def test_sampling_is_seeded_and_stop_strings_cut():
    model = tiny_model(seed=1)
    batch = tiny_batch(model, [1])
    kwargs = dict(max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.9, eos_token_id=[])
    a, b = model.generate(**batch, seed=7, **kwargs), model.generate(**batch, seed=7, **kwargs)
    assert a.sequences == b.sequences
    tok = tiny_tokenizer()
    full = model.generate(**batch, max_new_tokens=8, eos_token_id=[], tokenizer=tok)
    stop = full.texts[0][2:4]
    assert stop, full.texts
    cut = model.generate(**batch, max_new_tokens=8, eos_token_id=[], tokenizer=tok, stop_strings=[stop])
    assert cut.texts[0] == full.texts[0][: full.texts[0].find(stop)]
    assert len(cut.sequences[0]) < len(full.sequences[0])
    with pytest.raises(ConfigError, match="tokenizer"):
        model.generate(**batch, stop_strings=["x"])


def test_dtype_policy():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(ConfigError, match="float16.*CPU"):
        resolve_dtype("float16", "cpu")


def test_tokenizer_and_config_must_agree_on_image_token():
    with pytest.raises(ConfigError, match="image_token_id=7.*set model.image_token_id=4"):
        build_model(tiny_model_config(image_token_id=7), tiny_tokenizer())


def test_build_from_local_pretrained_folders(tmp_path):
    """The `path:` branch users take at home: each part loaded with from_pretrained from a folder."""
    source = tiny_model(seed=4)
    source.clip.save_pretrained(tmp_path / "clip")
    source.sam.save_pretrained(tmp_path / "sam")
    source.llm.save_pretrained(tmp_path / "llm")
    cfg = tiny_model_config(
        **{
            "vision.inline": None,
            "vision.path": str(tmp_path / "clip"),
            "sam.inline": None,
            "sam.path": str(tmp_path / "sam"),
            "llm.inline": None,
            "llm.path": str(tmp_path / "llm"),
        }
    )
    built = build_model(cfg, tiny_tokenizer()).eval()
    for part in ("clip", "sam", "llm"):
        want, got = getattr(source, part).state_dict(), getattr(built, part).state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert built.resolved_config().llm.origin == str(tmp_path / "llm")
    with pytest.raises(ConfigError, match="image_size=48 but the CLIP encoder has image_size=32"):
        build_model(
            tiny_model_config(
                **{"vision.inline": None, "vision.path": str(tmp_path / "clip"), "vision.image_size": 48}
            )
        )


def test_conv_alignment_in_the_full_model():
    model = tiny_model(**{"fusion.align": "conv", "fusion.conv_channels": [8, 12]}).train()
    batch = tiny_batch(model, [2, 2])
    out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    assert model.fusion.align.convs[1].weight.grad.abs().sum() > 0
