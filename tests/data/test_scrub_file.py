"""Scrubbing report files (`llava-ultra scrub IN OUT`, data/scrub.scrub_file)."""

from __future__ import annotations

from typer.testing import CliRunner

from llava_ultra.cli import app
from llava_ultra.data.reports import Report, read_reports, write_reports


def test_scrub_cli_writes_scrubbed_reports_and_counts(tmp_path):
    reports = [
        Report("a", "thyroid", "患者张三，女，45岁", "甲状腺右叶结节0.8cm×0.6cm", "TI-RADS 3类", "zh", ["a.png"]),
        Report(
            "b", "breast", "Patient: John Smith", "Cyst 1.1 cm", "BI-RADS 2", "en", ["b.png"],
            meta={"note": "MRN: 998877"},
        ),
        Report("c", "liver", "", "肝脏未见异常", "正常", "zh", ["c.png"]),
    ]  # fmt: skip
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.csv"
    write_reports(src, reports)
    with src.open("a", encoding="utf-8") as fh:
        fh.write("{broken\n")
    res = CliRunner().invoke(app, ["scrub", str(src), str(dst)])
    assert res.exit_code == 1  # the broken line is reported, not silently dropped
    assert "name: 2" in res.output and "record_number: 1" in res.output and "2 changed" in res.output
    assert f"{src}:4" in res.output
    out = read_reports(dst)
    assert out[0].history == "患者[姓名]，女，45岁" and out[0].findings == reports[0].findings
    assert out[1].history == "Patient: [NAME]" and out[1].meta == {"note": "MRN: [MRN]"}
    assert out[2] == reports[2]
    assert CliRunner().invoke(app, ["scrub", str(src), str(src)]).exit_code == 2
