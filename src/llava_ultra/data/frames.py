"""Per-frame corpora for encoder pretraining: one frame, its caption and/or its label mask per line.

Two sources, one format (`frames.jsonl`, paths relative to the file's folder):

    {"image": "images/f000001.png", "caption": "thyroid ultrasound. ...", "mask": "masks/f000001.png",
     "split": "train", "site": "thyroid", "valid": true, ...}

- `caption` (optional) trains the CLIP vision tower contrastively; `mask` (optional) is a PNG of
  integer labels (0 background, 1 organ, 2 lesion for SynthUS; any labels 0..L-1 for your own data)
  and trains the SAM image encoder. A line needs at least one of them.
- `build_synth_frames` makes the corpus from SynthUS: every frame of freshly planned reports whose
  indices start at `PRETRAIN_OFFSET` (10,000,000), so no report of an instruction-tuning or
  evaluation dataset (indices 0 .. reports-1, far below) can appear in it. The caption says what
  the frame shows (a frame outside the finding's run says "no lesion in this frame"), from the
  same vocabulary as the reports; the mask comes from `synth.label_map`.
- `read_frames` reads either kind, reports each bad line (missing file, no caption and no mask)
  with its line number, and refuses only when more than `max_bad_fraction` of lines are bad.

Notable choices: splits are by report (all frames of one report in one split: frames of a sweep
are near-duplicates, a frame split would leak), with the same golden-ratio rule as SynthUS; the
English caption is the default training text (the tiny text tower's BPE is built on it), the
Chinese one is kept beside it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..sites import FINDING_TYPES, SITES
from .synth import LABEL_NAMES, LOCATIONS, SynthConfig, label_map, plan_report, render_frame, write_png

PRETRAIN_OFFSET = 10_000_000
"""Report indices of the pretraining corpus start here; SynthUS datasets use 0 .. reports-1."""
FRAMES_FILE = "frames.jsonl"


@dataclass(frozen=True)
class FrameRecord:
    """One pretraining frame."""

    image: str
    caption: str | None = None
    mask: str | None = None
    split: str = "train"
    site: str | None = None
    valid: bool | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def frame_caption(site: str, finding: Any, in_frame: bool, language: str = "en") -> str:
    """What one frame shows, in words: site, then the finding (type, location, size) or its absence."""
    site_zh, site_en = SITES[site]
    if finding is None or not in_frame:
        return (
            f"{site_zh}超声，本帧未见病灶。"
            if language == "zh"
            else f"{site_en} ultrasound. no lesion in this frame."
        )
    loc_zh, loc_en = LOCATIONS[site][finding.location]
    type_zh, type_en = FINDING_TYPES[finding.type]
    w, h = finding.size_cm
    if language == "zh":
        return f"{site_zh}超声，{loc_zh}见{type_zh}，大小约{w:.1f}x{h:.1f}cm。"
    return f"{site_en} ultrasound. {type_en} in the {loc_en}, {w:.1f} x {h:.1f} cm."


def _split(index: int, val_frac: float) -> str:
    u = ((index + 1) * 0.6180339887498949) % 1.0
    return "val" if u < val_frac else "train"


@dataclass
class FramesSummary:
    out: str
    reports: int
    frames: int
    per_split: dict[str, int]
    lesion_frames: int
    seconds: float

    def render(self) -> str:
        return (
            f"pretraining frames written to {self.out}: {self.frames} frames from {self.reports} reports "
            f"(report indices from {PRETRAIN_OFFSET:,}, disjoint from SynthUS datasets); "
            f"{', '.join(f'{k} {v}' for k, v in self.per_split.items())}; "
            f"{self.lesion_frames} frames show a lesion; {self.seconds:.1f} s"
        )


def build_synth_frames(out: Path, cfg: SynthConfig, val_frac: float = 0.1) -> FramesSummary:
    """Write a SynthUS frame corpus (images/, masks/, frames.jsonl, frames_config.json) to `out`.

    `cfg.reports` reports are planned with `cfg` (seed, sizes, hard) at indices PRETRAIN_OFFSET + i;
    the bytes depend only on `cfg` and `val_frac`."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "frames_config.json").is_file():
        raise DataError(f"{out} is not empty and holds no frame corpus; choose an empty or new folder")
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    lines, per_split, lesion = [], {"train": 0, "val": 0}, 0
    for i in range(cfg.reports):
        plan = plan_report(cfg, PRETRAIN_OFFSET + i)
        split = _split(i, val_frac)
        f = plan.finding
        for j in range(plan.k):
            name = f"{plan.report_id}_{j}.png"
            write_png(out / "images" / name, render_frame(plan, j))
            labels = label_map(plan, j)
            write_png(out / "masks" / name, labels)
            shows = f is not None and f.scale[j] > 0
            lesion += int(shows)
            record = FrameRecord(
                image=f"images/{name}",
                caption=frame_caption(plan.site, f, shows, "en"),
                mask=f"masks/{name}",
                split=split,
                site=plan.site,
                valid=bool(plan.valid[j]),
                meta={
                    "report_id": plan.report_id,
                    "report_finding": f.type if f else "none",
                    "frame": j,
                    "caption_zh": frame_caption(plan.site, f, shows, "zh"),
                    "finding_type": f.type if shows else "none",
                    "location": f.location if shows else None,
                    "size_cm": list(f.size_cm) if shows else None,
                    "lesion_px": int((labels == 2).sum()),
                },
            )
            lines.append(json.dumps(asdict(record), ensure_ascii=False))
            per_split[split] += 1
    (out / FRAMES_FILE).write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    config = {
        "synth": {**asdict(cfg), "sites": list(cfg.sites)},
        "offset": PRETRAIN_OFFSET,
        "val_frac": val_frac,
        "labels": list(LABEL_NAMES),
    }
    (out / "frames_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return FramesSummary(str(out), cfg.reports, len(lines), per_split, lesion, time.perf_counter() - t0)


@dataclass
class FrameCorpus:
    """Records read from a frames.jsonl, with the lines that could not be used."""

    root: Path
    records: list[FrameRecord]
    bad: list[str]
    labels: list[str] | None = None

    def split(self, name: str) -> list[FrameRecord]:
        return [r for r in self.records if r.split == name]


def read_frames(path: Path, max_bad_fraction: float = 0.01) -> FrameCorpus:
    """Read a frames.jsonl (or a folder holding one). Bad lines are listed with their line number;
    more than `max_bad_fraction` bad lines raise, naming the first few."""
    path = Path(path)
    if path.is_dir():
        path = path / FRAMES_FILE
    if not path.is_file():
        raise DataError(
            f"{path} not found; build a corpus with `llava-ultra pretrain-encoders --synth-reports N` "
            "or write one line per frame as in docs/data.md"
        )
    root = path.parent
    records, bad = [], []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 ({exc}); save it as UTF-8") from exc
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            bad.append(f"line {n}: not valid JSON ({str(exc)[:80]})")
            continue
        if not isinstance(row, dict) or not isinstance(row.get("image"), str):
            bad.append(f"line {n}: needs an object with an 'image' path")
            continue
        if not row.get("caption") and not row.get("mask"):
            bad.append(f"line {n}: has neither 'caption' nor 'mask'; give at least one")
            continue
        missing = [k for k in ("image", "mask") if row.get(k) and not (root / row[k]).is_file()]
        if missing:
            bad.append(
                f"line {n}: {', '.join(f'{k} file {row[k]!r}' for k in missing)} not found under {root}"
            )
            continue
        known = {f: row.get(f) for f in ("image", "caption", "mask", "split", "site", "valid", "meta")}
        known = {k: v for k, v in known.items() if v is not None}
        records.append(FrameRecord(**known))
    total = len(records) + len(bad)
    if total == 0:
        raise DataError(f"{path} holds no frames")
    if len(bad) > max_bad_fraction * total:
        raise DataError(
            f"{path}: {len(bad)} of {total} lines are unusable (above max_bad_fraction={max_bad_fraction}): "
            + "; ".join(bad[:3])
        )
    labels = None
    cfg_path = root / "frames_config.json"
    if cfg_path.is_file():
        labels = json.loads(cfg_path.read_text(encoding="utf-8")).get("labels")
    return FrameCorpus(root, records, bad, labels)


def corpus_reports(corpus: FrameCorpus) -> set[str]:
    """Report ids a corpus was built from (SynthUS corpora record them in meta)."""
    return {r.meta["report_id"] for r in corpus.records if "report_id" in r.meta}
