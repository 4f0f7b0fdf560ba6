"""SynthUS: a synthetic multi-frame ultrasound report dataset, deterministic by seed.

It reproduces the two properties LLaVA-Ultra is about: findings that are small and subtle enough
to need fine-grained vision, and reports paired with k frames of a sweep (cine loop) of which only
a contiguous subset shows the finding. Everything is generated here, so tests, demos and
benchmarks never need hospital data.

Notable choices:
- One report = one `ReportPlan`, a pure function of `(seed, report index)` drawn from
  `numpy.random.default_rng([seed, index])`. Rendering a frame is a pure function of the plan (no
  RNG at all), so output bytes are identical for any worker count and a frame can be re-rendered
  without its finding (`render_frame(plan, j, with_finding=False)`) to check the validity labels.
- Geometry lives in "anatomy coordinates": x right and y down (depth), both in units of the image
  width. Frame j translates the anatomy by `shifts[j]` (probe drift) and moves the sweep position
  `z[j]` (thyroid: cranio-caudal position, so lobes shrink towards the poles; cardiac: phase of the
  heart beat; others: mild shape change). A finding is a fixed anatomy point with a drawn size
  scale per frame (largest in its key frame, 0 where it is out of the scan plane).
- Grey values are echogenicity maps painted with soft-edged shapes on small windows (no full-image
  work per shape), multiplied by speckle cropped from a per-process bank of anisotropically
  smoothed Rayleigh noise (part moves with the tissue, part decorrelates) and a low-frequency
  tissue texture, then by a depth-gain map that also masks the scan region, then log-compressed.
- Linear probe (thyroid, breast): rectangular region, shadows straight down. Curved/phased probe
  (liver, kidney, uterus, cardiac): fan with its apex above the image top, shadows along rays.
  Depth tick marks every cm (0.5 cm for small fields of view) on the right edge; the top-left
  banner area is left black (no text is drawn).
- Sizes are in cm with `px_per_cm = 0.9 * image_size / fov_cm`; a finding is never drawn narrower
  than 2.5 px (the size in cm is rounded up to keep text and pixels consistent at tiny sizes).
- Splits come from a golden-ratio sequence over the report index: stable per report across runs of
  different length and close to the requested fractions even for a few dozen reports.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import ConfigError, DataError
from ..sites import FINDING_TYPES, SITES
from .reports import Report

SYNTH_VERSION = "1"
SPLITS = ("train", "val", "test")
_TOP = 0.06  # scan region starts here (normalised depth); above it is the banner area
_DEPTH = 0.9  # scan depth as a fraction of the image height
_MIN_FINDING_PX = 2.5
_PNG_LEVEL = 1  # zlib level: speckle barely compresses; higher levels buy ~4 % smaller files


# ------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class SynthConfig:
    """What to generate.

    Attributes:
        reports: number of reports (each gives one zh and one en record sharing its frames).
        seed: non-negative random seed; the same config gives byte-identical files.
        k_min: fewest frames per report (k is uniform in [k_min, k_max]).
        k_max: most frames per report.
        image_size: width and height of every frame in pixels.
        hard: lower contrast, smaller findings and fewer valid frames per report.
        train_frac: fraction of reports in the train split.
        val_frac: fraction in val; test gets the rest.
        contrast: scales the contrast of every finding (hard mode multiplies it by 0.5).
        sites: examination sites to draw from (keys of `llava_ultra.sites.SITES`).
    """

    reports: int = 1000
    seed: int = 0
    k_min: int = 1
    k_max: int = 8
    image_size: int = 224
    hard: bool = False
    train_frac: float = 0.8
    val_frac: float = 0.1
    contrast: float = 1.0
    sites: tuple[str, ...] = tuple(SITES)

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


# ------------------------------------------------------------------------------- vocabulary


# site -> probe geometry, field of view (cm), finding mix. Stones only where stones form (the
# gallbladder, drawn in the liver view, and the kidney); cardiac findings are annular calcification.
@dataclass(frozen=True)
class _Probe:
    """Scan geometry: 'linear' (rectangle) or 'sector' (fan from a virtual apex at `apex_y`,
    above the image top for a curved abdominal probe, just under it for a phased cardiac one)."""

    kind: str
    fov_cm: float
    apex_y: float = 0.0
    half_angle: float = 0.0


_CURVED = {"kind": "sector", "apex_y": -0.1, "half_angle": 34.0}
_PROBE = {
    "thyroid": _Probe("linear", 4.0),
    "breast": _Probe("linear", 4.0),
    "liver": _Probe(fov_cm=16.0, **_CURVED),
    "kidney": _Probe(fov_cm=12.0, **_CURVED),
    "uterus": _Probe(fov_cm=10.0, **_CURVED),
    "cardiac": _Probe("sector", 16.0, apex_y=0.03, half_angle=40.0),
}
FINDING_MIX: dict[str, dict[str, float]] = {
    "thyroid": {"cyst": 0.2, "nodule": 0.35, "calcification": 0.2, "none": 0.25},
    "breast": {"cyst": 0.3, "nodule": 0.35, "calcification": 0.15, "none": 0.2},
    "liver": {"cyst": 0.25, "nodule": 0.15, "calcification": 0.1, "stone": 0.25, "none": 0.25},
    "kidney": {"cyst": 0.3, "nodule": 0.1, "calcification": 0.05, "stone": 0.3, "none": 0.25},
    "uterus": {"cyst": 0.15, "nodule": 0.4, "calcification": 0.1, "none": 0.35},
    "cardiac": {"calcification": 0.35, "none": 0.65},
}


def _thyroid_locs() -> dict[str, tuple[str, str]]:
    sides = {"right": ("右", "right"), "left": ("左", "left")}
    parts = {
        "upper": ("上极", "upper pole of the {} thyroid lobe"),
        "middle": ("中部", "middle portion of the {} thyroid lobe"),
        "lower": ("下极", "lower pole of the {} thyroid lobe"),
    }
    return {
        f"{s}_lobe_{p}": (f"甲状腺{sz}叶{pz}", pe.format(se))
        for s, (sz, se) in sides.items()
        for p, (pz, pe) in parts.items()
    }


def _breast_locs() -> dict[str, tuple[str, str]]:
    quads = {
        "upper_outer": ("外上象限", "upper outer quadrant"),
        "lower_outer": ("外下象限", "lower outer quadrant"),
        "upper_inner": ("内上象限", "upper inner quadrant"),
        "lower_inner": ("内下象限", "lower inner quadrant"),
    }
    return {
        f"{s}_{q}": (f"{sz}乳{qz}", f"{qe} of the {s} breast")
        for s, sz in (("right", "右"), ("left", "左"))
        for q, (qz, qe) in quads.items()
    }


def _kidney_locs() -> dict[str, tuple[str, str]]:
    parts = {
        "upper": ("上极", "upper pole"),
        "middle": ("中部", "middle portion"),
        "lower": ("下极", "lower pole"),
    }
    return {
        f"{s}_{p}": (f"{sz}肾{pz}", f"{pe} of the {s} kidney")
        for s, sz in (("right", "右"), ("left", "左"))
        for p, (pz, pe) in parts.items()
    }


# site -> location key -> (Chinese, English). The key is what `meta["location"]` holds.
LOCATIONS: dict[str, dict[str, tuple[str, str]]] = {
    "thyroid": _thyroid_locs(),
    "breast": _breast_locs(),
    "liver": {
        "right_lobe": ("肝右叶", "right lobe of the liver"),
        "left_lobe": ("肝左叶", "left lobe of the liver"),
        "gallbladder": ("胆囊", "gallbladder"),
    },
    "kidney": _kidney_locs(),
    "uterus": {
        "anterior_wall": ("子宫前壁", "anterior wall of the uterus"),
        "posterior_wall": ("子宫后壁", "posterior wall of the uterus"),
        "fundus": ("宫底", "uterine fundus"),
        "cervix": ("宫颈", "cervix"),
    },
    "cardiac": {
        "mitral_annulus": ("二尖瓣环", "mitral annulus"),
        "tricuspid_annulus": ("三尖瓣环", "tricuspid annulus"),
    },
}

# site -> finding type -> allowed location keys
_ALLOWED: dict[str, dict[str, tuple[str, ...]]] = {
    "thyroid": dict.fromkeys(("cyst", "nodule", "calcification"), tuple(LOCATIONS["thyroid"])),
    "breast": dict.fromkeys(("cyst", "nodule", "calcification"), tuple(LOCATIONS["breast"])),
    "liver": {
        **dict.fromkeys(("cyst", "nodule", "calcification"), ("right_lobe", "left_lobe")),
        "stone": ("gallbladder",),
    },
    "kidney": dict.fromkeys(("cyst", "nodule", "calcification", "stone"), tuple(LOCATIONS["kidney"])),
    "uterus": {
        "cyst": ("cervix",),
        "nodule": ("anterior_wall", "posterior_wall", "fundus"),
        "calcification": ("anterior_wall", "posterior_wall"),
    },
    "cardiac": {"calcification": ("mitral_annulus", "tricuspid_annulus")},
}

# site -> [(zh, en)] reasons for the examination
_HISTORY: dict[str, list[tuple[str, str]]] = {
    "thyroid": [("颈部不适", "Neck discomfort"), ("发现颈部肿物1周", "Neck lump noticed one week ago")],
    "breast": [("乳房胀痛", "Breast tenderness"), ("自查发现乳房肿块", "Self-detected breast lump")],
    "liver": [("右上腹痛", "Right upper abdominal pain"), ("肝功能异常", "Abnormal liver function tests")],
    "kidney": [("腰痛", "Flank pain"), ("镜下血尿", "Microscopic hematuria")],
    "uterus": [("月经量增多", "Heavy menstrual bleeding"), ("下腹痛", "Lower abdominal pain")],
    "cardiac": [("胸闷", "Chest tightness"), ("心悸", "Palpitations")],
}
_HISTORY_COMMON = [("体检", "Routine health check-up"), ("复查", "Follow-up examination")]

# site -> [(zh, en)] description of the organ as a whole
_NORMAL: dict[str, list[tuple[str, str]]] = {
    "thyroid": [
        (
            "甲状腺形态大小正常，包膜光整，实质回声均匀。",
            "The thyroid is normal in shape and size, with a smooth capsule and homogeneous parenchymal echotexture.",
        ),
        (
            "甲状腺左右叶及峡部大小正常，被膜完整，腺体回声分布均匀。",
            "Both thyroid lobes and the isthmus are normal in size, with an intact capsule and evenly distributed glandular echoes.",
        ),
    ],
    "breast": [
        (
            "双侧乳腺腺体层结构清晰，回声分布均匀，导管未见扩张。",
            "Both breasts show a clearly layered glandular structure with evenly distributed echoes and no ductal dilatation.",
        ),
        (
            "双乳皮肤及皮下脂肪层未见异常，腺体层回声均匀。",
            "The skin and subcutaneous fat of both breasts are unremarkable and the glandular layer is homogeneous.",
        ),
    ],
    "liver": [
        (
            "肝脏形态大小正常，包膜光整，实质回声均匀，肝内管道结构清晰。胆囊大小正常，壁光滑。",
            "The liver is normal in shape and size with a smooth capsule, homogeneous parenchyma and clearly "
            "displayed intrahepatic vessels. The gallbladder is normal in size with a smooth wall.",
        ),
        (
            "肝脏大小形态正常，肝实质回声细密均匀。胆囊形态正常，囊壁不厚。",
            "The liver is normal in size and shape with fine, homogeneous parenchymal echoes. The gallbladder "
            "is normal in shape without wall thickening.",
        ),
    ],
    "kidney": [
        (
            "双肾形态大小正常，包膜光整，皮髓质分界清晰，集合系统未见分离。",
            "Both kidneys are normal in shape and size with smooth capsules, clear corticomedullary "
            "differentiation and no separation of the collecting system.",
        ),
        (
            "双肾大小正常，实质回声均匀，肾盂未见扩张。",
            "Both kidneys are normal in size with homogeneous parenchyma and no pelvic dilatation.",
        ),
    ],
    "uterus": [
        (
            "子宫前位，形态大小正常，肌层回声均匀，内膜居中，厚度正常。",
            "The uterus is anteverted and normal in shape and size, with homogeneous myometrium and a "
            "central endometrium of normal thickness.",
        ),
        (
            "子宫大小正常，轮廓清晰，宫腔线居中。",
            "The uterus is normal in size with a clear outline and a central cavity line.",
        ),
    ],
    "cardiac": [
        (
            "各房室大小正常，室间隔及左室壁厚度正常，运动协调。",
            "All cardiac chambers are normal in size; the interventricular septum and left ventricular wall "
            "are of normal thickness with coordinated motion.",
        ),
        (
            "心脏各腔室内径正常，室壁运动未见异常。",
            "Chamber dimensions are normal and wall motion is unremarkable.",
        ),
    ],
}
_NO_LESION = {
    "cardiac": ("各瓣膜形态及活动未见明显异常。", "The valves appear normal in morphology and motion."),
}
_NO_LESION_DEFAULT = ("未见明显占位性病变。", "No obvious space-occupying lesion is seen.")

# finding type -> [(zh, en)] sentence templates; {loc}/{loc_en} location, {w}/{h} size in cm
_FINDING_TEXT: dict[str, list[tuple[str, str]]] = {
    "cyst": [
        (
            "{loc}见一大小约{w}cm×{h}cm的无回声区，边界清，壁光滑，后方回声增强。",
            "An anechoic area measuring approximately {w} cm × {h} cm is seen in the {loc_en}, "
            "well-defined with a smooth wall and posterior acoustic enhancement.",
        ),
        (
            "{loc}可见一无回声区，大小约{w}cm×{h}cm，形态规则，内透声好，后方回声增强。",
            "In the {loc_en} there is an anechoic area of about {w} cm × {h} cm, regular in shape with "
            "good internal sound transmission and posterior acoustic enhancement.",
        ),
    ],
    "nodule": [
        (
            "{loc}见一大小约{w}cm×{h}cm的低回声结节，边界清，形态欠规则，CDFI：未见明显血流信号。",
            "A hypoechoic nodule measuring approximately {w} cm × {h} cm is seen in the {loc_en}, "
            "well-defined and slightly irregular in shape; CDFI: no obvious blood flow signal.",
        ),
        (
            "{loc}探及一实性低回声结节，大小约{w}cm×{h}cm，边界尚清，内部回声欠均匀。",
            "A solid hypoechoic nodule of about {w} cm × {h} cm is detected in the {loc_en}, with fairly "
            "clear margins and slightly heterogeneous internal echoes.",
        ),
    ],
    "calcification": [
        (
            "{loc}见一强回声光点，大小约{w}cm×{h}cm，后方伴声影。",
            "A hyperechoic focus measuring approximately {w} cm × {h} cm is seen in the {loc_en}, with "
            "posterior acoustic shadowing.",
        ),
        (
            "{loc}可见点状强回声，大小约{w}cm×{h}cm，后伴声影。",
            "A punctate echogenic focus of about {w} cm × {h} cm is visible in the {loc_en}, with a "
            "posterior acoustic shadow.",
        ),
    ],
    "stone": [
        (
            "{loc}内见一弧形强回声团，大小约{w}cm×{h}cm，后方伴明显声影。",
            "An arc-shaped hyperechoic mass measuring approximately {w} cm × {h} cm is seen within the "
            "{loc_en}, with marked posterior acoustic shadowing.",
        ),
        (
            "{loc}内可见一强回声团，大小约{w}cm×{h}cm，表面呈弧形，后伴声影。",
            "Within the {loc_en} there is a hyperechoic mass of about {w} cm × {h} cm with an "
            "arc-shaped surface and a posterior acoustic shadow.",
        ),
    ],
}

# (site, finding type) -> (zh, en) diagnosis; "none" uses the site name
_DIAGNOSIS: dict[tuple[str, str], tuple[str, str]] = {
    ("thyroid", "cyst"): ("{loc}囊性结节 TI-RADS 2类", "Cystic nodule in the {loc_en}, TI-RADS 2"),
    ("thyroid", "nodule"): ("{loc}实性结节 TI-RADS 3类", "Solid nodule in the {loc_en}, TI-RADS 3"),
    ("thyroid", "calcification"): ("{loc}钙化灶 TI-RADS 4a类", "Calcification in the {loc_en}, TI-RADS 4a"),
    ("breast", "cyst"): ("{loc}囊肿 BI-RADS 2类", "Cyst in the {loc_en}, BI-RADS 2"),
    ("breast", "nodule"): ("{loc}实性结节 BI-RADS 3类", "Solid nodule in the {loc_en}, BI-RADS 3"),
    ("breast", "calcification"): ("{loc}钙化灶 BI-RADS 4a类", "Calcification in the {loc_en}, BI-RADS 4a"),
    ("liver", "cyst"): ("{loc}囊肿", "Cyst in the {loc_en}"),
    ("liver", "nodule"): (
        "{loc}实性结节，建议进一步检查",
        "Solid nodule in the {loc_en}; further evaluation recommended",
    ),
    ("liver", "calcification"): ("{loc}钙化灶", "Calcification in the {loc_en}"),
    ("liver", "stone"): ("胆囊结石", "Gallbladder stone"),
    ("kidney", "cyst"): ("{loc}囊肿", "Cyst in the {loc_en}"),
    ("kidney", "nodule"): (
        "{loc}实性结节，建议进一步检查",
        "Solid nodule in the {loc_en}; further evaluation recommended",
    ),
    ("kidney", "calcification"): ("{loc}钙化灶", "Calcification in the {loc_en}"),
    ("kidney", "stone"): ("{loc}结石", "Stone in the {loc_en}"),
    ("uterus", "cyst"): ("宫颈纳氏囊肿", "Nabothian cyst of the cervix"),
    ("uterus", "nodule"): ("{loc}实性结节，考虑子宫肌瘤", "Solid nodule in the {loc_en}, likely leiomyoma"),
    ("uterus", "calcification"): ("{loc}钙化灶", "Calcification in the {loc_en}"),
    ("cardiac", "calcification"): ("{loc}钙化", "Calcification of the {loc_en}"),
}


# --------------------------------------------------------------------------------------- plan


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
        return _DEPTH * self.image_size / _PROBE[self.site].fov_cm


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
    histories = _HISTORY_COMMON + _HISTORY[site]
    history = histories[int(rng.integers(len(histories)))]
    normal = _NORMAL[site][int(rng.integers(len(_NORMAL[site])))]
    anat = _ANATOMY_PARAMS[site](rng)
    k = int(rng.integers(cfg.k_min, cfg.k_max + 1))
    ftype = _pick(rng, FINDING_MIX[site])
    size = cfg.image_size

    valid = [True] * k
    run_start, run_len = 0, k
    finding_args: dict[str, Any] | None = None
    if ftype != "none":
        loc_keys = _ALLOWED[site][ftype]
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
        templates = _FINDING_TEXT[finding.type]
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
    (x0, x1, y0, y1), max_frac = _REGIONS[site](anat, z_key, ftype, location)
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
    fov = _PROBE[site].fov_cm
    px_per_cm = _DEPTH * cfg.image_size / fov
    min_cm = math.ceil(_MIN_FINDING_PX / px_per_cm * 10 - 1e-9) / 10
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
    floor = min(1.0, 0.5 * _MIN_FINDING_PX / (min(rx, ry) * cfg.image_size))
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


# ------------------------------------------------------------------------------------ canvas


@lru_cache(maxsize=16)
def _gain_map(probe: _Probe, size: int) -> np.ndarray:
    """Depth attenuation x time-gain compensation, zero outside the scan region: (S, S) float32."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    x, y = c[None, :], c[:, None]
    if probe.kind == "linear":
        depth = np.broadcast_to(y - _TOP, (size, size))
        inside = (x > 0.08) & (x < 0.92) & (depth > 0) & (depth < _DEPTH)
    else:
        depth = np.sqrt((x - 0.5) ** 2 + (y - probe.apex_y) ** 2) - (_TOP - probe.apex_y)
        ang = np.degrees(np.arctan2(np.abs(x - 0.5), y - probe.apex_y))
        inside = (depth > 0) & (depth < _DEPTH) & (ang < probe.half_angle)
    cm = depth / _DEPTH * probe.fov_cm  # depth in cm
    att = np.exp(-0.11 * cm) * (1.0 + 0.09 * cm)  # attenuation partly undone by TGC
    near = 0.8 + 0.2 * np.clip(depth / 0.05, 0, 1)
    return (att * near * inside).astype(np.float32)


