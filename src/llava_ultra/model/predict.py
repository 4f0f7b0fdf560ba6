"""Batched prediction: images -> the input processor -> `UltraModel.generate` -> answers and selections.

The one place "load images, prepare, generate" is written: eval/runner.py (the `eval` command),
eval/synthus.py (frame choice on held-out reports) and the recipes (quickstart, ablate, the
LoGra-Med experiment) all predict through it.

Notable choices:
- `predict` is ONE generate call over the rows it is given; which rows share a call (and so their
  padding) is the caller's choice, so every caller keeps its batches: the eval runner's planned
  and sharded batches, quickstart's per-question-type batches of 16. `predict_batched` cuts rows
  into consecutive batches of `batch_size`.
- A row's images are PIL images or file paths; files are opened and converted to RGB here, and an
  unreadable one is a `DataError` naming the file and the fix. With `skip_unreadable=True` that
  row gets a `Prediction` with `error` set and no answer instead, and the batch is generated
  without it (the eval runner scores such a row as 0 and never drops it).
- Answers are stripped of surrounding whitespace; `n_tokens` counts the generated tokens (EOS
  excluded), `scores` are the selector's scores of the row's own images (None when the model does
  not score: selector mode 'none').
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import ConfigError, DataError

ImageLike = Image.Image | str | Path
"""An image as a caller has it: decoded, or a file to open."""


@dataclass
class Prediction:
    """One row's answer and which of its images reached the LLM."""

    text: str
    """The answer, stripped ('' when the row failed)."""
    n_tokens: int
    """Generated tokens (EOS excluded)."""
    selected: list[int] | None
    """Positions of the row's images the selector sent to the LLM (None when the row failed)."""
    scores: list[float] | None
    """The selector's score of each of the row's images (None without scores or when it failed)."""
    error: str | None = None
    """Why the row has no answer (an unreadable image; only with `skip_unreadable=True`)."""


def load_images(paths: Sequence[str | Path]) -> list[Image.Image]:
    """The image files as RGB PIL images; a missing or undecodable file is a DataError naming it."""
    images = []
    for p in paths:
        try:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        except FileNotFoundError:
            raise DataError(f"image {p} does not exist; restore it or fix the sample's image path") from None
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"image {p} cannot be decoded ({exc}); replace the file") from None
    return images


def _decoded(row: Sequence[ImageLike]) -> list[Image.Image]:
    return [im if isinstance(im, Image.Image) else load_images([im])[0] for im in row]


def predict(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    images: Sequence[Sequence[ImageLike]],
    *,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_strings: Sequence[str] = (),
    skip_unreadable: bool = False,
) -> list[Prediction]:
    """Answers to `prompts` (each with one image placeholder where its images go, none without
    images) about `images` (one list per prompt), from one `model.generate` call; greedy unless
    `do_sample`. Returned in row order."""
    if len(prompts) != len(images):
        raise DataError(f"got {len(prompts)} prompts but {len(images)} image lists; give one list per prompt")
    out: dict[int, Prediction] = {}
    ready: list[tuple[int, list[Image.Image]]] = []
    for i, row in enumerate(images):
        try:
            ready.append((i, _decoded(row)))
        except DataError as exc:
            if not skip_unreadable:
                raise
            out[i] = Prediction("", 0, None, None, error=str(exc))
    if ready:
        batch = model.prepare_inputs(tokenizer, [prompts[i] for i, _ in ready], [imgs for _, imgs in ready])
        gen = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop_strings=stop_strings,
            tokenizer=tokenizer,
        )
        scores = gen.selection.scores
        for b, (i, imgs) in enumerate(ready):
            out[i] = Prediction(
                gen.texts[b].strip(),
                len(gen.sequences[b]),
                list(gen.selection.indices[b]),
                None if scores is None else [float(x) for x in scores[b, : len(imgs)]],
            )
    return [out[i] for i in range(len(prompts))]


def predict_batched(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    images: Sequence[Sequence[ImageLike]],
    batch_size: int,
    **kwargs: Any,
) -> list[Prediction]:
    """`predict` over consecutive batches of `batch_size` rows (the last may be short); `kwargs` are
    `predict`'s decoding settings, the same for every batch."""
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    return [
        p
        for start in range(0, len(prompts), batch_size)
        for p in predict(
            model,
            tokenizer,
            prompts[start : start + batch_size],
            images[start : start + batch_size],
            **kwargs,
        )
    ]
