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
from typer.testing import CliRunner

from llava_ultra.cli import app
from llava_ultra.config import TEMPLATES, Stage2Config
from llava_ultra.errors import ConfigError
from llava_ultra.eval.runner import EvalSettings
from llava_ultra.model.checkpoint import load_checkpoint
from llava_ultra.model.convert import convert
from llava_ultra.model.processor import IGNORE_INDEX, encode_sample
from llava_ultra.model.tokenizer import default_template, render_conversation, render_prompt
from llava_ultra.serve.engine import Engine, Message
from tests.helpers import tiny_model_config, tiny_tokenizer
from tests.model.test_convert import Parts, _inputs, write_llava

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
    """A tiny original-format LlavaMistralForCausalLM folder (test_convert's writer), converted."""
    root = tmp_path_factory.mktemp("llava_med")
    parts = Parts("mistral", max_positions=256)  # room for the vicuna system prompt
    parts.clip.save_pretrained(root / "clip")
    src = write_llava(parts, root / "llava-med-v1.5-mistral-7b")
    summary = convert("llava-med", src, root / "out", vision_tower=str(root / "clip"))
    return {"root": root, "out": root / "out", "summary": summary, "parts": parts}


def test_llava_med_converts_with_mistral_instruct_and_same_logits(llava_med):
    summary = llava_med["summary"]
    assert summary.template == "mistral_instruct" and summary.kind == "full"
    model, _ = load_checkpoint(llava_med["out"])
    assert model.config.template == "mistral_instruct"
    assert model.llm.config.model_type == "mistral"
    # the converted model computes what LLaVA computes: CLIP[-2] w/o CLS -> MLP -> spliced embeddings
    vocab = model.llm.config.vocab_size - 1
    ids, pixels = _inputs(summary.image_token_id, vocab)
    with torch.no_grad():
        got = model(input_ids=ids, pixel_values_clip=pixels, image_counts=[1]).logits
    want = llava_med["parts"].reference_logits(ids, pixels, summary.image_token_id)
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
