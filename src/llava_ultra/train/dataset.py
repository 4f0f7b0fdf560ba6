"""Instruction samples -> training batches: token ids with masked labels, image groups, padding.

What this file owns: reading an instruction JSON (written by `data/instruct.py`), turning each
sample into token ids and labels, checking every sample BEFORE training starts, a map-style
Dataset that loads a sample's k frames, a collator that pads and flattens, and a deterministic
sharded batch sampler.

Notable choices:
- Rendering goes through `model.tokenizer.render_conversation` (the same text `render_prompt`
  gives at inference), and the whole text is tokenised ONCE; labels come from character offsets
  (a token is a target when its last character lies in an assistant segment). Tokenising
  segments separately would split BPE merges differently from inference. Needs a fast tokenizer.
- The first human turn carries one `<image>` per frame; they are collapsed into one placeholder
  at the front ("<image>\\n question", LLaVA's layout) and expanded to
  `ModelConfig.image_tokens_for(k)` tokens: the number of visual tokens that reach the LLM after
  frame selection, not k x tokens_per_image.
- `prepare_samples` is the up-front check: text-only tokenisation plus image-token arithmetic
  (fast, no image is decoded) gives every sample's exact length; images are checked to exist.
  Bad samples are reported by id with the reason and skipped; above `max_bad_fraction` the run
  aborts with a `DataError` before any compute. Corrupt images can only be seen when decoded: the
  Dataset returns a `BadSample` for them, the collator passes it along, and the training loop
  counts it against the same budget.
- Image loading is pluggable: the Dataset asks an `ImageSource` for a sample's tensors (a dict of
  (k, ...) tensors whose keys are `UltraModel.forward` arguments). `PixelSource` opens PNG/JPEG
  files and runs the model's image processor; a frozen-feature cache can stand in for it by
  returning precomputed encoder outputs under its own keys.
- Shuffling is a permutation drawn from `seed + epoch`; each process takes an equal-length shard
  (so DDP ranks never disagree on the number of steps), and a resumed run can start at any batch
  without loading the skipped ones. `valid` labels are passed along as `frame_valid`; only the
  optional supervised selector loss (`selector.supervised_weight > 0`) reads them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from ..config import ModelConfig
from ..errors import ConfigError, DataError
from ..model.tokenizer import render_conversation
from .reports import resolve_image

IGNORE_INDEX = -100
ROLES = {"human": "user", "gpt": "assistant"}


# ------------------------------------------------------------------------------------ reading


def read_instructions(path: str | Path) -> list[dict[str, Any]]:
    """The list of samples in an instruction JSON file (a JSON array of LLaVA-style samples)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"instruction file {path} does not exist; build it with `llava-ultra instruct` "
            f"or set data.stage1 / data.stage2 to an existing file"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid UTF-8 JSON: {exc}") from exc
    if not isinstance(data, list):
        raise DataError(f"{path} must hold a JSON array of samples, got {type(data).__name__}")
    if not data:
        raise DataError(f"{path} holds no samples; point the config at a non-empty instruction file")
    return data


def image_root_for(path: str | Path, override: str | None = None) -> Path:
    """The folder a file's `images` paths resolve against: `override`, else `image_root` from the
    `instruct_meta.json` beside the file, else the file's own folder."""
    if override is not None:
        return Path(override)
    folder = Path(path).parent
    meta = folder / "instruct_meta.json"
    if meta.is_file():
        root = json.loads(meta.read_text(encoding="utf-8")).get("image_root")
        if root:
            return (folder / root).resolve()
    return folder


# ---------------------------------------------------------------------------------- encoding


@dataclass
class Encoded:
    """One sample as token ids; placeholders already expanded to the LLM's visual-token count."""

    input_ids: np.ndarray
    """(T,) int64 token ids."""
    labels: np.ndarray
    """(T,) int64: the token id where the model is trained to produce it, else IGNORE_INDEX."""
    findings_ids: np.ndarray | None = None
    """(F,) findings text ids for the selector's attention teacher (None when not requested)."""
    extended_ids: np.ndarray | None = None
    """(X,) extended-caption ids for the LoGra-Med alignment loss (None when not requested; empty
    when the sample has no caption and cannot be extended: it then stays out of the graphs)."""


