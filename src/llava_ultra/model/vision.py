"""Frozen vision encoders (CLIP, SAM) built on transformers' own classes, and their preprocessing.

Encoders are plain `transformers.CLIPVisionModel` / `SamVisionModel` instances, so real weights load
with `from_pretrained` (a hub id or local folder at home) and tiny random-init ones come from inline
config kwargs. Both are frozen: `requires_grad=False` and eval mode. Both run attention through
PyTorch's fused `scaled_dot_product_attention` (`ENCODER_ATTENTION`, set explicitly rather than left
to the transformers default; flash / memory-efficient kernels on a GPU). SAM's relative-position
bias goes in as SDPA's additive mask. Outputs equal the eager attention's in fp32 (tested).

Shapes (M = images in the batch, all k frames of all samples encoded in one call):
- `clip_tokens`: pixels (M, 3, S, S) -> hidden_states[select_layer] -> (M, G*G, Dc) for 'patch'
  (CLS dropped) or (M, 1 + G*G, Dc) for 'cls_patch', where G = S / patch_size.
- `sam_grid`: pixels (M, 3, S', S') -> neck output, channels-first (M, C, Gs, Gs). It stays a grid
  because the aligner in fusion.py pools/convolves it onto the CLIP grid before flattening.

Preprocessing is plain PIL + numpy + torch (no torchvision). One aspect step is shared by both
encoders (`pad` to a square with the mean colour as LLaVA v1.5's `expand2square` does, `crop`
centre-square, or `resize`), so that CLIP's and SAM's token grids cover the same pixels and can be
fused token by token. Then CLIP gets the resize the checkpoint records (`vision.resize`: the square to
S x S, or CLIPImageProcessor's shortest-edge resize + centre crop, which with 'crop' replaces the crop
above so that converted llava-hf and original LLaVA checkpoints see the pixels their own processors
make) with the recorded PIL filter, and normalisation; SAM gets its longest-side resize, ImageNet
normalisation and zero padding at the bottom/right (a no-op for the square input, kept so the function
is SAM's own preprocessing for any input). The arithmetic is transformers' image processors': the
pad colour is `int(mean * 255)` (LLaVA's rule; `pad_colour='round'` for the old one), pixels are
rescaled as float64 x (1/255) then float32, then (x - mean) / std in float32, so pixels equal
CLIPImageProcessor's (PIL backend) bit for bit.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModel, SamVisionConfig, SamVisionModel

from ..config import SamConfig, VisionConfig
from ..errors import ConfigError, DataError

ENCODER_ATTENTION = "sdpa"
"""Attention backend of both encoders (transformers supports SDPA for CLIP and SAM)."""


def _inline_kwargs(inline: dict) -> dict:
    """Config kwargs of an inline encoder (SDPA attention unless the inline dict names another)."""
    return {
        "attn_implementation": ENCODER_ATTENTION,
        **{k: v for k, v in inline.items() if k != "model_type"},
    }


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """Turn off gradients and switch to eval mode (in place); returns the module."""
    module.requires_grad_(False)
    return module.eval()


def _from_pretrained(cls: type, path: str, what: str, cfg: VisionConfig | SamConfig) -> torch.nn.Module:
    """`cls.from_pretrained(path)`, strictly: a weight of the tower that the folder lacks (or holds
    with another shape) raises, and a local folder's preprocessor_config.json must agree with the
    config's normalisation. Extra weights are fine: hub CLIP / SAM checkpoints also hold the text
    tower / the prompt encoder and mask decoder."""
    try:
        model, info = cls.from_pretrained(
            path, output_loading_info=True, attn_implementation=ENCODER_ATTENTION
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{what}.path={path!r} could not be loaded: {exc}") from exc
    wrong = {
        k: sorted(map(str, v)) for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v
    }
    if wrong:
        detail = "; ".join(f"{k.replace('_', ' ')}: {', '.join(v[:5])}" for k, v in wrong.items())
        raise ConfigError(
            f"{what}.path={path!r} does not match a {cls.__name__} ({detail}); point {what}.path at a "
            f"{cls.__name__} folder (e.g. the clip/ or sam/ folder of `llava-ultra pretrain-encoders`)"
        )
    pre = Path(path) / "preprocessor_config.json"
    if pre.is_file():
        saved = json.loads(pre.read_text(encoding="utf-8"))
        for key in ("image_mean", "image_std"):
            if key in saved and not np.allclose(saved[key], getattr(cfg, key), atol=1e-6):
                raise ConfigError(
                    f"{what}.{key}={list(getattr(cfg, key))} but {pre} says {saved[key]}; set "
                    f"{what}.{key}={saved[key]} (the encoder was trained with it)"
                )
    return model


def build_clip(cfg: VisionConfig) -> CLIPVisionModel:
    """A frozen CLIP vision tower from a hub id / folder or from inline config kwargs."""
    if cfg.inline is not None:
        model = CLIPVisionModel(CLIPVisionConfig(**_inline_kwargs(cfg.inline)))
    else:
        model = _from_pretrained(CLIPVisionModel, cfg.path, "model.vision", cfg)
    for key in ("image_size", "patch_size"):
        if getattr(model.config, key) != getattr(cfg, key):
            raise ConfigError(
                f"model.vision.{key}={getattr(cfg, key)} but the CLIP encoder has {key}="
                f"{getattr(model.config, key)}; set model.vision.{key}={getattr(model.config, key)}"
            )
    return freeze(model)


def build_sam(cfg: SamConfig) -> SamVisionModel | None:
    """A frozen SAM image encoder, or None when SAM is disabled."""
    if not cfg.enabled:
        return None
    if cfg.inline is not None:
        model = SamVisionModel(SamVisionConfig(**_inline_kwargs(cfg.inline)))
    else:
        model = _from_pretrained(SamVisionModel, cfg.path, "model.sam", cfg)
    if model.config.image_size != cfg.image_size:
        raise ConfigError(
            f"model.sam.image_size={cfg.image_size} but the SAM encoder has image_size="
            f"{model.config.image_size}; set model.sam.image_size={model.config.image_size}"
        )
    return freeze(model)


def _needs_grad(module: torch.nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def clip_tokens(
    model: CLIPVisionModel, pixels: torch.Tensor, select_layer: int, select_feature: str
) -> torch.Tensor:
    """(M, 3, S, S) -> (M, N, Dc) tokens of hidden layer `select_layer` (CLS dropped for 'patch')."""
    with torch.set_grad_enabled(torch.is_grad_enabled() and _needs_grad(model)):
        out = model(pixel_values=pixels.to(model.dtype), output_hidden_states=True)
    hidden = out.hidden_states[select_layer]  # (M, 1 + G*G, Dc)
    return hidden[:, 1:] if select_feature == "patch" else hidden


def sam_grid(model: SamVisionModel, pixels: torch.Tensor) -> torch.Tensor:
    """(M, 3, S', S') -> (M, C, Gs, Gs) neck features, channels-first."""
    with torch.set_grad_enabled(torch.is_grad_enabled() and _needs_grad(model)):
        return model(pixel_values=pixels.to(model.dtype)).last_hidden_state


# ------------------------------------------------------------------------------- preprocessing


RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def pad_colour(fill: Sequence[float], rule: str = "truncate") -> tuple[int, ...]:
    """The 0-255 pad colour of 0-1 `fill`: int(x * 255) (LLaVA's expand2square) or round(x * 255)."""
    if rule == "truncate":
        return tuple(int(c * 255) for c in fill)
    if rule == "round":
        return tuple(int(round(c * 255)) for c in fill)
    raise ConfigError(f"unknown pad colour rule {rule!r}; use truncate or round")


def to_square(image: Image.Image, mode: str, fill: Sequence[float], rule: str = "truncate") -> Image.Image:
    """Make an RGB image square: 'pad' with the `fill` colour (0-1 floats, made 0-255 by `rule`) around
    the centred image (LLaVA's expand2square offsets), 'crop' centre, or 'resize'."""
    image = image.convert("RGB")
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    if mode == "pad":
        canvas = Image.new("RGB", (side, side), pad_colour(fill, rule))
        canvas.paste(image, ((side - w) // 2, (side - h) // 2))
        return canvas
    if mode == "crop":
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        return image.crop((left, top, left + side, top + side))
    if mode == "resize":
        return image.resize((side, side), Image.Resampling.BICUBIC)
    raise ConfigError(f"unknown image_aspect_ratio {mode!r}; use pad, crop or resize")


def _normalise(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    # transformers' rescale (float64 x 1/255, then float32) and normalize (float32), bit for bit
    array = (np.asarray(image, dtype=np.float64) * (1 / 255)).astype(np.float32)  # (H, W, 3)
    array = (array - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))  # (3, H, W)


def clip_resize(image: Image.Image, cfg: VisionConfig) -> Image.Image:
    """An RGB image -> S x S by `cfg.resize` with `cfg.resample`: 'square' resizes to S x S;
    'shortest_edge_crop' is CLIPImageProcessor's: shortest edge to S, the other to
    int(S * long / short), then the centre S x S crop (top-left at ((H - S) // 2, (W - S) // 2))."""
    side, resample = cfg.image_size, RESAMPLE[cfg.resample]
    if cfg.resize == "square":
        return image.resize((side, side), resample)
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(side * long / short)
    size = (side, new_long) if w <= h else (new_long, side)
    resized = image.resize(size, resample)
    left, top = (size[0] - side) // 2, (size[1] - side) // 2
    return resized.crop((left, top, left + side, top + side))


def clip_pixels(image: Image.Image, cfg: VisionConfig) -> torch.Tensor:
    """One RGB image -> (3, S, S) CLIP input: `clip_resize` + normalisation with the recorded mean/std."""
    return _normalise(clip_resize(image, cfg), cfg.image_mean, cfg.image_std)


def sam_pixels(image: Image.Image, cfg: SamConfig) -> torch.Tensor:
    """One RGB image -> (3, S', S') SAM input: longest side to S', normalise, zero-pad bottom/right."""
    w, h = image.size
    scale = cfg.image_size / max(w, h)
    size = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))
    tensor = _normalise(image.resize(size, Image.Resampling.BILINEAR), cfg.image_mean, cfg.image_std)
    out = torch.zeros(3, cfg.image_size, cfg.image_size)
    out[:, : tensor.shape[1], : tensor.shape[2]] = tensor
    return out


class ImageProcessor:
    """PIL images -> the pixel tensors `UltraModel` takes, for both encoders at once.

    `__call__(images)` returns `{"pixel_values_clip": (M, 3, S, S), "pixel_values_sam": (M, 3, S', S')
    or None}` for a flat list of M images (all frames of all samples, in order).
    """

    def __init__(self, vision: VisionConfig, sam: SamConfig) -> None:
        self.vision, self.sam = vision, sam

    def __call__(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor | None]:
        if not images:
            return {"pixel_values_clip": None, "pixel_values_sam": None}
        squares, clip_inputs = [], []
        v = self.vision
        # CLIPImageProcessor's crop comes after its resize: 'crop' + 'shortest_edge_crop' leaves it to CLIP
        clip_crops = v.image_aspect_ratio == "crop" and v.resize == "shortest_edge_crop"
        for i, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise DataError(
                    f"image {i} is a {type(image).__name__}, not a PIL image; open it with PIL first"
                )
            squares.append(to_square(image, v.image_aspect_ratio, v.image_mean, v.pad_colour))
            clip_inputs.append(image.convert("RGB") if clip_crops else squares[-1])
        clip = torch.stack([clip_pixels(im, v) for im in clip_inputs])
        sam = torch.stack([sam_pixels(im, self.sam) for im in squares]) if self.sam.enabled else None
        return {"pixel_values_clip": clip, "pixel_values_sam": sam}
