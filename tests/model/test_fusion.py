"""Fusion: grid alignment, projector naming, fusion weight bounds and gradient."""

from __future__ import annotations

import pytest
import torch

from llava_ultra.config import FusionConfig
from llava_ultra.errors import ConfigError
from llava_ultra.model.fusion import Fusion, Projector


def test_projector_names_follow_llava_hf():
    mlp = Projector("mlp2x_gelu", 8, 16)
    assert sorted(mlp.state_dict()) == [
        "linear_1.bias",
        "linear_1.weight",
        "linear_2.bias",
        "linear_2.weight",
    ]
    assert sorted(Projector("linear", 8, 16).state_dict()) == ["linear_1.bias", "linear_1.weight"]


def test_unknown_projector_type_is_an_error():
    with pytest.raises(ConfigError, match="unknown projector type 'mlp3x_relu'"):
        Projector("mlp3x_relu", 8, 16)
    with pytest.raises(ConfigError, match="projector_type='mlp2x_gelo'.*did you mean 'mlp2x_gelu'"):
        FusionConfig(projector_type="mlp2x_gelo")


def test_pool_alignment_matches_manual_average():
    fusion = Fusion(FusionConfig(align="pool"), clip_dim=8, llm_dim=16, grid=2, sam_channels=3)
    grid = torch.arange(48, dtype=torch.float32).view(1, 3, 4, 4)
    tokens = fusion.align_sam(grid)  # (1, 4, 3)
    assert tokens.shape == (1, 4, 3)
    torch.testing.assert_close(tokens[0, 0], grid[0, :, :2, :2].mean((1, 2)))  # top-left cell first
    torch.testing.assert_close(tokens[0, 1], grid[0, :, :2, 2:].mean((1, 2)))  # row-major like CLIP patches
    assert list(fusion.state_dict()) == [
        "alpha_logit",
        *[
            f"{p}_projector.{layer}.{w}"
            for p in ("clip", "sam")
            for layer in ("linear_1", "linear_2")
            for w in ("weight", "bias")
        ],
    ]


def test_conv_alignment_reaches_the_clip_grid():
    fusion = Fusion(
        FusionConfig(align="conv", conv_channels=[6, 10]), clip_dim=8, llm_dim=16, grid=3, sam_channels=4
    )
    assert fusion.align_sam(torch.randn(2, 4, 16, 16)).shape == (2, 9, 10)  # 16 -> 12 -> 6 -> 3
    assert "align.convs.1.weight" in fusion.state_dict()
    assert fusion(torch.randn(2, 9, 8), torch.randn(2, 4, 16, 16)).shape == (2, 9, 16)


def test_fusion_weight_in_unit_interval_with_gradient():
    torch.manual_seed(0)
    fusion = Fusion(FusionConfig(alpha_init=0.8), clip_dim=8, llm_dim=16, grid=2, sam_channels=4)
    assert fusion.alpha.item() == pytest.approx(0.8)
    clip, sam = torch.randn(3, 4, 8), torch.randn(3, 4, 4, 4)
    h1, h2 = fusion.clip_projector(clip), fusion.sam_projector(fusion.align_sam(sam))
    out = fusion(clip, sam)
    torch.testing.assert_close(out, 0.8 * h1 + 0.2 * h2)
    out.pow(2).sum().backward()
    assert fusion.alpha_logit.grad is not None and fusion.alpha_logit.grad.abs() > 0
    with torch.no_grad():  # even a large step leaves a inside [0, 1]
        for value in (-100.0, 100.0):
            fusion.alpha_logit.fill_(value)
            assert 0.0 <= fusion.alpha.item() <= 1.0


def test_without_sam_it_is_plain_llava():
    fusion = Fusion(FusionConfig(), clip_dim=8, llm_dim=16, grid=2, sam_channels=None)
    assert fusion.alpha is None and fusion.sam_projector is None
    clip = torch.randn(2, 4, 8)
    torch.testing.assert_close(fusion(clip), fusion.clip_projector(clip))
    assert not any(k.startswith(("sam_projector", "alpha", "align")) for k in fusion.state_dict())