def to_messages(sample: dict[str, Any], image_token: str) -> list[dict[str, str]]:
    """LLaVA turns (`from` human/gpt) -> role/content messages, with the first turn's per-frame
    placeholders collapsed into one at its front."""
    sid = sample.get("id", "<no id>")
    conv = sample.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise DataError(f"sample {sid} has no conversations; give human/gpt turns")
    messages = []
    for i, turn in enumerate(conv):
        role = ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
        if role is None or not isinstance(turn.get("value"), str):
            raise DataError(f"sample {sid}: turn {i} must be {{'from': 'human'|'gpt', 'value': str}}")
        messages.append({"role": role, "content": turn["value"]})
    n_images = len(sample.get("images") or [])
    first = messages[0]["content"]
    if first.count(image_token) != n_images or sum(m["content"].count(image_token) for m in messages) != (
        n_images
    ):
        raise DataError(
            f"sample {sid}: {sum(m['content'].count(image_token) for m in messages)} {image_token} "
            f"placeholders but {n_images} images; put one {image_token} per image in the first human turn"
        )
    if n_images:
        text = re.sub(rf"{re.escape(image_token)}\s*", "", first).strip()
        messages[0] = {"role": "user", "content": f"{image_token}\n{text}"}
    return messages


def encode_sample(
    sample: dict[str, Any],
    tokenizer: Any,
    model_cfg: ModelConfig,
    template: str,
    *,
    system: str | None = None,
    findings_tokens: int = 0,
    extended_tokens: int = 0,
) -> Encoded:
    """Token ids and labels of one sample (loss only on the assistant's answers, EOS included).

    `findings_tokens > 0` also tokenises the sample's findings text (at most that many tokens)
    for the attention teacher. `extended_tokens > 0` tokenises its extended caption (the LLM-written
    `extended_caption`, else the template of `data/extend.py`; at most that many tokens) for the
    LoGra-Med alignment loss. Raises DataError for a malformed sample.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            "collate needs a fast (Rust) tokenizer for character offsets; load it with "
            "AutoTokenizer.from_pretrained(..., use_fast=True)"
        )
    sid = sample.get("id", "<no id>")
    image_token = model_cfg.image_token
    k = len(sample.get("images") or [])
    segments = render_conversation(
        to_messages(sample, image_token),
        template,
        system=system,
        image_token=image_token,
        eos_token=tokenizer.eos_token or "</s>",
    )
    text, targets, at = "", [], 0
    for seg in segments:
        if seg.is_target:
            targets.append((at, at + len(seg.text)))
        text += seg.text
        at += len(seg.text)
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    ids = list(enc["input_ids"])
    labels = [
        tok if end > start and any(a < end <= b for a, b in targets) else IGNORE_INDEX
        for tok, (start, end) in zip(ids, enc["offset_mapping"], strict=True)
    ]
    image_id = model_cfg.image_token_id
    found = ids.count(image_id)
    if found != (1 if k else 0):
        raise DataError(
            f"sample {sid}: the rendered text holds {found} {image_token} tokens for {k} image(s); "
            f"the tokenizer must map {image_token!r} to id {image_id} as one token"
        )
    if k:
        pos, n = ids.index(image_id), model_cfg.image_tokens_for(k)
        ids = ids[:pos] + [image_id] * n + ids[pos + 1 :]
        labels = labels[:pos] + [IGNORE_INDEX] * n + labels[pos + 1 :]
    if all(label == IGNORE_INDEX for label in labels):
        raise DataError(f"sample {sid} has no answer tokens to learn from; every sample needs a gpt turn")
    findings = None
    if findings_tokens > 0 and str(sample.get("findings") or "").strip():
        f_ids = tokenizer(str(sample["findings"]), add_special_tokens=False)["input_ids"]
        findings = np.asarray(f_ids[:findings_tokens], dtype=np.int64)
    extended = None
    if extended_tokens > 0:
        from .extend import sample_extended_caption

        try:
            caption = sample_extended_caption(sample)
        except DataError:  # no site / language to build one from: the sample trains without the view
            caption = ""
        x_ids = tokenizer(caption, add_special_tokens=False)["input_ids"] if caption else []
        extended = np.asarray(x_ids[:extended_tokens], dtype=np.int64)
    return Encoded(np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64), findings, extended)


# ------------------------------------------------------------------------------ up-front check


@dataclass(frozen=True)
class BadSample:
    """A sample that was skipped, and why (`kind`: malformed, missing_image, too_long, corrupt_image)."""

    id: str
    kind: str
    reason: str


@dataclass
class Prepared:
    """The samples that passed `prepare_samples`, their encodings, and the ones that did not."""

    samples: list[dict[str, Any]]
    encoded: list[Encoded]
    bad: list[BadSample] = field(default_factory=list)
    total: int = 0

    @property
    def max_length(self) -> int:
        return max((len(e.input_ids) for e in self.encoded), default=0)


def describe_bad(bad: Sequence[BadSample], limit: int = 10) -> str:
    """One line per bad sample (at most `limit`, then a count)."""
    lines = [f"  {b.id}: {b.reason}" for b in bad[:limit]]
    if len(bad) > limit:
        lines.append(f"  ... and {len(bad) - limit} more")
    return "\n".join(lines)


def check_bad_budget(n_bad: int, total: int, max_bad_fraction: float, what: str, bad=()) -> None:
    """Raise DataError when more than `max_bad_fraction` of `total` samples are bad."""
    if total and n_bad > max_bad_fraction * total:
        listing = f"\n{describe_bad(list(bad))}" if bad else ""
        raise DataError(
            f"{what}: {n_bad} of {total} samples are bad ({n_bad / total:.1%}), above "
            f"data.max_bad_fraction={max_bad_fraction}; fix the data or raise the threshold{listing}"
        )


def prepare_samples(
    samples: Sequence[dict[str, Any]],
    tokenizer: Any,
    model_cfg: ModelConfig,
    *,
    template: str,
    image_root: Path,
    max_length: int,
    max_bad_fraction: float,
    system: str | None = None,
    findings_tokens: int = 0,
    extended_tokens: int = 0,
    source: str = "data",
) -> Prepared:
    """Encode every sample and check it fits `max_length` and that its images exist.

    Bad samples are collected (id + reason), never dropped silently; more than
    `max_bad_fraction` of them raises DataError listing the first few. When no image at all
    exists the error says so (almost always a wrong `data.image_root`).
    """
    out = Prepared(samples=[], encoded=[], total=len(samples))
    missing_all = True
    for i, sample in enumerate(samples):
        sid = str(sample.get("id", f"#{i}")) if isinstance(sample, dict) else f"#{i}"
        try:
            if not isinstance(sample, dict):
                raise DataError(f"sample {sid} is a {type(sample).__name__}, not an object")
            paths = [resolve_image(image_root, rel) for rel in sample.get("images") or []]
            missing = [p for p in paths if not p.is_file()]
            missing_all &= len(missing) == len(paths) and bool(paths)
            if missing:
                out.bad.append(
                    BadSample(sid, "missing_image", f"image not found: {', '.join(map(str, missing))}")
                )
                continue
            enc = encode_sample(
                sample,
                tokenizer,
                model_cfg,
                template,
                system=system,
                findings_tokens=findings_tokens,
                extended_tokens=extended_tokens,
            )
        except DataError as exc:
            out.bad.append(BadSample(sid, "malformed", str(exc)))
            continue
        if len(enc.input_ids) > max_length:
            out.bad.append(
                BadSample(
                    sid,
                    "too_long",
                    f"{len(enc.input_ids)} tokens after expanding {len(paths)} image(s) to "
                    f"{model_cfg.image_tokens_for(len(paths))} visual tokens exceeds "
                    f"data.max_length={max_length}",
                )
            )
            continue
        out.samples.append(sample)
        out.encoded.append(enc)
    if missing_all and samples:
        raise DataError(
            f"{source}: none of the images exist under {image_root} (e.g. {out.bad[0].reason}); "
            f"set data.image_root to the dataset folder the image paths are relative to"
        )
    check_bad_budget(len(out.bad), out.total, max_bad_fraction, source, out.bad)
    if not out.samples:
        raise DataError(f"{source}: no usable samples remain\n{describe_bad(out.bad)}")
    return out


# ----------------------------------------------------------------------------------- dataset


class ImageSource(Protocol):
    """Gives the model inputs for one sample's frames: a dict of (k, ...) tensors keyed by
    `UltraModel.forward` argument names. Raises DataError for an unreadable image."""

    def __call__(self, paths: Sequence[Path]) -> dict[str, torch.Tensor | None]: ...


class PixelSource:
    """Opens image files and preprocesses them with the model's `ImageProcessor`."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, paths: Sequence[Path]) -> dict[str, torch.Tensor | None]:
        images = []
        for path in paths:
            try:
                with Image.open(path) as im:
                    images.append(im.convert("RGB"))
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                raise DataError(f"corrupt image {path}: {exc}") from exc
        return self.processor(images)


