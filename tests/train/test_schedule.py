"""Cosine schedule with warm-up (golden values) and the optimiser's parameter groups."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from llava_ultra.config import Stage2Config, TrainConfig
from llava_ultra.errors import ConfigError
from llava_ultra.train.schedule import build_optimizer, build_scheduler, lr_factor, param_groups, warmup_steps


def test_lr_factor_golden():
    assert [lr_factor(s, 10, 2) for s in range(3)] == [0.5, 1.0, 1.0]
    assert lr_factor(6, 10, 2) == pytest.approx(0.5)  # half-way through the decay
    assert lr_factor(10, 10, 2) == pytest.approx(0.0)
    assert lr_factor(10, 10, 2, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(4, 10, 0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.4)))
    assert warmup_steps(100, 0.03) == 3 and warmup_steps(5, 0.0) == 0


def test_scheduler_follows_lr_factor_and_groups_skip_decay_on_vectors():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[2].requires_grad_(False)
    stage = Stage2Config(lr=0.1, warmup_ratio=0.2, weight_decay=0.01)
    opt = build_optimizer(model, TrainConfig(optimizer="adam"), stage)
    assert isinstance(opt, torch.optim.Adam) and not isinstance(opt, torch.optim.AdamW)
    assert [len(g["params"]) for g in opt.param_groups] == [1, 3]  # weight | bias, norm weight, norm bias
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    sched = build_scheduler(opt, stage, total_steps=10)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.1 * lr_factor(s, 10, 2) for s in range(10)])


def test_nothing_trainable_is_an_error():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ConfigError, match="no parameter is trainable"):
        param_groups(model, 0.0)
