"""DICOM ultrasound ingest: single-frame and cine files -> de-identified 8-bit PNG frames.

What it owns:
- `read_dicom`: open a file, refusing non-DICOM files, truncated files (named as truncated, with
  the element where the file ends) and DICOM without pixel data (DataError naming the file and
  the fix).
- `decode_frames`: the selected frames as display-ready uint8, (n, H, W, 3) for colour or
  (n, H, W) for grey. YBR_FULL / YBR_FULL_422 (raw or JPEG) become RGB through pydicom's own
  colour conversion (`as_rgb=True`); PALETTE COLOR goes through `apply_color_lut`; MONOCHROME1/2
  get the modality rescale, then the first VOI window when the file has one (else a per-frame
  min-max stretch, unless the data already is unsigned 8-bit), MONOCHROME1 inverted.
- `deidentify_dataset`: a copy of the dataset under the DICOM PS3.15 Basic Application Level
  Confidentiality Profile: every attribute of Table E.1-1 (`deid_profile.ACTIONS`, generated from
  the standard, not typed here) gets its action D/Z/X/U, recursively through sequences; private
  attributes, overlays, curves and icon images are removed; UIDs and the patient ID become keyed
  HMAC values (`pseudonym.PseudonymKey`). Beyond the table, as a safety net, attributes it does
  not list lose free text (LT/ST/UT/UN), person names and dates, and their non-standard UIDs are
  keyed. Option: Retain Longitudinal Temporal Information with Full Dates (`retain_dates`). The
  output records Patient Identity Removed, De-identification Method and its Code Sequence. A
  `DeidLog` records what was done by tag keyword only, never by value.
- `ingest_dicom`: the batch command. Writes `images/<study>/<instance>_fNNNN.png` (pixels
  cleaned by `pixels.py`: ultrasound regions kept, or band + burned-in text blanked), one report
  skeleton per study in `reports.skeleton.jsonl` (text left empty for a person to fill, so
  `validate` flags a skeleton until it is filled), `logs/deid.jsonl` (every header and pixel
  decision per file), and optionally de-identified DICOM copies in `dicom/<study>/<instance>.dcm`
  holding exactly the written frames, uncompressed, explicit VR little endian (big-endian input
  is re-encoded). Anything that fails for one file (not DICOM, truncated, undecodable, refused
  for burned-in text, a SOPInstanceUID already ingested in this batch, a write error) is one
  failure line; the batch goes on.

Choices: the site is required (a hospital export has no machine-readable examination site we can
trust); source paths never appear in any written file (hospital file names often hold patient
names), only on the console; study/instance folder and file names are hashes of keyed UIDs; the
pseudonym key never goes into the output folder (a key file inside it is refused).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import warnings
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
from pydicom.sequence import Sequence as PydicomSequence
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from ..errors import ConfigError, DataError
from ..sites import check_site
from .deid_profile import action_for, simple_action
from .pixels import Box, apply_plan, banner_height, blank_banner, check_mask, plan_pixel_cleaning
from .pseudonym import PseudonymKey, default_key_path
from .reports import LANGUAGES

__all__ = [
    "DeidLog",
    "IngestOptions",
    "IngestSummary",
    "banner_height",
    "blank_banner",
    "decode_frames",
    "deidentify_dataset",
    "frame_indices",
    "ingest_dicom",
    "ingest_file",
    "read_dicom",
]

STANDARD_UID_ROOT = "1.2.840.10008."  # DICOM-defined UIDs (SOP classes, transfer syntaxes...)
SKELETON_NAME = "reports.skeleton.jsonl"
DEID_LOG_NAME = "logs/deid.jsonl"

EMPTY_VRS = frozenset({"DA", "DT", "TM", "PN"})  # safety net: dates and names the table misses
REMOVE_VRS = frozenset({"LT", "ST", "UT"})  # safety net: free text the table misses
FILE_META_REMOVE = (
    "SourceApplicationEntityTitle",
    "SendingApplicationEntityTitle",
    "ReceivingApplicationEntityTitle",
    "PrivateInformationCreatorUID",
    "PrivateInformation",
)


# --------------------------------------------------------------------------------- reading


def _truncation(path: Path, ds: Dataset) -> str | None:
    """Why `ds` (read from `path`) is truncated, or None. pydicom reads a short file silently."""
    if len(ds) == 0:
        return "the file ends before its first data element"
    ts = getattr(getattr(ds, "file_meta", None), "get", lambda _k: None)("TransferSyntaxUID")
    deflated = ts is not None and getattr(ts, "is_deflated", False)
    last = ds.get_item(max(ds.keys()))
    length = getattr(last, "length", None)
    tell = getattr(last, "value_tell", None)
    size = path.stat().st_size
    # Offsets of a deflated file refer to the inflated stream, not to the file on disk.
    if (
        not deflated
        and tell is not None
        and length is not None
        and length != 0xFFFFFFFF
        and tell + length > size
    ):
        name = pydicom.datadict.keyword_for_tag(last.tag) or str(last.tag)
        return f"the file ends inside {name} {last.tag} ({size - tell} of {length} bytes)"
    if "PixelData" in ds and ts is not None and not getattr(ts, "is_encapsulated", True):
        try:
            bits = int(ds.BitsAllocated)
            need = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * _frame_count(ds)
        except (AttributeError, TypeError, ValueError):
            return None
        need = (need * bits + 7) // 8
        have = len(ds.PixelData or b"")
        if have < need:
            return f"PixelData holds {have} of the {need} bytes its Rows/Columns/frames need"
    return None


def read_dicom(path: str | os.PathLike[str]) -> Dataset:
    """Open a DICOM file with pixel data; DataError naming the file and the fix otherwise."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist or is not a file; check the path")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(path)
    except InvalidDicomError:
        raise DataError(
            f"{path} is not a DICOM file (no 'DICM' marker after the 128-byte preamble); "
            "pass DICOM files only, or export the study from the PACS as DICOM Part 10 files"
        ) from None
    except Exception as exc:  # pydicom raises many types on truncated/corrupt input
        raise DataError(f"{path} could not be parsed as DICOM ({exc}); re-export the file") from None
    eof = [str(w.message) for w in caught if "EOF" in str(w.message) or "end of file" in str(w.message)]
    why = _truncation(path, ds) or (f"reading stopped early ({eof[0]})" if eof else None)
    if why:
        raise DataError(f"{path} is truncated: {why}; copy or export the file again")
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


