"""Converters: tiny original-format LLaVA / LLaVA LoRA / llava-hf / SAM checkpoints written by the tests.

The reference for a converted LLaVA is computed independently with transformers' own modules, the
way LLaVA v1.5 does it: CLIP hidden_states[-2] without CLS -> Linear-GELU-Linear -> spliced into the
Llama input embeddings at the placeholder positions.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    SamVisionConfig,
    SamVisionModel,
)
from typer.testing import CliRunner

from llava_ultra.cli import app
from llava_ultra.errors import CheckpointError, ConfigError
from llava_ultra.model.checkpoint import load_checkpoint
from llava_ultra.model.convert import convert, read_sam
from tests.helpers import TINY_TEXTS, tiny_model_dict, tiny_tokenizer

CLIP = dict(
    image_size=32,
    patch_size=8,
    hidden_size=24,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
)
N_IMAGE_TOKENS = 16  # (32 / 8) ** 2


def _src_tokenizer() -> PreTrainedTokenizerFast:
    """A LLaMA-like tokenizer WITHOUT <image> or a pad token (as Vicuna's)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TINY_TEXTS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


# LLM family -> (transformers config and model, original LLaVA architecture and model_type)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, "LlavaLlamaForCausalLM", "llava_llama", {"rope_theta": 50000.0}),
    "mistral": (
        MistralConfig,
        MistralForCausalLM,
        "LlavaMistralForCausalLM",
        "llava_mistral",
        {"sliding_window": None},
    ),
}


