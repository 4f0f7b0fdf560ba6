"""SynthUS configuration and report plans: every random choice of a report, made up front.

A `ReportPlan` is a pure function of (config, report index), drawn from
`numpy.random.default_rng([seed, index])` in a fixed order; rendering and text never draw again,
so the plan alone decides the bytes of a report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...errors import ConfigError
from ...sites import SITES
from .anatomy import ANATOMY_PARAMS, REGIONS
from .vocab import (
    ALLOWED,
    DEPTH,
    FINDING_MIX,
    FINDING_TEXT,
    HISTORY,
    HISTORY_COMMON,
    MIN_FINDING_PX,
    NORMAL,
    PROBES,
)


@dataclass(frozen=True)
class SynthConfig:
    """What to generate."""

    reports: int = 1000
    """Number of reports (each gives one zh and one en record sharing its frames)."""
    seed: int = 0
    """Non-negative random seed; the same config gives byte-identical files."""
    k_min: int = 1
    """Fewest frames per report (k is uniform in [k_min, k_max])."""
    k_max: int = 8
    """Most frames per report."""
    image_size: int = 224
    """Width and height of every frame in pixels."""
    hard: bool = False
    """Lower contrast, smaller findings and fewer valid frames per report."""
    train_frac: float = 0.8
    """Fraction of reports in the train split."""
    val_frac: float = 0.1
    """Fraction in val; test gets the rest."""
    contrast: float = 1.0
    """Scales the contrast of every finding (hard mode multiplies it by 0.5)."""
    sites: tuple[str, ...] = tuple(SITES)
    """Examination sites to draw from (keys of `llava_ultra.sites.SITES`)."""

    def __post_init__(self) -> None:
        if self.reports < 1:
            raise ConfigError(f"reports={self.reports}: generate at least 1 report")
        if self.seed < 0:
            raise ConfigError(f"seed={self.seed}: use a non-negative integer seed")
        if self.k_min < 1:
            raise ConfigError(f"k_min={self.k_min}: every report needs at least 1 frame; set k_min >= 1")
        if self.k_max < self.k_min:
            raise ConfigError(f"k_max={self.k_max} is below k_min={self.k_min}; set k_max >= k_min")
        if self.k_max > 64:
            raise ConfigError(f"k_max={self.k_max}: at most 64 frames per report are supported")
        if not 32 <= self.image_size <= 2048:
            raise ConfigError(f"image_size={self.image_size}: use a size between 32 and 2048 pixels")
        if not (
            0 <= self.train_frac <= 1 and 0 <= self.val_frac <= 1 and self.train_frac + self.val_frac <= 1
        ):
            raise ConfigError(
                f"train_frac={self.train_frac}, val_frac={self.val_frac}: each must be in [0, 1] and "
                "their sum at most 1 (test gets the rest)"
            )
        if not 0.05 <= self.contrast <= 2.0:
            raise ConfigError(f"contrast={self.contrast}: use a value between 0.05 and 2.0 (1.0 = default)")
        if not self.sites:
            raise ConfigError("sites is empty; list at least one of: " + ", ".join(SITES))
        unknown = [s for s in self.sites if s not in SITES]
        if unknown:
            raise ConfigError(f"unknown site(s) {unknown}; use keys from: {', '.join(SITES)}")


@dataclass(frozen=True)
class Finding:
    """A finding fixed in anatomy coordinates (units of image width; y is depth).

    `rx`, `ry` are the half-sizes drawn in the key frame; `scale[j]` multiplies them in frame j and
    is 0 where the finding is out of the scan plane. `lobes` perturbs a nodule's outline.
    """

    type: str
    location: str
    size_cm: tuple[float, float]
    cx: float
    cy: float
    rx: float
    ry: float
    contrast: float
    scale: tuple[float, ...]
    key_frame: int
    lobes: tuple[tuple[float, float, float], ...] = ()


@dataclass(frozen=True)
class ReportPlan:
    """Everything needed to write one report: a pure function of (config, index)."""

    index: int
    report_id: str
    site: str
    split: str
    image_size: int
    seed: int
    k: int
    valid: tuple[bool, ...]
    z: tuple[float, ...]
    shifts: tuple[tuple[float, float], ...]
    speckle: tuple[tuple[int, int, int, int, int], ...]  # per frame: moving (x, y), fresh (x, y), flip
    anat: dict[str, float]
    finding: Finding | None
    history: tuple[str, str]
    normal: tuple[str, str]
    sentence: tuple[str, str] | None
    hard: bool

    @property
    def px_per_cm(self) -> float:
        return DEPTH * self.image_size / PROBES[self.site].fov_cm


def report_id(index: int) -> str:
    """Index-based id so that subsets agree across runs: 12 -> 'r000012'."""
    return f"r{index:06d}"


def split_of(index: int, cfg: SynthConfig) -> str:
    """Split of report `index`: a golden-ratio sequence, stable per index and evenly spread."""
    offset = (cfg.seed * 0.7548776662466927) % 1.0
    u = ((index + 1) * 0.6180339887498949 + offset) % 1.0
    if u < cfg.train_frac:
        return "train"
    return "val" if u < cfg.train_frac + cfg.val_frac else "test"


def _pick(rng: np.random.Generator, options: dict[str, float]) -> str:
    keys = sorted(options)
    p = np.array([options[k] for k in keys], dtype=float)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def plan_report(cfg: SynthConfig, index: int) -> ReportPlan:
    """Draw every random choice of report `index` from `default_rng([seed, index])`."""
    rng = np.random.default_rng([cfg.seed, index])
    site = cfg.sites[int(rng.integers(len(cfg.sites)))]
    histories = HISTORY_COMMON + HISTORY[site]
    history = histories[int(rng.integers(len(histories)))]
    normal = NORMAL[site][int(rng.integers(len(NORMAL[site])))]
    anat = ANATOMY_PARAMS[site](rng)
    k = int(rng.integers(cfg.k_min, cfg.k_max + 1))
    ftype = _pick(rng, FINDING_MIX[site])
    size = cfg.image_size

    valid = [True] * k
    run_start, run_len = 0, k
    finding_args: dict[str, Any] | None = None
    if ftype != "none":
        loc_keys = ALLOWED[site][ftype]
        location = loc_keys[int(rng.integers(len(loc_keys)))]
        top = max(1, math.ceil(0.4 * k))
        run_len = int(rng.integers(1, top + 1)) if cfg.hard else int(rng.integers(top, k + 1))
        run_start = int(rng.integers(0, k - run_len + 1))
        valid = [run_start <= j < run_start + run_len for j in range(k)]
        finding_args = {"type": ftype, "location": location}

    # sweep positions: thyroid findings dictate where the sweep is (pole <-> z); others random
    key = run_start + (run_len - 1) // 2
    dz = 0.09
    if finding_args is not None and site == "thyroid":
        part = finding_args["location"].rsplit("_", 1)[1]
        lo, hi = {"upper": (0.08, 0.28), "middle": (0.42, 0.58), "lower": (0.72, 0.92)}[part]
        z_key = float(rng.uniform(lo, hi))
    else:
        z_key = float(rng.uniform(0.2, 0.8))
    z = tuple(z_key + (j - key) * dz for j in range(k))
    t = np.linspace(-1.0, 1.0, k) if k > 1 else np.zeros(1)
    vx, vy, wob, ph = (
        rng.uniform(-0.035, 0.035),
        rng.uniform(-0.015, 0.015),
        rng.uniform(0, 0.01),
        rng.uniform(0, 6.3),
    )
    shifts = tuple((float(vx * tj + wob * math.sin(math.pi * tj + ph)), float(vy * tj)) for tj in t.tolist())
    ox, oy = (int(v) for v in rng.integers(size // 8, 7 * size // 8, size=2))
    fresh = rng.integers(0, size, size=(k, 2))
    flips = rng.integers(0, 4, size=k)
    speckle = tuple(
        (
            ox + round(shifts[j][0] * size),
            oy + round(shifts[j][1] * size),
            int(fresh[j, 0]),
            int(fresh[j, 1]),
            int(flips[j]),
        )
        for j in range(k)
    )

    finding = None
    sentence = None
    if finding_args is not None:
        finding = _plan_finding(rng, cfg, site, anat, z[key], finding_args, valid, key)
        templates = FINDING_TEXT[finding.type]
        sentence = templates[int(rng.integers(len(templates)))]
    return ReportPlan(
        index=index,
        report_id=report_id(index),
        site=site,
        split=split_of(index, cfg),
        image_size=size,
        seed=cfg.seed,
        k=k,
        valid=tuple(valid),
        z=z,
        shifts=shifts,
        speckle=speckle,
        anat=anat,
        finding=finding,
        history=history,
        normal=normal,
        sentence=sentence,
        hard=cfg.hard,
    )


def _plan_finding(
    rng: np.random.Generator,
    cfg: SynthConfig,
    site: str,
    anat: dict[str, float],
    z_key: float,
    args: dict[str, Any],
    valid: list[bool],
    key: int,
) -> Finding:
    ftype, location = args["type"], args["location"]
    (x0, x1, y0, y1), max_frac = REGIONS[site](anat, z_key, ftype, location)
    cx, cy = float(rng.uniform(x0, x1)), float(rng.uniform(y0, y1))
    # width as a fraction of the image width; a good share is small (2-5 %)
    small = rng.random() < (0.7 if cfg.hard else 0.45)
    if ftype == "calcification":
        frac = rng.uniform(0.012, 0.035)
    elif ftype == "stone":
        frac = rng.uniform(0.03, 0.09)
    else:
        frac = rng.uniform(0.02, 0.05) if small else rng.uniform(0.05, 0.16)
    if cfg.hard:
        frac *= 0.75
    frac = min(frac, max_frac)
    aspect = rng.uniform(0.5, 0.8) if ftype == "stone" else rng.uniform(0.6, 1.0)
    if ftype == "cyst":
        aspect = rng.uniform(0.75, 1.0)
    fov = PROBES[site].fov_cm
    px_per_cm = DEPTH * cfg.image_size / fov
    min_cm = math.ceil(MIN_FINDING_PX / px_per_cm * 10 - 1e-9) / 10
    w_cm = max(round(frac * fov, 1), min_cm, 0.1)
    h_cm = max(round(frac * aspect * fov, 1), min_cm, 0.1)
    rx = w_cm * px_per_cm / (2 * cfg.image_size)
    ry = h_cm * px_per_cm / (2 * cfg.image_size)
    contrast = float(rng.uniform(0.7, 1.0)) * cfg.contrast * (0.5 if cfg.hard else 1.0)
    lobes: tuple[tuple[float, float, float], ...] = ()
    if ftype == "nodule":
        lobes = tuple(
            (float(rng.uniform(0.05, 0.14)), float(f), float(rng.uniform(0, 2 * math.pi))) for f in (3, 5)
        )
    # cross-section through a blob: full size in the key frame, smaller towards the run's ends,
    # but never below ~1.25 px radius so every valid frame really shows it
    run = [j for j, v in enumerate(valid) if v]
    half = max(1.0, len(run) / 2)
    floor = min(1.0, 0.5 * MIN_FINDING_PX / (min(rx, ry) * cfg.image_size))
    scale = tuple(
        (max(0.55, floor, 1.0 - 0.45 * ((j - key) / half) ** 2) if v else 0.0) for j, v in enumerate(valid)
    )
    return Finding(
        type=ftype,
        location=location,
        size_cm=(w_cm, h_cm),
        cx=cx,
        cy=cy,
        rx=rx,
        ry=ry,
        contrast=contrast,
        scale=scale,
        key_frame=key,
        lobes=lobes,
    )