# ------------------------------------------------------------------------- de-identification

_DUMMY_TEXT = {"AE": "ANONYMOUS", "CS": "ANONYMIZED", "PN": "ANONYMOUS", "AS": "000Y", "UR": ""}
_DUMMY_DATES = {"DA": "19000101", "TM": "000000", "DT": "19000101000000"}
_NUMERIC_VRS = frozenset({"US", "SS", "UL", "SL", "UV", "SV", "FL", "FD"})
_BINARY_VRS = frozenset({"OB", "OW", "OD", "OF", "OL", "OV", "UN"})
_BIRTH = frozenset({"PatientBirthDate", "PatientBirthTime"})


@dataclass
class DeidLog:
    """What `deidentify_dataset` did, by tag keyword only (values are never recorded)."""

    removed: set[str] = field(default_factory=set)
    emptied: set[str] = field(default_factory=set)
    dummied: set[str] = field(default_factory=set)
    replaced: set[str] = field(default_factory=set)
    dates_retained: set[str] = field(default_factory=set)
    private_tags_removed: int = 0
    overlay_elements_removed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "removed": sorted(self.removed),
            "emptied": sorted(self.emptied),
            "dummied": sorted(self.dummied),
            "replaced": sorted(self.replaced),
            "dates_retained": sorted(self.dates_retained),
            "private_tags_removed": self.private_tags_removed,
            "overlay_elements_removed": self.overlay_elements_removed,
        }


def _is_overlay_or_curve(tag: Any) -> bool:
    group = tag.group
    return (0x6000 <= group <= 0x60FF or 0x5000 <= group <= 0x50FF) and group % 2 == 0


def _new_uid(value: Any, key: PseudonymKey) -> Any:
    """Keyed replacement of every non-standard UID in a (possibly multi-valued) UI value."""
    values = list(value) if isinstance(value, MultiValue | list) else [value]
    new = [v if not v or str(v).startswith(STANDARD_UID_ROOT) else key.uid(str(v)) for v in values]
    return new if isinstance(value, MultiValue | list) else new[0]


