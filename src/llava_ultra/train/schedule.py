"""Optimiser and learning-rate schedule for one training stage.

Notable choices:
- Cosine decay with linear warm-up is a pure function of the step (`lr_factor`), wrapped in a
  `LambdaLR`; it is stepped once per optimiser step by the loop itself (not through accelerate's
  scheduler wrapper, which would step it once per process).
- Only parameters with `requires_grad` are optimised. Biases, norms and 1-d parameters (the fusion
  weight) get no weight decay, the usual AdamW split.
- 'adam' is `torch.optim.Adam` (weight decay as L2, as in the paper's recipe); 'adamw' decouples it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import StageConfig, TrainConfig
from ..errors import ConfigError


def lr_factor(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr at optimiser step `step` (0-based): linear warm-up over `warmup`
    steps, then cosine decay from 1 to `min_ratio` at `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps(total: int, ratio: float) -> int:
    """Warm-up steps for `total` optimiser steps and a warm-up `ratio`."""
    return int(math.ceil(total * ratio))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into decayed (matrices) and non-decayed (biases, norms, scalars)."""
    decay, no_decay = [], []
    for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ConfigError("no parameter is trainable in this stage; check train.stageN.trainable")
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, train: TrainConfig, stage: StageConfig) -> torch.optim.Optimizer:
    """Adam or AdamW over the model's trainable parameters with the stage's lr."""
    cls = torch.optim.AdamW if train.optimizer == "adamw" else torch.optim.Adam
    return cls(
        param_groups(model, stage.weight_decay),
        lr=stage.lr,
        betas=tuple(train.betas),
        eps=train.eps,
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, stage: StageConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine schedule with warm-up over `total_steps` optimiser steps."""
    warm = warmup_steps(total_steps, stage.warmup_ratio)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warm, stage.min_lr_ratio)
    )
