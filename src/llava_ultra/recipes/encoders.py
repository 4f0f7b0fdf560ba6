"""The default pretrained tiny encoders: built once per content hash, reused by every recipe.

quickstart, ablate and the LoGra-Med experiment train LLaVA-Ultra on top of domain-pretrained
tiny CLIP and SAM encoders (train/pretrain.py), as a real deployment would start from pretrained
CLIP ViT-L and SAM ViT-L. Building them (a SynthUS frame corpus of reports disjoint from every
dataset, pretraining, the quality measurements of eval/encoders.py) takes a few minutes on a
2-core CPU, so the result is cached under `cache_root()` in a folder named by the SHA-256 of the
recipe (corpus config, pretraining config, PRETRAIN_VERSION): a changed recipe or a code change
that bumps the version builds a new folder, an unchanged one is reused. The folder is written
atomically (a crash leaves no half-built cache).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..eval.encoders import evaluate_encoders
from ..train.checkpoint import atomic_dir
from ..train.pretrain import PRETRAIN_VERSION, PretrainConfig, encoder_overrides, pretrain, write_json

ENCODER_CHOICES = ("pretrained", "random")
"""--encoders: 'pretrained' (default: the cached SynthUS-pretrained tiny encoders), 'random'
(the preset's random-init encoders), or a folder written by `pretrain-encoders`."""


@dataclass(frozen=True)
class EncoderRecipe:
    """The default tiny encoders: a SynthUS frame corpus and a pretraining config."""

    corpus_reports: int = 2000
    corpus_seed: int = 0
    hard: bool = False
    steps: int = 500
    batch_size: int = 64
    lr: float = 3e-3
    lesion_weight: float = 30.0
    token_lesion_weight: float = 1.0
    """Per-token lesion-presence head on SAM's neck (docs/results.md, section 1): makes lesions
    linearly readable from SAM's tokens, which the frame selector's scorer needs."""
    report_batches: bool = True
    """Whole reports per pretraining batch (their frames are each other's hard negatives)."""
    probe_steps: int = 150
    """Steps of the decoder probe fitted on the random-init SAM (quality table only; not hashed)."""
    quality_frames: int = 600
    """At most this many train / held-out frames for the quality table (not hashed): a lighter table
    than `pretrain-encoders` prints (1,500 frames, 300 probe steps), to keep `make demo` short."""

    def corpus_config(self) -> Any:
        from ..data.synth import SynthConfig

        return SynthConfig(reports=self.corpus_reports, seed=self.corpus_seed, k_min=1, k_max=6,
                           image_size=128, hard=self.hard)  # fmt: skip

    def pretrain_config(self) -> PretrainConfig:
        return PretrainConfig(
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            lesion_weight=self.lesion_weight,
            token_lesion_weight=self.token_lesion_weight,
            report_batches=self.report_batches,
            progress=False,
        )

    def key(self) -> str:
        blob = json.dumps({"version": PRETRAIN_VERSION, "corpus": asdict(self.corpus_config()),
                           "pretrain": self.pretrain_config().to_dict()}, sort_keys=True, default=list)  # fmt: skip
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_root() -> Path:
    """Where built encoders are kept: $LLAVA_ULTRA_CACHE or ~/.cache/llava-ultra."""
    return Path(os.environ.get("LLAVA_ULTRA_CACHE") or Path.home() / ".cache" / "llava-ultra") / "encoders"


def ensure_encoders(recipe: EncoderRecipe | None = None, root: Path | None = None, echo=print) -> Path:
    """The folder of the recipe's pretrained encoders, built on first use and reused by content hash."""
    from ..data.frames import build_synth_frames

    recipe = recipe or EncoderRecipe()
    folder = (root or cache_root()) / f"synthus-tiny-{recipe.key()}"
    if (folder / "pretrain.json").is_file() and (folder / "encoder_quality.json").is_file():
        return folder
    echo(f"pretraining the tiny encoders once (cached in {folder}) ...")
    corpus = folder.parent / f".{folder.name}.corpus"
    if not (corpus / "frames.jsonl").is_file():
        shutil.rmtree(corpus, ignore_errors=True)
        echo(build_synth_frames(corpus, recipe.corpus_config()).render())
    with atomic_dir(folder) as tmp:
        pretrain(corpus, tmp, recipe.pretrain_config(), overwrite=True, echo=echo)
        quality = evaluate_encoders(
            tmp, corpus, max_frames=recipe.quality_frames, decoder_steps=recipe.probe_steps
        )
        write_json(tmp / "encoder_quality.json", quality)
        shutil.move(str(corpus), str(tmp / "corpus"))
        write_json(tmp / "recipe.json", asdict(recipe))
    return folder


FAST_RECIPE = EncoderRecipe(corpus_reports=40, steps=12, batch_size=32, probe_steps=10, quality_frames=100)
"""The smoke-test encoders of `quickstart --fast` (seconds to build; barely trained)."""


def resolve_encoders(choice: str | Path | None, fast: bool = False, echo=print) -> list[str]:
    """Config overrides for --encoders: [] for 'random', the cached default for 'pretrained' (built
    on first use from default SynthUS frames and used for hard SynthUS too: one pretrained encoder
    serves every dataset; the smoke-test recipe when `fast`), else a `pretrain-encoders` folder."""
    if choice in (None, "random"):
        return []
    if choice == "pretrained":
        return encoder_overrides(ensure_encoders(FAST_RECIPE if fast else EncoderRecipe(), echo=echo))
    folder = Path(choice)
    if not (folder / "clip" / "config.json").is_file():
        raise ConfigError(
            f"--encoders {choice!r}: not 'pretrained' or 'random', and not a folder written by "
            "`llava-ultra pretrain-encoders` (no clip/config.json in it)"
        )
    return encoder_overrides(folder)