class Parts:
    """The tiny original pieces: an LLM (Llama, or Mistral as in LLaVA-Med v1.5), a CLIP tower, an
    mlp2x_gelu projector, a tokenizer."""

    def __init__(self, family: str = "llama", max_positions: int = 128) -> None:
        config_cls, model_cls, self.architecture, self.model_type, extra = FAMILIES[family]
        torch.manual_seed(0)
        self.tokenizer = _src_tokenizer()
        self.vocab = len(self.tokenizer)
        self.llama = model_cls(
            config_cls(
                vocab_size=self.vocab,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=max_positions,
                bos_token_id=1,
                eos_token_id=2,
                tie_word_embeddings=False,
                **extra,
            )
        ).eval()
        self.clip = CLIPVisionModel(CLIPVisionConfig(**CLIP)).eval()
        self.proj = {
            "model.mm_projector.0.weight": torch.randn(32, 24) * 0.2,
            "model.mm_projector.0.bias": torch.randn(32) * 0.1,
            "model.mm_projector.2.weight": torch.randn(32, 32) * 0.2,
            "model.mm_projector.2.bias": torch.randn(32) * 0.1,
        }

    def llava_config(self, **fields) -> dict:
        config = self.llama.config.to_dict() | {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "mm_vision_tower": "tiny-test/clip-vit-8-32",  # not a known hub tower: any tower of its width fits
            "mm_hidden_size": 24,
            "mm_projector_type": "mlp2x_gelu",
            "mm_vision_select_layer": -2,
            "mm_vision_select_feature": "patch",
            "mm_use_im_start_end": False,
            "mm_use_im_patch_token": False,
            "image_aspect_ratio": "pad",
            "tune_mm_mlp_adapter": False,
            "tokenizer_model_max_length": 2048,
        }
        return config | fields

    def reference_logits(
        self, ids: torch.Tensor, pixels: torch.Tensor, image_id: int, llama=None
    ) -> torch.Tensor:
        llama = llama or self.llama
        p = self.proj
        with torch.no_grad():
            feats = self.clip(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
            h = torch.nn.functional.gelu(
                feats @ p["model.mm_projector.0.weight"].T + p["model.mm_projector.0.bias"]
            )
            h = h @ p["model.mm_projector.2.weight"].T + p["model.mm_projector.2.bias"]
            is_image = ids == image_id
            embeds = llama.get_input_embeddings()(ids.masked_fill(is_image, 0))
            embeds[is_image] = h.reshape(-1, h.shape[-1])
            return llama(inputs_embeds=embeds).logits


@pytest.fixture(scope="module")
def parts() -> Parts:
    return Parts()


@pytest.fixture(scope="module")
def clip_folder(parts, tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    parts.clip.save_pretrained(folder)
    return folder


def write_llava(parts: Parts, folder, fmt: str = "safetensors", tower: bool = False, drop=(), **fields):
    """An original-format LLaVA checkpoint folder with the original key names and config fields."""
    folder.mkdir(parents=True, exist_ok=True)
    state = dict(parts.llama.state_dict()) | parts.proj
    if tower:
        state |= {
            f"model.vision_tower.vision_tower.vision_model.{k}": v for k, v in parts.clip.state_dict().items()
        }
        state["model.vision_tower.vision_tower.vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    state = {k: v.clone() for k, v in state.items() if k not in drop}
    if fmt == "safetensors":
        save_file(state, str(folder / "model.safetensors"))
    else:  # two pytorch_model shards + index, as transformers 4.3x wrote them (with rotary buffers)
        state |= {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(4) for i in range(2)}
        keys = sorted(state)
        shards = {
            "pytorch_model-00001-of-00002.bin": keys[::2],
            "pytorch_model-00002-of-00002.bin": keys[1::2],
        }
        for name, part in shards.items():
            torch.save({k: state[k] for k in part}, folder / name)
        index = {"weight_map": {k: name for name, part in shards.items() for k in part}}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(parts.llava_config(**fields)))
    parts.tokenizer.save_pretrained(folder)
    return folder


def _inputs(image_id: int, vocab: int):
    g = torch.Generator().manual_seed(1)
    text = torch.randint(3, vocab, (1, 8), generator=g)
    ids = torch.cat([text[:, :3], torch.full((1, N_IMAGE_TOKENS), image_id), text[:, 3:]], dim=1)
    return ids, torch.randn(1, 3, 32, 32, generator=g)


def _converted_logits(folder, ids, pixels):
    model, tokenizer = load_checkpoint(folder)
    with torch.no_grad():
        return model(input_ids=ids, pixel_values_clip=pixels, image_counts=[1]).logits, model, tokenizer


@pytest.mark.parametrize("fmt,tower", [("safetensors", False), ("bin", False), ("safetensors", True)])
def test_original_llava_converts_to_the_same_model(parts, clip_folder, tmp_path, fmt, tower):
    # the folder name says "lora"; the files say full checkpoint, and the files win
    src = write_llava(parts, tmp_path / "llava-lora-13b", fmt=fmt, tower=tower)
    vision = clip_folder
    if tower:  # weights come from the checkpoint; the tower folder only supplies the architecture
        vision = tmp_path / "clip_config_only"
        vision.mkdir()
        shutil.copy(clip_folder / "config.json", vision / "config.json")
    summary = convert("llava", src, tmp_path / "out", vision_tower=str(vision))
    assert summary.kind == "full" and summary.added_image_token and summary.grew_vocab
    assert summary.image_token_id == parts.vocab and summary.initialised == []
    assert summary.ignored == (2 if fmt == "bin" else 1 if tower else 0)

    ids, pixels = _inputs(parts.vocab, parts.vocab)
    got, model, tokenizer = _converted_logits(tmp_path / "out", ids, pixels)
    want = parts.reference_logits(ids, pixels, parts.vocab)
    assert got.shape[-1] == parts.vocab + 1  # one new row for <image>
    assert (got[..., : parts.vocab] - want).abs().max().item() <= 1e-5
    assert tokenizer.convert_tokens_to_ids("<image>") == parts.vocab and tokenizer.pad_token == "<unk>"
    c = model.config
    assert (c.template, c.fusion.projector_type, c.vision.select_layer) == ("vicuna_v1", "mlp2x_gelu", -2)
    assert (c.vision.image_aspect_ratio, c.sam.enabled, c.selector.mode) == ("pad", False, "none")
    assert model.llm.config.rope_parameters["rope_theta"] == 50000.0


def test_llava_lora_output_converts(parts, clip_folder, tmp_path):
    base = tmp_path / "vicuna"
    parts.llama.save_pretrained(base)
    parts.tokenizer.save_pretrained(base)
    torch.manual_seed(3)
    adapted = get_peft_model(
        LlamaForCausalLM.from_pretrained(base).eval(),
        LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
        ),
    )
    src = tmp_path / "llava-v1.5-7b"  # no "lora" in the name: the adapter files say what it is
    adapted.save_pretrained(src)
    torch.save({f"base_model.model.{k}": v for k, v in parts.proj.items()}, src / "non_lora_trainables.bin")
    (src / "config.json").write_text(json.dumps(parts.llava_config()))

    with pytest.raises(ConfigError, match=r"LoRA output \(adapter_config.json\); pass --base"):
        convert("llava", src, tmp_path / "out", vision_tower=str(clip_folder))
    summary = convert("llava", src, tmp_path / "out", vision_tower=str(clip_folder), base=base)
    assert summary.kind == "lora"

    ids, pixels = _inputs(parts.vocab, parts.vocab)
    got, _, _ = _converted_logits(tmp_path / "out", ids, pixels)
    merged = adapted.merge_and_unload().eval()
    want = parts.reference_logits(ids, pixels, parts.vocab, llama=merged)
    assert (parts.reference_logits(ids, pixels, parts.vocab) - want).abs().max() > 1e-3  # LoRA matters
    assert (got[..., : parts.vocab] - want).abs().max().item() <= 1e-5


def test_llava_config_and_key_errors(parts, clip_folder, tmp_path):
    tower = str(clip_folder)
    src = write_llava(parts, tmp_path / "identity", mm_projector_type="identity")
    with pytest.raises(ConfigError, match=r"mm_projector_type='identity' is not supported"):
        convert("llava", src, tmp_path / "o1", vision_tower=tower)
    src = write_llava(parts, tmp_path / "startend", mm_use_im_start_end=True)
    with pytest.raises(ConfigError, match=r"mm_use_im_start_end=true"):
        convert("llava", src, tmp_path / "o2", vision_tower=tower)
    src = write_llava(parts, tmp_path / "noproj", drop=tuple(parts.proj))
    with pytest.raises(CheckpointError, match=r"no projector weights \(model\.mm_projector\.\*\)"):
        convert("llava", src, tmp_path / "o3", vision_tower=tower)
    src = write_llava(parts, tmp_path / "halfproj", drop=("model.mm_projector.2.bias",))
    with pytest.raises(CheckpointError, match=r"1 missing: fusion\.clip_projector\.linear_2\.bias"):
        convert("llava", src, tmp_path / "o4", vision_tower=tower)
    src = write_llava(parts, tmp_path / "full")
    with pytest.raises(ConfigError, match="--base is only for LoRA"):
        convert("llava", src, tmp_path / "o5", vision_tower=tower, base=src)
    with pytest.raises(ConfigError, match=r"only fusion\.\*, selector\.\* and dtype"):
        convert("llava", src, tmp_path / "o6", vision_tower=tower, overrides=["vision.select_layer=-1"])
    (src / "config.json").write_text(json.dumps(parts.llama.config.to_dict()))
    with pytest.raises(CheckpointError, match="not an original LLaVA config.*--from llava-hf"):
        convert("llava", src, tmp_path / "o7", vision_tower=tower)


# ------------------------------------------------------------------------------------ SAM

HF_TO_ORIGINAL = {  # golden: transformers SamVisionModel name -> segment-anything name
    "vision_encoder.pos_embed": "image_encoder.pos_embed",
    "vision_encoder.patch_embed.projection.weight": "image_encoder.patch_embed.proj.weight",
    "vision_encoder.layers.1.layer_norm1.weight": "image_encoder.blocks.1.norm1.weight",
    "vision_encoder.layers.0.layer_norm2.bias": "image_encoder.blocks.0.norm2.bias",
    "vision_encoder.layers.1.attn.qkv.weight": "image_encoder.blocks.1.attn.qkv.weight",
    "vision_encoder.layers.1.attn.rel_pos_h": "image_encoder.blocks.1.attn.rel_pos_h",
    "vision_encoder.layers.0.mlp.lin2.bias": "image_encoder.blocks.0.mlp.lin2.bias",
    "vision_encoder.neck.conv1.weight": "image_encoder.neck.0.weight",
    "vision_encoder.neck.layer_norm1.weight": "image_encoder.neck.1.weight",
    "vision_encoder.neck.conv2.weight": "image_encoder.neck.2.weight",
    "vision_encoder.neck.layer_norm2.bias": "image_encoder.neck.3.bias",
}


def _to_original(key: str) -> str:
    key = key.replace("vision_encoder.", "image_encoder.").replace(
        "patch_embed.projection", "patch_embed.proj"
    )
    key = (
        key.replace(".layers.", ".blocks.")
        .replace(".layer_norm1.", ".norm1.")
        .replace(".layer_norm2.", ".norm2.")
    )
    for i, name in enumerate(("conv1", "norm1", "conv2", "norm2")):
        key = key.replace(f"neck.{name}.", f"neck.{i}.")
    return key


@pytest.fixture(scope="module")
def sam_model():
    torch.manual_seed(7)
    return SamVisionModel(SamVisionConfig(**tiny_model_dict()["sam"]["inline"])).eval()


def test_original_sam_converts_to_hf_names(sam_model, tmp_path):
    state = sam_model.state_dict()
    assert all(_to_original(k) == v for k, v in HF_TO_ORIGINAL.items())
    original = {_to_original(k): v.clone() for k, v in state.items()}
    original["prompt_encoder.point_embeddings.0.weight"] = torch.zeros(1, 16)  # not part of the image encoder
    torch.save(original, tmp_path / "sam_vit_tiny.pth")

    summary = convert("sam", tmp_path / "sam_vit_tiny.pth", tmp_path / "sam_hf")
    assert summary.tensors == len(state)
    loaded, info = SamVisionModel.from_pretrained(tmp_path / "sam_hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in state.items())
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "window_size",
        "image_size",
        "patch_size",
        "output_channels",
        "mlp_dim",
    ):
        assert getattr(loaded.config, key) == getattr(sam_model.config, key), key
    assert list(loaded.config.global_attn_indexes) == [1]

    sam_model.save_pretrained(tmp_path / "sam_hf_src")  # HF format reads to the same tensors
    config, hf = read_sam(tmp_path / "sam_hf_src")
    assert hf.keys() == state.keys() and all(torch.equal(hf[k], state[k]) for k in state)

    del original["image_encoder.neck.0.weight"]
    torch.save(original, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match=r"image_encoder\.neck\.0\.weight"):
        convert("sam", tmp_path / "broken.pth", tmp_path / "x")


def test_sam_injected_into_a_llava_conversion(parts, clip_folder, sam_model, tmp_path):
    src = write_llava(parts, tmp_path / "llava")
    sam_model.save_pretrained(tmp_path / "sam")
    summary = convert(
        "llava-med",
        src,
        tmp_path / "out",
        vision_tower=str(clip_folder),
        sam=tmp_path / "sam",
        overrides=["selector.mode=feature+attention", "selector.attn_layers=1"],
    )
    assert (
        "fusion.alpha_logit" in summary.initialised
        and "fusion.sam_projector.linear_1.weight" in summary.initialised
    )
    assert "selector.score_head.weight" in summary.initialised
    assert not any(
        k.startswith(("fusion.clip_projector", "sam.", "clip.", "llm.")) for k in summary.initialised
    )
    model, _ = load_checkpoint(tmp_path / "out")
    assert model.config.sam.enabled and model.config.selector.mode == "feature+attention"
    assert all(torch.equal(v, model.sam.state_dict()[k]) for k, v in sam_model.state_dict().items())
    assert torch.equal(model.fusion.clip_projector.linear_2.bias, parts.proj["model.mm_projector.2.bias"])


# ------------------------------------------------------------------------------- llava-hf


def test_llava_hf_converts_and_matches_transformers(tmp_path):
    tok = tiny_tokenizer()
    spec = tiny_model_dict()
    torch.manual_seed(0)
    reference = LlavaForConditionalGeneration(
        LlavaConfig(
            vision_config=CLIPVisionConfig(**spec["vision"]["inline"]),
            text_config=LlamaConfig(**{k: v for k, v in spec["llm"]["inline"].items() if k != "model_type"}),
            image_token_index=4,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
    ).eval()
    reference.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    with pytest.raises(
        CheckpointError,
        match=r"hf has no preprocessor_config.json \(nor a processor_config.json with an image_processor\): the image preprocessing",
    ):
        convert("llava-hf", tmp_path / "hf", tmp_path / "out")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "hf"
    )
    summary = convert("llava-hf", tmp_path / "hf", tmp_path / "out")
    assert summary.kind == "llava-hf" and summary.image_token_id == 4
    ids, pixels = _inputs(4, 300)
    got, _, _ = _converted_logits(tmp_path / "out", ids, pixels)
    with torch.no_grad():
        want = reference(input_ids=ids, pixel_values=pixels).logits
    assert (got - want).abs().max().item() <= 1e-5


def test_cli_convert(sam_model, tmp_path):
    sam_model.save_pretrained(tmp_path / "sam")
    runner = CliRunner()
    result = runner.invoke(
        app, ["convert", "--from", "sam", "--src", str(tmp_path / "sam"), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 0, result.output
    assert "converted" in result.output and (tmp_path / "o" / "model.safetensors").is_file()
    result = runner.invoke(
        app, ["convert", "--from", "llava-next", "--src", str(tmp_path), "--out", str(tmp_path / "x")]
    )
    assert result.exit_code == 2 and "--from 'llava-next' is not supported" in result.output
