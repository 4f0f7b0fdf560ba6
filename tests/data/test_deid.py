"""De-identification a privacy officer can check: every Table E.1-1 attribute planted into a real
pydicom file and gone from every output; burned-in text blanked on real ultrasound files; keyed
pseudonyms; per-file robustness with exact messages."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import stat
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageDraw
from pydicom.data import get_testdata_file
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian
from typer.testing import CliRunner

from llava_ultra.cli import app
from llava_ultra.data.deid_profile import ACTIONS, REPEATING, TABLE_SOURCE, simple_action
from llava_ultra.data.dicom import SKELETON_NAME, decode_frames, deidentify_dataset, read_dicom
from llava_ultra.data.pixels import detect_text_boxes
from llava_ultra.data.pseudonym import PseudonymKey
from llava_ultra.errors import DataError


def _testfile(name: str) -> str:
    return str(get_testdata_file(name, download=False))


def _ingest(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(app, ["ingest-dicom", *args])
    return res.exit_code, res.output


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _decoded(path: str) -> np.ndarray:
    return decode_frames(pydicom.dcmread(path), [0])[0]


# ------------------------------------------------------------------------ Table E.1-1, planted


def _marker_value(i: int, vr: str) -> tuple[object, bytes | None]:
    """A value unique to attribute number i for its VR, and the bytes to search for (None: numeric)."""
    text = f"MK{i:04d}Q"
    if vr in ("AE", "CS", "LO", "SH", "PN", "LT", "ST", "UT", "UC"):
        return text, text.encode()
    if vr == "UR":
        return f"http://{text}/", text.encode()
    if vr == "DA":
        day = (dt.date(1911, 1, 1) + dt.timedelta(days=i)).strftime("%Y%m%d")
        return day, day.encode()
    if vr == "TM":
        return f"101010.{i:06d}", f"101010.{i:06d}".encode()
    if vr == "DT":
        value = (dt.date(1911, 1, 1) + dt.timedelta(days=i)).strftime("%Y%m%d") + f"101010.{i:06d}"
        return value, value.encode()
    if vr == "AS":
        return f"{i % 1000:03d}W", None  # 4 characters cannot be unique: checked by parsing
    if vr == "DS":
        return f"-{7000 + i}.125", f"-{7000 + i}.125".encode()
    if vr == "IS":
        return f"-7{i:05d}", f"-7{i:05d}".encode()
    if vr == "UI":
        uid = f"1.2.826.0.1.3680043.8.498.4242.{i}"
        return uid, uid.encode()
    if vr in ("OB", "UN"):
        return f"MKB{i:04d}Q".encode(), f"MKB{i:04d}Q".encode()
    if vr == "US":
        return 40000 + i % 20000, None
    raise AssertionError(f"no marker for VR {vr}")


def _planted_file(tmp_path: Path) -> tuple[Path, dict[Tag, tuple[str, object, bytes | None]]]:
    """pydicom's real GE ultrasound file with a marker in every attribute of Table E.1-1.

    Attributes unknown to pydicom's dictionary (newer than it) are written as LO. Sequences get
    one item holding a marker in Code Meaning (an attribute the table does not list), so a
    sequence that survived would leak it. Plus a private element, a curve and an overlay comment.
    """
    ds = pydicom.dcmread(_testfile("examples_rgb_color.dcm"))
    planted: dict[Tag, tuple[str, object, bytes | None]] = {}
    for i, tag in enumerate(sorted(ACTIONS)):
        if tag.group in (0x0000, 0x0002):  # command set (never in files); file meta (mirrors SOP UID)
            continue
        vr = dictionary_VR(tag) if keyword_for_tag(tag) else "LO"
        if vr == "SQ":
            item = Dataset()
            item.CodeMeaning = f"MK{i:04d}S"
            value, needle = Sequence([item]), f"MK{i:04d}S".encode()
        else:
            value, needle = _marker_value(i, vr)
        ds.add(DataElement(tag, vr, value))
        planted[tag] = (vr, value, needle)
    ds.add(DataElement(0x50000040, "LT", "MKCURVEQ"))  # (50xx,xxxx) Curve Data row
    ds.add(DataElement(0x60024000, "LT", "MKOVERLAYQ"))  # (60xx,4000) Overlay Comments row
    block = ds.private_block(0x0029, "HOSPITAL PRIVATE", create=True)
    block.add_new(0x10, "LO", "MKPRIVATEQ")
    path = tmp_path / "planted.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, planted


def test_every_table_attribute_planted_is_gone_from_every_output(tmp_path):
    src, planted = _planted_file(tmp_path)
    assert len(planted) >= 640 and "2026c" in TABLE_SOURCE  # the whole table, from the standard
    source = src.read_bytes()
    needles = [n for _, _, n in planted.values() if n] + [b"MKCURVEQ", b"MKOVERLAYQ", b"MKPRIVATEQ"]
    assert all(n in source for n in needles)  # the check below can fail
    original = pydicom.dcmread(src)
    secrets = needles + [
        str(original.PatientID).encode(),  # 13US1
        str(original.SOPInstanceUID).encode(),
        str(original.StudyInstanceUID).encode(),
        b"BAPTIST",  # InstitutionName
    ]
    key = tmp_path / "k.key"
    for extra in ([], ["--write-dicom"]):
        out = tmp_path / f"out{len(extra)}"
        code, output = _ingest(
            str(src), "--out", str(out), "--site", "breast", "--key-file", str(key), *extra
        )
        assert code == 0, output
        written = [p for p in out.rglob("*")]
        suffixes = {p.suffix for p in written if p.is_file()}
        assert suffixes == ({".png", ".jsonl", ".dcm"} if extra else {".png", ".jsonl"})
        for path in written:
            name = str(path.relative_to(out)).encode()
            data = path.read_bytes() if path.is_file() else b""
            for secret in secrets:
                assert secret not in name, f"{secret!r} in the name {path}"
                assert secret not in data, f"{secret!r} leaked into {path}"
        for dcm in out.rglob("*.dcm"):
            clean = pydicom.dcmread(dcm)
            for elem in clean.iterall():
                if elem.tag in planted and elem.VR != "SQ":
                    vr, value, _ = planted[elem.tag]
                    assert elem.value != value, f"{keyword_for_tag(elem.tag) or elem.tag} kept its value"
                    assert simple_action(ACTIONS[elem.tag]) != "X", f"{elem.tag} should be removed"
            assert not any(e.tag.is_private or e.tag.group in (0x5000, 0x6002) for e in clean.iterall())
            assert "IconImageSequence" not in clean
            assert clean.PatientIdentityRemoved == "YES"
            codes = [item.CodeValue for item in clean.DeidentificationMethodCodeSequence]
            assert codes == ["113100", "113101"]  # basic profile + clean pixel data option
            assert clean.LongitudinalTemporalInformationModified == "REMOVED"
            assert clean.PatientID.startswith("ANON-") and clean.PatientName == "ANONYMOUS"
        log = json.loads((out / "logs/deid.jsonl").read_text().splitlines()[0])
        assert {"AdmittingDiagnosesDescription", "MedicalAlerts", "Allergies", "StationAETitle"} <= set(
            log["removed"]
        )
        assert (
            "TimezoneOffsetFromUTC" in log["removed"] and "ReasonForTheRequestedProcedure" in log["removed"]
        )
        assert log["private_tags_removed"] == 2 and log["overlay_elements_removed"] == 2
        assert REPEATING  # the table's repeating-group rows are loaded too


def test_retain_longitudinal_dates_option_keeps_dates_but_not_birth_date(tmp_path):
    ds = pydicom.dcmread(_testfile("examples_rgb_color.dcm"))
    ds.PatientBirthDate = "19800305"
    key = PseudonymKey(b"k" * 32)
    kept = deidentify_dataset(ds, key, retain_dates=True)
    assert kept.StudyDate == "20040826" and kept.PatientBirthDate == ""
    assert [i.CodeValue for i in kept.DeidentificationMethodCodeSequence] == ["113100", "113106"]
    assert kept.LongitudinalTemporalInformationModified == "UNMODIFIED"
    assert deidentify_dataset(ds, key).StudyDate == ""


# --------------------------------------------------------------------------- burned-in pixels


def test_philips_header_text_below_the_top_band_is_blank_at_default_settings(tmp_path):
    # pydicom's Philips CX50 frame: the header strip with the patient ID (11-05-25-142825) and the
    # time sits at rows ~35-50, below the 10% band (35 rows); its ultrasound regions describe a
    # taller frame than the stored one, so they are not trusted.
    src = _testfile("examples_palette.dcm")
    out = tmp_path / "out"
    code, output = _ingest(src, "--out", str(out), "--site", "uterus", "--key-file", str(tmp_path / "k"))
    assert code == 0, output
    (png,) = list(out.rglob("*.png"))
    frame = _png(png)
    original = pydicom.dcmread(src)
    assert original.PatientID == "11-05-25-142825"
    # White text on the dark blue strip (max channel 94) and on black: no bright pixel may remain.
    before = np.asarray(Image.fromarray(_decoded(src)))
    assert before[34:52, 90:270].max() == 255 and before[34:52, 660:790].max() == 255
    assert frame[34:52, 90:270].max() < 100  # the patient ID line
    assert frame[34:52, 660:790].max() < 100  # the time
    assert not frame[:35].any()  # the band
    left = np.delete(frame[64:260, 0:82], 178 - 64, axis=0)  # row 178: the underline of "2D"
    assert left.max() < 100  # the settings column on the left
    assert np.array_equal(frame[110:250, 340:560], before[110:250, 340:560])  # the image survives
    log = json.loads((out / "logs/deid.jsonl").read_text())
    assert log["pixels"]["method"] == "band_and_text_detection"
    assert "does not fit the stored 800x350 frame" in log["pixels"]["notes"][0]
    assert len(log["pixels"]["text_boxes_blanked"]) >= 20


def test_text_drawn_low_in_a_frame_is_blanked(tmp_path):
    ds = pydicom.dcmread(_testfile("examples_rgb_color.dcm"))
    frame = ds.pixel_array.copy()
    im = Image.fromarray(frame)
    ImageDraw.Draw(im).text((150, 196), "ZHANG SAN 13800001", fill=(255, 255, 255))
    drawn = np.asarray(im)
    changed = np.argwhere((drawn != frame).any(axis=-1))
    assert len(changed) > 50
    ds.PixelData = drawn.tobytes()
    src = tmp_path / "drawn.dcm"
    ds.save_as(src)
    out = tmp_path / "out"
    code, output = _ingest(str(src), "--out", str(out), "--site", "breast", "--key-file", str(tmp_path / "k"))
    assert code == 0, output
    (png,) = list(out.rglob("*.png"))
    result = _png(png)
    (y0, x0), (y1, x1) = changed.min(axis=0), changed.max(axis=0)
    assert y0 > 190  # far below the top band
    assert not result[y0 : y1 + 1, x0 : x1 + 1].any()


def test_ultrasound_regions_keep_only_the_image(tmp_path):
    ds = pydicom.dcmread(_testfile("examples_rgb_color.dcm"))
    region = Dataset()
    region.RegionSpatialFormat = 1
    region.RegionDataType = 1
    region.RegionFlags = 0
    region.RegionLocationMinX0, region.RegionLocationMinY0 = 40, 70
    region.RegionLocationMaxX1, region.RegionLocationMaxY1 = 275, 150
    graphics = Dataset()
    graphics.RegionSpatialFormat = 5
    graphics.RegionLocationMinX0, graphics.RegionLocationMinY0 = 0, 0
    graphics.RegionLocationMaxX1, graphics.RegionLocationMaxY1 = 100, 60
    ds.SequenceOfUltrasoundRegions = Sequence([region, graphics])
    ds.BurnedInAnnotation = "YES"  # accepted: the regions say where the image is
    src = tmp_path / "regions.dcm"
    ds.save_as(src)
    out = tmp_path / "out"
    code, output = _ingest(str(src), "--out", str(out), "--site", "breast", "--key-file", str(tmp_path / "k"))
    assert code == 0, output
    result = _png(next(out.rglob("*.png")))
    keep = np.zeros(result.shape[:2], bool)
    keep[70:151, 40:276] = True
    assert not result[~keep].any()
    assert np.array_equal(result[keep], ds.pixel_array[keep])
    log = json.loads((out / "logs/deid.jsonl").read_text())
    assert log["pixels"]["method"] == "ultrasound_regions" and log["pixels"]["kept_regions"] == [
        [40, 70, 275, 150]
    ]
    assert "region 1: spatial format 5 is not an image region, blanked" in log["pixels"]["notes"]


def test_burned_in_annotation_yes_is_refused_without_regions_or_mask(tmp_path):
    ds = pydicom.dcmread(_testfile("examples_rgb_color.dcm"))
    ds.BurnedInAnnotation = "YES"
    src = tmp_path / "burned.dcm"
    ds.save_as(src)
    key = str(tmp_path / "k")
    code, output = _ingest(str(src), "--out", str(tmp_path / "o1"), "--site", "breast", "--key-file", key)
    assert code == 1
    assert (
        f"{src}: Burned In Annotation is YES (text is burned into the pixels) and the file has no "
        "Sequence of Ultrasound Regions to keep; pass --mask x0,y0,x1,y1 (repeatable) or --banner-rows N "
        "covering the text, or --allow-burned-in to rely on the default top band and text detection"
    ) in " ".join(output.split())
    for extra in (["--allow-burned-in"], ["--mask", "0,0,319,60"]):
        out = tmp_path / extra[0].strip("-")
        code, output = _ingest(str(src), "--out", str(out), "--site", "breast", "--key-file", key, *extra)
        assert code == 0, output
        log = json.loads((out / "logs/deid.jsonl").read_text())
        assert (
            log["burned_in_annotation"] == "YES"
            and "Burned In Annotation is YES" in log["pixels"]["notes"][-1]
        )
    assert not _png(next((tmp_path / "mask").rglob("*.png")))[:61].any()
    code, output = _ingest(str(src), "--out", str(tmp_path / "o3"), "--site", "breast", "--mask", "1,2,3")
    assert code == 2 and "mask '1,2,3' is not x0,y0,x1,y1" in output


def test_detector_leaves_plain_tissue_alone():
    rng = np.random.default_rng(0)
    speckle = rng.gamma(2.0, 40.0, size=(2, 200, 300)).clip(0, 255).astype(np.uint8)
    assert detect_text_boxes(speckle) == []


# ------------------------------------------------------------------------------- pseudonyms


def _patient_pseudonyms(out: Path) -> list[str]:
    records = [json.loads(line) for line in (out / SKELETON_NAME).read_text().splitlines()]
    return [inst["patient"] for r in records for inst in r["meta"]["instances"]]


def test_pseudonyms_are_keyed_stable_and_unlinkable_across_keys(tmp_path):
    src = _testfile("examples_rgb_color.dcm")  # PatientID 13US1: enumerable in seconds if hashed
    key_a, key_b = tmp_path / "a.key", tmp_path / "b.key"
    runs = {}
    for name, key in (("a1", key_a), ("a2", key_a), ("b", key_b)):
        out = tmp_path / name
        code, output = _ingest(src, "--out", str(out), "--site", "breast", "--key-file", str(key))
        assert code == 0, output
        runs[name] = (_patient_pseudonyms(out), sorted(p.name for p in out.rglob("*.png")))
    assert runs["a1"] == runs["a2"]  # same key: same patient pseudonym, same file names
    assert runs["a1"][0] != runs["b"][0] and runs["a1"][1] != runs["b"][1]  # another key: unlinkable
    (pseudo,) = runs["a1"][0]
    assert pseudo == PseudonymKey.load(key_a).pseudonym("13US1")
    for plain in (hashlib.sha256(b"13US1").hexdigest(), hashlib.sha256(b"\x0013US1").hexdigest()):
        assert plain[:16] not in pseudo  # not a plain or salt-less hash
    assert stat.S_IMODE(key_a.stat().st_mode) == 0o600 and len(bytes.fromhex(key_a.read_text())) == 32


def test_key_is_created_on_first_use_and_says_where(tmp_path, monkeypatch):
    default = tmp_path / "config" / "deid.key"
    monkeypatch.setenv("LLAVA_ULTRA_KEY_FILE", str(default))
    src = _testfile("examples_rgb_color.dcm")
    code, output = _ingest(src, "--out", str(tmp_path / "o1"), "--site", "breast")
    assert code == 0 and default.is_file()
    assert f"pseudonym key: created {default} (keep it secret and out of any data release;" in output
    code, output = _ingest(src, "--out", str(tmp_path / "o2"), "--site", "breast")
    assert code == 0 and f"pseudonym key: {default}\n" in output


def test_no_key_no_pseudonyms(tmp_path):
    ds = pydicom.dcmread(_testfile("examples_rgb_color.dcm"))
    with pytest.raises(DataError, match="de-identification needs a pseudonym key"):
        deidentify_dataset(ds, None)
    empty = tmp_path / "empty.key"
    empty.write_text("\n")
    code, output = _ingest(
        _testfile("examples_rgb_color.dcm"),
        "--out",
        str(tmp_path / "o"),
        "--site",
        "breast",
        "--key-file",
        str(empty),
    )
    assert code == 2
    assert (
        f"key file {empty} holds 0 byte(s); a pseudonym key needs at least 16 (an empty or short key "
        "would make pseudonyms reversible)"
    ) in " ".join(output.split())
    code, output = _ingest(
        _testfile("examples_rgb_color.dcm"),
        "--out",
        str(tmp_path / "o"),
        "--site",
        "breast",
        "--key-file",
        str(tmp_path / "o" / "k.key"),
    )
    assert code == 2 and "lies inside the output folder" in output
    with pytest.raises(DataError, match="holds 3 byte"):
        PseudonymKey(b"abc")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    with pytest.raises(
        DataError, match=r"cannot create the pseudonym key file .*; pass --key-file with a writable"
    ):
        PseudonymKey.load_or_create(blocker / "deid.key")


# ------------------------------------------------------------------------------- robustness


def test_big_endian_with_write_dicom_is_re_encoded_and_the_batch_goes_on(tmp_path):
    big = _testfile("MR_small_bigendian.dcm")
    out = tmp_path / "out"
    code, output = _ingest(
        big, _testfile("examples_rgb_color.dcm"), "--out", str(out), "--site", "breast", "--write-dicom",
        "--key-file", str(tmp_path / "k"),
    )  # fmt: skip
    assert code == 0, output
    assert "ingested 2 DICOM file(s)" in output and "failed: 0" in output
    logs = [json.loads(line) for line in (out / "logs/deid.jsonl").read_text().splitlines()]
    assert logs[0]["notes"] == ["re-encoded from Explicit VR Big Endian to Explicit VR Little Endian"]
    written = [pydicom.dcmread(p) for p in out.rglob("*.dcm")]
    assert {d.file_meta.TransferSyntaxUID for d in written} == {ExplicitVRLittleEndian}
    mr = next(d for d in written if d.Modality == "MR")
    assert mr.pixel_array.shape == (64, 64)


def test_duplicate_sop_instance_uid_is_reported_not_overwritten(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(_testfile("examples_rgb_color.dcm"), src / "a.dcm")
    shutil.copy(_testfile("examples_rgb_color.dcm"), src / "b.dcm")
    out = tmp_path / "out"
    code, output = _ingest(str(src), "--out", str(out), "--site", "breast", "--key-file", str(tmp_path / "k"))
    assert code == 1
    assert (
        f"{src / 'b.dcm'} has the same SOPInstanceUID as {src / 'a.dcm'} (a duplicate or a re-export); "
        "skipped so that it does not overwrite that file's frames. Remove one of the two, or give the "
        "copy a new SOPInstanceUID"
    ) in " ".join(output.split())
    assert len(list(out.rglob("*.png"))) == 1


def test_truncated_files_are_named_as_truncated(tmp_path):
    data = Path(_testfile("examples_rgb_color.dcm")).read_bytes()
    mid_pixels, mid_header, no_elements = tmp_path / "mid.dcm", tmp_path / "head.dcm", tmp_path / "meta.dcm"
    mid_pixels.write_bytes(data[: len(data) // 2])
    mid_header.write_bytes(data[:900])
    no_elements.write_bytes(data[:200])
    out = tmp_path / "out"
    code, output = _ingest(
        str(mid_pixels), str(mid_header), str(no_elements), _testfile("examples_rgb_color.dcm"),
        "--out", str(out), "--site", "breast", "--key-file", str(tmp_path / "k"),
    )  # fmt: skip
    flat = " ".join(output.split())
    assert code == 1 and "failed: 3" in flat and "ingested 1 DICOM file(s)" in flat
    assert (
        f"{mid_pixels} is truncated: the file ends inside PixelData (7FE0,0010) (114695 of 230400 bytes); "
        "copy or export the file again"
    ) in flat
    assert (
        f"{mid_header} is truncated: the file ends inside StudyInstanceUID (0020,000D) (4 of 44 bytes)"
        in flat
    )
    assert f"{no_elements} is truncated: the file ends before its first data element" in flat
    assert "without pixel data" not in flat


def test_pydicom_truncated_and_deflated_files():
    with pytest.raises(DataError) as exc:
        read_dicom(_testfile("MR_truncated.dcm"))  # pydicom's own truncated file
    assert str(exc.value).endswith(
        "is truncated: the file ends inside PixelData (7FE0,0010) (8130 of 8192 bytes); copy or export the file again"
    )
    # Offsets in a deflated file refer to the inflated stream: not a truncation.
    assert read_dicom(_testfile("image_dfl.dcm")).Rows == 512
