"""End-to-end parity of converted checkpoints with the originals, through each side's OWN preprocessing.

Non-square images only (that is where preprocessing differs), a sentencepiece-style (Metaspace,
byte-fallback BPE) Llama tokenizer as LLaMA / Vicuna / Mistral checkpoints have, and:

- llava-hf: transformers' `LlavaProcessor` (its CLIPImageProcessor resizes the shortest edge and
  centre-crops) + `LlavaForConditionalGeneration`, against `llava-ultra convert --from llava-hf`.
- original LLaVA (`image_aspect_ratio: pad`): the pipeline of LLaVA's `llava/mm_utils.py`, re-implemented
  below from its source: `expand2square` with `tuple(int(x * 255) for x in image_mean)`, then
  `CLIPImageProcessor.preprocess`, and `tokenizer_image_token` (each piece between `<image>`s tokenised
  on its own, BOS kept on the first piece only, -200 in between); the model side is CLIP
  hidden_states[-2] without CLS -> Linear-GELU-Linear -> spliced into the Llama input embeddings.
  LLaVA loads the tokenizer with sentencepiece, which prefixes '▁' to every call; the raw
  `tokenizers` object below does the same per call, so it stands in for it.

Each must give the same pixels (bit for bit), the same ids and the same logits (<= 1e-5).
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoProcessor,
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from llava_ultra.model.checkpoint import load_checkpoint
from llava_ultra.model.convert import convert
from llava_ultra.model.tokenizer import load_tokenizer

CLIP = dict(image_size=32, patch_size=8, hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4)  # fmt: skip
N_TOKENS = 16  # (32 / 8) ** 2
PROMPT = "A chat between a user and an assistant. USER: <image>\nWhat is shown in the image? ASSISTANT:"
TEXTS = [
    PROMPT.replace("<image>", ""),
    "The liver is normal. 甲状腺右叶低回声结节。",
    "What is this?\nIt is a lung.",
]
PROCESSOR = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}


def sentencepiece_like() -> Tokenizer:
    """A Llama-style tokenizer: byte-fallback BPE, Metaspace '▁' prefix, BOS added by the post-processor."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(
        TEXTS * 8, trainers.BpeTrainer(vocab_size=420, special_tokens=specials, show_progress=False)
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def write_tokenizer(tok: Tokenizer, folder, legacy: bool | None) -> None:
    """tokenizer.json + a tokenizer_config.json as LLaMA checkpoints ship it (`legacy` as given)."""
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
    }
    if legacy is not None:
        config["legacy"] = legacy
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def non_square_images() -> list[Image.Image]:
    g = torch.Generator().manual_seed(5)
    wide = torch.randint(0, 256, (30, 47, 3), generator=g, dtype=torch.uint8).numpy()  # 47 x 30
    tall = torch.randint(0, 256, (53, 21, 3), generator=g, dtype=torch.uint8).numpy()  # 21 x 53
    return [Image.fromarray(wide), Image.fromarray(tall)]


# ---------------------------------------------------------- LLaVA's mm_utils, re-implemented