def _box_blur(a: np.ndarray, rx: int, ry: int) -> np.ndarray:
    """Wrap-around box blur via cumulative sums (separable, any size)."""
    for axis, r in ((1, rx), (0, ry)):
        if r <= 0:
            continue
        pad = np.concatenate([a.take(range(-r - 1, 0), axis=axis), a, a.take(range(r), axis=axis)], axis=axis)
        cs = np.cumsum(pad, axis=axis, dtype=np.float64)
        n = a.shape[axis]
        hi = cs.take(range(2 * r + 1, 2 * r + 1 + n), axis=axis)
        lo = cs.take(range(0, n), axis=axis)
        a = ((hi - lo) / (2 * r + 1)).astype(np.float32)
    return a


@lru_cache(maxsize=4)
def _banks(seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-process noise banks (2S x 2S): speckle (mean 1) and low-frequency tissue texture."""
    rng = np.random.default_rng([seed, 0x5EED, size])
    n = 2 * size
    rx = max(1, round(size / 160))
    ray = rng.rayleigh(1.0, size=(n, n)).astype(np.float32)
    spk = _box_blur(ray, rx, max(0, rx // 2))  # speckle is elongated laterally
    spk = spk / spk.mean()
    spk = 1.0 + (spk - 1.0) * (0.45 / spk.std())  # restore Rayleigh-like spread after smoothing
    spk = np.clip(spk, 0.05, None).astype(np.float32)
    low = rng.standard_normal((n, n)).astype(np.float32)
    r = max(2, size // 28)
    low = _box_blur(_box_blur(low, r, r), r, r)
    low = 1.0 + 0.1 * (low - low.mean()) / low.std()
    return spk, low.astype(np.float32)


class _Canvas:
    """Echogenicity map of one frame; shapes are given in anatomy coordinates and painted on the
    small pixel window they cover."""

    def __init__(self, size: int, shift: tuple[float, float], probe: _Probe, fill: float) -> None:
        self.size = size
        self.dx, self.dy = shift
        self.probe = probe
        c = (np.arange(size, dtype=np.float32) + 0.5) / size
        self.c = c
        self.xa = c - np.float32(self.dx)  # anatomy x of every column
        self.ya = c - np.float32(self.dy)  # anatomy y of every row
        self.e = np.full((size, size), fill, dtype=np.float32)

    def _window(self, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice] | None:
        s = self.size
        c0 = max(0, math.floor((x0 + self.dx) * s))
        c1 = min(s, math.ceil((x1 + self.dx) * s))
        r0 = max(0, math.floor((y0 + self.dy) * s))
        r1 = min(s, math.ceil((y1 + self.dy) * s))
        if c0 >= c1 or r0 >= r1:
            return None
        return slice(r0, r1), slice(c0, c1)

    def _apply(self, win: tuple[slice, slice], m: np.ndarray, value: float, mode: str) -> None:
        e = self.e[win]
        if mode == "paint":
            e += (value - e) * m
        elif mode == "mul":
            e *= 1.0 + (value - 1.0) * m
        else:  # add
            e += value * m

    def ellipse(
        self,
        cx: float,
        cy: float,
        rx: float,
        ry: float,
        value: float,
        mode: str = "paint",
        angle: float = 0.0,
        ring: float | None = None,
        half: str | None = None,
        lobes: tuple[tuple[float, float, float], ...] = (),
        edge_px: float = 1.2,
    ) -> None:
        """Soft ellipse; `ring` keeps only the outer band (thickness in squared-radius units),
        `half` keeps the 'upper' or 'lower' half, `lobes` (amp, freq, phase) make it irregular."""
        r = max(rx, ry) if angle else None
        win = self._window(cx - (r or rx), cx + (r or rx), cy - (r or ry), cy + (r or ry))
        if win is None:
            return
        u = self.xa[win[1]][None, :] - np.float32(cx)
        v = self.ya[win[0]][:, None] - np.float32(cy)
        if angle:
            ca, sa = math.cos(math.radians(angle)), math.sin(math.radians(angle))
            u, v = u * ca + v * sa, v * ca - u * sa
        rr = (u / rx) ** 2 + (v / ry) ** 2
        if lobes:
            theta = np.arctan2(v / ry, u / rx)
            shrink = 1.0 - sum(a * (1.0 + np.cos(f * theta + p)) / 2 for a, f, p in lobes)
            rr = rr / shrink**2
        e = min(0.6, 2 * edge_px / (min(rx, ry) * self.size))
        m = np.clip((1.0 - rr) / e, 0.0, 1.0)
        if ring is not None:
            m *= np.clip((rr - (1.0 - ring)) / e, 0.0, 1.0)
        if half == "upper":
            m *= v < 0
        elif half == "lower":
            m *= v > 0
        self._apply(win, m, value, mode)

    def band(
        self, y0: float, y1: float, value: float, amp: float = 0.0, freq: float = 1.0, phase: float = 0.0
    ) -> None:
        """Horizontal layer between two wavy boundaries, full width."""
        win = self._window(-1.0, 2.0, y0 - amp, y1 + amp)
        if win is None:
            return
        x = self.xa[None, :]
        y = self.ya[win[0]][:, None]
        wave = np.float32(amp) * np.sin(np.float32(2 * math.pi * freq) * x + np.float32(phase))
        s = np.float32(self.size / 1.5)
        m = np.clip((y - y0 - wave) * s, 0, 1) * np.clip((y1 + wave * 0.7 - y) * s, 0, 1)
        self._apply(win, m, value, "paint")

    def posterior(
        self, cx: float, cy: float, half_w: float, factor: float, fade: float | None = None
    ) -> None:
        """Multiply by `factor` behind a point (shadow < 1 < enhancement) along the scan lines:
        straight down for a linear probe, along rays from the fan apex for a sector probe."""
        s = self.size
        ix, iy = cx + self.dx, cy + self.dy
        r0 = max(0, math.floor(iy * s))
        if r0 >= s:
            return
        apex = self.probe.apex_y
        if self.probe.kind == "linear":
            c0, c1 = max(0, math.floor((ix - half_w) * s) - 1), min(s, math.ceil((ix + half_w) * s) + 1)
            if c0 >= c1:
                return
            d_px = (half_w - np.abs(self.c[c0:c1][None, :] - ix)) * s
            d_px = np.broadcast_to(d_px, (s - r0, c1 - c0))
        else:
            dep = max(iy - apex, 1e-3)
            lat_c, lat_w = (ix - 0.5) / dep, half_w / dep
            xs = [0.5 + (lat_c + sgn * lat_w) * (yy - apex) for sgn in (-1, 1) for yy in (iy, 1.0)]
            c0, c1 = max(0, math.floor(min(xs) * s) - 1), min(s, math.ceil(max(xs) * s) + 1)
            if c0 >= c1:
                return
            yd = self.c[r0:, None] - apex
            lat = (self.c[None, c0:c1] - 0.5) / yd
            d_px = (lat_w - np.abs(lat - lat_c)) * yd * s
        m = np.clip(d_px / 1.5 + 0.5, 0.0, 1.0)
        if fade is not None:
            m = m * np.exp(-(self.c[r0:, None] - iy) / fade)
        self._apply((slice(r0, s), slice(c0, c1)), m, factor, "mul")

    def shadow_column(self, cx: float, y0: float, half_w: float, factor: float) -> None:
        """Anatomical shadow in anatomy coordinates (linear-probe sites only)."""
        win = self._window(cx - half_w, cx + half_w, y0, 2.0)
        if win is None:
            return
        d = (half_w - np.abs(self.xa[win[1]][None, :] - cx)) * self.size
        m = np.broadcast_to(np.clip(d / 1.5, 0, 1), (win[0].stop - win[0].start, win[1].stop - win[1].start))
        self._apply(win, m, factor, "mul")


# ---------------------------------------------------------------------------------- anatomy
# Each site has: a parameter sampler (per report), a painter (per frame, given sweep position z)
# and location regions (where a finding centre may go, and its widest allowed size).


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _body_wall(cv: _Canvas, skin: float = 0.95) -> None:
    """Near-field layers concentric with the probe face: skin, fat, muscle, fascia."""
    apex = cv.probe.apex_y
    face = _TOP - apex
    for r0, r1, val in ((0.0, 0.03, skin), (0.03, 0.07, 0.28), (0.07, 0.11, 0.5), (0.11, 0.125, 1.0)):
        ra, rb = face + r0, face + r1
        cv.ellipse(0.5, apex, rb, rb, val, ring=1 - (ra / rb) ** 2, half="lower")


def _thyroid_g(z: float) -> float:
    """Lobe cross-section scale along the cranio-caudal sweep: smaller towards both poles."""
    return math.sqrt(max(0.25, 1.0 - 0.75 * (2 * z - 1) ** 2))


def _thyroid_params(rng: np.random.Generator) -> dict[str, float]:
    return {"sep": _u(rng, 0.19, 0.23), "scale": _u(rng, 0.92, 1.08), "echo": _u(rng, 0.75, 0.9),
            "isth": _u(rng, 0.025, 0.04), "ph": _u(rng, 0, 6.3)}  # fmt: skip


def _thyroid_draw(cv: _Canvas, p: dict[str, float], z: float) -> None:
    cv.band(0.06, 0.085, 1.1)
    cv.band(0.085, 0.13, 0.3, amp=0.006, freq=1.5, phase=p["ph"])
    g = _thyroid_g(z) * p["scale"]
    for sx in (-1, 1):
        cv.ellipse(0.5 + sx * 0.36, 0.22, 0.13, 0.06, 0.2)  # sternocleidomastoid
        cv.ellipse(0.5 + sx * 0.2, 0.7, 0.1, 0.045, 0.2)  # longus colli
        cx = 0.5 + sx * 0.37  # common carotid artery, lateral and deep to the lobe
        cv.posterior(cx, 0.52, 0.045, 1.3, fade=0.2)
        cv.ellipse(0.5 + sx * p["sep"], 0.42, 0.15 * g, 0.15 * g, p["echo"])  # lobe
        cv.ellipse(cx, 0.52, 0.058, 0.058, 1.0, ring=0.3)
        cv.ellipse(cx, 0.52, 0.05, 0.05, 0.02)
        cv.ellipse(0.5 + sx * 0.17, 0.175, 0.16, 0.035, 0.18)  # strap muscles
    cv.ellipse(0.5, 0.28, 0.13, p["isth"], p["echo"])
    cv.shadow_column(0.5, 0.38, 0.065, 0.3)  # trachea: air shadow with reverberations
    for yr in (0.5, 0.58, 0.66):
        cv.ellipse(0.5, yr, 0.055, 0.005, 0.45)
    cv.ellipse(0.5, 0.42, 0.075, 0.07, 1.4, mode="add", ring=0.35, half="upper")
    cv.shadow_column(0.5, 0.86, 0.14, 0.3)  # vertebral body
    cv.ellipse(0.5, 0.88, 0.16, 0.06, 1.2, ring=0.3, half="upper")


def _thyroid_regions(p: dict[str, float], z: float, ftype: str, loc: str) -> tuple[tuple[float, ...], float]:
    g = _thyroid_g(z) * p["scale"]
    # transverse view, radiological convention: the patient's right lobe is on the image left
    cx = 0.5 - p["sep"] if loc.startswith("right") else 0.5 + p["sep"]
    rx, ry = 0.15 * g, 0.15 * g
    return (cx - 0.35 * rx, cx + 0.35 * rx, 0.42 - 0.35 * ry, 0.42 + 0.35 * ry), 1.1 * ry


def _breast_params(rng: np.random.Generator) -> dict[str, float]:
    p = {
        "yt": _u(rng, 0.24, 0.3),
        "yb": _u(rng, 0.58, 0.64),
        "ph": _u(rng, 0, 6.3),
        "rib": _u(rng, 0.25, 0.7),
    }
    for i in range(4):
        p[f"lx{i}"], p[f"ly{i}"] = _u(rng, 0.15, 0.85), _u(rng, 0.0, 1.0)
    return p


def _breast_draw(cv: _Canvas, p: dict[str, float], z: float) -> None:
    ph = p["ph"] + 1.5 * z
    cv.band(0.06, 0.08, 1.1)
    for i, y in enumerate((0.12, 0.17, 0.215)):  # Cooper's ligaments in subcutaneous fat
        cv.band(y, y + 0.007, 0.85, amp=0.03, freq=1.7 + 0.4 * i, phase=ph + i)
    cv.band(p["yt"], p["yb"], 0.82, amp=0.025, freq=1.3, phase=ph)  # fibroglandular layer
    for i in range(4):  # fat lobules inside the gland
        ly = p["yt"] + 0.06 + p[f"ly{i}"] * (p["yb"] - p["yt"] - 0.12)
        cv.ellipse(p[f"lx{i}"], ly, 0.05, 0.022, 0.4)
    cv.band(p["yb"] + 0.02, 0.72, 0.3, amp=0.01, freq=1.0, phase=ph)
    cv.band(0.72, 0.86, 0.45)  # pectoralis with striations
    for y in (0.75, 0.79, 0.83):
        cv.band(y, y + 0.005, 0.7)
    cv.shadow_column(p["rib"], 0.9, 0.08, 0.12)
    cv.ellipse(p["rib"], 0.91, 0.09, 0.035, 1.3, ring=0.4, half="upper")


def _breast_regions(p: dict[str, float], z: float, ftype: str, loc: str) -> tuple[tuple[float, ...], float]:
    # side and quadrant are where the probe was (written on the image by the sonographer), so the
    # in-image position is always the glandular layer
    return (0.25, 0.75, p["yt"] + 0.07, p["yb"] - 0.07), 0.8 * (p["yb"] - p["yt"])


def _liver_params(rng: np.random.Generator) -> dict[str, float]:
    return {"echo": _u(rng, 0.5, 0.65), "gx": _u(rng, 0.38, 0.42), "gy": _u(rng, 0.64, 0.68),
            "gs": _u(rng, 0.9, 1.1), "va": _u(rng, -25, -5)}  # fmt: skip


def _liver_draw(cv: _Canvas, p: dict[str, float], z: float) -> None:
    cv.ellipse(0.5, 0.52, 0.62, 0.43, p["echo"])
    cv.ellipse(0.5, 0.52, 0.62, 0.43, 1.2, ring=0.06, half="lower")  # diaphragm
    v = 1.0 + 0.15 * (z - 0.5)
    cv.ellipse(0.55, 0.40, 0.1, 0.03 * v, 1.1, angle=p["va"])  # portal vein: bright wall
    cv.ellipse(0.55, 0.40, 0.09, 0.02 * v, 0.03, angle=p["va"])
    cv.ellipse(0.65, 0.29, 0.07, 0.016 * v, 0.03, angle=35)  # hepatic vein
    cv.ellipse(0.52, 0.86, 0.13, 0.04, 0.03, angle=5)  # inferior vena cava
    gx, gy, gs = p["gx"], p["gy"], p["gs"]
    cv.posterior(gx, gy, 0.085 * gs, 1.35, fade=0.25)  # gallbladder
    cv.ellipse(gx, gy, 0.115 * gs, 0.06 * gs, 1.0, angle=15)
    cv.ellipse(gx, gy, 0.105 * gs, 0.05 * gs, 0.02, angle=15)
    _body_wall(cv)


def _liver_regions(p: dict[str, float], z: float, ftype: str, loc: str) -> tuple[tuple[float, ...], float]:
    if loc == "gallbladder":  # stones lie in the dependent (deep) part
        gx, gy, gs = p["gx"], p["gy"], p["gs"]
        return (gx - 0.04 * gs, gx + 0.04 * gs, gy + 0.012 * gs, gy + 0.018 * gs), 0.075 * gs
    if loc == "right_lobe":  # patient's right on the image left
        return (0.33, 0.42, 0.4, 0.5), 0.14
    return (0.58, 0.7, 0.5, 0.64), 0.14


def _kidney_params(rng: np.random.Generator) -> dict[str, float]:
    return {"kx": _u(rng, 0.48, 0.52), "ky": _u(rng, 0.56, 0.6), "s": _u(rng, 0.92, 1.06)}


def _kidney_draw(cv: _Canvas, p: dict[str, float], z: float) -> None:
    kx, ky, s = p["kx"], p["ky"], p["s"]
    cv.ellipse(0.45, 0.2, 0.6, 0.2, 0.55)  # liver as acoustic window
    cv.band(0.86, 1.2, 0.4)  # psoas
    cv.ellipse(kx, ky, 0.33 * s, 0.19 * s, 0.85)  # perirenal fat
    cv.ellipse(kx, ky, 0.28 * s, 0.14 * s, 0.42)  # cortex
    for dxp in (-0.17, -0.085, 0.0, 0.085, 0.17):  # medullary pyramids
        for sy in (-1, 1):
            cv.ellipse(kx + dxp * s, ky + sy * 0.07 * s, 0.03 * s, 0.025 * s, 0.18)
    cv.ellipse(kx, ky + 0.15 * s, 0.09 * s, 0.05 * s, 0.85)  # hilum notch: the bean
    sz = 1.0 - 0.08 * abs(2 * z - 1)
    cv.ellipse(kx, ky + 0.005, 0.19 * s * sz, 0.05 * s * sz, 1.05)  # echogenic central sinus
    _body_wall(cv)


def _kidney_regions(p: dict[str, float], z: float, ftype: str, loc: str) -> tuple[tuple[float, ...], float]:
    # longitudinal view: upper pole on the image left; left/right kidney is the probe side
    kx, ky, s = p["kx"], p["ky"], p["s"]
    part = loc.rsplit("_", 1)[1]
    if ftype == "stone":  # inside the sinus
        x = {"upper": (-0.14, -0.09), "middle": (-0.03, 0.03), "lower": (0.09, 0.14)}[part]
        return (kx + x[0] * s, kx + x[1] * s, ky - 0.01, ky + 0.015), 0.07
    if part == "middle":  # parenchyma above the sinus
        return (kx - 0.04 * s, kx + 0.04 * s, ky - 0.1 * s, ky - 0.085 * s), 0.12
    x = (-0.22, -0.17) if part == "upper" else (0.17, 0.22)
    return (kx + x[0] * s, kx + x[1] * s, ky - 0.03, ky + 0.03), 0.12


_UT_ANGLE = 20.0
_UT_AXIS = (math.cos(math.radians(_UT_ANGLE)), math.sin(math.radians(_UT_ANGLE)))  # fundus -> cervix
_UT_NORMAL = (-_UT_AXIS[1], _UT_AXIS[0])  # points deeper (posterior)


def _uterus_params(rng: np.random.Generator) -> dict[str, float]:
    return {"bx": _u(rng, 0.44, 0.48), "by": _u(rng, 0.55, 0.58), "s": _u(rng, 0.92, 1.08),
            "endo": _u(rng, 0.018, 0.03)}  # fmt: skip


def _uterus_draw(cv: _Canvas, p: dict[str, float], z: float) -> None:
    bx, by, s = p["bx"], p["by"], p["s"]
    cv.posterior(0.5, 0.26, 0.2, 1.35, fade=0.3)  # full bladder: acoustic window
    cv.ellipse(0.5, 0.26, 0.255, 0.125, 0.9)
    cv.ellipse(0.5, 0.26, 0.245, 0.115, 0.02)
    ax, ay = _UT_AXIS
    cv.ellipse(bx + ax * 0.24 * s, by + ay * 0.24 * s, 0.13 * s, 0.075 * s, 0.5, angle=_UT_ANGLE)  # cervix
    cv.ellipse(bx, by, 0.22 * s, 0.12 * s, 0.56, angle=_UT_ANGLE)  # body (myometrium)
    cv.ellipse(bx, by, 0.15 * s, p["endo"] * (1 + 0.3 * z), 1.0, angle=_UT_ANGLE)  # endometrium
    cv.ellipse(0.76, 0.84, 0.1, 0.04, 0.8)  # rectum
    _body_wall(cv)


def _uterus_regions(p: dict[str, float], z: float, ftype: str, loc: str) -> tuple[tuple[float, ...], float]:
    bx, by, s = p["bx"], p["by"], p["s"]
    (ax, ay), (nx, ny) = _UT_AXIS, _UT_NORMAL
    along, across, extent, max_frac = {
        "anterior_wall": (0.0, -0.075, 0.05, 0.1),
        "posterior_wall": (0.0, 0.075, 0.05, 0.1),
        "fundus": (-0.16, 0.0, 0.02, 0.12),
        "cervix": (0.24, 0.0, 0.03, 0.07),
    }[loc]
    cx = bx + (ax * along + nx * across) * s
    cy = by + (ay * along + ny * across) * s
    return (cx - extent, cx + extent, cy - 0.01, cy + 0.01), max_frac * s


def _cardiac_params(rng: np.random.Generator) -> dict[str, float]:
    return {"ph": _u(rng, 0, 1), "s": _u(rng, 0.95, 1.05)}


def _cardiac_draw(cv: _Canvas, p: dict[str, float], z: float) -> None:
    s = p["s"]
    beat = math.sin(2 * math.pi * (z + p["ph"]))
    sv, sa = 1 + 0.1 * beat, 1 - 0.1 * beat  # ventricles and atria fill in turn
    cv.ellipse(0.5, 0.55, 0.39 * s, 0.44 * s, 1.2, ring=0.1)  # pericardium
    cv.ellipse(0.5, 0.55, 0.37 * s, 0.42 * s, 0.55)  # myocardium
    cv.ellipse(0.61, 0.38, 0.1 * sv * s, 0.2 * sv * s, 0.03)  # LV
    cv.ellipse(0.39, 0.4, 0.085 * sv * s, 0.17 * sv * s, 0.03)  # RV
    cv.ellipse(0.61, 0.74, 0.1 * sa * s, 0.085 * sa * s, 0.03)  # LA
    cv.ellipse(0.39, 0.73, 0.09 * sa * s, 0.08 * sa * s, 0.03)  # RA
    open_ = 0.5 + 0.5 * beat
    for cx in (0.56, 0.66):  # mitral leaflets
        cv.ellipse(cx, 0.6, 0.035, 0.007 + 0.01 * open_, 0.9, angle=60 * open_ * (1 if cx > 0.61 else -1))
    for cx in (0.35, 0.43):  # tricuspid leaflets
        cv.ellipse(cx, 0.6, 0.03, 0.007 + 0.01 * open_, 0.9, angle=60 * open_ * (1 if cx > 0.39 else -1))
    _body_wall(cv, skin=0.6)


def _cardiac_regions(p: dict[str, float], z: float, ftype: str, loc: str) -> tuple[tuple[float, ...], float]:
    # apical four-chamber view: left heart on the image right
    cx = 0.5 + (0.2 if loc == "mitral_annulus" else -0.2) * p["s"]
    return (cx - 0.01, cx + 0.01, 0.595, 0.61), 0.05


_ANATOMY_PARAMS = {
    "thyroid": _thyroid_params,
    "breast": _breast_params,
    "liver": _liver_params,
    "kidney": _kidney_params,
    "uterus": _uterus_params,
    "cardiac": _cardiac_params,
}
_DRAW = {
    "thyroid": _thyroid_draw,
    "breast": _breast_draw,
    "liver": _liver_draw,
    "kidney": _kidney_draw,
    "uterus": _uterus_draw,
    "cardiac": _cardiac_draw,
}
_REGIONS = {
    "thyroid": _thyroid_regions,
    "breast": _breast_regions,
    "liver": _liver_regions,
    "kidney": _kidney_regions,
    "uterus": _uterus_regions,
    "cardiac": _cardiac_regions,
}
_BACKGROUND = {"thyroid": 0.32, "breast": 0.3, "liver": 0.3, "kidney": 0.35, "uterus": 0.28, "cardiac": 0.08}


# ---------------------------------------------------------------------------------- render


def _draw_finding(cv: _Canvas, f: Finding, scale: float) -> None:
    rx, ry, c = f.rx * scale, f.ry * scale, f.contrast
    if f.type == "cyst":  # anechoic, posterior acoustic enhancement
        cv.posterior(f.cx, f.cy, rx * 0.85, 1.0 + 0.55 * c, fade=0.25)
        cv.ellipse(f.cx, f.cy, rx, ry, 1.0 - 0.97 * min(c, 1.0), mode="mul")
    elif f.type == "nodule":  # solid, hypoechoic, irregular outline
        cv.ellipse(f.cx, f.cy, rx, ry, 1.0 - 0.6 * min(c, 1.0), mode="mul", lobes=f.lobes)
    elif f.type == "calcification":  # small bright focus, posterior shadow
        cv.posterior(f.cx, f.cy, rx * 0.9, 1.0 - 0.75 * min(c, 1.0))
        cv.ellipse(f.cx, f.cy, rx, ry, 1.7 * c, mode="add")
    else:  # stone: bright arc on its surface, strong shadow
        cv.posterior(f.cx, f.cy, rx * 0.9, 1.0 - 0.9 * min(c, 1.0))
        cv.ellipse(f.cx, f.cy, rx, ry, 1.0 - 0.5 * min(c, 1.0), mode="mul")
        cv.ellipse(f.cx, f.cy, rx, ry, 2.0 * c, mode="add", ring=0.5, half="upper")


def render_frame(plan: ReportPlan, j: int, with_finding: bool = True) -> np.ndarray:
    """Frame `j` of a planned report as an (S, S) uint8 grayscale image.

    `with_finding=False` renders the identical frame without the finding, which is how tests check
    that the validity labels match the pixels.
    """
    if not 0 <= j < plan.k:
        raise DataError(f"{plan.report_id} has {plan.k} frames; frame index {j} is out of range")
    size = plan.image_size
    probe = _PROBE[plan.site]
    cv = _Canvas(size, plan.shifts[j], probe, _BACKGROUND[plan.site])
    _DRAW[plan.site](cv, plan.anat, plan.z[j])
    f = plan.finding
    if with_finding and f is not None and f.scale[j] > 0:
        _draw_finding(cv, f, f.scale[j])
    spk_bank, low_bank = _banks(plan.seed, size)
    mx, my, fx, fy, flip = plan.speckle[j]
    moving = spk_bank[my : my + size, mx : mx + size]
    fresh = spk_bank[fy : fy + size, fx : fx + size]
    if flip & 1:
        fresh = fresh[:, ::-1]
    if flip & 2:
        fresh = fresh[::-1, :]
    texture = low_bank[my : my + size, mx : mx + size]
    gain = _gain_map(probe, size)
    signal = (cv.e * texture + np.float32(0.02)) * (0.6 * moving + 0.4 * fresh) * gain
    img = np.log1p(np.float32(6.0) * signal) * np.float32(255.0 / math.log1p(6.0 * 1.6))
    img = np.clip(img, 0, 255).astype(np.uint8)
    _depth_ticks(img, probe.fov_cm)
    return img


def _depth_ticks(img: np.ndarray, fov_cm: float) -> None:
    """Depth scale on the right edge: one tick per cm (per 0.5 cm when the field is shallow)."""
    s = img.shape[0]
    step = 0.5 if fov_cm <= 5 else 1.0
    x0, x1 = s - max(2, s // 40), s - 1
    for i in range(int(fov_cm / step) + 1):
        y = round((_TOP + i * step / fov_cm * _DEPTH) * s)
        if 0 <= y < s:
            img[y, x0:x1] = 200


def finding_bbox(plan: ReportPlan, j: int) -> list[int] | None:
    """Pixel box [x0, y0, x1, y1) of the finding as drawn in frame j; None where it is not drawn."""
    f = plan.finding
    if f is None or f.scale[j] <= 0:
        return None
    s = plan.image_size
    dx, dy = plan.shifts[j]
    rx, ry = f.rx * f.scale[j], f.ry * f.scale[j]
    x0 = max(0, math.floor((f.cx - rx + dx) * s))
    x1 = min(s, math.ceil((f.cx + rx + dx) * s))
    y0 = max(0, math.floor((f.cy - ry + dy) * s))
    y1 = min(s, math.ceil((f.cy + ry + dy) * s))
    return [x0, y0, x1, y1]


# ------------------------------------------------------------------------------------ labels
# Segmentation labels for encoder pretraining (data/frames.py): the site's main organ and the
# finding, painted with the same shapes (anatomy coordinates, frame shift, lobes) as the grey image.

LABEL_BACKGROUND, LABEL_ORGAN, LABEL_LESION = 0, 1, 2
LABEL_NAMES = ("background", "organ", "lesion")


def _organ_thyroid(cv: _Canvas, p: dict[str, float], z: float) -> None:
    g = _thyroid_g(z) * p["scale"]
    for sx in (-1, 1):
        cv.ellipse(0.5 + sx * p["sep"], 0.42, 0.15 * g, 0.15 * g, 1.0)
    cv.ellipse(0.5, 0.28, 0.13, p["isth"], 1.0)


def _organ_breast(cv: _Canvas, p: dict[str, float], z: float) -> None:
    cv.band(p["yt"], p["yb"], 1.0, amp=0.025, freq=1.3, phase=p["ph"] + 1.5 * z)


def _organ_liver(cv: _Canvas, p: dict[str, float], z: float) -> None:
    cv.ellipse(0.5, 0.52, 0.62, 0.43, 1.0)


def _organ_kidney(cv: _Canvas, p: dict[str, float], z: float) -> None:
    cv.ellipse(p["kx"], p["ky"], 0.28 * p["s"], 0.14 * p["s"], 1.0)


def _organ_uterus(cv: _Canvas, p: dict[str, float], z: float) -> None:
    bx, by, s = p["bx"], p["by"], p["s"]
    ax, ay = _UT_AXIS
    cv.ellipse(bx + ax * 0.24 * s, by + ay * 0.24 * s, 0.13 * s, 0.075 * s, 1.0, angle=_UT_ANGLE)
    cv.ellipse(bx, by, 0.22 * s, 0.12 * s, 1.0, angle=_UT_ANGLE)


def _organ_cardiac(cv: _Canvas, p: dict[str, float], z: float) -> None:
    cv.ellipse(0.5, 0.55, 0.37 * p["s"], 0.42 * p["s"], 1.0)


_ORGAN = {
    "thyroid": _organ_thyroid,
    "breast": _organ_breast,
    "liver": _organ_liver,
    "kidney": _organ_kidney,
    "uterus": _organ_uterus,
    "cardiac": _organ_cardiac,
}


def label_map(plan: ReportPlan, j: int) -> np.ndarray:
    """Frame `j`'s labels as an (S, S) uint8 map: 0 background, 1 the site's organ, 2 the finding.

    Painted with the frame's own shift and the finding's per-frame scale, so the lesion label is
    exactly where `render_frame` draws the finding (and empty in frames that do not show it);
    everything outside the scan region is background."""
    if not 0 <= j < plan.k:
        raise DataError(f"{plan.report_id} has {plan.k} frames; frame index {j} is out of range")
    size = plan.image_size
    probe = _PROBE[plan.site]
    organ = _Canvas(size, plan.shifts[j], probe, 0.0)
    _ORGAN[plan.site](organ, plan.anat, plan.z[j])
    inside = _gain_map(probe, size) > 0
    labels = np.where((organ.e > 0.5) & inside, LABEL_ORGAN, LABEL_BACKGROUND).astype(np.uint8)
    f = plan.finding
    if f is not None and f.scale[j] > 0:
        lesion = _Canvas(size, plan.shifts[j], probe, 0.0)
        lobes = f.lobes if f.type == "nodule" else ()
        lesion.ellipse(f.cx, f.cy, f.rx * f.scale[j], f.ry * f.scale[j], 1.0, lobes=lobes)
        labels[(lesion.e > 0.5) & inside] = LABEL_LESION
    return labels


# ------------------------------------------------------------------------------------ text


def report_texts(plan: ReportPlan) -> tuple[Report, Report]:
    """The zh and en records of a planned report: same id, frames, validity and facts."""
    f = plan.finding
    images = [f"images/{plan.report_id}_{j}.png" for j in range(plan.k)]
    meta: dict[str, Any] = {
        "split": plan.split,
        "finding_type": f.type if f else "none",
        "size_cm": list(f.size_cm) if f else None,
        "location": f.location if f else None,
        "bbox": finding_bbox(plan, f.key_frame) if f else None,
        "key_frame": f.key_frame if f else None,
        "frame_bboxes": [finding_bbox(plan, j) for j in range(plan.k)] if f else None,
        "px_per_cm": round(plan.px_per_cm, 4),
        "contrast": round(f.contrast, 4) if f else None,
        "hard": plan.hard,
        "synth_version": SYNTH_VERSION,
    }
    out = []
    for lang, li in (("zh", 0), ("en", 1)):
        findings = plan.normal[li]
        if f is None:
            closing = _NO_LESION.get(plan.site, _NO_LESION_DEFAULT)[li]
            findings = findings + (closing if lang == "zh" else " " + closing)
            site_zh, site_en = SITES[plan.site]
            diagnosis = (
                f"{site_zh}未见明显异常" if lang == "zh" else f"No obvious abnormality of the {site_en}"
            )
        else:
            loc_zh, loc_en = LOCATIONS[plan.site][f.location]
            fmt = {"loc": loc_zh, "loc_en": loc_en, "w": f"{f.size_cm[0]:.1f}", "h": f"{f.size_cm[1]:.1f}"}
            assert plan.sentence is not None
            sentence = plan.sentence[li].format(**fmt)
            findings = findings + (sentence if lang == "zh" else " " + sentence)
            diagnosis = _DIAGNOSIS[(plan.site, f.type)][li].format(**fmt)
        out.append(
            Report(
                id=plan.report_id,
                site=plan.site,
                history=plan.history[li],
                findings=findings,
                diagnosis=diagnosis,
                language=lang,
                images=list(images),
                valid=list(plan.valid),
                meta=dict(meta),
            )
        )
    return out[0], out[1]


# -------------------------------------------------------------------------------- generate


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