class InstructDataset(torch.utils.data.Dataset):
    """Map-style dataset over prepared samples; item i is a dict of tensors or a `BadSample`."""

    def __init__(self, prepared: Prepared, image_root: Path, source: ImageSource) -> None:
        self.prepared, self.image_root, self.source = prepared, Path(image_root), source

    def __len__(self) -> int:
        return len(self.prepared.samples)

    def __getitem__(self, i: int) -> dict[str, Any] | BadSample:
        sample, enc = self.prepared.samples[i], self.prepared.encoded[i]
        paths = [resolve_image(self.image_root, rel) for rel in sample.get("images") or []]
        try:
            images = self.source(paths) if paths else {}
        except DataError as exc:
            return BadSample(str(sample.get("id", f"#{i}")), "corrupt_image", str(exc))
        return {"encoded": enc, "images": images, "k": len(paths), "valid": sample.get("valid")}


def _pad(rows: Sequence[np.ndarray], value: int, side: str) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for b, r in enumerate(rows):
        if side == "right":
            out[b, : len(r)] = torch.from_numpy(r)
        else:
            out[b, width - len(r) :] = torch.from_numpy(r)
    return out


class Collator:
    """Items -> `{"inputs": UltraModel.forward kwargs or None, "bad": [BadSample], "samples": n,
    "extended": {"input_ids", "attention_mask"} or None}`.

    Token rows are padded on the right (training) with `pad_id`, labels with IGNORE_INDEX; image
    tensors of all samples are concatenated in sample order (M = sum k) with `image_counts`.
    `extended` holds the padded extended captions when the samples were encoded with them (an
    empty caption is one pad token with mask 0); it is kept out of `inputs` (not a forward argument).
    """

    def __init__(self, pad_id: int, padding_side: str = "right") -> None:
        if padding_side not in ("left", "right"):
            raise ConfigError(f"padding_side={padding_side!r}: use 'left' or 'right'")
        self.pad_id, self.side = pad_id, padding_side

    def __call__(self, items: Sequence[dict[str, Any] | BadSample]) -> dict[str, Any]:
        bad = [x for x in items if isinstance(x, BadSample)]
        good = [x for x in items if not isinstance(x, BadSample)]
        if not good:
            return {"inputs": None, "bad": bad, "samples": 0, "extended": None}
        encs = [x["encoded"] for x in good]
        ids = _pad([e.input_ids for e in encs], self.pad_id, self.side)
        inputs: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": _pad([np.ones(len(e.input_ids), np.int64) for e in encs], 0, self.side),
            "labels": _pad([e.labels for e in encs], IGNORE_INDEX, self.side),
            "image_counts": torch.tensor([x["k"] for x in good], dtype=torch.long),
        }
        labels = [x.get("valid") for x in good]
        if any(isinstance(v, list) and len(v) == x["k"] for v, x in zip(labels, good, strict=True)):
            # per-image validity (1/0; -1 where a sample has none): only the optional supervised
            # selector loss reads it
            inputs["frame_valid"] = torch.tensor(
                [
                    -1 if f is None else int(bool(f))
                    for v, x in zip(labels, good, strict=True)
                    for f in (v if isinstance(v, list) and len(v) == x["k"] else [None] * x["k"])
                ],
                dtype=torch.long,
            )
        keys = sorted({k for x in good for k in x["images"]})
        for key in keys:
            parts = [x["images"].get(key) for x in good if x["k"]]
            inputs[key] = None if not parts or any(p is None for p in parts) else torch.cat(parts)
        if any(e.findings_ids is not None for e in encs):
            rows = [e.findings_ids if e.findings_ids is not None else np.zeros(0, np.int64) for e in encs]
            rows = [r if len(r) else np.asarray([self.pad_id]) for r in rows]
            inputs["findings_ids"] = _pad(rows, self.pad_id, "right")
            inputs["findings_mask"] = _pad(
                [
                    np.ones(len(e.findings_ids), np.int64)
                    if e.findings_ids is not None and len(e.findings_ids)
                    else np.zeros(1, np.int64)
                    for e in encs
                ],
                0,
                "right",
            )
        extended = None
        if any(e.extended_ids is not None for e in encs):
            rows = [e.extended_ids if e.extended_ids is not None else np.zeros(0, np.int64) for e in encs]
            extended = {
                "input_ids": _pad(
                    [r if len(r) else np.asarray([self.pad_id]) for r in rows], self.pad_id, "right"
                ),
                "attention_mask": _pad(
                    [np.ones(max(len(r), 1), np.int64) * bool(len(r)) for r in rows], 0, "right"
                ),
            }
        return {"inputs": inputs, "bad": bad, "samples": len(good), "extended": extended}