def _dummy(elem: Any, key: PseudonymKey) -> Any:
    vr = elem.VR
    if vr == "UI":
        return _new_uid(elem.value, key)
    if vr in _DUMMY_DATES:
        return _DUMMY_DATES[vr]
    if vr in _DUMMY_TEXT:
        return _DUMMY_TEXT[vr]
    if vr in ("IS", "DS"):
        return "0"
    if vr in _NUMERIC_VRS:
        return 0
    if vr in _BINARY_VRS:
        return b"\x00\x00"
    return "ANONYMIZED"  # LO, SH, LT, ST, UT, UC


@dataclass(frozen=True)
class _Ctx:
    key: PseudonymKey
    retain_dates: bool
    log: DeidLog


def _clean(ds: Dataset, ctx: _Ctx) -> None:
    """Apply Table E.1-1 to `ds` in place, recursing into every sequence that is kept."""
    log = ctx.log
    for elem in list(ds):
        tag, vr = elem.tag, elem.VR
        kw = elem.keyword or str(tag)
        if tag.is_private:
            del ds[tag]
            log.private_tags_removed += 1
            continue
        if _is_overlay_or_curve(tag):  # Table E.1-1 (50xx,xxxx), (60xx,3000/4000); whole groups go
            del ds[tag]
            log.overlay_elements_removed += 1
            continue
        table_action = action_for(tag)
        if ctx.retain_dates and vr in ("DA", "DT", "TM") and kw not in _BIRTH:
            log.dates_retained.add(kw)  # Retain Longitudinal Temporal Information, Full Dates
            continue
        if table_action is None:
            # Not in the table. Belt and braces beyond the profile: free text, unknown-VR and
            # person-name values are dropped, dates emptied, non-standard UIDs keyed.
            if vr == "SQ":
                for item in elem.value:
                    _clean(item, ctx)
            elif vr in REMOVE_VRS or vr == "UN":
                del ds[tag]
                log.removed.add(kw)
            elif vr in EMPTY_VRS and elem.value not in (None, ""):
                elem.value = ""
                log.emptied.add(kw)
            elif vr == "UI" and elem.value:
                new = _new_uid(elem.value, ctx.key)
                if new != elem.value:
                    elem.value = new
                    log.replaced.add(kw)
            continue
        action = simple_action(table_action)
        if kw == "PatientID":  # Z in the table: a keyed pseudonym is the dummy value
            elem.value = ctx.key.pseudonym(str(elem.value)) if elem.value else ""
            log.replaced.add(kw)
        elif kw == "PatientName":
            elem.value = "ANONYMOUS"
            log.dummied.add(kw)
        elif action == "X":
            del ds[tag]
            log.removed.add(kw)
        elif action == "U" or (vr == "UI" and action == "D"):
            if vr == "SQ":  # not in the 2026c table, but never keep a sequence we cannot rewrite
                del ds[tag]
                log.removed.add(kw)
            else:
                elem.value = _new_uid(elem.value, ctx.key)
                log.replaced.add(kw)
        elif vr == "SQ":  # Z or D on a sequence: no items survive (a dummy item would be invented)
            elem.value = []
            log.emptied.add(kw)
        elif action == "Z":
            elem.value = None if vr in _NUMERIC_VRS else (b"" if vr in _BINARY_VRS else "")
            log.emptied.add(kw)
        else:  # D
            elem.value = _dummy(elem, ctx.key)
            log.dummied.add(kw)


def _method_codes(retain_dates: bool, pixels_cleaned: bool) -> PydicomSequence:
    items = []
    chosen = [codes.DCM.BasicApplicationConfidentialityProfile]
    if pixels_cleaned:
        chosen.append(codes.DCM.CleanPixelDataOption)
    if retain_dates:
        chosen.append(codes.DCM.RetainLongitudinalTemporalInformationFullDatesOption)
    for code in chosen:
        item = Dataset()
        item.CodeValue = code.value
        item.CodingSchemeDesignator = code.scheme_designator
        item.CodeMeaning = code.meaning
        items.append(item)
    return PydicomSequence(items)


