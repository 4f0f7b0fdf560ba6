"""SynthUS generation throughput on one worker, against PNG-writing baselines in the same run.

Generates N reports (default 500) at 224 px, then, with the same encoder settings, writes the same
number of blank PNGs and re-writes the generated frames themselves (decoded beforehand, untimed).
The second baseline is exactly the encoding and disk I/O share of generation, so the ratio to it
says how much of the time is synthesis. Prints JSON
and rewrites the "SynthUS generation" section of docs/performance.md (between its markers).

    .venv/bin/python benchmarks/synth_throughput.py --reports 500 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

from llava_ultra.data.synth import SynthConfig, generate, write_png

BEGIN, END = "<!-- synth:begin -->", "<!-- synth:end -->"
ROOT = Path(__file__).resolve().parents[1]


def _write_many(folder: Path, frames: list[np.ndarray]) -> float:
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    for i, img in enumerate(frames):
        write_png(folder / f"f{i}.png", img)
    return time.perf_counter() - t0


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _once(cfg: SynthConfig) -> tuple[int, float, float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        summary = generate(Path(tmp) / "synthus", cfg, workers=1)
        n = summary.frames
        blank = [np.zeros((cfg.image_size, cfg.image_size), np.uint8)] * n
        frames = [np.asarray(Image.open(p)) for p in sorted((Path(tmp) / "synthus" / "images").iterdir())]
        blank_s = _write_many(Path(tmp) / "blank", blank)
        same_s = _write_many(Path(tmp) / "same", frames)
    return n, summary.seconds, blank_s, same_s


def run(reports: int, image_size: int, seed: int, repeat: int = 1) -> dict:
    """Best of `repeat` runs for each timing (the CPU may be shared with other jobs)."""
    cfg = SynthConfig(reports=reports, seed=seed, image_size=image_size)
    runs = [_once(cfg) for _ in range(repeat)]
    n = runs[0][0]
    seconds, blank_s, same_s = (min(r[i] for r in runs) for i in (1, 2, 3))
    return {
        "reports": reports,
        "image_size": image_size,
        "frames": n,
        "workers": 1,
        "repeat": repeat,
        "seconds": round(seconds, 3),
        "reports_per_s": round(reports / seconds, 1),
        "reports_per_min": round(60 * reports / seconds),
        "frames_per_s": round(n / seconds, 1),
        "baseline_blank_png_s": round(blank_s, 3),
        "baseline_same_frames_png_s": round(same_s, 3),
        "ratio_vs_blank_png": round(seconds / blank_s, 2),
        "ratio_vs_same_frames_png": round(seconds / same_s, 2),
        "synthesis_share": round(1 - same_s / seconds, 3),
        "cpu": _cpu(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pillow": PIL.__version__,
    }


def section(r: dict) -> str:
    return "\n".join(
        [
            BEGIN,
            "## SynthUS generation",
            "",
            f"`python benchmarks/synth_throughput.py --reports {r['reports']} --image-size {r['image_size']} "
            f"--repeat {r['repeat']}` (best of {r['repeat']}; 1 worker; {r['cpu']}, shared with other jobs; Python {r['python']}, numpy {r['numpy']}, "
            f"Pillow {r['pillow']}).",
            "",
            "| measure | value |",
            "|---|---|",
            f"| reports | {r['reports']} ({r['frames']} frames of {r['image_size']} px) |",
            f"| wall time | {r['seconds']} s |",
            f"| reports/s | {r['reports_per_s']} ({r['reports_per_min']} per minute) |",
            f"| frames/s | {r['frames_per_s']} |",
            f"| baseline: same number of blank PNGs | {r['baseline_blank_png_s']} s |",
            f"| baseline: re-writing the same frames as PNG | {r['baseline_same_frames_png_s']} s |",
            f"| ratio to blank PNGs | {r['ratio_vs_blank_png']}x |",
            f"| ratio to re-writing the same frames | {r['ratio_vs_same_frames_png']}x |",
            f"| share of time spent on synthesis | {100 * r['synthesis_share']:.0f} % |",
            "",
            "Re-writing the generated frames is exactly the PNG encoding and disk I/O part of generation, "
            "so the rest (planning, painting anatomy and findings, speckle, text, JSONL) is synthesis. "
            "Output does not depend on the worker count, and `--workers N` spreads reports over N "
            "processes.",
            END,
        ]
    )


def write_doc(path: Path, text: str) -> None:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        head = "# Performance\n\nMeasured by the scripts in `benchmarks/`; each section is rewritten by its script.\n"
        path.write_text(head + "\n" + text + "\n", encoding="utf-8")
        return
    doc = path.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if pattern.search(doc):
        doc = pattern.sub(lambda _: text, doc)
    else:
        doc = doc.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(doc, encoding="utf-8")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reports", type=int, default=500)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1, help="report the best of this many runs")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "performance.md", help="'-' to skip")
    args = ap.parse_args(argv)
    result = run(args.reports, args.image_size, args.seed, args.repeat)
    print(json.dumps(result, indent=2))
    if str(args.doc) != "-":
        write_doc(args.doc, section(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
