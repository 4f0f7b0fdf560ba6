"""SynthUS dataset files: `generate` writes frames, report JSONL per split/language and the config.

Reports are built in chunks (in worker processes when asked; spawn context) and written in index
order, so the output bytes depend only on the config, never on the worker count. PNGs use a low
zlib level: speckle barely compresses.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ...errors import ConfigError, DataError
from ...sites import FINDING_TYPES, SITES
from .plan import SynthConfig, plan_report
from .render import render_frame
from .text import report_texts
from .vocab import SPLITS, SYNTH_VERSION

_PNG_LEVEL = 1  # zlib level: speckle barely compresses; higher levels buy ~4 % smaller files


@dataclass
class SynthSummary:
    """What `generate` wrote, with timing."""

    out: str
    reports: int
    frames: int
    valid_frames: int
    seconds: float
    workers: int
    per_split: dict[str, int] = field(default_factory=dict)
    per_site: dict[str, int] = field(default_factory=dict)
    per_finding: dict[str, int] = field(default_factory=dict)

    @property
    def reports_per_s(self) -> float:
        return self.reports / self.seconds if self.seconds > 0 else float("inf")

    def render(self) -> str:
        def fmt(d: dict[str, int]) -> str:
            return ", ".join(f"{k} {v}" for k, v in d.items())

        return "\n".join(
            [
                f"SynthUS written to {self.out}",
                f"  reports  {self.reports} (zh + en records each), frames {self.frames} "
                f"({self.valid_frames} valid, {self.frames / self.reports:.2f} per report)",
                f"  splits   {fmt(self.per_split)}",
                f"  sites    {fmt(self.per_site)}",
                f"  findings {fmt(self.per_finding)}",
                f"  time     {self.seconds:.2f} s on {self.workers} worker(s): "
                f"{self.reports_per_s:.1f} reports/s, {self.frames / max(self.seconds, 1e-9):.1f} frames/s",
            ]
        )


def write_png(path: Path, img: np.ndarray) -> None:
    """Write a uint8 grayscale frame as PNG (deterministic bytes)."""
    Image.fromarray(img).save(path, format="PNG", compress_level=_PNG_LEVEL)


def _build_chunk(args: tuple[SynthConfig, str, int, int]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    cfg, out, start, stop = args
    images = Path(out) / "images"
    rows = []
    for i in range(start, stop):
        plan = plan_report(cfg, i)
        for j in range(plan.k):
            write_png(images / f"{plan.report_id}_{j}.png", render_frame(plan, j))
        zh, en = report_texts(plan)
        rows.append((asdict(zh), asdict(en)))
    return rows


_OWN_FILE = re.compile(r"^r\d{6,}_\d+\.png$")


def _prepare_out(out: Path) -> None:
    """Create `out`; refuse a non-empty folder that is not a SynthUS dataset, and clear the frames
    of a previous SynthUS run so that no stale file survives."""
    if out.exists() and not out.is_dir():
        raise DataError(f"output path {out} is a file; pass a folder (it will be created if missing)")
    if out.is_dir() and any(out.iterdir()) and not (out / "synth_config.json").exists():
        raise DataError(
            f"output folder {out} is not empty and holds no SynthUS dataset (no synth_config.json); "
            "choose an empty or new folder"
        )
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    for p in images.iterdir():
        if _OWN_FILE.match(p.name):
            p.unlink()


def generate(out: Path, cfg: SynthConfig, workers: int = 1) -> SynthSummary:
    """Write SynthUS to `out` (images/, {train,val,test}.{zh,en}.jsonl, synth_config.json).

    Output bytes depend only on `cfg`, never on `workers`.
    """
    if workers < 1:
        raise ConfigError(f"workers={workers}: use at least 1 worker process")
    out = Path(out)
    t0 = time.perf_counter()
    _prepare_out(out)
    n = cfg.reports
    chunk = max(1, min(64, n // (workers * 4) or 1))
    tasks = [(cfg, str(out), a, min(n, a + chunk)) for a in range(0, n, chunk)]
    if workers == 1:
        results = [_build_chunk(t) for t in tasks]
    else:
        with mp.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
            results = pool.map(_build_chunk, tasks, chunksize=1)

    lines: dict[tuple[str, str], list[str]] = {(s, lang): [] for s in SPLITS for lang in ("zh", "en")}
    per_site: Counter[str] = Counter()
    per_finding: Counter[str] = Counter()
    per_split: Counter[str] = Counter()
    frames = valid_frames = 0
    for rows in results:
        for zh, en in rows:
            split = zh["meta"]["split"]
            lines[(split, "zh")].append(json.dumps(zh, ensure_ascii=False))
            lines[(split, "en")].append(json.dumps(en, ensure_ascii=False))
            per_split[split] += 1
            per_site[zh["site"]] += 1
            per_finding[zh["meta"]["finding_type"]] += 1
            frames += len(zh["images"])
            valid_frames += sum(zh["valid"])
    for (split, lang), rows_ in lines.items():
        text = "".join(line + "\n" for line in rows_)
        (out / f"{split}.{lang}.jsonl").write_text(text, encoding="utf-8")
    config = {**asdict(cfg), "sites": list(cfg.sites), "synth_version": SYNTH_VERSION}
    (out / "synth_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return SynthSummary(
        out=str(out),
        reports=n,
        frames=frames,
        valid_frames=valid_frames,
        seconds=time.perf_counter() - t0,
        workers=workers,
        per_split={s: per_split[s] for s in SPLITS},
        per_site={s: per_site[s] for s in SITES if s in cfg.sites},
        per_finding={t: per_finding[t] for t in FINDING_TYPES},
    )