def deidentify_dataset(
    ds: Dataset,
    key: PseudonymKey | None,
    *,
    retain_dates: bool = False,
    pixels_cleaned: bool = False,
    log: DeidLog | None = None,
) -> Dataset:
    """A de-identified copy of `ds` under DICOM PS3.15 Table E.1-1 (the input is not modified).

    Every attribute of the table gets its action, recursively through sequences; private
    attributes, overlays and curves are removed; UIDs and the patient ID are replaced with keyed
    HMAC values (`key` is required: no key, no pseudonyms). `retain_dates` is the standard's
    Retain Longitudinal Temporal Information with Full Dates option (birth date/time still go).
    The output records Patient Identity Removed, the methods and their codes (CID 7050).
    """
    if key is None:
        raise DataError(
            "de-identification needs a pseudonym key (keyed HMAC pseudonyms); load one with "
            "PseudonymKey.load_or_create(path) or pass --key-file"
        )
    log = log if log is not None else DeidLog()
    out = copy.deepcopy(ds)
    _clean(out, _Ctx(key, retain_dates, log))
    meta = getattr(out, "file_meta", None)
    if meta is not None:
        for kw in FILE_META_REMOVE:
            if kw in meta:
                del meta[kw]
                log.removed.add(kw)
        uid = str(meta.get("MediaStorageSOPInstanceUID") or "")
        if uid and not uid.startswith(STANDARD_UID_ROOT):
            meta.MediaStorageSOPInstanceUID = key.uid(uid)
            log.replaced.add("MediaStorageSOPInstanceUID")
    out.PatientIdentityRemoved = "YES"
    out.DeidentificationMethod = "llava-ultra: PS3.15 Table E.1-1 (2026c), keyed HMAC UIDs/IDs"  # LO <= 64
    out.DeidentificationMethodCodeSequence = _method_codes(retain_dates, pixels_cleaned)
    out.LongitudinalTemporalInformationModified = "UNMODIFIED" if retain_dates else "REMOVED"
    return out


# ----------------------------------------------------------------------------------- ingest


@dataclass(frozen=True)
class IngestOptions:
    """Settings of `ingest_dicom`."""

    site: str
    """Examination site key for the report skeletons (one of `llava_ultra.sites.SITES`)."""
    language: str = "zh"
    """Language the report text will be written in ('zh' or 'en')."""
    banner_rows: int | None = None
    """Files without usable ultrasound regions: blank this many top rows (0 disables; give this or
    banner_fraction, not both)."""
    banner_fraction: float | None = None
    """Files without usable ultrasound regions: blank this top fraction of the rows (neither given:
    0.1)."""
    masks: tuple[Box, ...] = ()
    """Extra pixel boxes x0,y0,x1,y1 (inclusive) blanked in every frame (--mask, repeatable)."""
    detect_text: bool = True
    """Blank burned-in text found by the detector (files without usable regions)."""
    allow_burned_in: bool = False
    """Accept Burned In Annotation = YES files without regions or a mask."""
    every: int = 1
    """Keep every N-th frame of a cine loop."""
    max_frames: int | None = None
    """Keep at most this many frames per file (after `every`)."""
    write_dicom: bool = False
    """Also write de-identified DICOM copies holding the written frames."""
    key_file: str | None = None
    """Pseudonym key file (created on first use); None: `pseudonym.default_key_path()`."""
    retain_dates: bool = False
    """PS3.15 option Retain Longitudinal Temporal Information with Full Dates."""

    def __post_init__(self) -> None:
        check_site(self.site)
        for box in self.masks:
            check_mask(box)
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
    key_path: Path | None = None
    key_created: bool = False

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
        if self.key_path is not None:
            lines.append(
                f"pseudonym key: created {self.key_path} (keep it secret and out of any data release; "
                "pass the same --key-file to link patients across runs)"
                if self.key_created
                else f"pseudonym key: {self.key_path}"
            )
        if self.files:
            lines.append(
                f"next: fill findings/diagnosis in {self.out / SKELETON_NAME}, "
                f"then run `llava-ultra validate {self.out / SKELETON_NAME}`"
            )
        return "\n".join(lines)


