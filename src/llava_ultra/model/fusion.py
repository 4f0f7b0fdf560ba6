"""Visual enhancement: align SAM's grid to CLIP's, project both to the LLM width, fuse.

    H1 = P1(CLIP tokens)                         (M, N, D)
    H2 = P2(flatten(align(SAM grid)))            (M, N, D)
    H_v = a * H1 + (1 - a) * H2,  a = sigmoid(alpha_logit) in [0, 1]

Choices:
- Alignment ('pool', default) is parameter-free `adaptive_avg_pool2d` of the (M, C, Gs, Gs) SAM grid
  onto the G x G CLIP grid (64 -> 24 for the real encoders, 16 -> 8 in the tiny preset). 'conv' is
  DeepSeek-VL's: bilinear resize to G * 2^L, then L stride-2 3x3 convolutions (no bias, no
  activation) with configurable channels, e.g. 64 -> 96 -> 48 -> 24 with channels [512, 1024].
- Each encoder has its own projector, named like llava-hf's `LlavaMultiModalProjector`
  (`linear_1`, `act`, `linear_2`) so that llava-hf / LLaVA weights map onto `clip_projector` 1:1.
- With SAM disabled the module is plain LLaVA: only `clip_projector`, H_v = H1, no fusion weight.

State-dict names (a contract other modules rely on): `clip_projector.*`, `sam_projector.*`,
`align.*` (conv only), `alpha_logit`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PROJECTOR_TYPES, FusionConfig
from ..errors import ConfigError


class Projector(nn.Module):
    """'linear': `linear_1`; 'mlp2x_gelu': `linear_1` -> GELU (`act`) -> `linear_2`."""

    def __init__(self, kind: str, in_dim: int, out_dim: int) -> None:
        super().__init__()
        if kind not in PROJECTOR_TYPES:
            raise ConfigError(f"unknown projector type {kind!r}; use one of {', '.join(PROJECTOR_TYPES)}")
        self.kind = kind
        self.linear_1 = nn.Linear(in_dim, out_dim)
        if kind == "mlp2x_gelu":
            self.act = nn.GELU()
            self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear_1(x)
        if self.kind == "mlp2x_gelu":
            x = self.linear_2(self.act(x))
        return x


class ConvAlign(nn.Module):
    """(M, C, Gs, Gs) -> (M, C_out, G, G): bilinear resize to G*2^L, then L stride-2 convolutions."""

    def __init__(self, in_channels: int, channels: list[int], grid: int) -> None:
        super().__init__()
        self.grid = grid
        dims = [in_channels, *channels]
        self.convs = nn.ModuleList(
            nn.Conv2d(dims[i], dims[i + 1], kernel_size=3, stride=2, padding=1, bias=False)
            for i in range(len(channels))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = self.grid * 2 ** len(self.convs)
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        for conv in self.convs:
            x = conv(x)
        return x


class Fusion(nn.Module):
    """CLIP tokens (+ SAM grid) -> fused visual tokens H_v at the LLM width."""

    def __init__(
        self, cfg: FusionConfig, clip_dim: int, llm_dim: int, grid: int, sam_channels: int | None = None
    ) -> None:
        super().__init__()
        self.grid = grid
        self.clip_projector = Projector(cfg.projector_type, clip_dim, llm_dim)
        self.sam_projector: Projector | None = None
        self.align: ConvAlign | None = None
        if sam_channels is None:
            return
        sam_out = sam_channels
        if cfg.align == "conv":
            self.align = ConvAlign(sam_channels, list(cfg.conv_channels), grid)
            sam_out = cfg.conv_channels[-1]
        self.sam_projector = Projector(cfg.projector_type, sam_out, llm_dim)
        a = cfg.alpha_init
        self.alpha_logit = nn.Parameter(torch.tensor(math.log(a / (1 - a))))

    @property
    def alpha(self) -> torch.Tensor | None:
        """The CLIP weight a = sigmoid(alpha_logit), or None without SAM."""
        return torch.sigmoid(self.alpha_logit) if self.sam_projector is not None else None

    def align_sam(self, grid: torch.Tensor) -> torch.Tensor:
        """(M, C, Gs, Gs) SAM grid -> (M, G*G, C') tokens in CLIP's row-major patch order."""
        x = self.align(grid) if self.align is not None else F.adaptive_avg_pool2d(grid, self.grid)
        return x.flatten(2).transpose(1, 2)  # (M, C', G, G) -> (M, G*G, C')

    def forward(self, clip_tokens: torch.Tensor, sam_grid: torch.Tensor | None = None) -> torch.Tensor:
        """(M, N, Dc) [+ (M, C, Gs, Gs)] -> H_v (M, N, D)."""
        h1 = self.clip_projector(clip_tokens)  # (M, N, D)
        if self.sam_projector is None:
            return h1
        if sam_grid is None:
            raise ValueError("this model fuses SAM features: pass pixel_values_sam as well")
        h2 = self.sam_projector(self.align_sam(sam_grid.to(h1.dtype)))  # (M, N, D)
        if h2.shape != h1.shape:
            raise ValueError(f"SAM tokens {tuple(h2.shape)} do not match CLIP tokens {tuple(h1.shape)}")
        a = torch.sigmoid(self.alpha_logit).to(h1.dtype)
        return a * h1 + (1 - a) * h2
