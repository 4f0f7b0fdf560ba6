"""Pixel de-identification for ultrasound frames: keep the image regions, blank burned-in text.

What it owns: `plan_pixel_cleaning` decides, per file, which pixels survive, and returns the
decision as a plain dict for the de-identification log; `apply_plan` blanks the rest.

Decision order:
1. The file has a Sequence of Ultrasound Regions (0018,6011): the union of its image regions
   (spatial format 2D, M-mode, spectral, waveform; not "graphics" or "none"), clipped to the frame,
   is kept and every other pixel is set to 0. The machine draws the patient name, ID, date and
   settings outside those boxes. When any region does not fit the stored frame, the regions
   describe another frame (a resized or cropped export; pydicom's Philips and SonoSite files are
   such) and none is trusted: step 2 applies, and the log says why.
2. Otherwise: the top band (`banner_rows` / `banner_fraction`, default 10 %) is blanked, then every
   box the burned-in text detector finds, anywhere in the frame.
3. In both cases, the user's `masks` (pixel boxes x0,y0,x1,y1) are blanked as well.

The text detector looks for what a machine's overlay text is and tissue is not: strokes that are
bright, in one flat colour, on a flat dark background, with a sharp edge (a pixel at least
`min_contrast` brighter than its 5x5 neighbourhood minimum). Stroke pixels are joined horizontally
into words and lines; a component is text when its height is that of a text line (5 to 48 px) and
most of its stroke pixels share one value and most of its background does too. Speckle fails the
last two tests (its values spread). No OCR: none installs here as a CPU package without model
downloads, and detection only has to find text, not read it. Boxes are unioned over up to 8
frames of a cine loop and blanked in every frame.

Refusal: a file whose Burned In Annotation (0028,0301) is YES and that has neither ultrasound
regions nor a user mask is refused (the caller turns it into a per-file error) unless
`allow_burned_in` is set; then the band and the detector are relied on, and the log says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from scipy import ndimage

from ..errors import ConfigError, DataError

DEFAULT_BANNER_FRACTION = 0.10
# RegionSpatialFormat (0018,6012): 0 none, 1 2D, 2 M-mode, 3 spectral, 4 waveform, 5 graphics.
IMAGE_SPATIAL_FORMATS = (1, 2, 3, 4)
MAX_DETECTION_FRAMES = 8

Box = tuple[int, int, int, int]  # x0, y0, x1, y1, inclusive pixel coordinates


def parse_mask(text: str) -> Box:
    """'x0,y0,x1,y1' (inclusive pixel box) -> a tuple; ConfigError naming the format otherwise."""
    return check_mask(tuple(v.strip() for v in text.split(",")))


def check_mask(box: Sequence[Any]) -> Box:
    """A pixel box (x0, y0, x1, y1, inclusive; integers or their text) checked and as ints."""
    text = ",".join(str(v) for v in box)
    try:
        if len(box) != 4 or any(isinstance(v, bool | float) for v in box):
            raise ValueError
        x0, y0, x1, y1 = (int(v) for v in box)
    except (TypeError, ValueError):
        raise ConfigError(
            f"mask {text!r} is not x0,y0,x1,y1; give four integers, e.g. --mask 0,0,799,59"
        ) from None
    if min(x0, y0) < 0 or x1 < x0 or y1 < y0:
        raise ConfigError(f"mask {text!r}: need 0 <= x0 <= x1 and 0 <= y0 <= y1 (inclusive pixel box)")
    return x0, y0, x1, y1


def banner_height(rows: int, banner_rows: int | None = None, banner_fraction: float | None = None) -> int:
    """Rows of the top banner to blank: explicit rows, else a fraction of the height (default 10%)."""
    if banner_rows is not None and banner_fraction is not None:
        raise ConfigError("give either banner_rows or banner_fraction, not both")
    if banner_rows is not None:
        if banner_rows < 0:
            raise ConfigError(f"banner_rows={banner_rows}: must be >= 0 (0 disables blanking)")
        return min(banner_rows, rows)
    fraction = DEFAULT_BANNER_FRACTION if banner_fraction is None else banner_fraction
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"banner_fraction={fraction}: must be in [0, 1] (0 disables blanking)")
    return min(rows, int(np.ceil(rows * fraction)))


def blank_banner(frames: np.ndarray, rows: int) -> np.ndarray:
    """Copy of `frames` (n, H, W[, C]) with the top `rows` rows set to 0."""
    out = frames.copy()
    out[:, :rows] = 0
    return out


def ultrasound_regions(ds: Dataset, rows: int, cols: int) -> tuple[list[Box], list[str]]:
    """Image regions of the Sequence of Ultrasound Regions clipped to the frame, and notes."""
    boxes: list[Box] = []
    notes: list[str] = []
    for i, item in enumerate(ds.get("SequenceOfUltrasoundRegions") or []):
        try:
            fmt = int(item.get("RegionSpatialFormat", 0))
            x0, y0 = int(item.RegionLocationMinX0), int(item.RegionLocationMinY0)
            x1, y1 = int(item.RegionLocationMaxX1), int(item.RegionLocationMaxY1)
        except (AttributeError, TypeError, ValueError):
            notes.append(f"region {i}: no usable RegionLocation values, ignored")
            continue
        if fmt not in IMAGE_SPATIAL_FORMATS:
            notes.append(f"region {i}: spatial format {fmt} is not an image region, blanked")
            continue
        if min(x0, y0) < 0 or x1 >= cols or y1 >= rows or x0 > x1 or y0 > y1:
            notes.append(
                f"region {i}: ({x0},{y0})-({x1},{y1}) does not fit the stored {cols}x{rows} frame (the "
                "regions describe another frame size, e.g. a resized or cropped export): regions not "
                "trusted, falling back to band and text detection"
            )
            return [], notes
        boxes.append((x0, y0, x1, y1))
    return boxes, notes


def _luminance(frame: np.ndarray) -> np.ndarray:
    """Brightest channel (coloured overlay text counts as bright), int16."""
    g = frame.max(axis=-1) if frame.ndim == 3 else frame
    return g.astype(np.int16)


def _flat_share(values: np.ndarray, tolerance: int) -> float:
    """Share of `values` within `tolerance` of their most common value."""
    if values.size == 0:
        return 0.0
    counts = np.bincount(values.astype(np.int64).clip(0, 255), minlength=256)
    mode = int(counts.argmax())
    return float(counts[max(mode - tolerance, 0) : mode + tolerance + 1].sum()) / values.size


def detect_text_boxes(
    frames: np.ndarray,
    *,
    min_contrast: int = 50,
    min_brightness: int = 60,
    margin: int = 2,
) -> list[Box]:
    """Boxes (x0, y0, x1, y1) of burned-in text lines found in up to 8 of the frames."""
    n, rows, cols = frames.shape[:3]
    picks = np.unique(np.linspace(0, n - 1, min(n, MAX_DETECTION_FRAMES)).round().astype(int))
    max_height = 48
    boxes: list[Box] = []
    for k in picks:
        g = _luminance(frames[k])
        floor = ndimage.minimum_filter(g, size=5)
        strokes = (g >= min_brightness) & (g - floor >= min_contrast)
        if not strokes.any():
            continue
        words = ndimage.binary_dilation(strokes, structure=np.ones((1, 9), dtype=bool))  # one text line
        labels, _ = ndimage.label(words)
        for idx, sl in enumerate(ndimage.find_objects(labels), start=1):
            if sl is None:
                continue
            h, w = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
            if not 4 <= h <= max_height or w < 4:
                continue
            inside = labels[sl] == idx
            stroke = strokes[sl] & inside
            if stroke.sum() < 6:
                continue
            # Background: every non-stroke pixel of the box grown by 3 px (text sits on a flat
            # backdrop; a speckle blob inside tissue is surrounded by more speckle).
            y0, y1 = max(sl[0].start - 3, 0), min(sl[0].stop + 3, rows)
            x0, x1 = max(sl[1].start - 3, 0), min(sl[1].stop + 3, cols)
            around = g[y0:y1, x0:x1]
            near_stroke = ndimage.binary_dilation(strokes[y0:y1, x0:x1], iterations=1)
            flat_bg = _flat_share(around[~near_stroke], 12)
            if flat_bg < 0.7 or (flat_bg < 0.85 and _flat_share(g[sl][stroke], 24) < 0.5):
                continue
            boxes.append(
                (
                    max(sl[1].start - margin, 0),
                    max(sl[0].start - margin, 0),
                    min(sl[1].stop - 1 + margin, cols - 1),
                    min(sl[0].stop - 1 + margin, rows - 1),
                )
            )
    return _merge(boxes)


def _merge(boxes: list[Box]) -> list[Box]:
    """Drop boxes contained in another (the same text found in several frames)."""
    out: list[Box] = []
    for b in sorted(set(boxes), key=lambda b: -(b[2] - b[0] + 1) * (b[3] - b[1] + 1)):
        if not any(o[0] <= b[0] and o[1] <= b[1] and o[2] >= b[2] and o[3] >= b[3] for o in out):
            out.append(b)
    return sorted(out, key=lambda b: (b[1], b[0]))


@dataclass
class PixelPlan:
    """Which pixels survive: `keep` boxes (regions) or everything but `blank` boxes and the band."""

    method: str  # "ultrasound_regions" or "band_and_text_detection"
    keep: list[Box] = field(default_factory=list)
    banner_rows: int = 0
    blank: list[Box] = field(default_factory=list)
    detected: list[Box] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "kept_regions": [list(b) for b in self.keep],
            "banner_rows": self.banner_rows,
            "masks": [list(b) for b in self.blank],
            "text_boxes_blanked": [list(b) for b in self.detected],
            "notes": list(self.notes),
        }


def plan_pixel_cleaning(
    ds: Dataset,
    frames: np.ndarray,
    *,
    banner_rows: int | None = None,
    banner_fraction: float | None = None,
    masks: tuple[Box, ...] = (),
    detect_text: bool = True,
    allow_burned_in: bool = False,
    source: str = "",
) -> PixelPlan:
    """Decide how to clean `frames` (n, H, W[, C]) of `ds`; DataError for a refused file."""
    rows, cols = frames.shape[1:3]
    regions, notes = ultrasound_regions(ds, rows, cols)
    burned = str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES"
    if regions:
        plan = PixelPlan("ultrasound_regions", keep=regions, blank=list(masks), notes=notes)
        notes.append("kept only the image regions of the Sequence of Ultrasound Regions")
        return plan
    explicit = bool(masks) or banner_rows is not None or banner_fraction is not None
    if burned and not explicit and not allow_burned_in:
        raise DataError(
            f"{source or 'dataset'}: Burned In Annotation is YES (text is burned into the pixels) and the "
            "file has no Sequence of Ultrasound Regions to keep; pass --mask x0,y0,x1,y1 (repeatable) "
            "or --banner-rows N covering the text, or --allow-burned-in to rely on the default top band "
            "and text detection"
        )
    if burned:
        notes.append(
            "Burned In Annotation is YES: relying on "
            + ("the given band/masks" if explicit else "--allow-burned-in (default band)")
            + (" and text detection" if detect_text else "")
        )
    plan = PixelPlan(
        "band_and_text_detection",
        banner_rows=banner_height(rows, banner_rows, banner_fraction),
        blank=list(masks),
        notes=notes,
    )
    if detect_text:
        plan.detected = detect_text_boxes(frames)
    else:
        notes.append("text detection switched off (--no-detect-text)")
    return plan


def apply_plan(frames: np.ndarray, plan: PixelPlan) -> np.ndarray:
    """Copy of `frames` with everything the plan does not keep set to 0."""
    out = frames.copy()
    if plan.keep:
        keep = np.zeros(frames.shape[1:3], dtype=bool)
        for x0, y0, x1, y1 in plan.keep:
            keep[y0 : y1 + 1, x0 : x1 + 1] = True
        out[:, ~keep] = 0
    out[:, : plan.banner_rows] = 0
    for x0, y0, x1, y1 in [*plan.blank, *plan.detected]:
        out[:, y0 : y1 + 1, x0 : x1 + 1] = 0
    return out
