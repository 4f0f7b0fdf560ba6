"""SynthUS report text: the zh and en records of a planned report.

Both records share id, frames, validity and meta; sentences come from the vocabulary tables with
the plan's location and size filled in, so text and pixels always agree.
"""

from __future__ import annotations

from typing import Any

from ...sites import SITES
from ..reports import Report
from .plan import ReportPlan
from .render import finding_bbox
from .vocab import DIAGNOSIS, LOCATIONS, NO_LESION, NO_LESION_DEFAULT, SYNTH_VERSION


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
            closing = NO_LESION.get(plan.site, NO_LESION_DEFAULT)[li]
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
            diagnosis = DIAGNOSIS[(plan.site, f.type)][li].format(**fmt)
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
