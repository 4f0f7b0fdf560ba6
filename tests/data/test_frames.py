"""Pretraining frame corpus: deterministic, disjoint from SynthUS datasets, labels match pixels."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from llava_ultra.data.frames import PRETRAIN_OFFSET, build_synth_frames, frame_caption, read_frames
from llava_ultra.data.synth import (
    LABEL_LESION,
    SynthConfig,
    finding_bbox,
    generate,
    label_map,
    plan_report,
    render_frame,
)
from llava_ultra.errors import DataError

CFG = SynthConfig(reports=14, seed=3, k_min=1, k_max=4, image_size=64)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("frames") / "corpus"
    build_synth_frames(out, CFG, val_frac=0.3)
    return out


def test_corpus_is_deterministic(corpus, tmp_path):
    again = tmp_path / "again"
    build_synth_frames(again, CFG, val_frac=0.3)
    assert (again / "frames.jsonl").read_bytes() == (corpus / "frames.jsonl").read_bytes()
    first = json.loads((corpus / "frames.jsonl").read_text().splitlines()[0])
    assert (again / first["image"]).read_bytes() == (corpus / first["image"]).read_bytes()
    assert (again / first["mask"]).read_bytes() == (corpus / first["mask"]).read_bytes()


def test_no_report_of_a_dataset_leaks_into_the_corpus(corpus, tmp_path):
    generate(tmp_path / "synthus", SynthConfig(reports=30, seed=3, k_min=1, k_max=4, image_size=64))
    dataset_ids = {
        json.loads(line)["id"]
        for f in (tmp_path / "synthus").glob("*.en.jsonl")
        for line in f.read_text().splitlines()
    }
    frames = read_frames(corpus)
    corpus_ids = {r.meta["report_id"] for r in frames.records}
    assert corpus_ids and dataset_ids and not corpus_ids & dataset_ids
    assert all(int(i[1:]) >= PRETRAIN_OFFSET for i in corpus_ids)
    # both splits exist and keep all frames of a report together
    split_of = {}
    for r in frames.records:
        assert split_of.setdefault(r.meta["report_id"], r.split) == r.split
    assert set(split_of.values()) == {"train", "val"}


def test_lesion_label_is_where_the_finding_is_drawn():
    checked = 0
    for i in range(40):
        plan = plan_report(CFG, PRETRAIN_OFFSET + i)
        for j in range(plan.k):
            labels = label_map(plan, j)
            lesion = labels == LABEL_LESION
            shown = plan.finding is not None and plan.finding.scale[j] > 0
            assert lesion.any() == shown
            if shown:
                x0, y0, x1, y1 = finding_bbox(plan, j)
                ys, xs = np.nonzero(lesion)
                assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1
                # the lesion is where the pixels change when the finding is drawn
                diff = render_frame(plan, j).astype(int) - render_frame(plan, j, with_finding=False).astype(
                    int
                )
                assert np.abs(diff)[lesion].mean() > np.abs(diff)[~lesion].mean()
                checked += 1
    assert checked > 5


def test_captions_say_what_the_frame_shows(corpus):
    frames = read_frames(corpus).records
    with_lesion = [r for r in frames if r.meta["finding_type"] != "none"]
    without = [r for r in frames if r.meta["finding_type"] == "none"]
    assert with_lesion and without
    for r in with_lesion:
        assert "no lesion" not in r.caption and r.meta["location"] and "cm" in r.caption
        assert np.asarray(Image.open(corpus / r.mask)).max() == LABEL_LESION
    for r in without:
        assert r.caption.endswith("no lesion in this frame.")
        assert np.asarray(Image.open(corpus / r.mask)).max() < LABEL_LESION
    plan = next(
        plan_report(CFG, PRETRAIN_OFFSET + i)
        for i in range(50)
        if plan_report(CFG, PRETRAIN_OFFSET + i).finding is not None
    )
    zh = frame_caption(plan.site, plan.finding, True, "zh")
    assert "超声" in zh and "cm" in zh and "未见" not in zh


def test_bad_lines_are_numbered_and_counted(corpus, tmp_path):
    lines = (corpus / "frames.jsonl").read_text().splitlines()
    broken = tmp_path / "frames.jsonl"
    for sub in ("images", "masks"):
        (tmp_path / sub).symlink_to(corpus / sub)
    bad = [
        "{not json",
        json.dumps({"image": "images/nowhere.png", "caption": "x"}),
        json.dumps({"image": json.loads(lines[0])["image"]}),
    ]
    broken.write_text("\n".join([*lines, *bad]) + "\n")
    with pytest.raises(DataError, match=r"3 of \d+ lines are unusable.*line \d+: not valid JSON"):
        read_frames(broken)
    ok = read_frames(broken, max_bad_fraction=0.5)
    assert len(ok.records) == len(lines) and len(ok.bad) == 3
    n = len(lines)
    assert ok.bad[1].startswith(f"line {n + 2}: image file 'images/nowhere.png' not found")
    assert ok.bad[2] == f"line {n + 3}: has neither 'caption' nor 'mask'; give at least one"
    with pytest.raises(DataError, match="not found; build a corpus"):
        read_frames(tmp_path / "missing")
