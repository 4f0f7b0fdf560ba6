"""SynthUS: determinism, coverage, validity labels vs pixels, splits, text vs meta, config errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from llava_ultra.cli import app
from llava_ultra.data.synth import (
    LOCATIONS,
    SynthConfig,
    finding_bbox,
    generate,
    plan_report,
    render_frame,
    report_texts,
)
from llava_ultra.errors import ConfigError, DataError
from llava_ultra.sites import FINDING_TYPES, SITES

N = 120
CFG = SynthConfig(reports=N, seed=7, k_min=1, k_max=4, image_size=64)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthus")
    generate(out, CFG)
    return out


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _records(root: Path, lang: str) -> list[dict]:
    return [r for split in ("train", "val", "test") for r in _read(root / f"{split}.{lang}.jsonl")]


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# Content hash (decoded pixels, report JSONL, config) of a small easy + hard dataset, recorded
# before synth.py became a package. Any change to what a seed generates changes it: bump
# SYNTH_VERSION and record the new hash only when the change is intended. Pixels rather than PNG
# bytes, so a different zlib build cannot fail it.
GOLDEN_SHA256 = "98c54fb1e9b1b11fa5aeedf9f9282e1d3e65e31748a879c9686dc3fdbf852e97"


def test_generated_content_matches_the_golden_hash(tmp_path: Path) -> None:
    digest = hashlib.sha256()
    for hard in (False, True):
        out = tmp_path / str(hard)
        generate(out, SynthConfig(reports=12, seed=7, k_min=1, k_max=4, image_size=64, hard=hard))
        for p in sorted(out.rglob("*")):
            if p.is_file():
                digest.update(p.relative_to(out).as_posix().encode())
                digest.update(np.asarray(Image.open(p)).tobytes() if p.suffix == ".png" else p.read_bytes())
    assert digest.hexdigest() == GOLDEN_SHA256


def test_same_seed_gives_identical_bytes_for_any_worker_count(tmp_path: Path) -> None:
    cfg = SynthConfig(reports=16, seed=3, k_max=3, image_size=48)
    generate(tmp_path / "a", cfg, workers=1)
    generate(tmp_path / "b", cfg, workers=2)
    generate(tmp_path / "c", SynthConfig(reports=16, seed=4, k_max=3, image_size=48))
    a, b, c = (_tree_bytes(tmp_path / x) for x in "abc")
    assert a == b
    assert any(name.endswith(".png") for name in a)
    assert (tmp_path / "a" / "train.zh.jsonl").read_bytes() != (
        tmp_path / "c" / "train.zh.jsonl"
    ).read_bytes()
    shared = set(a) & set(c)
    assert any(a[k] != c[k] for k in shared if k.endswith(".png"))


def test_rerun_into_same_folder_leaves_no_stale_frames(tmp_path: Path) -> None:
    generate(tmp_path, SynthConfig(reports=6, image_size=32))
    generate(tmp_path, SynthConfig(reports=2, image_size=32))
    listed = {p for r in _records(tmp_path, "zh") for p in r["images"]}
    on_disk = {f"images/{p.name}" for p in (tmp_path / "images").iterdir()}
    assert listed == on_disk


def test_every_site_and_finding_type_appears(dataset: Path) -> None:
    records = _records(dataset, "zh")
    assert len(records) == N
    assert {r["site"] for r in records} == set(SITES)
    assert {r["meta"]["finding_type"] for r in records} == set(FINDING_TYPES)
    for r in records:
        assert CFG.k_min <= len(r["images"]) <= CFG.k_max
        assert all((dataset / p).is_file() for p in r["images"])


def test_validity_labels_agree_with_drawn_pixels(dataset: Path) -> None:
    checked_valid = checked_invalid = 0
    for i in range(N):
        plan = plan_report(CFG, i)
        for j in range(plan.k):
            img = render_frame(plan, j)
            on_disk = np.asarray(Image.open(dataset / "images" / f"{plan.report_id}_{j}.png"))
            assert np.array_equal(img, on_disk)
            diff = img != render_frame(plan, j, with_finding=False)
            box = finding_bbox(plan, j)
            if plan.finding is None:
                assert plan.valid[j] and not diff.any()
            elif not plan.valid[j]:
                assert box is None and not diff.any(), (plan.report_id, j)
                checked_invalid += 1
            else:
                x0, y0, x1, y1 = box
                assert diff[y0:y1, x0:x1].any(), (plan.report_id, j)
                assert not diff[:y0].any()  # effects are the lesion and what lies behind it
                checked_valid += 1
    assert checked_valid > 50 and checked_invalid > 10


def test_valid_frames_form_one_contiguous_run(dataset: Path) -> None:
    for r in _records(dataset, "en"):
        valid, meta = r["valid"], r["meta"]
        if meta["finding_type"] == "none":
            assert all(valid) and meta["bbox"] is None
            continue
        first, last = valid.index(True), len(valid) - 1 - valid[::-1].index(True)
        assert all(valid[first : last + 1]) and sum(valid) == last - first + 1
        assert [b is not None for b in meta["frame_bboxes"]] == valid
        assert valid[meta["key_frame"]] and meta["bbox"] == meta["frame_bboxes"][meta["key_frame"]]


def test_splits_are_disjoint_covering_and_stable(dataset: Path) -> None:
    ids = {s: [r["id"] for r in _read(dataset / f"{s}.zh.jsonl")] for s in ("train", "val", "test")}
    all_ids = [i for v in ids.values() for i in v]
    assert sorted(all_ids) == [f"r{i:06d}" for i in range(N)]
    assert len(set(all_ids)) == N
    assert 0.7 * N <= len(ids["train"]) <= 0.9 * N and ids["val"] and ids["test"]
    for s, members in ids.items():
        assert all(r["meta"]["split"] == s for r in _read(dataset / f"{s}.en.jsonl"))
        assert members == [r["id"] for r in _read(dataset / f"{s}.en.jsonl")]
    # a shorter run reproduces the same reports, splits included
    small = SynthConfig(reports=10, seed=CFG.seed, k_min=1, k_max=4, image_size=64)
    for i in range(10):
        assert report_texts(plan_report(small, i)) == report_texts(plan_report(CFG, i))


def test_zh_and_en_share_ids_images_validity_and_meta(dataset: Path) -> None:
    for split in ("train", "val", "test"):
        zh, en = _read(dataset / f"{split}.zh.jsonl"), _read(dataset / f"{split}.en.jsonl")
        assert len(zh) == len(en)
        for a, b in zip(zh, en, strict=True):
            assert (a["language"], b["language"]) == ("zh", "en")
            for key in ("id", "site", "images", "valid", "meta"):
                assert a[key] == b[key]
            assert a["findings"] != b["findings"]


def test_text_sizes_and_locations_match_meta(dataset: Path) -> None:
    for zh, en in zip(_records(dataset, "zh"), _records(dataset, "en"), strict=True):
        meta = zh["meta"]
        if meta["finding_type"] == "none":
            assert "未见明显异常" in zh["diagnosis"] and "No obvious abnormality" in en["diagnosis"]
            continue
        w, h = meta["size_cm"]
        assert f"{w:.1f}cm×{h:.1f}cm" in zh["findings"]
        assert f"{w:.1f} cm × {h:.1f} cm" in en["findings"]
        loc_zh, loc_en = LOCATIONS[zh["site"]][meta["location"]]
        assert loc_zh in zh["findings"] and loc_en in en["findings"]
        assert loc_zh in zh["diagnosis"] and loc_en in en["diagnosis"].lower()
        word = {"cyst": "囊", "nodule": "结节", "calcification": "钙化", "stone": "结石"}[
            meta["finding_type"]
        ]
        assert word in zh["diagnosis"]
        # the drawn width in the key frame is the stated size (unless cut by the image edge)
        x0, _, x1, _ = meta["bbox"]
        if x0 > 0 and x1 < CFG.image_size:
            assert abs((x1 - x0) - w * meta["px_per_cm"]) <= 2.0


def test_locations_correspond_to_where_findings_are_drawn() -> None:
    cfg = SynthConfig(reports=400, seed=1, image_size=128, sites=("thyroid", "kidney"))
    seen = set()
    for i in range(cfg.reports):
        plan = plan_report(cfg, i)
        f = plan.finding
        if f is None:
            continue
        x0, _, x1, _ = finding_bbox(plan, f.key_frame)
        x = (x0 + x1) / 2 / cfg.image_size
        if plan.site == "thyroid":  # transverse view: patient's right lobe on the image left
            assert (x < 0.5) == f.location.startswith("right")
            part = f.location.rsplit("_", 1)[1]  # sweep position z runs upper (0) -> lower (1) pole
            z = plan.z[f.key_frame]
            assert {"upper": z < 1 / 3, "middle": 1 / 3 <= z < 2 / 3, "lower": z >= 2 / 3}[part]
        else:  # longitudinal view: upper pole on the image left
            part = f.location.rsplit("_", 1)[1]
            centre = plan.anat["kx"] + plan.shifts[f.key_frame][0]
            assert {"upper": x < centre - 0.05, "middle": abs(x - centre) < 0.06, "lower": x > centre + 0.05}[
                part
            ]
        seen.add((plan.site, f.location.rsplit("_", 1)[1]))
    assert len(seen) == 6


def test_hard_mode_is_smaller_fainter_and_less_valid() -> None:
    def stats(hard: bool) -> tuple[float, float, float]:
        cfg = SynthConfig(reports=300, seed=2, k_min=4, hard=hard)
        fs = [(p.finding, p.valid) for p in (plan_report(cfg, i) for i in range(cfg.reports)) if p.finding]
        size = np.mean([f.rx for f, _ in fs])
        contrast = np.mean([f.contrast for f, _ in fs])
        valid = np.mean([np.mean(v) for _, v in fs])
        return float(size), float(contrast), float(valid)

    easy, hard = stats(False), stats(True)
    assert hard[0] < 0.9 * easy[0]
    assert hard[1] < 0.7 * easy[1]
    assert hard[2] < 0.7 * easy[2]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"reports": 0}, "at least 1 report"),
        ({"k_min": 0}, "k_min >= 1"),
        ({"k_min": 5, "k_max": 3}, "k_max >= k_min"),
        ({"image_size": 16}, "between 32 and 2048"),
        ({"seed": -1}, "non-negative"),
        ({"train_frac": 0.9, "val_frac": 0.2}, "sum at most 1"),
        ({"sites": ("thyroid", "lung")}, "unknown site"),
        ({"contrast": 0.0}, "contrast"),
    ],
)
def test_bad_config_raises_clear_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SynthConfig(**kwargs)


def test_bad_output_folder_and_workers(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a dataset")
    with pytest.raises(DataError, match="choose an empty or new folder"):
        generate(tmp_path, SynthConfig(reports=1, image_size=32))
    with pytest.raises(ConfigError, match="at least 1 worker"):
        generate(tmp_path / "new", SynthConfig(reports=1, image_size=32), workers=0)


def test_config_file_and_summary(dataset: Path) -> None:
    saved = json.loads((dataset / "synth_config.json").read_text())
    assert saved.pop("synth_version") == "1"
    assert SynthConfig(**{**saved, "sites": tuple(saved["sites"])}) == CFG


def test_cli_synth(tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["synth", "--out", str(tmp_path / "d"), "--reports", "5", "--image-size", "40"])
    assert ok.exit_code == 0, ok.output
    assert "reports  5" in ok.output and "reports/s" in ok.output
    bad = runner.invoke(app, ["synth", "--out", str(tmp_path / "e"), "--k-min", "3", "--k-max", "2"])
    assert bad.exit_code == 2
    assert "k_max >= k_min" in bad.output
