"""LoGra-Med alignment in training: config checks, extended captions in collate, gradients reach the
projector, a CPU run that logs the loss and trains the GNN, exact resume, and 2-process DDP."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llava_ultra.errors import ConfigError
from llava_ultra.model.checkpoint import load_checkpoint
from llava_ultra.model.processor import encode_sample
from llava_ultra.train import logra, loop
from llava_ultra.train.dataset import Collator, InstructDataset, PixelSource, image_root_for
from llava_ultra.train.loop import initial_model, train
from tests.train.conftest import launch_ddp, train_config
from tests.train.test_loop import folder_tensors

ALIGN = {"train.align_weight": 1.0, "train.align.k": 2, "train.align.hidden": 32}


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_k_must_be_below_the_per_device_batch_when_on(instruct_dir: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match=r"train.align.k=4 .* train.stage1.batch_size=4"):
        train_config(instruct_dir, tmp_path, **{**ALIGN, "train.align.k": 4})
    # off (weight 0), or the small-batch stage not aligned: accepted
    train_config(instruct_dir, tmp_path, **{"train.align.k": 4})
    train_config(
        instruct_dir,
        tmp_path,
        **{**ALIGN, "train.align.k": 4, "train.stage1.batch_size": 8, "train.stage2.batch_size": 8},
    )
    with pytest.raises(ConfigError, match="train.align.solver"):
        train_config(instruct_dir, tmp_path, **{"train.align.solver": "lpmp"})


def test_collate_tokenises_the_llm_caption_else_the_template(instruct_dir: Path, tmp_path: Path):
    cfg = train_config(instruct_dir, tmp_path, **ALIGN)
    tok = loop.resolve_tokenizer(cfg, None)
    mcfg = loop._model_config(cfg, None, tok)
    sample = json.loads((instruct_dir / "stage2.train.json").read_text(encoding="utf-8"))[0]
    template = encode_sample(sample, tok, mcfg, "vicuna_v1", extended_tokens=64).extended_ids
    written = encode_sample(
        {**sample, "extended_caption": "An LLM-written caption."}, tok, mcfg, "vicuna_v1", extended_tokens=64
    ).extended_ids
    assert tok.decode(written.tolist()) == "An LLM-written caption."
    assert 0 < len(template) <= 64 and tok.decode(template.tolist()) != tok.decode(written.tolist())
    assert encode_sample(sample, tok, mcfg, "vicuna_v1").extended_ids is None  # off: not tokenised
    no_site = {k: v for k, v in sample.items() if k != "site"}
    assert len(encode_sample(no_site, tok, mcfg, "vicuna_v1", extended_tokens=64).extended_ids) == 0


def test_alignment_gradient_reaches_the_projector(instruct_dir: Path, tmp_path: Path):
    cfg = train_config(instruct_dir, tmp_path, **{**ALIGN, "train.align.noise": 1.0})
    tok = loop.resolve_tokenizer(cfg, None)
    mcfg = loop._model_config(cfg, None, tok)
    prepared = loop.prepare_stage_data(cfg, 2, tok, mcfg, log=lambda *_: None)
    model = loop._set_trainable(initial_model(cfg, tok), cfg, 2).train()
    ds = InstructDataset(prepared, image_root_for(cfg.data.stage2), PixelSource(model.image_processor))
    batch = Collator(tok.pad_token_id)([ds[i] for i in range(8)])
    head = logra.build_head(cfg.train, 2, model.llm.config.hidden_size, "cpu").train()
    torch.manual_seed(0)
    out, loss, logged = logra.aligned_loss(model, head, model.llm, batch["inputs"], batch["extended"])
    assert logged["align_nodes"] == 8 and logged["align_skipped"] == 0 and logged["align_loss"] > 0
    (loss - out.loss).backward()  # the alignment term alone
    proj = model.fusion.clip_projector.linear_1.weight.grad
    assert proj is not None and float(proj.abs().sum()) > 0
    assert all(float(p.grad.abs().sum()) > 0 for p in head.parameters())


def test_training_with_alignment_logs_it_and_trains_the_gnn(instruct_dir: Path, tmp_path: Path):
    out = tmp_path / "run"
    cfg = train_config(instruct_dir, out, **ALIGN)
    result = train(cfg)
    assert all(s.completed and all(math.isfinite(x) for x in s.losses) for s in result.stages)
    steps = [r for r in records(out) if "event" not in r]
    assert len(steps) == 6
    for r in steps:
        assert math.isfinite(r["align_loss"]) and 0 <= r["align_loss"] <= 2
        assert {"align_image", "align_short", "align_extended", "align_skipped"} <= set(r)
        assert r["loss"] == pytest.approx(r["lm_loss"] + r.get("kd_loss", 0.0) + r["align_loss"], rel=1e-4)
    tok = loop.resolve_tokenizer(cfg, None)
    for stage in (1, 2):
        fresh = logra.build_head(cfg.train, stage, 32, "cpu").state_dict()
        saved = load_file(str(out / "checkpoints" / f"stage{stage}" / "step-00000003" / logra.HEAD_FILE))
        assert set(saved) == set(fresh) and all(not torch.equal(saved[k], fresh[k]) for k in fresh)
    model, _ = load_checkpoint(out / "stage2")  # the model checkpoint has no head keys
    assert not any(k.startswith(("gnn.", "align")) for k in model.state_dict())
    assert not (out / "stage2" / logra.HEAD_FILE).exists() and tok is not None


def test_resume_with_alignment_equals_uninterrupted(instruct_dir: Path, tmp_path: Path):
    settings = {
        **ALIGN,
        "train.stages": [1],
        "train.save_every": 2,
        "train.keep_last": 1,
        "train.stage1.max_steps": 4,
    }
    whole = train_config(instruct_dir, tmp_path / "whole", **settings)
    train(whole)
    cut = train_config(instruct_dir, tmp_path / "cut", **settings)
    assert not train(cut, stop_after=3).stages[0].completed  # last checkpoint: step 2
    train(cut, resume=True)
    a, b = folder_tensors(tmp_path / "whole" / "stage1"), folder_tensors(tmp_path / "cut" / "stage1")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    heads = [
        load_file(str(p / "checkpoints" / "stage1" / "step-00000004" / logra.HEAD_FILE))
        for p in (tmp_path / "whole", tmp_path / "cut")
    ]
    assert all(torch.allclose(heads[0][k], heads[1][k], atol=1e-6) for k in heads[0])
    losses = [
        [r["align_loss"] for r in records(p) if r.get("step") == 4 and "event" not in r]
        for p in (tmp_path / "whole", tmp_path / "cut")
    ]
    assert losses[0] == losses[1]


@pytest.mark.slow
def test_two_process_ddp_with_alignment(instruct_dir: Path, tmp_path: Path):
    out = tmp_path / "run"
    cfg = train_config(
        instruct_dir, out, **{**ALIGN, "train.stage1.max_steps": 2, "train.stage2.max_steps": 2}
    )
    proc = launch_ddp(cfg, tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = records(out)
    prints = [r for r in recs if r.get("event") == "rank_fingerprints"]  # trainables + GNN, per rank
    assert [p["stage"] for p in prints] == [1, 2]
    assert all(len(p["values"]) == 2 and p["values"][0] == p["values"][1] for p in prints)
    steps = [r for r in recs if "event" not in r]
    assert [r["samples"] for r in steps if r["stage"] == 1] == [8, 16]  # 2 processes x batch 4
    assert all(math.isfinite(r["align_loss"]) and r["align_skipped"] == 0 for r in steps)


def test_backward_scale_names_what_accelerate_puts_on_the_gradient():
    """1 / grad_accum on CPU fp32 (no loss scaler), so the black-box re-solve sees the loss's own gradient."""
    from accelerate import Accelerator

    assert logra.backward_scale(Accelerator(cpu=True)) == 1.0
    assert logra.backward_scale(Accelerator(cpu=True, gradient_accumulation_steps=4)) == 0.25
