"""Instruction samples -> training batches: reading, the up-front check, the Dataset, collate, sampler.

What this file owns: reading an instruction JSON (written by `data/instruct.py`), checking every
sample BEFORE training starts, a map-style Dataset that loads a sample's k frames, a collator that
pads and flattens, and a deterministic sharded batch sampler. Turning a sample into token ids and
labels (chat template, placeholder expansion, label masking, padding) is the input processor's
(`model/processor.py`), the same code inference uses.

Notable choices:
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

from ..config import ModelConfig
from ..data.reports import resolve_image
from ..errors import ConfigError, DataError
from ..model.processor import Encoded, encode_sample, pad_encoded, pad_extended, pad_findings

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
        inputs: dict[str, Any] = {
            **pad_encoded(encs, self.pad_id, self.side),
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
        inputs.update(pad_findings(encs, self.pad_id))
        extended = pad_extended(encs, self.pad_id)
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
