"""Does a model look at its images? Compare its output on real images with noise of the same sizes.

What `llava-ultra check-images` runs. A model whose logits do not move when its images are replaced
by noise ignores them (a re-initialised or zeroed projector, a vision tower that did not load).

Notable choices: all images are one study (one sample of k images); with several, each one is also
replaced alone, and the report says how many of them the selector passes to the LLM (an image it
leaves out changes nothing, which is not a fault).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from ..errors import DataError
from ..model.checkpoint import load_for_inference
from ..model.tokenizer import model_template, render_prompt
from ..model.ultra import UltraModel


@dataclass
class NoiseCheck:
    """Does the model look at the image? Compare its output on real images with noise images."""

    image_matters: bool
    """True when the next-token logits move by more than the tolerance."""
    max_logit_diff: float
    """Largest absolute change of the first answer token's logits."""
    answer_changed: bool
    """Whether the greedy answers differ."""
    answer_real: str
    """Greedy answer with the real images."""
    answer_noise: str
    """Greedy answer with noise images."""
    per_image_diffs: list[float] = field(default_factory=list)
    """With several images: the largest logit change when only image i is replaced by noise."""
    images_into_llm: int = 1
    """How many of the images the model feeds to its LLM (its selector's choice; the others are
    scored, or skipped, but never seen by the LLM)."""
    selector: str = ""
    """The selector setting that decides which images reach the LLM, in words."""


def noise_image_check(
    model: UltraModel,
    tokenizer: PreTrainedTokenizerBase,
    images: Sequence[Image.Image],
    prompt: str,
    *,
    max_new_tokens: int = 16,
    seed: int = 0,
    atol: float = 1e-4,
) -> NoiseCheck:
    """Replace `images` by uniform noise of the same sizes and report whether the output changes.

    `prompt` is the text the model continues (e.g. `render_prompt(...)`) with one image placeholder;
    if it has none, one is put in front. All images are one study (one sample of k images). A
    model whose logits do not move ignores its images (a re-initialised or zeroed projector, a
    vision tower that did not load): `image_matters` is False. With several images each one is
    also replaced alone (`per_image_diffs`), and `images_into_llm` says how many of them the
    model's selector passes to the LLM: an image the selector leaves out changes nothing.
    """
    if not images:
        raise DataError("noise_image_check needs at least one image")
    if model.config.image_token not in prompt:
        prompt = f"{model.config.image_token}\n{prompt}"
    rng = np.random.default_rng(seed)
    noise = [Image.fromarray(rng.integers(0, 256, (im.height, im.width, 3), dtype=np.uint8)) for im in images]
    was_training = model.training
    model.eval()

    def last_logits(imgs: list[Image.Image]) -> tuple[dict[str, Any], torch.Tensor]:
        batch = model.prepare_inputs(tokenizer, [prompt], [imgs])
        with torch.no_grad():
            return batch, model(**batch).logits[0, -1].float()

    answers, logits = [], []
    for imgs in (list(images), noise):
        batch, last = last_logits(imgs)
        logits.append(last)
        answers.append(model.generate(**batch, max_new_tokens=max_new_tokens, tokenizer=tokenizer).texts[0])
    per_image = []
    if len(images) > 1:
        for i in range(len(images)):
            one_noised = [noise[j] if j == i else im for j, im in enumerate(images)]
            per_image.append(float((logits[0] - last_logits(one_noised)[1]).abs().max()))
    model.train(was_training)
    diff = float((logits[0] - logits[1]).abs().max())
    sel = model.config.selector
    how = f"selector mode {sel.mode!r}" + (f", strategy {sel.none_strategy!r}" if sel.mode == "none" else "")
    return NoiseCheck(
        image_matters=diff > atol,
        max_logit_diff=diff,
        answer_changed=answers[0] != answers[1],
        answer_real=answers[0],
        answer_noise=answers[1],
        per_image_diffs=per_image,
        images_into_llm=sel.images_into_llm(len(images)),
        selector=how,
    )


def check_checkpoint_images(
    folder: str | Path,
    image_paths: Sequence[str | Path],
    question: str = "Describe the findings. 请描述超声所见。",
    *,
    template: str | None = None,
    device: str | None = None,
    max_new_tokens: int = 16,
) -> NoiseCheck:
    """`noise_image_check` on a checkpoint folder (what `llava-ultra check-images` runs): load it,
    prompt it with `question` in its own conversation format, and compare real images with noise."""
    if not image_paths:
        raise DataError("check-images needs at least one image: pass --image PATH")
    images = []
    for path in image_paths:
        try:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        except (OSError, ValueError) as err:
            raise DataError(f"cannot read image {path}: {err}; pass a PNG or JPEG file") from err
    model, tokenizer = load_for_inference(folder, device=device)
    messages = [{"role": "user", "content": f"{model.config.image_token}\n{question}"}]  # one for all k
    prompt = render_prompt(messages, template or model_template(model), image_token=model.config.image_token)
    return noise_image_check(model, tokenizer, images, prompt, max_new_tokens=max_new_tokens)
