"""Report records: JSONL/CSV round trips, line-numbered errors, safe image paths, `validate`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from llava_ultra.cli import app
from llava_ultra.data.reports import (
    Report,
    read_reports,
    read_reports_lenient,
    resolve_image,
    validate_dataset,
    write_reports,
)
from llava_ultra.errors import DataError


def _report(i: int, images: list[str] | None = None, **kw) -> Report:
    fields = dict(
        id=f"r{i}",
        site="thyroid",
        history='体检发现, "quoted"\n第二行',
        findings=f"甲状腺右叶见{i}.8cm×0.6cm低回声结节，边界清",
        diagnosis="甲状腺结节 TI-RADS 3类",
        language="zh",
        images=images or [f"img/r{i}_0.png", f"img/r{i}_1.png"],
        valid=[True, False],
        meta={"finding": "nodule", "size_cm": 0.8, "nested": {"a": [1, 2]}},
    )
    fields.update(kw)
    return Report(**fields)


def _png(path: Path, value: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16), value, dtype=np.uint8)).save(path)


def _dataset(tmp_path: Path, n: int = 3) -> Path:
    reports = [_report(i) for i in range(n)]
    for r in reports:
        for rel in r.images:
            _png(tmp_path / rel)
    write_reports(tmp_path / "train.jsonl", reports)
    return tmp_path / "train.jsonl"


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_round_trip_is_exact(tmp_path, suffix):
    reports = [
        _report(0),
        _report(1, valid=None, meta={}, history="", language="en", findings="A 1.2 x 0.8 cm cyst, r\r\nn"),
        _report(2, images=["a|b.png"], valid=[True]),
    ]
    path = tmp_path / f"reports{suffix}"
    write_reports(path, reports)
    assert read_reports(path) == reports
    write_reports(tmp_path / f"again{suffix}", read_reports(path))
    assert (tmp_path / f"again{suffix}").read_bytes() == path.read_bytes()


def test_csv_accepts_pipe_separated_lists_and_missing_optional_columns(tmp_path):
    path = tmp_path / "export.csv"
    path.write_text(
        "id,site,findings,diagnosis,language,images,valid\nx1,breast,见低回声,乳腺结节,zh,a.png|b.png,1|0\n",
        encoding="utf-8",
    )
    (r,) = read_reports(path)
    assert r.images == ["a.png", "b.png"] and r.valid == [True, False] and r.history == "" and r.meta == {}


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"id": "a", "site": "thyroid"', "bad JSON"),
        (
            '{"id": "a", "site": "thyroid", "findings": "x", "diagnosis": "y", "language": "zh"}',
            "missing field",
        ),
        (
            '{"id": "a", "site": "lung", "findings": "x", "diagnosis": "y", "language": "zh", "images": ["a.png"]}',
            "unknown site 'lung'; use one of: breast, cardiac",
        ),
        (
            '{"id": "a", "site": "liver", "findings": " ", "diagnosis": "", "language": "zh", "images": ["a.png"]}',
            "is empty",
        ),
        (
            '{"id": "a", "site": "liver", "findings": "x", "diagnosis": "", "language": "zh", "images": ["a.png"], "image": 1}',
            "unknown field(s) image",
        ),
    ],
)
def test_malformed_line_names_file_line_and_fix(tmp_path, line, expected):
    good = json.dumps(_report(0).to_dict(), ensure_ascii=False)
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n\n{line}\n{good}\n", encoding="utf-8")
    with pytest.raises(DataError) as exc:
        read_reports(path)
    assert f"{path}:3:" in str(exc.value) and expected in str(exc.value)
    reports, problems = read_reports_lenient(path)
    assert len(reports) == 2 and [p[0] for p in problems] == [3]


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="use .jsonl or .csv"):
        read_reports(tmp_path / "r.txt")
    with pytest.raises(DataError, match="does not exist"):
        read_reports(tmp_path / "missing.jsonl")
    (tmp_path / "h.csv").write_text("id,site,text\n", encoding="utf-8")
    with pytest.raises(DataError, match="lacks column"):
        read_reports(tmp_path / "h.csv")
    (tmp_path / "gbk.jsonl").write_bytes('{"id": "患者"}\n'.encode("gbk"))
    with pytest.raises(DataError, match="not UTF-8"):
        read_reports(tmp_path / "gbk.jsonl")


def test_resolve_image_refuses_escaping_and_absolute_paths(tmp_path):
    assert resolve_image(tmp_path, "img/a.png") == tmp_path / "img" / "a.png"
    assert resolve_image(tmp_path, "img/../b.png") == tmp_path / "b.png"
    for bad in ["../secret.png", "img/../../x.png", "..\\x.png", "/etc/passwd", "C:\\x.png", " "]:
        with pytest.raises(DataError) as exc:
            resolve_image(tmp_path, bad)
        assert "dataset root" in str(exc.value)


def test_validate_clean_dataset(tmp_path):
    summary = validate_dataset(_dataset(tmp_path))
    assert summary.ok and summary.records == 3 and summary.images_checked == 6 and not summary.problems


def test_validate_catches_truncated_missing_unsafe_and_duplicates(tmp_path):
    path = _dataset(tmp_path, n=4)
    truncated = tmp_path / "img/r1_0.png"
    truncated.write_bytes(truncated.read_bytes()[:-30])
    (tmp_path / "img/r2_1.png").unlink()
    reports = read_reports(path) + [_report(0), _report(9, images=["../outside.png"], valid=None)]
    write_reports(path, reports)
    with path.open("a", encoding="utf-8") as fh:
        fh.write("not json\n")

    summary = validate_dataset(tmp_path, max_bad_fraction=0.5)
    kinds = summary.counts
    assert kinds == {
        "malformed": 1,
        "duplicate_id": 1,
        "unsafe_path": 1,
        "missing_image": 1,
        "corrupt_image": 1,
    }
    assert summary.records == 7 and summary.bad_records == 5
    assert not summary.ok  # 5/7 > 0.5
    text = summary.render()
    assert str(truncated) in text and str(tmp_path / "img/r2_1.png") in text and "../outside.png" in text
    assert validate_dataset(tmp_path, max_bad_fraction=0.8).ok


def test_validate_cli_exit_codes_and_capped_listing(tmp_path):
    path = _dataset(tmp_path, n=25)
    for i in range(25):
        (tmp_path / f"img/r{i}_0.png").unlink()
    runner = CliRunner()
    res = runner.invoke(app, ["validate", str(path)])
    assert res.exit_code == 1
    assert "missing_image: 25" in res.output and "and 5 more missing_image" in res.output
    res = runner.invoke(app, ["validate", str(path), "--all", "--max-bad-fraction", "1.0"])
    assert res.exit_code == 0 and res.output.count("does not exist") == 25
    res = runner.invoke(app, ["validate", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_validate_folder_without_report_files(tmp_path):
    with pytest.raises(DataError, match="no \\*.jsonl or \\*.csv"):
        validate_dataset(tmp_path)


def _good_csv_row(rid: str) -> str:
    return f"{rid},thyroid,,甲状腺结节,TI-RADS 3类,zh,a.png"


def test_malformed_csv_rows_give_line_numbered_errors_in_validate_and_scrub(tmp_path):
    _png(tmp_path / "a.png")
    path = tmp_path / "r.csv"
    path.write_text(
        "id,site,history,findings,diagnosis,language,images\n"
        + _good_csv_row("a")
        + "\nb,thyroid,x\n"  # line 3: too few cells
        + 'c,thyroid,,"unclosed,y,zh,a.png\n'  # line 4: the quote never closes
        + _good_csv_row("d")  # line 5: still read
        + "\n",
        encoding="utf-8",
    )
    few = (
        f"{path}:3: row has 3 cells, the header has 7 (missing: findings, diagnosis, language, images); "
        "add the missing cells, empty ones as ,,"
    )
    unclosed = (
        f'{path}:4: unclosed quote: a cell opened with " on this line is never closed, so the rest of '
        'the file would be read as one cell; close the quote (write a quote inside a cell as "")'
    )
    res = CliRunner().invoke(app, ["validate", str(path)])
    assert res.exit_code == 1 and few in res.output and unclosed in res.output
    assert "validated 1 file(s): 4 report(s)" in res.output and "malformed: 2" in res.output
    res = CliRunner().invoke(app, ["scrub", str(path), str(tmp_path / "out.jsonl")])
    assert res.exit_code == 1 and few in res.output and unclosed in res.output
    assert [r.id for r in read_reports(tmp_path / "out.jsonl")] == ["a", "d"]


def test_deeply_nested_json_is_a_line_numbered_error_not_a_recursion_error(tmp_path):
    _png(tmp_path / "a.png")
    good = json.dumps(_report(0, images=["a.png"], valid=None).to_dict(), ensure_ascii=False)
    bomb = '{"id": "x", "meta": ' + "[" * 100_000 + "]" * 100_000 + "}"
    deep_but_valid = json.dumps({**json.loads(good), "id": "y", "meta": {"k": [[[[[[[[[[1]]]]]]]]]]}})
    path = tmp_path / "r.jsonl"
    path.write_text(f"{good}\n{bomb}\n{deep_but_valid}\n", encoding="utf-8")
    message = (
        f"{path}:2: line nests JSON arrays/objects deeper than 32 levels; flatten 'meta' "
        "(reports need at most a few levels)"
    )
    res = CliRunner().invoke(app, ["validate", str(path), "--no-decode"])
    assert res.exit_code == 1 and message in res.output and "3 report(s)" in res.output
    res = CliRunner().invoke(app, ["scrub", str(path), str(tmp_path / "out.csv")])
    assert res.exit_code == 1 and message in res.output
    assert [r.id for r in read_reports(tmp_path / "out.csv")] == ["r0", "y"]
    csv_path = tmp_path / "deep.csv"
    csv_path.write_text(
        f'id,site,findings,diagnosis,language,images,meta\nz,liver,x,y,zh,a.png,"{"[" * 5000}{"]" * 5000}"\n',
        encoding="utf-8",
    )
    with pytest.raises(DataError) as exc:
        read_reports(csv_path)
    assert str(exc.value) == (
        f"{csv_path}:2: column 'meta' nests JSON arrays/objects deeper than 32 levels; flatten 'meta' "
        "(reports need at most a few levels)"
    )
