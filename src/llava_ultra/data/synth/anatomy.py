"""SynthUS anatomy: per site, a parameter sampler, a painter and the regions findings may occupy.

Each site has: a parameter sampler (drawn once per report from the report's RNG), a painter (per
frame, given the sweep position z), location regions (where a finding centre may go and its
widest allowed size) and an organ painter for the segmentation labels, which uses the same shapes
as the grey image.
"""

from __future__ import annotations

import math

import numpy as np

from .canvas import Canvas
from .vocab import TOP


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _body_wall(cv: Canvas, skin: float = 0.95) -> None:
    """Near-field layers concentric with the probe face: skin, fat, muscle, fascia."""
    apex = cv.probe.apex_y
    face = TOP - apex
    for r0, r1, val in ((0.0, 0.03, skin), (0.03, 0.07, 0.28), (0.07, 0.11, 0.5), (0.11, 0.125, 1.0)):
        ra, rb = face + r0, face + r1
        cv.ellipse(0.5, apex, rb, rb, val, ring=1 - (ra / rb) ** 2, half="lower")


def _thyroid_g(z: float) -> float:
    """Lobe cross-section scale along the cranio-caudal sweep: smaller towards both poles."""
    return math.sqrt(max(0.25, 1.0 - 0.75 * (2 * z - 1) ** 2))


def _thyroid_params(rng: np.random.Generator) -> dict[str, float]:
    return {"sep": _u(rng, 0.19, 0.23), "scale": _u(rng, 0.92, 1.08), "echo": _u(rng, 0.75, 0.9),
            "isth": _u(rng, 0.025, 0.04), "ph": _u(rng, 0, 6.3)}  # fmt: skip


def _thyroid_draw(cv: Canvas, p: dict[str, float], z: float) -> None:
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


def _breast_draw(cv: Canvas, p: dict[str, float], z: float) -> None:
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


def _liver_draw(cv: Canvas, p: dict[str, float], z: float) -> None:
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


def _kidney_draw(cv: Canvas, p: dict[str, float], z: float) -> None:
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


def _uterus_draw(cv: Canvas, p: dict[str, float], z: float) -> None:
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


def _cardiac_draw(cv: Canvas, p: dict[str, float], z: float) -> None:
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


ANATOMY_PARAMS = {
    "thyroid": _thyroid_params,
    "breast": _breast_params,
    "liver": _liver_params,
    "kidney": _kidney_params,
    "uterus": _uterus_params,
    "cardiac": _cardiac_params,
}
DRAW = {
    "thyroid": _thyroid_draw,
    "breast": _breast_draw,
    "liver": _liver_draw,
    "kidney": _kidney_draw,
    "uterus": _uterus_draw,
    "cardiac": _cardiac_draw,
}
REGIONS = {
    "thyroid": _thyroid_regions,
    "breast": _breast_regions,
    "liver": _liver_regions,
    "kidney": _kidney_regions,
    "uterus": _uterus_regions,
    "cardiac": _cardiac_regions,
}
BACKGROUND = {"thyroid": 0.32, "breast": 0.3, "liver": 0.3, "kidney": 0.35, "uterus": 0.28, "cardiac": 0.08}


def _organ_thyroid(cv: Canvas, p: dict[str, float], z: float) -> None:
    g = _thyroid_g(z) * p["scale"]
    for sx in (-1, 1):
        cv.ellipse(0.5 + sx * p["sep"], 0.42, 0.15 * g, 0.15 * g, 1.0)
    cv.ellipse(0.5, 0.28, 0.13, p["isth"], 1.0)


def _organ_breast(cv: Canvas, p: dict[str, float], z: float) -> None:
    cv.band(p["yt"], p["yb"], 1.0, amp=0.025, freq=1.3, phase=p["ph"] + 1.5 * z)


def _organ_liver(cv: Canvas, p: dict[str, float], z: float) -> None:
    cv.ellipse(0.5, 0.52, 0.62, 0.43, 1.0)


def _organ_kidney(cv: Canvas, p: dict[str, float], z: float) -> None:
    cv.ellipse(p["kx"], p["ky"], 0.28 * p["s"], 0.14 * p["s"], 1.0)


def _organ_uterus(cv: Canvas, p: dict[str, float], z: float) -> None:
    bx, by, s = p["bx"], p["by"], p["s"]
    ax, ay = _UT_AXIS
    cv.ellipse(bx + ax * 0.24 * s, by + ay * 0.24 * s, 0.13 * s, 0.075 * s, 1.0, angle=_UT_ANGLE)
    cv.ellipse(bx, by, 0.22 * s, 0.12 * s, 1.0, angle=_UT_ANGLE)


def _organ_cardiac(cv: Canvas, p: dict[str, float], z: float) -> None:
    cv.ellipse(0.5, 0.55, 0.37 * p["s"], 0.42 * p["s"], 1.0)


ORGAN = {
    "thyroid": _organ_thyroid,
    "breast": _organ_breast,
    "liver": _organ_liver,
    "kidney": _organ_kidney,
    "uterus": _organ_uterus,
    "cardiac": _organ_cardiac,
}
