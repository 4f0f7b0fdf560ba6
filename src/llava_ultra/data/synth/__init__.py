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

Package layout (each module imports only the ones above it): `vocab` (site geometry, finding mix,
locations, report phrases), `canvas` (drawing primitives, noise banks), `anatomy` (per-site
samplers and painters), `plan` (`SynthConfig`, `plan_report`), `render` (pixels, boxes, labels),
`text` (report records) and `dataset` (`generate`, files). The public names are re-exported here.
"""

from .dataset import SynthSummary, generate, write_png
from .plan import Finding, ReportPlan, SynthConfig, plan_report, report_id, split_of
from .render import (
    LABEL_BACKGROUND,
    LABEL_LESION,
    LABEL_NAMES,
    LABEL_ORGAN,
    finding_bbox,
    label_map,
    render_frame,
)
from .text import report_texts
from .vocab import FINDING_MIX, LOCATIONS, SPLITS, SYNTH_VERSION

__all__ = [
    "FINDING_MIX",
    "LABEL_BACKGROUND",
    "LABEL_LESION",
    "LABEL_NAMES",
    "LABEL_ORGAN",
    "LOCATIONS",
    "SPLITS",
    "SYNTH_VERSION",
    "Finding",
    "ReportPlan",
    "SynthConfig",
    "SynthSummary",
    "finding_bbox",
    "generate",
    "label_map",
    "plan_report",
    "render_frame",
    "report_id",
    "report_texts",
    "split_of",
    "write_png",
]