# ----------------------------------------------------------------------------------- sampler


class ShardedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Deterministic, resumable, sharded batches of dataset indices.

    Epoch e uses the permutation of `torch.randperm(n)` seeded with `seed + e`; the first
    `n // world * world` indices are dealt round-robin to the `world` processes, and each
    process cuts its shard into batches of `batch_size` (the last one may be smaller). Only
    the first `multiple_of * floor(batches / multiple_of)` batches are used, so every optimiser
    step sees whole accumulation groups. `start` skips that many batches of the current epoch
    (used once, by a resumed run) without touching the dataset.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        *,
        rank: int = 0,
        world: int = 1,
        multiple_of: int = 1,
        shuffle: bool = True,
    ) -> None:
        if batch_size < 1 or world < 1 or not 0 <= rank < world or multiple_of < 1:
            raise ConfigError(
                f"bad sampler settings: batch_size={batch_size}, rank={rank}, world={world}, "
                f"multiple_of={multiple_of}"
            )
        if n < world:
            raise DataError(f"{n} samples cannot be shared by {world} processes; use more data")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world, self.multiple_of, self.shuffle = rank, world, multiple_of, shuffle
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    @property
    def per_rank(self) -> int:
        return self.n // self.world

    def __len__(self) -> int:
        batches = math.ceil(self.per_rank / self.batch_size)
        return batches // self.multiple_of * self.multiple_of

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        mine = order[: self.per_rank * self.world][self.rank :: self.world]
        for b in range(self.start, len(self)):
            yield mine[b * self.batch_size : (b + 1) * self.batch_size]


def make_loader(
    dataset: InstructDataset,
    sampler: ShardedBatchSampler,
    collator: Collator,
    num_workers: int = 0,
    seed: int = 0,
) -> torch.utils.data.DataLoader:
    """A DataLoader over `dataset` with `num_workers` worker processes (0 = load in the main one).

    It draws its worker seeds from its own generator, never from the global torch RNG, so starting
    an epoch mid-way (resume) leaves the global RNG (dropout, LoRA dropout) where it would be."""
    if num_workers < 0:
        raise ConfigError(f"data.num_workers={num_workers} must be >= 0")
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collator,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        generator=torch.Generator().manual_seed(seed),
    )
