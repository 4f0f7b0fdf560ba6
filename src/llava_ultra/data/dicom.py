"""DICOM ultrasound ingest: single-frame and cine files -> de-identified 8-bit PNG frames.

What it owns:
- `read_dicom`: open a file, refusing non-DICOM files and DICOM without pixel data (DataError
  naming the file and the fix).
- `decode_frames`: the selected frames as display-ready uint8, (n, H, W, 3) for colour or
  (n, H, W) for grey. YBR_FULL / YBR_FULL_422 (raw or JPEG) become RGB through pydicom's own
  colour conversion (`as_rgb=True`); PALETTE COLOR goes through `apply_color_lut`; MONOCHROME1/2
  get the modality rescale, then the first VOI window when the file has one (else a per-frame
  min-max stretch, unless the data already is unsigned 8-bit), MONOCHROME1 inverted.
- `deidentify_dataset`: a copy of the dataset de-identified in the spirit of the DICOM PS3.15
  Basic Application Level Confidentiality Profile: identifying attributes removed or emptied,
  PatientName -> ANONYMOUS, PatientID -> salted hash pseudonym, every DA/DT/TM/PN value emptied,
  free-text LT/ST/UT removed, private tags and overlays removed, and every non-standard UID
  (anything outside the 1.2.840.10008 root) replaced by a deterministic salted-hash UID under
  2.25. A `DeidLog` records what was done by tag keyword only, never by value.
- `ingest_dicom`: the batch command. Writes `images/<study>/<instance>_fNNNN.png`, one report
  skeleton per study in `reports.skeleton.jsonl` (text left empty for a person to fill, so
  `validate` flags a skeleton until it is filled), `logs/deid.jsonl`, and optionally
  de-identified DICOM copies in `dicom/<study>/<instance>.dcm` that hold exactly the written
  (banner-blanked) frames, uncompressed. Bad files are counted and listed; the rest go on.

Choices: the site is required (a hospital export has no machine-readable examination site we can
trust); a top banner (default 10% of rows) of every frame is zeroed before anything is written,
because ultrasound machines burn the patient name into the pixels; source paths never appear in
any written file (hospital file names often hold patient names), only on the console. Hashing
with an empty salt is deterministic but lets anyone holding the original IDs/UIDs link records;
pass a secret `--salt` for data that leaves the hospital.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, iter_pixels

from ..errors import ConfigError, DataError
from ..sites import check_site
from .reports import LANGUAGES

DEFAULT_BANNER_FRACTION = 0.10
STANDARD_UID_ROOT = "1.2.840.10008."  # DICOM-defined UIDs (SOP classes, transfer syntaxes...)
SKELETON_NAME = "reports.skeleton.jsonl"
DEID_LOG_NAME = "logs/deid.jsonl"

# Attributes removed outright (identifying, or free text that may name people).
REMOVE_KEYWORDS = frozenset(
    {
        "PatientAddress", "PatientBirthTime", "PatientBirthName", "PatientMotherBirthName",
        "OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames", "PatientTelephoneNumbers",
        "PatientAge", "PatientSize", "PatientWeight", "EthnicGroup", "Occupation", "MilitaryRank",
        "BranchOfService", "MedicalRecordLocator", "PatientInsurancePlanCodeSequence",
        "PatientReligiousPreference", "CountryOfResidence", "RegionOfResidence", "PatientState",
        "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "AdmissionID",
        "IssuerOfAdmissionIDSequence", "CurrentPatientLocation", "PatientInstitutionResidence",
        "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "InstitutionCodeSequence",
        "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers",
        "ReferringPhysicianIdentificationSequence", "PhysiciansOfRecord",
        "PhysiciansOfRecordIdentificationSequence", "PerformingPhysicianName",
        "PerformingPhysicianIdentificationSequence", "NameOfPhysiciansReadingStudy",
        "PhysiciansReadingStudyIdentificationSequence", "OperatorsName", "OperatorIdentificationSequence",
        "RequestingPhysician", "RequestingService", "StationName", "DeviceSerialNumber",
        "StudyDescription", "SeriesDescription", "ProtocolName", "RequestAttributesSequence",
        "ReferencedPatientSequence", "PerformedProcedureStepID", "PerformedProcedureStepDescription",
        "ScheduledProcedureStepID", "RequestedProcedureID", "RequestedProcedureDescription",
        "ResponsiblePerson", "ResponsibleOrganization", "PerformedLocation", "ScheduledStationName",
        "PerformedStationName", "InstanceCreatorUID",
    }
)  # fmt: skip
# Type 2 attributes kept present but emptied.
EMPTY_KEYWORDS = frozenset({"PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID"})
EMPTY_VRS = frozenset({"DA", "DT", "TM", "PN"})  # every date, time and person name
REMOVE_VRS = frozenset({"LT", "ST", "UT"})  # free text
FILE_META_REMOVE = (
    "SourceApplicationEntityTitle",
    "SendingApplicationEntityTitle",
    "ReceivingApplicationEntityTitle",
    "PrivateInformationCreatorUID",
    "PrivateInformation",
)


# --------------------------------------------------------------------------------- reading


def read_dicom(path: str | os.PathLike[str]) -> Dataset:
    """Open a DICOM file with pixel data; DataError naming the file and the fix otherwise."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist or is not a file; check the path")
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        raise DataError(
            f"{path} is not a DICOM file (no 'DICM' marker after the 128-byte preamble); "
            "pass DICOM files only, or export the study from the PACS as DICOM Part 10 files"
        ) from None
    except Exception as exc:  # pydicom raises many types on truncated/corrupt input
        raise DataError(f"{path} could not be parsed as DICOM ({exc}); re-export the file") from None
    if "PixelData" not in ds:
        sop = ds.get("SOPClassUID")
        what = f" ({sop.name})" if sop is not None and hasattr(sop, "name") else ""
        raise DataError(
            f"{path} is DICOM without pixel data{what}, e.g. a structured report or DICOMDIR; "
            "pass image files only (ultrasound single-frame or cine)"
        )
    return ds


