"""What a run starts from, shared by the trainer and the feature cache: the stage's data file, the
run's tokenizer and the fresh stage-1 model.

Notable choices: both `train/loop.py` and `train/feature_cache.py` build the model and tokenizer
exactly this way (so cached encoder outputs are the encoders training will use); keeping it here,
below both, means neither imports the other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..errors import ConfigError, DataError
from .checkpoint import seed_everything
from .dataset import read_instructions


def data_path(cfg: Config, stage: int) -> str:
    """`data.stageN`, checked to be set and to exist."""
    path = cfg.data.stage1 if stage == 1 else cfg.data.stage2
    if path is None:
        raise ConfigError(
            f"data.stage{stage} is not set; point it at the stage-{stage} instruction JSON "
            f"(e.g. data/instruct/stage{stage}.train.json from `llava-ultra instruct`)"
        )
    if not Path(path).is_file():
        raise DataError(
            f"data.stage{stage}={path} does not exist; build it with `llava-ultra instruct` or fix the path"
        )
    return path


def _training_texts(cfg: Config) -> list[str]:
    texts = []
    for stage in cfg.train.stages:
        for sample in read_instructions(data_path(cfg, stage)):
            if isinstance(sample, dict):
                texts += [str(t.get("value", "")) for t in sample.get("conversations") or []]
                texts.append(str(sample.get("findings") or ""))
    return texts


def resolve_tokenizer(cfg: Config, init: Path | None) -> Any:
    """The tokenizer of a run: init folder's, `train.tokenizer`, the LLM's, or a tiny BPE built on
    the training text (inline LLMs only). `<image>` is added when missing."""
    from ..model.tokenizer import build_tiny_tokenizer, load_tokenizer

    if init is not None:
        return load_tokenizer(init)
    source = cfg.train.tokenizer or cfg.model.llm.path
    if source is None:
        vocab = (cfg.model.llm.inline or {}).get("vocab_size", 1024)
        return build_tiny_tokenizer(_training_texts(cfg), vocab_size=vocab)
    tok = load_tokenizer(source)
    token = cfg.model.image_token
    if tok.convert_tokens_to_ids(token) in (None, tok.unk_token_id):
        tok.add_special_tokens({"additional_special_tokens": [token]})
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


def initial_model(cfg: Config, tokenizer: Any, device: torch.device | str = "cpu") -> Any:
    """The model a fresh stage 1 starts from: `build_model(cfg.model)` after seeding with train.seed."""
    from ..model.ultra import build_model

    seed_everything(cfg.train.seed)
    return build_model(cfg.model, tokenizer, device=device)