def expand2square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    width, height = image.size
    if width == height:
        return image
    if width > height:
        result = Image.new(image.mode, (width, width), background)
        result.paste(image, (0, (width - height) // 2))
        return result
    result = Image.new(image.mode, (height, height), background)
    result.paste(image, ((height - width) // 2, 0))
    return result


def tokenizer_image_token(prompt: str, encode, bos_id: int, image_index: int = -200) -> list[int]:
    chunks = [encode(chunk) for chunk in prompt.split("<image>")]
    separated = [x for chunk in chunks for x in (chunk, [image_index] * 2)][:-1]
    offset = 1 if chunks and chunks[0] and chunks[0][0] == bos_id else 0
    ids = [chunks[0][0]] if offset else []
    for x in separated:
        ids.extend(x[offset:])
    return ids


def llava_logits(llama, clip, proj, ids: list[int], pixels: torch.Tensor) -> torch.Tensor:
    """LLaVA v1.5's forward: CLIP layer -2 patch tokens -> mlp2x_gelu -> spliced at the -200 position."""
    with torch.no_grad():
        feats = clip(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        h = torch.nn.functional.gelu(feats @ proj["0.weight"].T + proj["0.bias"])
        h = (h @ proj["2.weight"].T + proj["2.bias"])[0]  # (16, D)
        at = ids.index(-200)
        embed = llama.get_input_embeddings()
        pieces = [embed(torch.tensor([ids[:at]]))[0], h, embed(torch.tensor([ids[at + 1 :]]))[0]]
        return llama(inputs_embeds=torch.cat(pieces)[None]).logits


# ------------------------------------------------------------------------------ the tests


@pytest.fixture(scope="module")
def llama_parts():
    torch.manual_seed(0)
    tok = sentencepiece_like()
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=tok.get_vocab_size(),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
        )  # fmt: skip
    ).eval()
    clip = CLIPVisionModel(CLIPVisionConfig(**CLIP)).eval()
    proj = {
        "0.weight": torch.randn(32, 24) * 0.2,
        "0.bias": torch.randn(32) * 0.1,
        "2.weight": torch.randn(32, 32) * 0.2,
        "2.bias": torch.randn(32) * 0.1,
    }
    return tok, llama, clip, proj


def _ours(out, image):
    model, tokenizer = load_checkpoint(out)
    batch = model.prepare_inputs(tokenizer, [PROMPT], [[image]])
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items()}).logits
    return model, batch, logits


@pytest.mark.parametrize("legacy", [None, False, True])
def test_original_llava_pad_parity(llama_parts, tmp_path, legacy):
    tok, llama, clip, proj = llama_parts
    src = tmp_path / "llava-v1.5"
    write_tokenizer(tok, src, legacy)
    state = dict(llama.state_dict()) | {f"model.mm_projector.{k}": v for k, v in proj.items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(src / "model.safetensors"))
    config = llama.config.to_dict() | {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama",
        "mm_vision_tower": "tiny-test/clip-vit-8-32",
        "mm_hidden_size": 24,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_use_im_start_end": False,
        "image_aspect_ratio": "pad",
    }
    (src / "config.json").write_text(json.dumps(config))
    tower = tmp_path / "clip"
    clip.save_pretrained(tower)
    mean = [0.5, 0.4, 0.3]  # a mean whose x * 255 has fractions: int() and round() differ (127 vs 128)
    CLIPImageProcessor(**PROCESSOR, image_mean=mean).save_pretrained(tower)

    summary = convert("llava", src, tmp_path / "out", vision_tower=tower)
    assert "pad to a square with int(mean * 255)" in summary.preprocessing
    for image in non_square_images():
        processor = CLIPImageProcessor.from_pretrained(tower)
        square = expand2square(image, tuple(int(x * 255) for x in processor.image_mean))
        want_pixels = processor.preprocess(square, return_tensors="pt")["pixel_values"]
        want_ids = tokenizer_image_token(PROMPT, lambda s: tok.encode(s).ids, bos_id=1)
        want = llava_logits(llama, clip, proj, want_ids, want_pixels)

        model, batch, got = _ours(tmp_path / "out", image)
        assert torch.equal(batch["pixel_values_clip"], want_pixels)  # bit for bit
        image_id = model.config.image_token_id
        ids = batch["input_ids"][0].tolist()
        at = ids.index(image_id)
        assert ids[at : at + N_TOKENS] == [image_id] * N_TOKENS
        assert ids[:at] + [-200] + ids[at + N_TOKENS :] == want_ids
        assert (got[..., : tok.get_vocab_size()] - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("legacy", [False, True])
def test_llava_hf_crop_parity_through_llava_processor(llama_parts, tmp_path, legacy):
    tok, llama, clip, _ = llama_parts
    hf = tmp_path / "llava-hf"
    write_tokenizer(tok, tmp_path / "tok", legacy)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    torch.manual_seed(1)
    reference = LlavaForConditionalGeneration(
        LlavaConfig(
            vision_config=CLIPVisionConfig(**CLIP),
            text_config=LlamaConfig(
                **{k: v for k, v in llama.config.to_dict().items() if k != "vocab_size"},
                vocab_size=len(tokenizer),
            ),  # fmt: skip
            image_token_index=image_id,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
    ).eval()
    reference.save_pretrained(hf)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(**PROCESSOR, resample=2),  # bilinear, to see it recorded
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(hf)

    summary = convert("llava-hf", hf, tmp_path / "out")
    assert "bilinear resize of the shortest edge to 32, centre crop 32 x 32" in summary.preprocessing
    loaded = AutoProcessor.from_pretrained(hf)
    for image in non_square_images():
        inputs = loaded(images=image, text=PROMPT, return_tensors="pt")
        with torch.no_grad():
            want = reference(**inputs).logits
        model, batch, got = _ours(tmp_path / "out", image)
        c = model.config.vision
        assert (c.image_aspect_ratio, c.resize, c.resample) == ("crop", "shortest_edge_crop", "bilinear")
        assert torch.equal(batch["pixel_values_clip"], inputs["pixel_values"])
        assert batch["input_ids"].tolist() == inputs["input_ids"].tolist()
        assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("legacy", [None, False, True])
def test_metaspace_round_trip_keeps_tokenizer_image_token_ids(llama_parts, tmp_path, legacy):
    tok, llama, clip, proj = llama_parts
    src = tmp_path / "src"
    write_tokenizer(tok, src, legacy)
    want = tokenizer_image_token(PROMPT, lambda s: tok.encode(s).ids, bos_id=1)
    assert want[want.index(-200) + 1] == tok.token_to_id("▁")  # sentencepiece's prefix after <image>

    # the failure this guards against: transformers builds the Metaspace pre-tokenizer from `legacy`
    # (prefix only the first segment unless legacy=true) and save_pretrained drops the flag, so the
    # piece after <image> loses its '▁': one token fewer than tokenizer_image_token
    plain = AutoTokenizer.from_pretrained(src)
    plain.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    plain.save_pretrained(tmp_path / "plain")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "plain")
    image_id = reloaded.convert_tokens_to_ids("<image>")
    naive = [-200 if i == image_id else i for i in reloaded(PROMPT).input_ids]
    assert len(naive) == len(want) - 1

    # through convert (original format) and our loader: the same ids as tokenizer_image_token
    state = dict(llama.state_dict()) | {f"model.mm_projector.{k}": v for k, v in proj.items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(src / "model.safetensors"))
    config = llama.config.to_dict() | {"architectures": ["LlavaLlamaForCausalLM"], "mm_hidden_size": 24,
                                       "mm_vision_tower": "tiny-test/clip-vit-8-32",
                                       "mm_projector_type": "mlp2x_gelu", "image_aspect_ratio": "pad"}  # fmt: skip
    (src / "config.json").write_text(json.dumps(config))
    clip.save_pretrained(tmp_path / "clip")
    summary = convert("llava", src, tmp_path / "out", vision_tower=tmp_path / "clip")
    assert "prefix scheme 'always', legacy=true" in summary.tokenizer_note
    for _ in range(2):  # load, save, load again: still the same ids
        ours = load_tokenizer(tmp_path / "out")
        image_id = ours.convert_tokens_to_ids("<image>")
        assert [-200 if i == image_id else i for i in ours(PROMPT).input_ids] == want
        ours.save_pretrained(tmp_path / "out")
