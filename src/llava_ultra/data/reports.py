"""Hospital report records: one report, k images.

A `Report` is the unit a hospital exports: examination site, clinical history, findings
(超声所见), diagnosis (超声诊断), the language the text is written in, and the paths of the k
frames captured for it. Optional per-frame validity labels (does the frame show the finding?)
exist for synthetic data and for audited subsets; they are for evaluation only.

Image paths are stored relative to the dataset root (the folder of the JSONL/CSV file) so that a
dataset can be moved as a whole; `resolve_image` refuses paths that escape the root.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..sites import check_site

LANGUAGES = ("zh", "en")


@dataclass
class Report:
    """One examination report with its k image frames.

    Attributes:
        id: unique identifier of the report within its dataset.
        site: examination site key, one of `llava_ultra.sites.SITES`.
        history: clinical history / reason for examination (may be empty).
        findings: the findings text (超声所见).
        diagnosis: the diagnosis / impression text (超声诊断).
        language: 'zh' or 'en'.
        images: frame paths relative to the dataset root, in acquisition order.
        valid: optional per-frame labels, True where the frame shows the finding.
        meta: free-form structured extras (e.g. SynthUS finding type, size, location).
    """

    id: str
    site: str
    history: str
    findings: str
    diagnosis: str
    language: str
    images: list[str]
    valid: list[bool] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not str(self.id).strip():
            raise DataError("report has an empty id; give every report a unique non-empty id")
        check_site(self.site)
        if self.language not in LANGUAGES:
            raise DataError(f"report {self.id}: unknown language {self.language!r}; use 'zh' or 'en'")
        if not self.findings.strip() and not self.diagnosis.strip():
            raise DataError(
                f"report {self.id} is empty: both findings and diagnosis are blank; fill in at least one"
            )
        if not self.images:
            raise DataError(f"report {self.id} has no images; list at least one frame path")
        if self.valid is not None and len(self.valid) != len(self.images):
            raise DataError(
                f"report {self.id}: {len(self.valid)} validity labels for {len(self.images)} images; "
                "give one label per image or none"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
