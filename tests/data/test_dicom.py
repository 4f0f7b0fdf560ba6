"""DICOM ingest: colour handling on pydicom's real ultrasound files, de-identification that leaves
no planted PHI in any output (tags, PNGs, JSONL, log, rewritten DICOM, banner pixels), bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_color_lut, convert_color_space
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian
from typer.testing import CliRunner

from llava_ultra.cli import app
from llava_ultra.data.dicom import (
    SKELETON_NAME,
    IngestOptions,
    decode_frames,
    deidentify_dataset,
    frame_indices,
    ingest_dicom,
    read_dicom,
)
from llava_ultra.data.pseudonym import PseudonymKey
from llava_ultra.errors import ConfigError, DataError

KEY = PseudonymKey(b"test-key-0123456789abcdef")

US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
UID_ROOT = "1.2.826.0.1.3680043.8.498.7000"
PHI = {
    "PatientName": "ZHANG^SAN 张三",
    "PatientID": "ZS20240001",
    "PatientBirthDate": "19800305",
    "PatientAddress": "北京市朝阳区幸福路88号",
    "OtherPatientIDs": "OTHERID4242",
    "InstitutionName": "仁爱医院 RenaiHospital",
    "InstitutionAddress": "上海市黄浦区南京路1号",
    "ReferringPhysicianName": "LI^SI",
    "OperatorsName": "WANG^WU",
    "PerformingPhysicianName": "ZHAO^LIU",
    "AccessionNumber": "ACC998877",
    "StudyID": "STUDY4455",
    "StudyDate": "20240102",
    "DeviceSerialNumber": "SN7788XYZ",
    "StudyDescription": "甲状腺 张三 复查",
    "ImageComments": "call 13812345678",
}
PLANTED = [
    "ZHANG", "张三", "ZS20240001", "19800305", "幸福路", "OTHERID4242", "RenaiHospital", "仁爱",
    "黄浦", "LI^SI", "WANG^WU", "ZHAO^LIU", "ACC998877", "STUDY4455", "20240102", "SN7788XYZ",
    "13812345678", "PRIVATE-NOTE", UID_ROOT,
]  # fmt: skip


def _testfile(name: str) -> str:
    return str(get_testdata_file(name, download=False))


def _burned_frames(n: int = 3, rows: int = 64, cols: int = 80) -> np.ndarray:
    """RGB frames with a gradient body and bright 'text' burned into the top 10 rows."""
    y, x = np.mgrid[0:rows, 0:cols]
    body = np.stack([(x * 3) % 256, (y * 4) % 256, np.full_like(x, 90)], axis=-1).astype(np.uint8)
    frames = np.stack([np.roll(body, k, axis=1) for k in range(n)])
    frames[:, 2:10, 5:70:3] = 255  # the burned-in patient name
    return frames


def _write_dicom(path: Path, frames: np.ndarray | None, pi: str = "RGB", uid: str = "1") -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = US_MULTIFRAME
    meta.MediaStorageSOPInstanceUID = f"{UID_ROOT}.3.{uid}"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.SourceApplicationEntityTitle = "RENAI_US1"
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = US_MULTIFRAME
    ds.SOPInstanceUID = f"{UID_ROOT}.3.{uid}"
    ds.StudyInstanceUID = f"{UID_ROOT}.1"
    ds.SeriesInstanceUID = f"{UID_ROOT}.2"
    ds.Modality = "US"
    ds.InstanceNumber = uid
    for keyword, value in PHI.items():
        setattr(ds, keyword, value)
    ref = Dataset()
    ref.ReferencedSOPClassUID = US_MULTIFRAME
    ref.ReferencedSOPInstanceUID = f"{UID_ROOT}.9"
    ds.ReferencedImageSequence = Sequence([ref])
    block = ds.private_block(0x0011, "RENAI PRIVATE", create=True)
    block.add_new(0x01, "LO", "PRIVATE-NOTE ZHANG SAN")
    if frames is not None:
        ds.set_pixel_data(frames if len(frames) > 1 else frames[0], pi, 8, generate_instance_uid=False)
        if pi.startswith("MONO"):
            ds.BitsStored = 8
    ds.save_as(path, enforce_file_format=True)
    return path


def _all_output_bytes(out: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_real_ybr_cine_becomes_rgb_frames(tmp_path):
    src = _testfile("examples_ybr_color.dcm")
    key_file = tmp_path.parent / f"{tmp_path.name}.key"
    opts = IngestOptions(site="cardiac", every=3, write_dicom=True, key_file=str(key_file))
    summary = ingest_dicom([src], tmp_path, opts)
    assert summary.ok and summary.studies == 1 and summary.key_created
    (record,) = [json.loads(line) for line in (tmp_path / SKELETON_NAME).read_text().splitlines()]
    assert len(record["images"]) == 10  # 30 frames, every 3rd
    frames = np.stack([np.asarray(Image.open(tmp_path / p)) for p in record["images"]])
    assert frames.shape == (10, 240, 320, 3)
    rows = summary.files[0].log["pixels"]["banner_rows"]
    assert rows == 24 and not frames[:, :rows].any()
    # Converted YBR: a grey-scale echo has R ~ G ~ B. Unconverted Cb/Cr would sit near 128.
    means = frames[:, rows:].reshape(-1, 3).mean(axis=0)
    assert np.ptp(means) < 3 and means.max() < 60
    assert np.abs(frames[0].astype(int) - frames[-1]).mean() > 1  # a moving loop, not one frame
    # The de-identified copy holds exactly the written frames and no identifiers.
    (dcm,) = list((tmp_path / "dicom").rglob("*.dcm"))
    clean = pydicom.dcmread(dcm)
    assert np.array_equal(clean.pixel_array, frames)
    assert clean.PatientName == "ANONYMOUS" and clean.PatientIdentityRemoved == "YES"
    original = pydicom.dcmread(src)
    assert clean.StudyInstanceUID == PseudonymKey.load(key_file).uid(original.StudyInstanceUID)
    assert not any(e.tag.is_private for e in clean.iterall())
    assert clean.StudyDate == "" and "PLA" not in str(clean.PatientName)


def test_palette_and_monochrome_files(tmp_path):
    ds = read_dicom(_testfile("examples_palette.dcm"))
    (frame,) = decode_frames(ds, [0])
    expected = (apply_color_lut(ds.pixel_array, ds) >> 8).astype(np.uint8)
    assert frame.shape == (350, 800, 3) and np.array_equal(frame, expected)
    ct = read_dicom(_testfile("CT_small.dcm"))  # int16 with rescale, no window: min-max stretch
    (grey,) = decode_frames(ct, [0])
    assert grey.dtype == np.uint8 and grey.shape == (128, 128) and grey.min() == 0 and grey.max() == 255


def test_raw_ybr_full_matches_source_rgb(tmp_path):
    rgb = _burned_frames(2)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    ds = read_dicom(_write_dicom(tmp_path / "ybr.dcm", ybr, "YBR_FULL"))
    out = decode_frames(ds, [0, 1])
    assert np.abs(out.astype(int) - rgb).max() <= 2


def test_monochrome1_window_is_applied_and_inverted(tmp_path):
    frames = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (2, 16, 1))  # (2, 16, 64) ramp
    path = _write_dicom(tmp_path / "m1.dcm", frames, "MONOCHROME1")
    ds = pydicom.dcmread(path)
    ds.WindowCenter, ds.WindowWidth = 128, 128  # 64..192 maps to 0..255
    out = decode_frames(ds, [0])[0]
    assert out[0, 0] == 255 and out[0, -1] == 0  # dark input is white in MONOCHROME1
    assert out[0, 64 // 4] == 255 and out[0, 192 // 4] == 0


def test_planted_phi_never_reaches_any_output(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    burned = _burned_frames(3)
    _write_dicom(src / "a.dcm", burned, "RGB", uid="1")
    _write_dicom(src / "b.dcm", burned[:, :, :, 0].copy(), "MONOCHROME2", uid="2")
    out = tmp_path / "out"
    res = CliRunner().invoke(
        app,
        [
            "ingest-dicom",
            str(src),
            "--out",
            str(out),
            "--site",
            "thyroid",
            "--banner-rows",
            "12",
            "--no-detect-text",
            "--write-dicom",
            "--key-file",
            str(tmp_path / "k.key"),
        ],
    )
    assert res.exit_code == 0, res.output
    source = (src / "a.dcm").read_bytes()
    assert all(secret.encode("utf-8") in source for secret in PLANTED)  # the check can fail
    files = _all_output_bytes(out)
    assert {p.suffix for p in files} == {".png", ".jsonl", ".dcm"}
    for path, data in files.items():
        for secret in PLANTED:
            assert secret.encode("utf-8") not in data, f"{secret!r} leaked into {path}"
    (record,) = [json.loads(line) for line in (out / SKELETON_NAME).read_text().splitlines()]
    assert record["site"] == "thyroid" and len(record["images"]) == 6  # one study, two instances
    expected = list(burned) + list(burned[..., 0])  # instance 1 (RGB), then instance 2 (grey)
    for rel, source_frame in zip(record["images"], expected, strict=True):
        arr = np.asarray(Image.open(out / rel))
        assert not arr[:12].any(), f"banner not blank in {rel}"
        assert np.array_equal(arr[12:], source_frame[12:])  # the rest is untouched
    for dcm in out.rglob("*.dcm"):
        clean = pydicom.dcmread(dcm)
        assert clean.pixel_array.shape[0] == 3 and not clean.pixel_array[:, :12].any()
        for keyword in ("PatientAddress", "OtherPatientIDs", "InstitutionName", "DeviceSerialNumber"):
            assert keyword not in clean
    log = [json.loads(line) for line in (out / "logs/deid.jsonl").read_text().splitlines()]
    assert "PatientAddress" in log[0]["removed"] and log[0]["private_tags_removed"] == 2
    assert "StudyDate" in log[0]["emptied"] and "StudyInstanceUID" in log[0]["replaced"]


def test_deidentify_dataset_is_a_copy_and_deterministic(tmp_path):
    ds = pydicom.dcmread(_write_dicom(tmp_path / "a.dcm", _burned_frames(1)))
    other = PseudonymKey(b"another-key-0123456789")
    a, b, c = deidentify_dataset(ds, KEY), deidentify_dataset(ds, KEY), deidentify_dataset(ds, other)
    assert ds.PatientName == PHI["PatientName"]  # input untouched
    assert a.SOPInstanceUID == b.SOPInstanceUID != c.SOPInstanceUID
    assert a.file_meta.MediaStorageSOPInstanceUID == a.SOPInstanceUID
    assert a.SOPClassUID == US_MULTIFRAME  # standard UIDs are kept
    assert "ReferencedImageSequence" not in a  # X/Z/U* in Table E.1-1: we take X
    assert a.PatientID.startswith("ANON-") and a.PatientID == b.PatientID != c.PatientID


def test_frame_selection_and_bad_options():
    assert frame_indices(30, every=4, max_frames=3) == [0, 4, 8]
    assert frame_indices(1) == [0]
    with pytest.raises(ConfigError):
        frame_indices(5, every=0)
    with pytest.raises(ConfigError, match="either"):
        IngestOptions(site="thyroid", banner_rows=3, banner_fraction=0.1)
    with pytest.raises(DataError, match="unknown site 'lung'; use one of"):
        IngestOptions(site="lung")


def test_bad_inputs_are_reported_and_batch_continues(tmp_path):
    text = tmp_path / "notes.dcm"
    text.write_text("not a dicom file")
    nopix = _write_dicom(tmp_path / "nopix.dcm", None)
    good = _testfile("examples_rgb_color.dcm")
    with pytest.raises(DataError, match="not a DICOM file"):
        read_dicom(text)
    with pytest.raises(DataError, match="without pixel data"):
        read_dicom(nopix)
    out = tmp_path / "out"
    res = CliRunner().invoke(
        app, ["ingest-dicom", str(text), good, str(nopix), "--out", str(out), "--site", "breast"]
    )
    assert res.exit_code == 1
    assert "failed: 2" in res.output and str(text) in res.output and str(nopix) in res.output
    assert "ingested 1 DICOM file(s)" in res.output and (out / SKELETON_NAME).exists()
    # Re-running into the same folder would overwrite skeletons a person may have filled in.
    res = CliRunner().invoke(app, ["ingest-dicom", good, "--out", str(out), "--site", "breast"])
    assert res.exit_code == 2 and "already exists" in res.output
    res = CliRunner().invoke(app, ["ingest-dicom", good, "--out", str(tmp_path / "o2"), "--site", "lung"])
    assert res.exit_code == 2 and "thyroid" in res.output
