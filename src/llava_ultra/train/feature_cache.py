"""Frozen-feature cache: run the frozen vision encoders ONCE per unique image, train from their outputs.

Both encoders (CLIP, SAM) are frozen in every stage, so their outputs for an image never change
during training; only the projectors, fusion, selector and LLM that consume them do. What is stored
is therefore the encoders' raw outputs, the inputs to `fusion`, never the projected features:

    clip   (N, Dc)       CLIP's `select_layer` tokens after `select_feature` ('patch' drops CLS)
    sam    (C, Gs, Gs)   SAM's neck grid, channels-first (absent when SAM is disabled)

Layout of a cache folder (written to a temporary folder and renamed when complete):

    cache.json                 index: fingerprint + hash, storage dtype, one entry per image path
    features-00000.safetensors shards of at most `shard_mb` MiB; tensors '<key>.clip', '<key>.sam'

Notable choices:
- Images are keyed by their resolved absolute path; each entry also records the file's size and
  mtime, and a cache whose image changed on disk is refused before training (rebuild it).
- The cache records a fingerprint of everything that determines the encoder outputs: the encoder
  configs (resolved, as a checkpoint would save them, minus where they came from), the layer /
  feature selection, the preprocessing settings (sizes, aspect mode, mean/std), the weight dtype
  and a SHA-256 of both encoders' state dicts. A model whose fingerprint differs is refused with
  a `CheckpointError` naming both hashes and the parts that differ.
- Unique images are encoded in sorted path order with fixed batches, so the same data, model and
  settings give byte-identical files. A corrupt image is recorded with its error (training then
  skips that sample exactly as it does with live encoders); a missing file is reported and left out.
- `FeatureCache` is an `ImageSource` (train/dataset.py): it returns `clip_features` /
  `sam_features`, which `UltraModel.forward` takes in place of the pixel tensors. Shards are
  memory-mapped lazily per process (DataLoader workers open their own handles).
- `float16` storage halves the disk and I/O; values are range-checked (an overflow is an error
  that says to use float32). float32 storage reproduces the live-encoder loss to rounding.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..config import Config, SamConfig, VisionConfig, to_dict
from ..data.reports import resolve_image
from ..errors import CheckpointError, ConfigError, DataError
from . import checkpoint as ck
from .dataset import PixelSource, Prepared, image_root_for, read_instructions
from .setup import initial_model, resolve_tokenizer

INDEX_NAME = "cache.json"
FORMAT = "llava-ultra-feature-cache"
FORMAT_VERSION = 1
STORAGE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
_CONFIG_METADATA = ("transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype")


# -------------------------------------------------------------------------------- fingerprint


def _module_config(module: nn.Module) -> dict[str, Any]:
    data = module.config.to_diff_dict()
    for key in (*_CONFIG_METADATA, "model_type"):
        data.pop(key, None)
    return data


def _settings(cfg: VisionConfig | SamConfig) -> dict[str, Any]:
    """The config fields that shape the encoder's output (not where its weights came from)."""
    return {k: v for k, v in to_dict(cfg).items() if k not in ("path", "inline", "origin")}


def weights_hash(module: nn.Module) -> str:
    """SHA-256 over a module's state dict (names, dtypes, shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def encoder_fingerprint(model: Any) -> dict[str, Any]:
    """What determines the cached outputs of `model` (an UltraModel: `.config`, `.clip`, `.sam`)."""
    cfg = model.config
    clip_param = next(model.clip.parameters())
    return {
        "clip": {"config": _module_config(model.clip), "settings": _settings(cfg.vision)},
        "sam": None
        if model.sam is None
        else {"config": _module_config(model.sam), "settings": _settings(cfg.sam)},
        "dtype": str(clip_param.dtype).removeprefix("torch."),
        "weights": {
            "clip": weights_hash(model.clip),
            "sam": None if model.sam is None else weights_hash(model.sam),
        },
    }


def fingerprint_hash(fingerprint: dict[str, Any]) -> str:
    """A short stable hash of a fingerprint (SHA-256 of its canonical JSON, 16 hex digits)."""
    text = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Dotted paths at which two JSON-like values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _differences(a.get(key), b.get(key), f"{where}.{key}" if where else key)
        return out
    return [] if a == b else [where or "<root>"]


# -------------------------------------------------------------------------------------- build


@dataclass
class CacheSummary:
    """What `build_cache` did."""

    folder: Path
    images: int
    """Images encoded and stored."""
    shards: int
    hash: str
    seconds: float
    bad: list[str] = field(default_factory=list)
    """'path: reason' for every corrupt image (recorded in the index) and missing one (left out)."""

    def render(self) -> str:
        lines = [
            f"cached {self.images} image(s) in {self.shards} shard(s) in {self.seconds:.1f}s -> {self.folder}",
            f"encoder hash {self.hash}; train with data.feature_cache={self.folder}",
        ]
        if self.bad:
            lines.append(f"{len(self.bad)} image(s) could not be cached:")
            lines += [f"  {b}" for b in self.bad[:10]]
            if len(self.bad) > 10:
                lines.append(f"  ... and {len(self.bad) - 10} more")
        return "\n".join(lines)


def images_of(data_files: Sequence[str | Path], image_root: str | None = None) -> list[Path]:
    """Every unique image path (resolved, sorted) named by the samples of the instruction files."""
    found: set[Path] = set()
    for data in data_files:
        root = image_root_for(data, image_root)
        for sample in read_instructions(data):
            if isinstance(sample, dict):
                for rel in sample.get("images") or []:
                    try:
                        found.add(resolve_image(root, rel).resolve())
                    except (ValueError, TypeError, DataError):
                        continue  # an unsafe or malformed path; training reports the sample
    return sorted(found)


@torch.no_grad()
def encode_pixels(model: Any, pixels: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """Pixel tensors (M, ...) -> the frozen encoders' outputs: 'clip' (M, N, Dc), 'sam' (M, C, Gs, Gs)."""
    from ..model.vision import clip_tokens, sam_grid

    v = model.config.vision
    device = next(model.clip.parameters()).device
    out = {
        "clip": clip_tokens(
            model.clip, pixels["pixel_values_clip"].to(device), v.select_layer, v.select_feature
        )
    }
    if model.sam is not None:
        out["sam"] = sam_grid(model.sam, pixels["pixel_values_sam"].to(device))
    return out


