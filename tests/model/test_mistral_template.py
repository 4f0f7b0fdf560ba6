"""The 'mistral_instruct' conversation format (LLaVA-Med v1.5) and the recorded-template default.

Golden strings follow LLaVA's `conv_mistral_instruct` (separator style LLAMA_2, sep "", sep2 "</s>",
empty system): "[INST] q [/INST]" + " a </s>" per turn, `<s>` left to the tokenizer. A tiny
original-format `LlavaMistralForCausalLM` checkpoint is converted and must then be prompted in that
format by the engine and by `llava-ultra eval` without any --template flag.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel, MistralConfig, MistralForCausalLM
from typer.testing import CliRunner

from llava_ultra.cli import app
from llava_ultra.config import TEMPLATES, Stage2Config
from llava_ultra.data.collate import IGNORE_INDEX, encode_sample
from llava_ultra.errors import ConfigError
from llava_ultra.eval.runner import EvalSettings
from llava_ultra.model.convert import convert
from llava_ultra.model.lora import load_checkpoint
from llava_ultra.model.tokenizer import default_template, render_conversation, render_prompt
from llava_ultra.serve.engine import Engine, Message
from tests.helpers import tiny_model_config, tiny_tokenizer
from tests.model.test_convert import CLIP, N_IMAGE_TOKENS, _src_tokenizer

MESSAGES = [
    {"role": "user", "content": "<image>\n这是什么部位？"},
    {"role": "assistant", "content": "肝脏。"},
    {"role": "user", "content": "有无异常？"},
    {"role": "assistant", "content": "未见异常。"},
]


# ------------------------------------------------------------------------------ rendering


def test_mistral_instruct_golden_rendering():
    segments = render_conversation(MESSAGES, "mistral_instruct")
    assert "".join(s.text for s in segments) == (
        "[INST] <image>\n这是什么部位？ [/INST] 肝脏。 </s>[INST] 有无异常？ [/INST] 未见异常。 </s>"
    )
    assert [s.text for s in segments if s.is_target] == [" 肝脏。 </s>", " 未见异常。 </s>"]
    assert render_prompt(MESSAGES[:1], "mistral_instruct") == "[INST] <image>\n这是什么部位？ [/INST]"
    assert render_prompt(MESSAGES[:3], "mistral_instruct").endswith("</s>[INST] 有无异常？ [/INST]")
    # a system prompt is wrapped LLaMA-2 style inside the first instruction only
    with_system = render_prompt(MESSAGES[:3], "mistral_instruct", system="SYS")
    assert with_system.startswith("[INST] <<SYS>>\nSYS\n<</SYS>>\n\n<image>\n这是什么部位？ [/INST]")
    assert with_system.count("<<SYS>>") == 1
    assert render_prompt(MESSAGES[:1], "mistral_instruct", system="") == render_prompt(
        MESSAGES[:1], "mistral_instruct"
    )


def test_mistral_instruct_labels_mask_all_but_the_answers():
    tok, cfg = tiny_tokenizer(), tiny_model_config()
    sample = {
        "id": "m1",
        "images": ["a.png"],
        "conversations": [
            {"from": "human", "value": "<image>\n这是什么部位？"},
            {"from": "gpt", "value": "肝脏。"},
            {"from": "human", "value": "有无异常？"},
            {"from": "gpt", "value": "未见异常。"},
        ],
    }
    enc = encode_sample(sample, tok, cfg, "mistral_instruct")
    pairs = list(zip(enc.input_ids.tolist(), enc.labels.tolist(), strict=True))
    learned = tok.decode([t for t, lab in pairs if lab != IGNORE_INDEX])
    assert learned == " 肝脏。 </s> 未见异常。 </s>"
    masked = tok.decode([t for t, lab in pairs if lab == IGNORE_INDEX and t != cfg.image_token_id])
    assert masked == "<s>[INST] \n这是什么部位？ [/INST][INST] 有无异常？ [/INST]"
    assert (
        enc.input_ids[0] == tok.bos_token_id
        and (enc.labels[enc.input_ids == cfg.image_token_id] == -100).all()
    )


def test_one_template_list_everywhere():
    assert TEMPLATES == ("vicuna_v1", "mistral_instruct", "plain")
    assert EvalSettings(template="mistral_instruct").template == "mistral_instruct"
    assert EvalSettings().template is None  # None: the checkpoint's
    with pytest.raises(ConfigError, match="eval template='chatml'"):
        EvalSettings(template="chatml")
    assert Stage2Config(template="mistral_instruct").template == "mistral_instruct"


@pytest.mark.parametrize(
    "recorded,llm,want",
    [
        ("vicuna_v1", "llama", "vicuna_v1"),
        ("mistral_instruct", "mistral", "mistral_instruct"),
        ("mistral_instruct", None, "mistral_instruct"),
        ("plain", "llama", "vicuna_v1"),
        ("plain", None, "vicuna_v1"),
        ("plain", "mistral", "mistral_instruct"),
    ],
)
def test_default_template(recorded, llm, want):
    assert default_template(recorded, llm) == want


# ------------------------------------------------------------ converted LLaVA-Med v1.5 (Mistral)


@pytest.fixture(scope="module")
def llava_med(tmp_path_factory):
    """A tiny original-format LlavaMistralForCausalLM folder, its CLIP folder, and the pieces."""
    root = tmp_path_factory.mktemp("llava_med")
    torch.manual_seed(0)
    tokenizer = _src_tokenizer()
    vocab = len(tokenizer)
    mistral = MistralForCausalLM(
        MistralConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            sliding_window=None,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
        )
    ).eval()
    clip = CLIPVisionModel(CLIPVisionConfig(**CLIP)).eval()
    clip.save_pretrained(root / "clip")
    proj = {
        "model.mm_projector.0.weight": torch.randn(32, 24) * 0.2,
        "model.mm_projector.0.bias": torch.randn(32) * 0.1,
        "model.mm_projector.2.weight": torch.randn(32, 32) * 0.2,
        "model.mm_projector.2.bias": torch.randn(32) * 0.1,
    }
    src = root / "llava-med-v1.5-mistral-7b"
    src.mkdir()
    state = {k: v.clone() for k, v in (dict(mistral.state_dict()) | proj).items()}
    save_file(state, str(src / "model.safetensors"))
    config = mistral.config.to_dict() | {
        "architectures": ["LlavaMistralForCausalLM"],
        "model_type": "llava_mistral",
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "mm_hidden_size": 24,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "image_aspect_ratio": "pad",
    }
    (src / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(src)
    summary = convert("llava-med", src, root / "out", vision_tower=str(root / "clip"))
    return {
        "root": root,
        "out": root / "out",
        "summary": summary,
        "mistral": mistral,
        "clip": clip,
        "proj": proj,
    }


def test_llava_med_converts_with_mistral_instruct_and_same_logits(llava_med):
    summary = llava_med["summary"]
    assert summary.template == "mistral_instruct" and summary.kind == "full"
    model, _ = load_checkpoint(llava_med["out"])
    assert model.config.template == "mistral_instruct"
    assert model.llm.config.model_type == "mistral"
    # the converted model computes what LLaVA computes: CLIP[-2] w/o CLS -> MLP -> spliced embeddings
    image_id, vocab = summary.image_token_id, model.llm.config.vocab_size - 1
    g = torch.Generator().manual_seed(1)
    text = torch.randint(3, vocab, (1, 8), generator=g)
    ids = torch.cat([text[:, :3], torch.full((1, N_IMAGE_TOKENS), image_id), text[:, 3:]], dim=1)
    pixels = torch.randn(1, 3, 32, 32, generator=g)
    p, mistral, clip = llava_med["proj"], llava_med["mistral"], llava_med["clip"]
    with torch.no_grad():
        got = model(input_ids=ids, pixel_values_clip=pixels, image_counts=[1]).logits
        feats = clip(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        h = torch.nn.functional.gelu(
            feats @ p["model.mm_projector.0.weight"].T + p["model.mm_projector.0.bias"]
        )
        h = h @ p["model.mm_projector.2.weight"].T + p["model.mm_projector.2.bias"]
        is_image = ids == image_id
        embeds = mistral.get_input_embeddings()(ids.masked_fill(is_image, 0))
        embeds[is_image] = h.reshape(-1, h.shape[-1])
        want = mistral(inputs_embeds=embeds).logits
    assert (got[..., :vocab] - want).abs().max().item() <= 1e-5


def test_engine_prompts_with_the_recorded_template(llava_med):
    model, tokenizer = load_checkpoint(llava_med["out"])
    image = Image.new("RGB", (40, 32), (120, 60, 30))
    question = [Message("user", "What organ is this?", [image])]
    with Engine(model, tokenizer, max_batch_size=1) as engine:
        assert engine.template == "mistral_instruct"
        assert engine.prepare(question).prompt == "[INST] <image>\nWhat organ is this? [/INST]"
    with Engine(model, tokenizer, max_batch_size=1, template="vicuna_v1") as engine:  # a flag still wins
        assert engine.prepare(question).prompt.endswith("USER: <image>\nWhat organ is this? ASSISTANT:")


def test_plain_checkpoint_engine_uses_its_llm_family_chat_format(llava_med):
    model, tokenizer = load_checkpoint(llava_med["out"])
    model.config = dataclasses.replace(model.config, template="plain")
    with Engine(model, tokenizer, max_batch_size=1) as engine:
        assert engine.template == "mistral_instruct"


def test_eval_command_uses_the_recorded_template(llava_med):
    root = llava_med["root"]
    data = root / "data"
    data.mkdir()
    Image.new("RGB", (48, 40), (200, 100, 50)).save(data / "a.png")
    samples = [
        {
            "id": f"q{i}",
            "images": ["a.png"],
            "language": "en",
            "answer_type": kind,
            "conversations": [
                {"from": "human", "value": f"<image>\n{question}"},
                {"from": "gpt", "value": answer},
            ],
        }
        for i, (question, answer, kind) in enumerate(
            [("What organ is shown?", "liver", "OPEN"), ("Is there a lesion?", "no", "CLOSED")]
        )
    ]
    (data / "eval.test.json").write_text(json.dumps(samples), encoding="utf-8")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(
            app,
            [
                "eval",
                "--model", str(llava_med["out"]),
                "--data", str(data / "eval.test.json"),
                "--out", str(root / "run"),
                "--batch-size", "2",
                "--max-new-tokens", "2",
                "--bootstrap", "0",
                "--no-plots",
                "--device", "cpu",
            ],
        )  # fmt: skip
    finally:
        torch.set_num_threads(before)
    assert result.exit_code == 0, result.output
    run = json.loads((root / "run" / "run.json").read_text(encoding="utf-8"))
    assert run["decoding"]["template"] == "mistral_instruct"
    assert run["template_source"] == "checkpoint (model.template=mistral_instruct)"
    lines = (root / "run" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    prompts = [json.loads(line)["metadata"]["rendered_prompt"] for line in lines]
    assert prompts == [
        "[INST] <image>\nWhat organ is shown? [/INST]",
        "[INST] <image>\nIs there a lesion? [/INST]",
    ]