def frame_indices(n_frames: int, every: int = 1, max_frames: int | None = None) -> list[int]:
    """Indices of the frames to keep: every `every`-th frame, at most `max_frames` of them."""
    if every < 1:
        raise ConfigError(f"every={every}: must be >= 1 (1 keeps every frame)")
    if max_frames is not None and max_frames < 1:
        raise ConfigError(f"max_frames={max_frames}: must be >= 1, or left out for all frames")
    idx = list(range(0, n_frames, every))
    return idx if max_frames is None else idx[:max_frames]


def _frame_count(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        return 1


def _first(value: Any) -> float:
    """First value of a possibly multi-valued DS element."""
    if isinstance(value, MultiValue | list | tuple):
        value = value[0]
    return float(value)


def _grey_to_uint8(frame: np.ndarray, ds: Dataset) -> np.ndarray:
    """Modality rescale, then the first VOI window (or a min-max stretch), then MONOCHROME1 flip."""
    unsigned8 = int(ds.get("BitsStored", 8)) <= 8 and int(ds.get("PixelRepresentation", 0)) == 0
    rescaled = "RescaleSlope" in ds or "RescaleIntercept" in ds or "ModalityLUTSequence" in ds
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        x = apply_modality_lut(frame, ds).astype(np.float64)
        c, w = _first(ds.WindowCenter), max(_first(ds.WindowWidth), 1.0)
        out = np.clip((x - (c - 0.5)) / max(w - 1.0, 1.0) + 0.5, 0.0, 1.0) * 255.0
    elif unsigned8 and not rescaled:
        out = frame.astype(np.float64)
    else:
        x = apply_modality_lut(frame, ds).astype(np.float64)
        lo, hi = float(x.min()), float(x.max())
        out = (x - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(x)
    out = np.rint(out).clip(0, 255).astype(np.uint8)
    return 255 - out if ds.PhotometricInterpretation == "MONOCHROME1" else out


def _colour_to_uint8(frame: np.ndarray, bits: int) -> np.ndarray:
    if frame.dtype == np.uint8:
        return frame
    return (frame.astype(np.uint32) >> max(bits - 8, 0)).clip(0, 255).astype(np.uint8)


def decode_frames(ds: Dataset, indices: Sequence[int], source: str = "") -> np.ndarray:
    """Decode the frames at `indices` to uint8: (n, H, W, 3) colour or (n, H, W) grey."""
    pi = str(ds.get("PhotometricInterpretation", "")).strip()
    where = source or "dataset"
    supported = ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422")
    if pi not in supported and not pi.startswith("YBR_"):
        raise DataError(
            f"{where}: photometric interpretation {pi!r} is not supported; supported: {', '.join(supported)} "
            "(convert the file with e.g. dcmconv/gdcmconv first)"
        )
    try:
        raw = list(iter_pixels(ds, indices=list(indices), as_rgb=True))
    except Exception as exc:  # missing codec plugins and corrupt pixel data surface here
        ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        ts_name = getattr(ts, "name", str(ts))
        raise DataError(
            f"{where}: pixel data could not be decoded ({exc}); transfer syntax {ts_name}. Install a "
            "decoder plugin (e.g. pip install pylibjpeg pylibjpeg-openjpeg pylibjpeg-libjpeg) or "
            "decompress the file first (dcmdjpeg / gdcmconv --raw)"
        ) from None
    frames = []
    for frame in raw:
        if pi.startswith("MONOCHROME"):
            frames.append(_grey_to_uint8(frame, ds))
        elif pi == "PALETTE COLOR":
            lut_bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
            frames.append(_colour_to_uint8(apply_color_lut(frame, ds), lut_bits))
        else:  # RGB, or YBR already converted to RGB by the decoder (as_rgb=True)
            frames.append(_colour_to_uint8(frame, int(ds.get("BitsStored", 8))))
    if not frames:
        raise DataError(f"{where}: no frames selected; lower --every or raise --max-frames")
    return np.stack(frames)


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


# ------------------------------------------------------------------------- de-identification


def hashed_uid(uid: str, salt: str = "") -> str:
    """Deterministic replacement UID: 2.25.<128-bit integer of sha256(salt, uid)>."""
    digest = hashlib.sha256(f"{salt}\x00{uid}".encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def _pseudonym(value: str, salt: str, prefix: str) -> str:
    return prefix + hashlib.sha256(f"{salt}\x00{value}".encode()).hexdigest()[:12]


@dataclass
class DeidLog:
    """What `deidentify_dataset` did, by tag keyword only (values are never recorded)."""

    removed: set[str] = field(default_factory=set)
    emptied: set[str] = field(default_factory=set)
    replaced: set[str] = field(default_factory=set)
    private_tags_removed: int = 0
    overlay_elements_removed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "removed": sorted(self.removed),
            "emptied": sorted(self.emptied),
            "replaced": sorted(self.replaced),
            "private_tags_removed": self.private_tags_removed,
            "overlay_elements_removed": self.overlay_elements_removed,
        }


def _is_overlay_or_curve(tag: Any) -> bool:
    group = tag.group
    return (0x6000 <= group <= 0x60FF or 0x5000 <= group <= 0x50FF) and group % 2 == 0


def _clean(ds: Dataset, salt: str, log: DeidLog) -> None:
    for elem in list(ds):
        tag, kw, vr = elem.tag, elem.keyword, elem.VR
        if tag.is_private:
            del ds[tag]
            log.private_tags_removed += 1
        elif _is_overlay_or_curve(tag):
            del ds[tag]
            log.overlay_elements_removed += 1
        elif kw == "PatientName":
            elem.value = "ANONYMOUS"
            log.replaced.add(kw)
        elif kw == "PatientID":
            elem.value = _pseudonym(str(elem.value), salt, "ANON-") if elem.value else ""
            log.replaced.add(kw)
        elif kw in REMOVE_KEYWORDS or vr in REMOVE_VRS or vr == "UN":
            del ds[tag]
            log.removed.add(kw or str(tag))
        elif kw in EMPTY_KEYWORDS or vr in EMPTY_VRS:
            if elem.value not in (None, ""):
                elem.value = ""
                log.emptied.add(kw or str(tag))
        elif vr == "UI" and elem.value:
            values = elem.value if elem.VM > 1 else [elem.value]
            new = [v if str(v).startswith(STANDARD_UID_ROOT) else hashed_uid(str(v), salt) for v in values]
            if new != [str(v) for v in values]:
                elem.value = new if elem.VM > 1 else new[0]
                log.replaced.add(kw or str(tag))
        elif vr == "SQ":
            for item in elem.value:
                _clean(item, salt, log)


def deidentify_dataset(ds: Dataset, salt: str = "", log: DeidLog | None = None) -> Dataset:
    """Return a de-identified copy of `ds` (the input is not modified); fill `log` if given."""
    log = log if log is not None else DeidLog()
    out = copy.deepcopy(ds)
    _clean(out, salt, log)
    meta = getattr(out, "file_meta", None)
    if meta is not None:
        for kw in FILE_META_REMOVE:
            if kw in meta:
                del meta[kw]
                log.removed.add(kw)
        uid = str(meta.get("MediaStorageSOPInstanceUID") or "")
        if uid and not uid.startswith(STANDARD_UID_ROOT):
            meta.MediaStorageSOPInstanceUID = hashed_uid(uid, salt)
            log.replaced.add("MediaStorageSOPInstanceUID")
    out.PatientIdentityRemoved = "YES"
    out.DeidentificationMethod = "llava-ultra: PS3.15 basic profile (spirit), UIDs hashed"  # LO: <= 64
    return out


# ----------------------------------------------------------------------------------- ingest


@dataclass(frozen=True)
class IngestOptions:
    """Settings of `ingest_dicom`.

    Attributes:
        site: examination site key for the report skeletons (one of `llava_ultra.sites.SITES`).
        language: language the report text will be written in ('zh' or 'en').
        banner_rows / banner_fraction: top band blanked in every frame (at most one given;
            neither means 10% of the rows; 0 disables).
        every: keep every N-th frame of a cine loop.
        max_frames: keep at most this many frames per file (after `every`).
        write_dicom: also write de-identified DICOM copies holding the written frames.
        salt: secret mixed into hashed UIDs and pseudonyms; set it for data that leaves the site.
    """

    site: str
    language: str = "zh"
    banner_rows: int | None = None
    banner_fraction: float | None = None
    every: int = 1
    max_frames: int | None = None
    write_dicom: bool = False
    salt: str = ""

    def __post_init__(self) -> None:
        check_site(self.site)
        if self.language not in LANGUAGES:
            raise ConfigError(f"language {self.language!r} is not supported; use 'zh' or 'en'")
        banner_height(1000, self.banner_rows, self.banner_fraction)  # validates the pair
        frame_indices(1, self.every, self.max_frames)  # validates every / max_frames


@dataclass
class IngestedFile:
    """One DICOM file turned into frames (all paths relative to the output folder)."""

    study: str
    instance: str
    order: tuple[int, int]
    images: list[str]
    log: dict[str, Any]
    meta: dict[str, Any]


@dataclass
class IngestSummary:
    """Outcome of a batch: successes, failures (input path, message), what was written."""

    out: Path
    files: list[IngestedFile] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    studies: int = 0

    @property
    def ok(self) -> bool:
        return not self.failures

    def render(self) -> str:
        frames = sum(len(f.images) for f in self.files)
        lines = [
            f"ingested {len(self.files)} DICOM file(s) into {self.studies} study skeleton(s), "
            f"{frames} frame(s) -> {self.out}",
            f"failed: {len(self.failures)}",
        ]
        lines += [f"  {msg}" if path in msg else f"  {path}: {msg}" for path, msg in self.failures]
        if self.files:
            lines.append(
                f"next: fill findings/diagnosis in {self.out / SKELETON_NAME}, "
                f"then run `llava-ultra validate {self.out / SKELETON_NAME}`"
            )
        return "\n".join(lines)


def _save_png(frame: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(frame, mode="RGB" if frame.ndim == 3 else "L").save(path, format="PNG")


def _write_deid_dicom(ds: Dataset, frames: np.ndarray, every: int, path: Path) -> None:
    """Store the written frames (uncompressed, 8-bit, display-ready) in the de-identified copy."""
    for elem in list(ds):
        kw = elem.keyword
        if "PaletteColorLookupTable" in kw or kw in (
            "WindowCenter", "WindowWidth", "WindowCenterWidthExplanation", "VOILUTSequence",
            "RescaleSlope", "RescaleIntercept", "RescaleType", "ModalityLUTSequence", "FrameTimeVector",
        ):  # fmt: skip
            del ds[elem.tag]
    multi = "NumberOfFrames" in ds
    pi = "RGB" if frames.ndim == 4 else "MONOCHROME2"
    ds.set_pixel_data(frames if len(frames) > 1 else frames[0], pi, 8, generate_instance_uid=False)
    if multi:
        ds.NumberOfFrames = len(frames)
    if every > 1 and ds.get("FrameTime") is not None:
        ds.FrameTime = f"{float(ds.FrameTime) * every:.3f}"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def ingest_file(
    path: str | os.PathLike[str], out: str | os.PathLike[str], opts: IngestOptions
) -> IngestedFile:
    """Ingest one DICOM file: decode, blank the banner, write PNGs (and a de-identified copy)."""
    path, out = Path(path), Path(out)
    ds = read_dicom(path)
    n = _frame_count(ds)
    frames = decode_frames(ds, frame_indices(n, opts.every, opts.max_frames), source=str(path))
    rows = banner_height(frames.shape[1], opts.banner_rows, opts.banner_fraction)
    frames = blank_banner(frames, rows)

    log = DeidLog()
    clean = deidentify_dataset(ds, salt=opts.salt, log=log)
    instance_uid = str(clean.get("SOPInstanceUID") or "")
    instance = (
        "i"
        + hashlib.sha256(
            (instance_uid or hashlib.sha256(path.read_bytes()).hexdigest()).encode()
        ).hexdigest()[:12]
    )
    study_uid = str(clean.get("StudyInstanceUID") or "")
    study = "s" + hashlib.sha256(study_uid.encode()).hexdigest()[:12] if study_uid else "s" + instance[1:]

    images = []
    for j, frame in enumerate(frames):
        rel = f"images/{study}/{instance}_f{j:04d}.png"
        _save_png(frame, out / rel)
        images.append(rel)
    if opts.write_dicom:
        _write_deid_dicom(clean, frames, opts.every, out / "dicom" / study / f"{instance}.dcm")

    def _int(key: str) -> int:
        try:
            return int(ds.get(key) or 0)
        except (TypeError, ValueError):
            return 0

    meta = {
        "modality": str(ds.get("Modality", "")),
        "photometric": str(ds.get("PhotometricInterpretation", "")),
        "rows": int(frames.shape[1]),
        "columns": int(frames.shape[2]),
        "frames_in_file": n,
        "patient": str(clean.get("PatientID", "")),
    }
    entry = {
        "study": study,
        "instance": instance,
        **log.to_dict(),
        "banner_rows": rows,
        "burned_in_annotation": str(ds.get("BurnedInAnnotation", "")),
        "frames_written": len(images),
    }
    return IngestedFile(study, instance, (_int("SeriesNumber"), _int("InstanceNumber")), images, entry, meta)


def _expand(inputs: Iterable[str | os.PathLike[str]]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        files.extend(sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p])
    return files


def ingest_dicom(
    inputs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], opts: IngestOptions
) -> IngestSummary:
    """Ingest DICOM files and folders (searched recursively) into `out`; continue past bad files."""
    out = Path(out)
    skeleton = out / SKELETON_NAME
    if skeleton.exists():
        raise DataError(
            f"{skeleton} already exists and may hold filled-in reports; choose a new --out folder "
            "or move that file away"
        )
    files = _expand(inputs)
    if not files:
        raise DataError("no input files found; pass DICOM files or folders that contain them")
    summary = IngestSummary(out=out)
    for path in files:
        try:
            summary.files.append(ingest_file(path, out, opts))
        except DataError as exc:
            summary.failures.append((str(path), str(exc)))

    by_study: dict[str, list[IngestedFile]] = {}
    for f in summary.files:
        by_study.setdefault(f.study, []).append(f)
    summary.studies = len(by_study)
    if summary.files:
        (out / DEID_LOG_NAME).parent.mkdir(parents=True, exist_ok=True)
        with (out / DEID_LOG_NAME).open("w", encoding="utf-8") as fh:
            for f in summary.files:
                fh.write(json.dumps(f.log, ensure_ascii=False) + "\n")
        with skeleton.open("w", encoding="utf-8") as fh:
            for study, members in by_study.items():
                members.sort(key=lambda f: f.order)
                record = {
                    "id": f"us-{study[1:]}",
                    "site": opts.site,
                    "history": "",
                    "findings": "",
                    "diagnosis": "",
                    "language": opts.language,
                    "images": [img for f in members for img in f.images],
                    "valid": None,
                    "meta": {"source": "dicom", "instances": [f.meta for f in members]},
                }
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    return summary
