"""Encoder pretraining: losses fall, the output loads through the preset path loader, resume is exact,
and the pretrained CLIP classifies sites zero-shot better than chance on held-out frames."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llava_ultra.config import SamConfig, VisionConfig, from_dict
from llava_ultra.data.frames import build_synth_frames, read_frames
from llava_ultra.data.synth import SynthConfig
from llava_ultra.errors import CheckpointError, ConfigError
from llava_ultra.eval.encoders import frame_features, zero_shot_sites
from llava_ultra.model.vision import build_clip, build_sam
from llava_ultra.train.pretrain import (
    PretrainConfig,
    batch_indices,
    encoder_overrides,
    pretrain,
    report_batch_indices,
    report_groups,
)

STEPS = 60


def corpus_config(seed: int, reports: int = 36) -> SynthConfig:
    return SynthConfig(reports=reports, seed=seed, k_min=1, k_max=3, image_size=64)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    build_synth_frames(root / "corpus", corpus_config(0), val_frac=0.0)
    cfg = PretrainConfig(steps=STEPS, batch_size=24, lr=3e-3, warmup_steps=5, save_every=30, progress=False)
    result = pretrain(root / "corpus", root / "enc", cfg, echo=lambda *a: None)
    return root, cfg, result


def _mean(values):
    return sum(values) / len(values)


def test_pretraining_lowers_contrastive_and_mask_losses(trained):
    _, _, r = trained
    assert len(r.clip_loss) == len(r.mask_loss) == STEPS
    assert _mean(r.clip_loss[-10:]) < 0.8 * _mean(r.clip_loss[:5])
    assert _mean(r.mask_loss[-10:]) < 0.6 * _mean(r.mask_loss[:5])


def test_output_loads_through_the_preset_path_loader_strictly(trained):
    root, cfg, _ = trained
    enc = root / "enc"
    overrides = dict(o.split("=", 1) for o in encoder_overrides(enc))
    vision = from_dict(
        VisionConfig,
        {"path": json.loads(overrides["model.vision.path"]), "image_size": 112, "patch_size": 14,
         "image_mean": json.loads(overrides["model.vision.image_mean"])},
        "model.vision",
    )  # fmt: skip
    clip = build_clip(vision)
    saved = load_file(str(enc / "clip" / "model.safetensors"))
    for name, tensor in clip.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    assert not any(p.requires_grad for p in clip.parameters())
    sam = build_sam(from_dict(SamConfig, {"path": str(enc / "sam"), "image_size": 128}, "model.sam"))
    assert sam.config.image_size == 128
    # preprocessing is read from the saved config: a different normalisation is refused, named
    with pytest.raises(
        ConfigError, match=r"model.vision.image_mean=\[0.5, 0.5, 0.5\] but .*preprocessor_config"
    ):
        build_clip(from_dict(VisionConfig, {"path": str(enc / "clip"), "image_size": 112, "patch_size": 14,
                                             "image_mean": [0.5, 0.5, 0.5]}, "model.vision"))  # fmt: skip
    # a folder of the wrong kind is refused, naming the missing weights
    with pytest.raises(ConfigError, match="does not match a SamVisionModel"):
        build_sam(from_dict(SamConfig, {"path": str(enc / "clip"), "image_size": 128}, "model.sam"))


def test_resume_continues_exactly(trained, tmp_path):
    root, cfg, _ = trained
    # a run stopped after its step-30 checkpoint: keep only that checkpoint, resume to the end
    import shutil

    resumed = tmp_path / "resumed"
    shutil.copytree(root / "enc", resumed)
    for p in resumed.iterdir():
        if p.name != "checkpoints":
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    assert [p.name for p in (resumed / "checkpoints").iterdir()] == ["step-00000030"]
    messages = []
    r = pretrain(root / "corpus", resumed, cfg, resume=True, echo=messages.append)
    assert r.resumed_from == 30 and "resuming encoder pretraining" in messages[-1]
    for part in ("clip", "sam"):
        a = load_file(str(root / "enc" / part / "model.safetensors"))
        b = load_file(str(resumed / part / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    with pytest.raises(ConfigError, match="pass --resume to continue it or --overwrite"):
        pretrain(root / "corpus", resumed, cfg, echo=lambda *a: None)


def test_batches_are_a_pure_function_of_the_step():
    a = batch_indices(10, 4, 2, seed=1)  # crosses the first epoch boundary (frames 8..11)
    assert torch.equal(a, batch_indices(10, 4, 2, seed=1)) and len(a) == 4
    epoch0 = torch.cat([batch_indices(10, 5, s, 1) for s in (0, 1)])
    assert sorted(epoch0.tolist()) == list(range(10))


def test_report_batches_hold_whole_reports_and_cover_each_epoch_once():
    groups = [[0, 1, 2], [3], [4, 5], [6, 7, 8, 9]]  # 10 frames in 4 reports
    stream = torch.cat([report_batch_indices(groups, 5, s, seed=3) for s in range(4)]).tolist()
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    for epoch in (stream[:10], stream[10:]):
        starts = [epoch.index(g[0]) for g in groups]
        for g, at in zip(groups, starts, strict=True):  # each report's frames are contiguous
            assert epoch[at : at + len(g)] == g
    assert stream[:10] != stream[10:]  # the report order is reshuffled every epoch
    assert torch.equal(report_batch_indices(groups, 5, 3, 3), report_batch_indices(groups, 5, 3, 3))


def test_report_groups_read_the_report_id_and_leave_unknown_frames_alone():
    class R:
        def __init__(self, meta):
            self.meta = meta

    recs = [R({"report_id": "a"}), R({}), R({"report_id": "b"}), R({"report_id": "a"}), R(None)]
    assert report_groups(recs) == [[0, 3], [1], [2], [4]]


def test_zero_shot_site_accuracy_beats_chance_on_held_out_frames(trained, tmp_path):
    root, _, _ = trained
    build_synth_frames(tmp_path / "held", corpus_config(7, reports=24), val_frac=0.0)
    held = read_frames(tmp_path / "held")
    feats = frame_features(root / "enc", held, held.records)
    sites = [r.site for r in held.records]
    chance = 1 / len(set(sites))
    acc = zero_shot_sites(root / "enc", feats["clip_pooled"], sites)
    rnd = zero_shot_sites(
        root / "enc", frame_features(root / "enc", held, held.records, True)["clip_pooled"], sites, True
    )
    assert acc > max(2 * chance, rnd + 0.2), (acc, rnd, chance)


def test_a_corrupt_frame_is_reported_and_counted_not_fatal(trained, tmp_path):
    import shutil

    root, _, _ = trained
    corpus = tmp_path / "corpus"
    shutil.copytree(root / "corpus", corpus)
    first = json.loads((corpus / "frames.jsonl").read_text().splitlines()[0])
    (corpus / first["image"]).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    messages = []
    cfg = PretrainConfig(steps=3, batch_size=24, save_every=100, progress=False)
    r = pretrain(corpus, tmp_path / "enc", cfg, echo=messages.append)
    assert len(r.bad_frames) == 1 and first["image"] in r.bad_frames[0]
    saved = json.loads((tmp_path / "enc" / "pretrain.json").read_text())
    assert saved["frames"]["undecodable"] == 1
    events = [json.loads(x) for x in (tmp_path / "enc" / "metrics.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events if "event" in e] == ["bad_frame"]


def test_cli_builds_a_corpus_pretrains_and_refuses_to_overwrite(tmp_path):
    from typer.testing import CliRunner

    from llava_ultra.cli import app

    out = tmp_path / "enc"
    args = [
        "pretrain-encoders",
        "--out",
        str(out),
        "--synth-reports",
        "6",
        "--steps",
        "2",
        "--batch-size",
        "8",
    ]
    first = CliRunner().invoke(app, [*args, "--no-evaluate"])
    assert first.exit_code == 0, first.output
    assert (out / "clip" / "config.json").is_file() and (out / "sam" / "preprocessor_config.json").is_file()
    assert "model.vision.path=" in first.output
    again = CliRunner().invoke(app, [*args, "--no-evaluate"])
    assert again.exit_code == 2 and "pass --resume to continue it or --overwrite" in again.output
    redo = CliRunner().invoke(app, [*args, "--overwrite"])  # keeps the corpus in OUT, measures quality
    assert redo.exit_code == 0, redo.output
    assert "| zero-shot site accuracy (CLIP) |" in redo.output and (out / "corpus" / "frames.jsonl").is_file()
    bad = tmp_path / "frames.jsonl"
    bad.write_text('{"image": "missing.png"}\n')
    missing = CliRunner().invoke(
        app, ["pretrain-encoders", "--out", str(tmp_path / "x"), "--corpus", str(bad)]
    )
    assert missing.exit_code == 2 and "line 1: has neither 'caption' nor 'mask'" in missing.output


def _lesion_model(trained, **selector):
    from llava_ultra.config import load_config
    from llava_ultra.model.tokenizer import build_tiny_tokenizer
    from llava_ultra.model.ultra import build_model

    root, _, _ = trained
    overrides = encoder_overrides(root / "enc") + [f"model.selector.{k}={v}" for k, v in selector.items()]
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml", overrides)
    tok = build_tiny_tokenizer(["liver ultrasound findings"], vocab_size=300)
    return build_model(cfg.model, tok), root


def test_lesion_teacher_reads_the_pretrained_mask_decoder_and_is_never_saved(trained):
    from PIL import Image

    from llava_ultra.model.pretrain_heads import load_mask_decoder
    from llava_ultra.model.vision import sam_grid

    model, root = _lesion_model(trained, teacher="lesion")
    model.train()
    recs = [json.loads(line) for line in (root / "corpus" / "frames.jsonl").read_text().splitlines()][:5]
    images = [Image.open(root / "corpus" / r["image"]).convert("RGB") for r in recs]
    px = model.image_processor(images)
    findings = torch.ones(2, 4, dtype=torch.long)  # KD applies to samples that carry findings text
    _, selection, kd, _ = model._select(
        px["pixel_values_clip"], px["pixel_values_sam"], [3, 2], findings, None
    )
    # reference: the decoder saved by pretrain-encoders, applied by hand to SAM's grid
    decoder = load_mask_decoder(root / "enc")
    with torch.no_grad():
        mass = decoder(sam_grid(model.sam, px["pixel_values_sam"])).softmax(1)[:, 2:].sum((1, 2, 3))
    want = torch.full((2, 3), float("-inf"))
    want[0, :3], want[1, :2] = mass[:3], mass[3:]
    assert torch.allclose(selection.teacher, want, rtol=1e-5, atol=1e-4)
    assert kd is not None and torch.isfinite(kd) and kd.requires_grad  # it trains the scorer
    # frozen, out of the module tree: not a parameter, not in the checkpoint's state dict
    assert not any("lesion" in k or "decoder" in k for k in model.state_dict())
    assert all(not p.requires_grad for p in model._lesion_decoder.parameters())


def _no_sam(trained):
    from llava_ultra.config import load_config

    tiny = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
    load_config(tiny, ["model.selector.teacher=lesion", "model.sam.enabled=false"])


def test_lesion_teacher_needs_sam_and_a_decoder_and_says_how(trained):
    with pytest.raises(ConfigError, match="teacher='lesion' reads SAM"):
        _no_sam(trained)
    model, _ = _lesion_model(trained, teacher="lesion", teacher_decoder="/nonexistent")
    with pytest.raises(CheckpointError, match="/nonexistent holds no SAM mask decoder"):
        model._lesion_relevance(torch.zeros(2, 3, 128, 128), None)


def test_token_lesion_loss_marks_a_token_positive_when_any_pixel_of_its_block_is_a_lesion():
    from llava_ultra.model.pretrain_heads import token_lesion_loss

    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[0, 5, 6] = 2  # one lesion pixel: token (1, 1) of a 2x2 grid over 4x4 blocks
    perfect = torch.full((1, 2, 2), -20.0)
    perfect[0, 1, 1] = 20.0
    wrong = -perfect
    assert float(token_lesion_loss(perfect, target)) < 1e-6
    assert float(token_lesion_loss(wrong, target)) > 10
    # balanced: the lone positive token weighs as much as the three negatives together
    only_pos_wrong = torch.full((1, 2, 2), -20.0)
    only_neg_wrong = perfect.clone()
    only_neg_wrong[0, 0, 0] = 20.0
    assert float(token_lesion_loss(only_pos_wrong, target)) == pytest.approx(10.0, rel=1e-3)
    assert float(token_lesion_loss(only_neg_wrong, target)) == pytest.approx(20.0 / 3 / 2, rel=1e-3)
    # frames without a mask (-1) are ignored; a batch of them gives an exact, differentiable 0
    none = torch.full((1, 8, 8), -1, dtype=torch.long)
    logits = torch.zeros(1, 2, 2, requires_grad=True)
    loss = token_lesion_loss(logits, none)
    loss.backward()
    assert float(loss) == 0.0 and logits.grad is not None
    with pytest.raises(ValueError, match="whole multiple"):
        token_lesion_loss(torch.zeros(1, 3, 3), target)


def test_token_head_trains_saves_and_loads_with_the_decoder(tmp_path):
    from llava_ultra.model.pretrain_heads import load_mask_decoder

    build_synth_frames(tmp_path / "corpus", corpus_config(3, reports=24), val_frac=0.0)
    cfg = PretrainConfig(steps=40, batch_size=24, lr=3e-3, warmup_steps=3, save_every=40,
                         token_lesion_weight=1.0, progress=False)  # fmt: skip
    pretrain(tmp_path / "corpus", tmp_path / "enc", cfg, echo=lambda *a: None)
    meta = json.loads((tmp_path / "enc" / "sam_decoder.json").read_text())
    assert meta["token_head"] is True
    dec = load_mask_decoder(tmp_path / "enc")
    sam = build_sam(
        from_dict(SamConfig, {"path": str(tmp_path / "enc" / "sam"), "image_size": cfg.sam.image_size}, "sam")
    )
    grid = sam(pixel_values=torch.zeros(2, 3, cfg.sam.image_size, cfg.sam.image_size)).last_hidden_state
    side = cfg.sam.image_size // cfg.sam.inline["patch_size"]
    assert dec.token_logits(grid).shape == (2, side, side)
    with pytest.raises(ConfigError, match="token_lesion_weight"):
        PretrainConfig(token_lesion_weight=-1.0)


def test_a_decoder_without_token_head_loads_and_names_the_setting_when_asked_for_it(trained):
    from llava_ultra.model.pretrain_heads import load_mask_decoder

    root, cfg, _ = trained  # token_lesion_weight = 0 (the default)
    assert json.loads((root / "enc" / "sam_decoder.json").read_text())["token_head"] is False
    dec = load_mask_decoder(root / "enc")
    with pytest.raises(CheckpointError, match="token_lesion_weight"):
        dec.token_logits(torch.zeros(1, cfg.sam.inline["output_channels"], 4, 4))
