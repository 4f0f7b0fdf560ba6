"""SynthUS rendering: a planned frame to grey pixels, the finding's box, and segmentation labels.

`render_frame` paints the site's anatomy and the finding on a canvas, multiplies by speckle,
tissue texture and the depth-gain map, log-compresses and draws depth ticks. `label_map` paints
the organ and the finding with the same shapes, so the lesion label is exactly where the finding
is drawn.
"""

from __future__ import annotations

import math

import numpy as np

from ...errors import DataError
from .anatomy import BACKGROUND, DRAW, ORGAN
from .canvas import Canvas, gain_map, noise_banks
from .plan import Finding, ReportPlan
from .vocab import DEPTH, PROBES, TOP


def _draw_finding(cv: Canvas, f: Finding, scale: float) -> None:
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
    probe = PROBES[plan.site]
    cv = Canvas(size, plan.shifts[j], probe, BACKGROUND[plan.site])
    DRAW[plan.site](cv, plan.anat, plan.z[j])
    f = plan.finding
    if with_finding and f is not None and f.scale[j] > 0:
        _draw_finding(cv, f, f.scale[j])
    spk_bank, low_bank = noise_banks(plan.seed, size)
    mx, my, fx, fy, flip = plan.speckle[j]
    moving = spk_bank[my : my + size, mx : mx + size]
    fresh = spk_bank[fy : fy + size, fx : fx + size]
    if flip & 1:
        fresh = fresh[:, ::-1]
    if flip & 2:
        fresh = fresh[::-1, :]
    texture = low_bank[my : my + size, mx : mx + size]
    gain = gain_map(probe, size)
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
        y = round((TOP + i * step / fov_cm * DEPTH) * s)
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


# Segmentation labels for encoder pretraining (data/frames.py): the site's main organ and the
# finding, painted with the same shapes (anatomy coordinates, frame shift, lobes) as the grey image.

LABEL_BACKGROUND, LABEL_ORGAN, LABEL_LESION = 0, 1, 2
LABEL_NAMES = ("background", "organ", "lesion")


def label_map(plan: ReportPlan, j: int) -> np.ndarray:
    """Frame `j`'s labels as an (S, S) uint8 map: 0 background, 1 the site's organ, 2 the finding.

    Painted with the frame's own shift and the finding's per-frame scale, so the lesion label is
    exactly where `render_frame` draws the finding (and empty in frames that do not show it);
    everything outside the scan region is background."""
    if not 0 <= j < plan.k:
        raise DataError(f"{plan.report_id} has {plan.k} frames; frame index {j} is out of range")
    size = plan.image_size
    probe = PROBES[plan.site]
    organ = Canvas(size, plan.shifts[j], probe, 0.0)
    ORGAN[plan.site](organ, plan.anat, plan.z[j])
    inside = gain_map(probe, size) > 0
    labels = np.where((organ.e > 0.5) & inside, LABEL_ORGAN, LABEL_BACKGROUND).astype(np.uint8)
    f = plan.finding
    if f is not None and f.scale[j] > 0:
        lesion = Canvas(size, plan.shifts[j], probe, 0.0)
        lobes = f.lobes if f.type == "nodule" else ()
        lesion.ellipse(f.cx, f.cy, f.rx * f.scale[j], f.ry * f.scale[j], 1.0, lobes=lobes)
        labels[(lesion.e > 0.5) & inside] = LABEL_LESION
    return labels
