"""Encoders and preprocessing: shapes, layer selection, freezing, aspect handling."""

from __future__ import annotations

import torch
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModel, SamVisionConfig, SamVisionModel
from transformers.models.sam.modeling_sam import SamVisionAttention, SamVisionSdpaAttention

from llava_ultra.config import SamConfig, VisionConfig
from llava_ultra.model.vision import (
    ImageProcessor,
    build_clip,
    build_sam,
    clip_tokens,
    sam_grid,
    sam_pixels,
    to_square,
)
from tests.helpers import tiny_images, tiny_model_dict


def _configs():
    d = tiny_model_dict()
    return VisionConfig(**d["vision"]), SamConfig(**d["sam"])


def test_clip_tokens_select_layer_and_drop_cls():
    vision, _ = _configs()
    torch.manual_seed(0)
    clip = build_clip(vision)
    assert not clip.training and not any(p.requires_grad for p in clip.parameters())
    pixels = torch.randn(3, 3, 32, 32)
    patch = clip_tokens(clip, pixels, -2, "patch")
    full = clip_tokens(clip, pixels, -2, "cls_patch")
    assert patch.shape == (3, 16, 32) and full.shape == (3, 17, 32)
    torch.testing.assert_close(full[:, 1:], patch)
    with torch.no_grad():
        hidden = clip(pixel_values=pixels, output_hidden_states=True).hidden_states
    torch.testing.assert_close(patch, hidden[-2][:, 1:])
    assert not torch.allclose(patch, hidden[-1][:, 1:])


def test_sam_grid_is_channels_first():
    _, sam_cfg = _configs()
    sam = build_sam(sam_cfg)
    grid = sam_grid(sam, torch.randn(2, 3, 32, 32))
    assert grid.shape == (2, 16, 8, 8)
    assert build_sam(SamConfig(enabled=False)) is None


def test_pad_to_square_with_mean_colour():
    image = Image.new("RGB", (20, 10), (255, 0, 0))
    square = to_square(image, "pad", (0.5, 0.25, 0.0))
    assert square.size == (20, 20)
    # LLaVA's expand2square: int(x * 255) truncates (127.5 -> 127); 'round' is the old rule
    assert square.getpixel((0, 0)) == (127, 63, 0) and square.getpixel((10, 10)) == (255, 0, 0)
    assert to_square(image, "pad", (0.5, 0.25, 0.0), "round").getpixel((0, 0)) == (128, 64, 0)
    assert to_square(image, "crop", (0, 0, 0)).size == (10, 10)
    assert to_square(image, "resize", (0, 0, 0)).size == (20, 20)


def test_sam_longest_side_and_zero_padding():
    _, sam_cfg = _configs()
    image = Image.new("RGB", (64, 32), (124, 116, 104))  # ~ ImageNet mean -> ~0 after normalising
    pixels = sam_pixels(image, sam_cfg)
    assert pixels.shape == (3, 32, 32)
    assert pixels[:, 16:].abs().max() == 0  # padded rows at the bottom
    assert pixels[:, :16].abs().max() < 0.05


def test_processor_outputs_both_encoders_for_grayscale_frames():
    vision, sam_cfg = _configs()
    frames = [im.convert("L") for im in tiny_images(3, size=(30, 50))]
    out = ImageProcessor(vision, sam_cfg)(frames)
    assert out["pixel_values_clip"].shape == (3, 3, 32, 32)
    assert out["pixel_values_sam"].shape == (3, 3, 32, 32)
    # CLIP normalisation: a mid-grey frame maps to (0.5 - mean) / std
    grey = ImageProcessor(vision, sam_cfg)([Image.new("RGB", (32, 32), (128, 128, 128))])["pixel_values_clip"]
    expected = (128 / 255 - torch.tensor(vision.image_mean)) / torch.tensor(vision.image_std)
    torch.testing.assert_close(grey[0, :, 5, 5], expected)


def test_encoders_use_sdpa_and_match_eager_attention():
    """Both towers run SDPA (set explicitly) and give the eager attention's outputs in fp32; SAM's
    relative-position bias goes in as SDPA's mask."""
    vision, sam_cfg = _configs()
    torch.manual_seed(0)
    clip, sam = build_clip(vision), build_sam(sam_cfg)
    assert clip.config._attn_implementation == "sdpa" and sam.config._attn_implementation == "sdpa"
    assert type(sam.vision_encoder.layers[0].attn) is SamVisionSdpaAttention
    eager_clip = CLIPVisionModel(CLIPVisionConfig(**clip.config.to_dict(), attn_implementation="eager"))
    eager_sam = SamVisionModel(SamVisionConfig(**sam.config.to_dict(), attn_implementation="eager"))
    eager_clip.load_state_dict(clip.state_dict())
    eager_sam.load_state_dict(sam.state_dict())
    assert type(eager_sam.vision_encoder.layers[0].attn) is SamVisionAttention
    pixels = torch.randn(2, 3, 32, 32)
    fast = clip_tokens(clip, pixels, -2, "patch"), sam_grid(sam, pixels)
    slow = clip_tokens(eager_clip.eval(), pixels, -2, "patch"), sam_grid(eager_sam.eval(), pixels)
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
