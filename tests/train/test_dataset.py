"""Training data: up-front checks, corrupt images, collate padding, sampler (encoding: tests/model/test_processor.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llava_ultra.errors import DataError
from llava_ultra.model.processor import IGNORE_INDEX
from llava_ultra.train.dataset import (
    BadSample,
    Collator,
    InstructDataset,
    PixelSource,
    ShardedBatchSampler,
    prepare_samples,
)
from tests.helpers import instruct_sample as sample
from tests.helpers import tiny_images, tiny_model_config, tiny_tokenizer


@pytest.fixture
def images_dir(tmp_path: Path) -> Path:
    for i, im in enumerate(tiny_images(3, size=24)):
        im.save(tmp_path / f"img{i}.png")
    return tmp_path


def test_prepare_reports_missing_images_and_overlong_samples(images_dir: Path):
    tok, cfg = tiny_tokenizer(), tiny_model_config()
    good = [sample(2, sid=f"ok{i}") for i in range(8)]
    long = sample(1, answer="很长的回答。" * 200, sid="too-long")
    missing = sample(2, sid="no-image")
    missing["images"][1] = "nope.png"
    kwargs = {"template": "vicuna_v1", "image_root": images_dir, "max_length": 256}
    prepared = prepare_samples([*good, long, missing], tok, cfg, max_bad_fraction=0.25, **kwargs)
    assert len(prepared.samples) == 8
    assert {(b.id, b.kind) for b in prepared.bad} == {("too-long", "too_long"), ("no-image", "missing_image")}
    assert "exceeds data.max_length=256" in next(b.reason for b in prepared.bad if b.id == "too-long")
    assert "nope.png" in next(b.reason for b in prepared.bad if b.id == "no-image")
    with pytest.raises(DataError, match=r"2 of 10 samples are bad .* data.max_bad_fraction=0.1"):
        prepare_samples([*good, long, missing], tok, cfg, max_bad_fraction=0.1, **kwargs)


def test_no_image_found_points_at_image_root(tmp_path: Path):
    with pytest.raises(DataError, match="set data.image_root"):
        prepare_samples(
            [sample(2)],
            tiny_tokenizer(),
            tiny_model_config(),
            template="vicuna_v1",
            image_root=tmp_path,
            max_length=512,
            max_bad_fraction=1.0,
        )


def test_corrupt_image_becomes_a_bad_sample_and_batches_pad_right(images_dir: Path):
    tok, cfg = tiny_tokenizer(), tiny_model_config()
    (images_dir / "img2.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    corrupt = sample(3, sid="corrupt")
    samples = [sample(2, sid="a"), sample(1, answer="短", sid="b"), corrupt]
    prepared = prepare_samples(
        samples, tok, cfg, template="vicuna_v1", image_root=images_dir, max_length=512, max_bad_fraction=1.0
    )
    from llava_ultra.model.vision import ImageProcessor

    ds = InstructDataset(prepared, images_dir, PixelSource(ImageProcessor(cfg.vision, cfg.sam)))
    items = [ds[i] for i in range(3)]
    assert isinstance(items[2], BadSample) and "img2.png" in items[2].reason
    batch = Collator(pad_id=0)(items)
    assert [b.id for b in batch["bad"]] == ["corrupt"] and batch["samples"] == 2
    inputs = batch["inputs"]
    assert inputs["image_counts"].tolist() == [2, 1]
    assert inputs["pixel_values_clip"].shape == (3, 3, 32, 32) and inputs["pixel_values_sam"].shape[0] == 3
    lengths = inputs["attention_mask"].sum(1)
    short = int(lengths.argmin())
    assert (inputs["attention_mask"][short, lengths[short] :] == 0).all()  # right padding
    assert (inputs["labels"][short, lengths[short] :] == IGNORE_INDEX).all()
    assert (inputs["input_ids"][short, lengths[short] :] == 0).all()


def test_sampler_is_deterministic_sharded_and_keeps_whole_accumulation_groups():
    sampler = ShardedBatchSampler(23, 3, seed=5, multiple_of=3)
    assert len(sampler) == 6  # ceil(23 / 3) = 8 batches, cut to a multiple of 3
    batches = list(sampler)
    assert len(batches) == 6 and all(len(b) == 3 for b in batches)
    assert batches == list(ShardedBatchSampler(23, 3, seed=5, multiple_of=3))
    sampler.set_epoch(1)
    assert list(sampler) != batches
    ranks = [ShardedBatchSampler(23, 4, seed=5, rank=r, world=2) for r in (0, 1)]
    shards = [[i for b in s for i in b] for s in ranks]
    assert len(ranks[0]) == len(ranks[1]) == 3
    assert len(shards[0]) == len(shards[1]) == 11 and not set(shards[0]) & set(shards[1])


def test_resumed_epoch_skips_exactly_the_seen_batches():
    sampler = ShardedBatchSampler(20, 2, seed=1)
    sampler.set_epoch(3)
    whole = list(sampler)
    sampler.set_epoch(3, start=4)
    assert list(sampler) == whole[4:]