def _save_png(frame: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(frame, mode="RGB" if frame.ndim == 3 else "L").save(path, format="PNG")


def _write_deid_dicom(ds: Dataset, frames: np.ndarray, every: int, path: Path) -> list[str]:
    """Store the written frames (uncompressed, 8-bit, display-ready) in the de-identified copy.

    Always explicit VR little endian: big-endian input (which pydicom cannot store new pixel data
    in) is re-encoded. Returns notes for the log.
    """
    notes = []
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts is not None and ts != ExplicitVRLittleEndian:
        notes.append(f"re-encoded from {getattr(ts, 'name', ts)} to Explicit VR Little Endian")
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
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
    # dcmwrite, not save_as: save_as refuses a change of endianness. Every element has been
    # decoded by `_clean` (it visits all of them), so nothing is copied as raw big-endian bytes.
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return notes


def _names(clean: Dataset, path: Path) -> tuple[str, str]:
    """Folder (study) and file (instance) names: hashes of the keyed UIDs, never of source names."""
    instance_uid = str(clean.get("SOPInstanceUID") or "")
    seed = instance_uid or hashlib.sha256(path.read_bytes()).hexdigest()
    instance = "i" + hashlib.sha256(seed.encode()).hexdigest()[:12]
    study_uid = str(clean.get("StudyInstanceUID") or "")
    study = "s" + hashlib.sha256(study_uid.encode()).hexdigest()[:12] if study_uid else "s" + instance[1:]
    return study, instance


def ingest_file(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    opts: IngestOptions,
    key: PseudonymKey | None,
    seen: dict[str, str] | None = None,
) -> IngestedFile:
    """Ingest one DICOM file: decode, clean the pixels, write PNGs (and a de-identified copy).

    `seen` maps instance names already written in this batch to their source path; a file whose
    SOPInstanceUID repeats one of them is refused before anything is written.
    """
    path, out = Path(path), Path(out)
    ds = read_dicom(path)
    n = _frame_count(ds)
    frames = decode_frames(ds, frame_indices(n, opts.every, opts.max_frames), source=str(path))
    plan = plan_pixel_cleaning(
        ds,
        frames,
        banner_rows=opts.banner_rows,
        banner_fraction=opts.banner_fraction,
        masks=opts.masks,
        detect_text=opts.detect_text,
        allow_burned_in=opts.allow_burned_in,
        source=str(path),
    )
    frames = apply_plan(frames, plan)

    log = DeidLog()
    clean = deidentify_dataset(ds, key, retain_dates=opts.retain_dates, pixels_cleaned=True, log=log)
    study, instance = _names(clean, path)
    if seen is not None:
        if instance in seen:
            raise DataError(
                f"{path} has the same SOPInstanceUID as {seen[instance]} (a duplicate or a re-export); "
                "skipped so that it does not overwrite that file's frames. Remove one of the two, or "
                "give the copy a new SOPInstanceUID"
            )
        seen[instance] = str(path)

    images = []
    for j, frame in enumerate(frames):
        rel = f"images/{study}/{instance}_f{j:04d}.png"
        _save_png(frame, out / rel)
        images.append(rel)
    write_notes: list[str] = []
    if opts.write_dicom:
        try:
            write_notes = _write_deid_dicom(
                clean, frames, opts.every, out / "dicom" / study / f"{instance}.dcm"
            )
        except Exception as exc:  # any pydicom encoding failure is this file's problem, not the batch's
            for rel in images:
                (out / rel).unlink(missing_ok=True)
            raise DataError(
                f"{path}: the de-identified DICOM copy could not be written ({type(exc).__name__}: {exc}); "
                "its PNGs were removed too. Convert the file (e.g. gdcmconv --raw) or run without "
                "--write-dicom"
            ) from None

    def _int(key_: str) -> int:
        try:
            return int(ds.get(key_) or 0)
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
        "profile": "PS3.15 Table E.1-1 basic" + (" + retain full dates" if opts.retain_dates else ""),
        **log.to_dict(),
        "pixels": plan.to_dict(),
        "burned_in_annotation": str(ds.get("BurnedInAnnotation", "")),
        "frames_written": len(images),
        "dicom_written": opts.write_dicom,
        "notes": write_notes,
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
    key_path = Path(opts.key_file) if opts.key_file else None
    resolved = (key_path or default_key_path()).resolve()
    if resolved.is_relative_to(out.resolve()):
        raise DataError(
            f"pseudonym key {resolved} lies inside the output folder {out}, which is meant to be "
            "shared; keep the key elsewhere (e.g. the default ~/.config/llava-ultra/deid.key)"
        )
    key = PseudonymKey.load_or_create(key_path)
    summary = IngestSummary(out=out, key_path=key.path, key_created=key.created)
    seen: dict[str, str] = {}
    for path in files:
        try:
            summary.files.append(ingest_file(path, out, opts, key, seen))
        except DataError as exc:
            summary.failures.append((str(path), str(exc)))
        except Exception as exc:  # a decoder or pydicom bug on one file must not stop the batch
            summary.failures.append(
                (
                    str(path),
                    f"{path}: could not be ingested ({type(exc).__name__}: {exc}); re-export the file, "
                    "and report it if it opens in a DICOM viewer",
                )
            )

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