def _stat(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def build_cache(
    model: Any,
    data_files: Sequence[str | Path],
    out: str | Path,
    *,
    image_root: str | None = None,
    dtype: str = "float32",
    batch_size: int = 32,
    shard_mb: int = 1024,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> CacheSummary:
    """Encode every unique image of `data_files` with `model`'s frozen encoders and write the cache."""
    if dtype not in STORAGE_DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: use one of {', '.join(STORAGE_DTYPES)}")
    if batch_size < 1 or shard_mb < 1:
        raise ConfigError(f"batch_size={batch_size} and shard_mb={shard_mb} must be >= 1")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} already exists and is not empty; pick another --out or pass --overwrite")
    t0 = time.perf_counter()
    fingerprint = encoder_fingerprint(model)
    paths = images_of(data_files, image_root)
    if not paths:
        raise DataError(f"the instruction file(s) {', '.join(map(str, data_files))} name no images to cache")
    store = STORAGE_DTYPES[dtype]
    source = PixelSource(model.image_processor)
    entries: dict[str, dict[str, Any]] = {}
    bad: list[str] = []
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, shards, n_done = 0, [], 0
    limit = shard_mb * 2**20

    with ck.atomic_dir(out) as tmp:

        def flush() -> None:
            nonlocal shard, shard_bytes
            if shard:
                name = f"features-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": FORMAT})
                shards.append(name)
                shard, shard_bytes = {}, 0

        for start in range(0, len(paths), batch_size):
            chunk, pixels = [], []
            for path in paths[start : start + batch_size]:
                if not path.is_file():
                    bad.append(f"{path}: image not found (left out of the cache)")
                    continue
                try:
                    pixels.append(source([path]))
                except DataError as exc:
                    entries[str(path)] = {"error": str(exc), **_stat(path)}
                    bad.append(f"{path}: {exc}")
                    continue
                chunk.append(path)
            if not chunk:
                continue
            batch = {
                k: None if pixels[0][k] is None else torch.cat([p[k] for p in pixels]) for k in pixels[0]
            }
            feats = {k: v.to(device="cpu", dtype=store) for k, v in encode_pixels(model, batch).items()}
            for name, tensor in feats.items():
                if not torch.isfinite(tensor).all():
                    raise DataError(
                        f"the {name} features of {chunk[0]}..{chunk[-1]} are not finite in {dtype}; "
                        f"rebuild with --dtype float32"
                    )
            for i, path in enumerate(chunk):
                key = f"{n_done:08d}"
                if shard_bytes and shard_bytes >= limit:
                    flush()
                for name, tensor in feats.items():
                    shard[f"{key}.{name}"] = tensor[i].clone(memory_format=torch.contiguous_format)
                    shard_bytes += tensor[i].numel() * tensor.element_size()
                entries[str(path)] = {
                    "shard": f"features-{len(shards):05d}.safetensors",
                    "key": key,
                    **_stat(path),
                }
                n_done += 1
            log(f"cache-features: {min(start + batch_size, len(paths))}/{len(paths)} images")
        flush()
        index = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "hash": fingerprint_hash(fingerprint),
            "fingerprint": fingerprint,
            "dtype": dtype,
            "shards": shards,
            "images": entries,
        }
        (tmp / INDEX_NAME).write_text(
            json.dumps(index, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8"
        )
    return CacheSummary(out, n_done, len(shards), index["hash"], time.perf_counter() - t0, bad)


def model_for_cache(cfg: Config, device: str | torch.device | None = None) -> Any:
    """The model whose encoders training will use: `train.init_from`'s, else the fresh stage-1 model
    (`build_model` seeded with train.seed, with the run's tokenizer), built exactly as training does."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.train.init_from is not None:
        from ..model.checkpoint import load_checkpoint

        return load_checkpoint(cfg.train.init_from, device=device)[0]
    return initial_model(cfg, resolve_tokenizer(cfg, None), device).eval()


# --------------------------------------------------------------------------------------- read


def read_index(folder: str | Path) -> dict[str, Any]:
    """A cache's index, with a clear error for a folder that is not a cache."""
    path = Path(folder) / INDEX_NAME
    if not path.is_file():
        raise ConfigError(
            f"data.feature_cache={folder} holds no {INDEX_NAME}; build it with "
            f"`llava-ultra cache-features --config CONFIG --out {folder}` or unset data.feature_cache"
        )
    index = json.loads(path.read_text(encoding="utf-8"))
    if index.get("format") != FORMAT or index.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} is not a version-{FORMAT_VERSION} {FORMAT} index; rebuild it with `llava-ultra cache-features`"
        )
    return index


