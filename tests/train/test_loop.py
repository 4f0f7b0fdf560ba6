"""The two-stage recipe on a tiny model: learning, per-stage trainability, exact resume, bad data, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llava_ultra.config import load_config
from llava_ultra.errors import CheckpointError, ConfigError, DataError
from llava_ultra.model.checkpoint import load_checkpoint
from llava_ultra.model.tokenizer import load_tokenizer
from llava_ultra.train import loop
from llava_ultra.train.dataset import Collator, InstructDataset, PixelSource, image_root_for
from llava_ultra.train.loop import initial_model, train
from llava_ultra.train.schedule import build_optimizer
from llava_ultra.train.trainer import TrainingError
from tests.train.conftest import train_config, with_corrupt_image

WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors", "non_lora_trainables.safetensors")


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            out.update(load_file(str(folder / name)))
    return out


def by_component(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(instruct_dir: Path, tmp_path: Path):
    cfg = train_config(instruct_dir, tmp_path / "run", **{"train.stage2.trainable.llm": "full"})
    tok = loop.resolve_tokenizer(cfg, None)
    mcfg = loop._model_config(cfg, None, tok)
    prepared = loop.prepare_stage_data(cfg, 2, tok, mcfg, log=lambda *_: None)
    model = loop._set_trainable(initial_model(cfg, tok), cfg, 2).train()
    ds = InstructDataset(prepared, image_root_for(cfg.data.stage2), PixelSource(model.image_processor))
    batch = Collator(tok.pad_token_id)([ds[i] for i in range(4)])["inputs"]
    opt = build_optimizer(model, cfg.train, cfg.train.stage2)
    losses = []
    for _ in range(8):
        out = model(**batch)
        losses.append(float(out.loss.detach()))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    assert out.kd_loss is not None  # the attention teacher ran (stage 2, 'feature+attention')
    assert losses[-1] < losses[0] - 1.0 and losses[-1] == min(losses), losses


def test_train_with_default_stage_trainables_lowers_the_loss(instruct_dir: Path, tmp_path: Path):
    """The real loop (accelerate, scheduler, grad accumulation, stage-2 LoRA): stage 2's checkpoint
    has a lower loss than stage 1's on a fixed stage-2 batch, and the run's own losses fall."""
    cfg = train_config(
        instruct_dir,
        tmp_path / "run",
        **{
            "train.stage2.max_steps": 16,
            "train.stage2.epochs": 20,
            "train.stage2.grad_accum": 2,
            "train.stage2.warmup_ratio": 0.1,
        },
    )
    assert cfg.train.stage2.trainable["llm"] == "lora"
    result = train(cfg)
    stage2 = result.stages[1]
    assert stage2.completed and len(stage2.losses) == 16
    assert sum(stage2.losses[-4:]) < sum(stage2.losses[:4]), stage2.losses

    def fixed_batch_loss(folder: Path) -> float:
        model, tok = load_checkpoint(folder)
        mcfg = loop._model_config(cfg, None, tok)
        prepared = loop.prepare_stage_data(cfg, 2, tok, mcfg, log=lambda *_: None)
        ds = InstructDataset(prepared, image_root_for(cfg.data.stage2), PixelSource(model.image_processor))
        batch = Collator(tok.pad_token_id)([ds[i] for i in range(8)])["inputs"]
        with torch.no_grad():
            return float(model.eval()(**batch).loss)

    before, after = (
        fixed_batch_loss(tmp_path / "run" / "stage1"),
        fixed_batch_loss(tmp_path / "run" / "stage2"),
    )
    # LoRA on a random-init LLM starts near ln(vocab) = 6.93 and moves slowly: 16 steps give ~0.08
    assert after < before - 0.05, (before, after)


def test_each_stage_changes_only_its_components(instruct_dir: Path, tmp_path: Path):
    out = tmp_path / "run"
    cfg = train_config(instruct_dir, out)
    result = train(cfg)
    assert [s.stage for s in result.stages] == [1, 2] and all(s.completed for s in result.stages)

    tok = load_tokenizer(out / "stage1")
    start = {k: v for k, v in initial_model(cfg, tok).state_dict().items()}
    s1 = folder_tensors(out / "stage1")
    s2 = folder_tensors(out / "stage2")
    assert set(s1) == set(start)  # a random-init model saves everything, under our names

    def same(a, b, prefix):
        a, b = by_component(a, prefix), by_component(b, prefix)
        return set(a) <= set(b) and all(torch.equal(a[k], b[k]) for k in a)

    # stage 1: projectors + fusion trained, everything else bit-identical
    for frozen in ("clip.", "sam.", "llm.", "selector."):
        assert same(s1, start, frozen), frozen
    for trained in ("fusion.clip_projector.", "fusion.sam_projector.", "fusion.alpha_logit"):
        assert not same(s1, start, trained), trained

    # stage 2: adds the selector and LoRA on the LLM; towers and the LLM's base weights unchanged
    lora = {k for k in s2 if ".lora_" in k}
    assert lora and all(k.startswith("llm.") for k in lora)
    base2 = {k: v for k, v in s2.items() if k not in lora}
    for frozen in ("clip.", "sam.", "llm."):
        assert same(base2, s1, frozen), frozen
    for trained in ("selector.", "fusion.clip_projector.", "fusion.sam_projector."):
        assert not same(s2, s1, trained), trained
    assert any(float(v.abs().sum()) > 0 for k, v in s2.items() if ".lora_B" in k)  # B starts at zero

    model, tok2 = load_checkpoint(out / "stage2")  # eval / serve load the folder alone
    assert tok2 is not None and model.config.image_token_id == 4
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in log if "event" not in r]
    assert [(r["stage"], r["step"]) for r in steps] == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]
    assert all({"loss", "lr", "samples_per_s"} <= set(r) for r in steps)
    assert (out / "stage2" / "config.yaml").is_file() and (out / "config.yaml").is_file()


def test_kill_and_resume_reaches_the_uninterrupted_weights(instruct_dir: Path, tmp_path: Path):
    settings = {
        "train.save_every": 2,
        "train.keep_last": 1,
        "train.stage1.max_steps": 2,
        "train.stage2.max_steps": 5,
        "train.stage2.grad_accum": 2,
        "train.stage2.batch_size": 2,
        "train.stage2.warmup_ratio": 0.2,
    }
    whole = train_config(instruct_dir, tmp_path / "whole", **settings)
    train(whole)

    cut = train_config(instruct_dir, tmp_path / "cut", **settings)
    first = train(cut, stop_after=3)  # dies after step 3 of stage 2; last checkpoint is step 2
    assert [(s.stage, s.completed) for s in first.stages] == [(1, True), (2, False)]
    assert not (tmp_path / "cut" / "stage2").exists()
    ckpts = sorted(p.name for p in (tmp_path / "cut" / "checkpoints" / "stage2").iterdir())
    assert ckpts == ["step-00000002"]
    with pytest.raises(ConfigError, match="--resume"):
        train(cut)
    second = train(cut, resume=True)
    assert [(s.stage, s.steps) for s in second.stages] == [(2, 5)]

    a, b = folder_tensors(tmp_path / "whole" / "stage2"), folder_tensors(tmp_path / "cut" / "stage2")
    assert set(a) == set(b)
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert diff <= 1e-6, diff
    assert len(list((tmp_path / "cut" / "checkpoints" / "stage2").iterdir())) == 1  # keep_last


def test_corrupt_image_and_overlong_sample_are_reported_and_skipped(instruct_dir: Path, tmp_path: Path):
    def far_too_long(samples):
        long = json.loads(json.dumps(samples[1]))
        long["id"] = "far-too-long"
        long["conversations"][1]["value"] = "liver " * 1500
        return [long]

    path = with_corrupt_image(instruct_dir, tmp_path, far_too_long)
    cfg = train_config(
        instruct_dir,
        tmp_path / "run",
        **{
            "data.stage1": str(path),
            "train.stages": [1],
            "data.max_bad_fraction": 0.2,
            "train.stage1.max_steps": 100,
            "train.stage1.epochs": 3,
            "train.stage1.batch_size": 8,
        },
    )
    result = train(cfg)
    stage = result.stages[0]
    assert stage.completed
    # several epochs pass over the corrupt image: it is reported and counted once, not once per epoch
    epochs = 1 + max(
        json.loads(x).get("epoch", 0) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    )
    assert epochs >= 3, epochs
    assert sorted((b.id, b.kind) for b in stage.bad) == [
        ("far-too-long", "too_long"),
        ("has-corrupt-image", "corrupt_image"),
    ]
    assert "corrupt.png" in next(b.reason for b in stage.bad if b.kind == "corrupt_image")
    events = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(e["id"] for e in events if e.get("event") == "bad_sample") == [
        "far-too-long",
        "has-corrupt-image",
    ]

    strict = train_config(
        instruct_dir,
        tmp_path / "run2",
        **{"data.stage1": str(path), "train.stages": [1], "data.max_bad_fraction": 0.0},
    )
    with pytest.raises(DataError, match="far-too-long"):
        train(strict)
    assert not (tmp_path / "run2").exists()  # refused before anything was written


# ------------------------------------------------------------------------------------ bad input


def test_unknown_key_suggests_the_closest(tmp_path: Path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {vision: {inline: {}}, llm: {inline: {}}}\ntrain: {stage2: {lrr: 0.1}}\n")
    with pytest.raises(ConfigError, match="unknown key train.stage2.lrr: did you mean 'lr'"):
        load_config(cfg)
    with pytest.raises(ConfigError, match="did you mean 'save_every'"):
        load_config(tmp_path / "c.yaml", ["train.save_evry=3"])


def test_stage2_needs_an_existing_stage1_checkpoint(instruct_dir: Path, tmp_path: Path):
    alone = train_config(instruct_dir, tmp_path / "run", **{"train.stages": [2]})
    with pytest.raises(ConfigError, match="train.init_from"):
        train(alone)
    missing = train_config(
        instruct_dir, tmp_path / "run", **{"train.stages": [2], "train.init_from": str(tmp_path / "nope")}
    )
    with pytest.raises(CheckpointError, match=r"nope does not exist; run stage 1 first"):
        train(missing)
    assert not (tmp_path / "run").exists()


def test_missing_images_are_refused_before_compute(instruct_dir: Path, tmp_path: Path):
    cfg = train_config(instruct_dir, tmp_path / "run", **{"data.image_root": str(tmp_path)})
    with pytest.raises(DataError, match="none of the images exist .* set data.image_root"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_occupied_output_dir_is_refused_unless_resume_or_overwrite(instruct_dir: Path, tmp_path: Path):
    out = tmp_path / "run"
    cfg = train_config(instruct_dir, out, **{"train.stages": [1], "train.stage1.max_steps": 1})
    train(cfg)
    with pytest.raises(ConfigError, match="already holds a run .* --resume .* --overwrite"):
        train(cfg)
    changed = train_config(
        instruct_dir, out, **{"train.stages": [1], "train.stage1.max_steps": 1, "train.seed": 7}
    )
    with pytest.raises(ConfigError, match=r"different config:\n  train.seed: 0 -> 7"):
        train(changed, resume=True)
    assert train(changed, overwrite=True).stages[0].completed
    stranger = tmp_path / "notes"
    stranger.mkdir()
    (stranger / "thesis.txt").write_text("precious")
    other = train_config(instruct_dir, stranger, **{"train.stages": [1]})
    with pytest.raises(ConfigError, match="holds no llava-ultra run"):
        train(other, overwrite=True)
    assert (stranger / "thesis.txt").read_text() == "precious"


def test_nan_loss_stops_with_step_and_checkpoint(instruct_dir: Path, tmp_path: Path):
    cfg = train_config(
        instruct_dir,
        tmp_path / "run",
        **{
            "train.stages": [1],
            "train.stage1.lr": 1e30,
            "train.stage1.max_steps": 6,
            "train.save_every": 1,
            "train.max_grad_norm": 0.0,
        },
    )
    with pytest.raises(
        TrainingError, match=r"loss became (nan|inf) at step \d .* last checkpoint: .*step-0000000\d"
    ):
        train(cfg)


@pytest.mark.parametrize(
    "override",
    [{"data.num_workers": 2}, {"train.gradient_checkpointing": True}],
    ids=["workers", "grad_ckpt"],
)
def test_worker_processes_and_gradient_checkpointing_train_the_same(
    instruct_dir: Path, tmp_path: Path, override, monkeypatch
):
    """Loading in 2 worker processes, or recomputing activations, changes speed and memory, not the losses."""
    import transformers.modeling_utils

    calls = []
    real = transformers.modeling_utils.checkpoint  # what the LLM's checkpointing wraps

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    steps = {"train.stage1.max_steps": 2, "train.stage2.max_steps": 2}
    base = train(train_config(instruct_dir, tmp_path / "base", **steps))
    assert not calls
    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counting)
    other = train(train_config(instruct_dir, tmp_path / "other", **steps, **override))
    assert bool(calls) == ("train.gradient_checkpointing" in override)  # it really recomputed
    for a, b in zip(base.stages, other.stages, strict=True):
        assert len(a.losses) == len(b.losses) == 2
        assert a.losses == pytest.approx(b.losses, abs=1e-6), (a.stage, a.losses, b.losses)


def test_checkpoint_records_the_template_stage_2_was_tuned_with(instruct_dir: Path, tmp_path: Path):
    """A preset that tunes stage 2 in mistral_instruct (LLaVA-Med v1.5) while model.template keeps its
    default: the saved stage-2 checkpoint must say mistral_instruct, which eval and serve then use."""
    cfg = train_config(
        instruct_dir,
        tmp_path / "run",
        **{
            "train.stage1.max_steps": 1,
            "train.stage2.max_steps": 1,
            "train.stage2.template": "mistral_instruct",
        },
    )
    assert cfg.model.template == "vicuna_v1"
    train(cfg)
    stage1 = json.loads((tmp_path / "run" / "stage1" / "config.json").read_text())["model"]
    stage2 = json.loads((tmp_path / "run" / "stage2" / "config.json").read_text())["model"]
    assert stage1["template"] == "vicuna_v1"  # stage 1 ('plain' captions) keeps the model's own
    assert stage2["template"] == "mistral_instruct"