class FeatureCache:
    """An `ImageSource` over a cache folder: paths -> {'clip_features': (k, N, Dc), 'sam_features':
    (k, C, Gs, Gs) or None}, in the cache's storage dtype."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.index = read_index(self.folder)
        self.images: dict[str, dict[str, Any]] = self.index["images"]
        self._handles: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers open their own handles
        return {**self.__dict__, "_handles": {}}

    @property
    def hash(self) -> str:
        return self.index["hash"]

    def check_model(self, model: Any) -> None:
        """Refuse a model whose frozen encoders are not the ones this cache was built with."""
        for name in ("clip", "sam"):
            module = getattr(model, name)
            if module is not None and any(p.requires_grad for p in module.parameters()):
                raise ConfigError(
                    f"the {name} encoder trains in this stage, but data.feature_cache holds frozen-encoder "
                    f"outputs; set trainable.{name}: frozen or unset data.feature_cache"
                )
        mine = encoder_fingerprint(model)
        if fingerprint_hash(mine) != self.hash:
            diff = _differences(self.index["fingerprint"], mine)
            raise CheckpointError(
                f"feature cache {self.folder} was built for encoder hash {self.hash}, but this model's "
                f"encoders hash to {fingerprint_hash(mine)} (differing: {', '.join(diff[:8])}); rebuild "
                f"it with `llava-ultra cache-features --config CONFIG --out {self.folder} --overwrite` "
                f"for this model, or unset data.feature_cache to run the encoders live"
            )

    def check_covers(self, paths: Iterable[Path]) -> None:
        """Every path must be cached (or recorded as corrupt) and unchanged since; DataError otherwise."""
        missing, stale = [], []
        for path in paths:
            entry = self.images.get(str(Path(path).resolve()))
            if entry is None:
                missing.append(str(path))
            elif _stat(Path(path)) != {"size": entry["size"], "mtime_ns": entry["mtime_ns"]}:
                stale.append(str(path))
        fix = (
            f"rebuild it with `llava-ultra cache-features --config CONFIG --data <the instruction files> "
            f"--out {self.folder} --overwrite`, or unset data.feature_cache"
        )
        if missing:
            raise DataError(
                f"{len(missing)} image(s) are not in feature cache {self.folder}, e.g. {', '.join(missing[:3])}; {fix}"
            )
        if stale:
            raise DataError(
                f"{len(stale)} image(s) changed on disk since feature cache {self.folder} was built, e.g. "
                f"{', '.join(stale[:3])}; {fix}"
            )

    def _tensor(self, shard: str, key: str) -> torch.Tensor:
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.folder / shard), framework="pt")
        return self._handles[shard].get_tensor(key)

    def __call__(self, paths: Sequence[Path]) -> dict[str, torch.Tensor | None]:
        clip, sam = [], []
        for path in paths:
            entry = self.images.get(str(Path(path).resolve()))
            if entry is None:
                raise DataError(
                    f"image {path} is not in feature cache {self.folder}; rebuild the cache with "
                    f"`llava-ultra cache-features` over this data"
                )
            if "error" in entry:
                raise DataError(entry["error"])
            clip.append(self._tensor(entry["shard"], f"{entry['key']}.clip"))
            if self.index["fingerprint"]["sam"] is not None:
                sam.append(self._tensor(entry["shard"], f"{entry['key']}.sam"))
        return {
            "clip_features": torch.stack(clip),
            "sam_features": torch.stack(sam) if sam else None,
        }


def cached_source(folder: str | Path, model: Any, prepared: Prepared, image_root: Path) -> FeatureCache:
    """The training loop's source when `data.feature_cache` is set: checked against the model and
    the stage's samples before any step runs."""
    cache = FeatureCache(folder)
    cache.check_model(model)
    cache.check_covers(
        resolve_image(image_root, rel) for sample in prepared.samples for rel in sample.get("images") or []
    )
    return cache
