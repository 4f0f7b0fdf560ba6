"""Hospital report records: one report, k images.

A `Report` is the unit a hospital exports: examination site, clinical history, findings
(超声所见), diagnosis (超声诊断), the language the text is written in, and the paths of the k
frames captured for it. Optional per-frame validity labels (does the frame show the finding?)
exist for synthetic data and for audited subsets; they are for evaluation only.

Image paths are stored relative to the dataset root (the folder of the JSONL/CSV file) so that a
dataset can be moved as a whole; `resolve_image` refuses paths that escape the root.

Files: JSONL (one JSON object per line) or CSV, chosen by suffix. CSV keeps the text columns as
they are and stores `images`, `valid` and `meta` as JSON cells, so both formats round-trip
exactly. Readers come in two flavours: `read_reports` stops at the first bad line with a
`DataError` naming file, line and fix; `read_reports_lenient` (for batch commands) collects
`(line, message)` problems and carries on, so nothing is dropped without being counted.

`validate_dataset` checks a file or a folder of report files: every record parses, ids are
unique per file, every image path stays inside the dataset root, exists and fully decodes
(Pillow `verify` for checksums, then `load` for truncation). Each image file is decoded once even
when several reports (e.g. the zh and en renderings) share it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import DataError
from ..sites import check_site

LANGUAGES = ("zh", "en")
FIELDS = ("id", "site", "history", "findings", "diagnosis", "language", "images", "valid", "meta")
REQUIRED_FIELDS = ("id", "site", "findings", "diagnosis", "language", "images")
REPORT_SUFFIXES = (".jsonl", ".csv")


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

    @classmethod
    def from_dict(cls, obj: Any) -> Report:
        """Build a report from a parsed JSON object, checking field names and types.

        `history`, `valid` and `meta` may be omitted; an integer id is accepted and stored as a
        string. Raises DataError naming the bad field and the fix.
        """
        if not isinstance(obj, dict):
            raise DataError(
                f"expected a JSON object per report, got {type(obj).__name__}; write one {{...}} per line"
            )
        unknown = sorted(set(obj) - set(FIELDS))
        if unknown:
            raise DataError(
                f"unknown field(s) {', '.join(unknown)}; known fields are {', '.join(FIELDS)} "
                "(put extra information under 'meta')"
            )
        missing = [k for k in REQUIRED_FIELDS if k not in obj]
        if missing:
            raise DataError(
                f"missing field(s) {', '.join(missing)}; every report needs {', '.join(REQUIRED_FIELDS)}"
            )
        rid = obj["id"]
        if isinstance(rid, int) and not isinstance(rid, bool):
            rid = str(rid)
        if not isinstance(rid, str):
            raise DataError(f"field 'id' must be a string, got {type(rid).__name__}")
        for key in ("site", "history", "findings", "diagnosis", "language"):
            if key in obj and not isinstance(obj[key], str):
                raise DataError(
                    f"report {rid}: field {key!r} must be a string, got {type(obj[key]).__name__}"
                )
        images = obj["images"]
        if not isinstance(images, list) or not all(isinstance(x, str) for x in images):
            raise DataError(f"report {rid}: field 'images' must be a list of path strings")
        valid = obj.get("valid")
        if valid is not None and (not isinstance(valid, list) or not all(isinstance(x, bool) for x in valid)):
            raise DataError(f"report {rid}: field 'valid' must be a list of true/false (or null)")
        meta = obj.get("meta") or {}
        if not isinstance(meta, dict):
            raise DataError(f"report {rid}: field 'meta' must be a JSON object")
        return cls(
            id=rid,
            site=obj["site"],
            history=obj.get("history", ""),
            findings=obj["findings"],
            diagnosis=obj["diagnosis"],
            language=obj["language"],
            images=list(images),
            valid=None if valid is None else list(valid),
            meta=meta,
        )


# ------------------------------------------------------------------------------------ file I/O


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in REPORT_SUFFIXES:
        raise DataError(f"{path}: unsupported report file type {suffix or '(none)'!r}; use .jsonl or .csv")
    return suffix[1:]


MAX_JSON_DEPTH = 32  # reports are flat; deeper nesting is a broken or hostile export


def _depth_error(what: str) -> DataError:
    return DataError(
        f"{what} nests JSON arrays/objects deeper than {MAX_JSON_DEPTH} levels; flatten 'meta' "
        f"(reports need at most a few levels)"
    )


def _json_depth(text: str) -> int:
    """Deepest bracket nesting of a JSON text, brackets inside strings ignored (no recursion)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _loads(text: str, what: str) -> Any:
    """json.loads that refuses pathological nesting with a DataError instead of a RecursionError."""
    if ("[" in text or "{" in text) and _json_depth(text) > MAX_JSON_DEPTH:
        raise _depth_error(what)
    try:
        return json.loads(text)
    except RecursionError:  # belt and braces: the depth scan should have caught it
        raise _depth_error(what) from None


def _csv_list(cell: str, what: str) -> list[Any] | None:
    """Parse a CSV list cell: a JSON list, or '|'-separated values; '' means None."""
    cell = cell.strip()
    if not cell:
        return None
    if cell.startswith("["):
        try:
            value = _loads(cell, f"column {what!r}")
        except json.JSONDecodeError as exc:
            raise DataError(
                f'column {what!r} is not valid JSON ({exc.msg}); write a JSON list like ["a.png"]'
            ) from None
        return value
    return cell.split("|")


def _csv_row_to_obj(row: dict[str, str]) -> dict[str, Any]:
    obj: dict[str, Any] = {k: v for k, v in row.items() if k not in ("images", "valid", "meta")}
    obj["images"] = _csv_list(row.get("images", ""), "images") or []
    valid = _csv_list(row.get("valid", ""), "valid")
    if valid is not None and valid and isinstance(valid[0], str):
        flags = {"true": True, "1": True, "false": False, "0": False}
        try:
            valid = [flags[v.strip().lower()] for v in valid]
        except KeyError as exc:
            raise DataError(f"column 'valid' has {exc.args[0]!r}; use true/false or 1/0") from None
    obj["valid"] = valid
    meta = row.get("meta", "").strip()
    try:
        obj["meta"] = _loads(meta, "column 'meta'") if meta else {}
    except json.JSONDecodeError as exc:
        raise DataError(
            f"column 'meta' is not valid JSON ({exc.msg}); write a JSON object like {{}}"
        ) from None
    return obj


def _iter_records(path: Path) -> Iterator[tuple[int, Report | DataError]]:
    """Yield (line number, Report or the DataError for that line) for every record in `path`.

    File-level problems (missing file, not UTF-8 CSV, CSV header without required columns) raise.
    """
    path = Path(path)
    fmt = _format_of(path)
    if not path.is_file():
        raise DataError(f"report file {path} does not exist; check the path")
    if fmt == "jsonl":
        with path.open("rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue
                try:
                    text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                    yield lineno, Report.from_dict(_loads(text, "line"))
                except UnicodeDecodeError:
                    yield (
                        lineno,
                        DataError(
                            "line is not UTF-8; re-save the file as UTF-8 (e.g. iconv -f GBK -t UTF-8)"
                        ),
                    )
                except json.JSONDecodeError as exc:
                    yield (
                        lineno,
                        DataError(
                            f"bad JSON ({exc.msg} at column {exc.colno}); write one JSON object per line"
                        ),
                    )
                except DataError as exc:
                    yield lineno, exc
        return
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:  # keep \r\n inside quoted cells
            text = fh.read()
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8; re-save it as UTF-8 (e.g. iconv -f GBK -t UTF-8)") from None
    lines = io.StringIO(text, newline="").readlines()  # the line breaks the csv module counts
    header_rows = list(csv.reader(lines[:1]))
    header = header_rows[0] if header_rows else []
    missing = [k for k in REQUIRED_FIELDS if k not in header]
    unknown = [k for k in header if k not in FIELDS]
    if missing or unknown:
        raise DataError(
            f"{path}: CSV header lacks column(s) {', '.join(missing) or '-'} and has unknown column(s) "
            f"{', '.join(unknown) or '-'}; the header must be {', '.join(FIELDS)} "
            "(history, valid and meta may be left out)"
        )
    for lineno, cells in _csv_rows(lines, start=1):
        if isinstance(cells, DataError):
            yield lineno, cells
            continue
        if not any(c.strip() for c in cells):
            continue
        if len(cells) > len(header):
            yield (
                lineno,
                DataError(
                    f"row has {len(cells)} cells, the header has {len(header)}; quote cells that "
                    "contain commas"
                ),
            )
            continue
        if len(cells) < len(header):
            yield (
                lineno,
                DataError(
                    f"row has {len(cells)} cells, the header has {len(header)} "
                    f"(missing: {', '.join(header[len(cells) :])}); add the missing cells, empty ones "
                    "as ,,"
                ),
            )
            continue
        try:
            yield lineno, Report.from_dict(_csv_row_to_obj(dict(zip(header, cells, strict=True))))
        except DataError as exc:
            yield lineno, exc


def _csv_rows(lines: list[str], start: int) -> Iterator[tuple[int, list[str] | DataError]]:
    """(line number, cells) for each CSV record after line `start` (1-based header line).

    A quoted cell may span lines. A quote left open swallows the rest of the file in Python's
    csv module; we detect that (the record reaches the end of the file with too few cells and
    a cell holding a line break), report it at the line where the record starts, and resume
    parsing at the next line, so the rows after it are still read.
    """
    i = start  # index into `lines` of the next record's first line
    while i < len(lines):
        reader = csv.reader(io.StringIO("".join(lines[i:]), newline=""))
        before = 0
        resume = None
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield i + before + 1, DataError(f"bad CSV ({exc}); check quoting of this row")
                resume = i + before + 1
                break
            first = i + before + 1  # 1-based line where this record starts
            consumed = reader.line_num - before
            at_end = i + reader.line_num >= len(lines)
            record = "".join(lines[first - 1 : i + reader.line_num])
            if consumed > 1 and at_end and _unclosed_quote(record):
                yield (
                    first,
                    DataError(
                        'unclosed quote: a cell opened with " on this line is never closed, so the '
                        "rest of the file would be read as one cell; close the quote (write a quote "
                        'inside a cell as "")'
                    ),
                )
                resume = first  # re-read from the line after the broken one
                break
            yield first, cells
            before = reader.line_num
        i = resume if resume is not None else len(lines)


def _unclosed_quote(line: str) -> bool:
    """True when the CSV text `line` leaves a quoted cell open at its end."""
    open_ = False
    at_cell_start = True
    k = 0
    while k < len(line):
        ch = line[k]
        if open_:
            if ch == '"':
                if k + 1 < len(line) and line[k + 1] == '"':
                    k += 1
                else:
                    open_ = False
        elif ch == '"' and at_cell_start:
            open_ = True
        at_cell_start = ch == "," and not open_
        k += 1
    return open_


def read_reports(path: str | os.PathLike[str]) -> list[Report]:
    """Read every report of a .jsonl or .csv file; the first bad line raises a DataError naming
    the file, the line and the fix."""
    reports = []
    for lineno, item in _iter_records(Path(path)):
        if isinstance(item, DataError):
            raise DataError(f"{path}:{lineno}: {item}")
        reports.append(item)
    return reports


def read_reports_lenient(path: str | os.PathLike[str]) -> tuple[list[Report], list[tuple[int, str]]]:
    """Read a report file, collecting `(line, message)` for bad lines instead of stopping.

    For batch commands: they process the good reports and must print (and count) the problems.
    """
    reports: list[Report] = []
    problems: list[tuple[int, str]] = []
    for lineno, item in _iter_records(Path(path)):
        if isinstance(item, DataError):
            problems.append((lineno, str(item)))
        else:
            reports.append(item)
    return reports, problems


def write_reports(path: str | os.PathLike[str], reports: Sequence[Report]) -> None:
    """Write reports as .jsonl or .csv (by suffix), atomically (temp file, then rename)."""
    path = Path(path)
    fmt = _format_of(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8", newline="") as fh:
        if fmt == "jsonl":
            for r in reports:
                record = {k: getattr(r, k) for k in FIELDS}  # no deep copy: json only reads it
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            writer = csv.writer(fh)
            writer.writerow(FIELDS)
            for r in reports:
                writer.writerow(
                    [
                        r.id,
                        r.site,
                        r.history,
                        r.findings,
                        r.diagnosis,
                        r.language,
                        json.dumps(r.images, ensure_ascii=False),
                        "" if r.valid is None else json.dumps(r.valid),
                        json.dumps(r.meta, ensure_ascii=False),
                    ]
                )
    os.replace(tmp, path)


_DRIVE = re.compile(r"^[A-Za-z]:")


def _resolve(root: str, rel: str) -> str:
    """String version of `resolve_image` (no Path objects: validate calls it per image)."""
    if not isinstance(rel, str) or not rel.strip():
        raise DataError(f"empty image path under {root}; list a file path relative to the dataset root")
    posix = rel.replace("\\", "/")
    if posix.startswith("/") or _DRIVE.match(rel):
        raise DataError(
            f"image path {rel!r} is absolute; store it relative to the dataset root {root} "
            "(the folder of the report file)"
        )
    norm = posixpath.normpath(posix)
    if norm == ".." or norm.startswith("../"):
        raise DataError(
            f"image path {rel!r} escapes the dataset root {root}; move the image inside that folder "
            "and store a path without '..'"
        )
    return os.path.join(root, norm)


def resolve_image(root: str | os.PathLike[str], rel: str) -> Path:
    """Join an image path stored in a report to the dataset root.

    Refuses empty and absolute paths and paths that escape the root with '..' (checked
    lexically; backslashes count as separators so Windows exports are caught too).
    """
    return Path(_resolve(os.fspath(root), rel))


# ---------------------------------------------------------------------------------- validation

PROBLEM_KINDS = (
    "unreadable_file",
    "malformed",
    "duplicate_id",
    "unsafe_path",
    "missing_image",
    "corrupt_image",
)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset. `path` is the image path for image problems."""

    kind: str
    file: str
    line: int
    report_id: str | None
    path: str | None
    message: str

    def render(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        rid = f" report {self.report_id}" if self.report_id else ""
        return f"{where}{rid}: {self.message}"


@dataclass
class ValidationSummary:
    """What `validate_dataset` found. `ok` is False when the bad-report fraction exceeds the
    threshold or a report file could not be read at all."""

    files: list[str]
    records: int
    bad_records: int
    image_refs: int
    images_checked: int
    problems: list[Problem]
    max_bad_fraction: float

    @property
    def bad_fraction(self) -> float:
        return self.bad_records / self.records if self.records else 0.0

    @property
    def counts(self) -> dict[str, int]:
        c = Counter(p.kind for p in self.problems)
        return {k: c[k] for k in PROBLEM_KINDS if c[k]}

    @property
    def ok(self) -> bool:
        unreadable = any(p.kind == "unreadable_file" for p in self.problems)
        return not unreadable and self.records > 0 and self.bad_fraction <= self.max_bad_fraction

    def render(self, max_listed: int | None = 20) -> str:
        """Human-readable summary; lists up to `max_listed` problems per kind (None: all)."""
        lines = [
            f"validated {len(self.files)} file(s): {self.records} report(s), {self.image_refs} image "
            f"reference(s), {self.images_checked} distinct image file(s) checked",
            f"bad reports: {self.bad_records} ({100 * self.bad_fraction:.2f}%), allowed "
            f"{100 * self.max_bad_fraction:.2f}% -> {'OK' if self.ok else 'FAIL'}",
        ]
        if self.records == 0:
            lines.append("no reports found: add reports to the file(s)")
        for kind, n in self.counts.items():
            lines.append(f"{kind}: {n}")
            listed = [p for p in self.problems if p.kind == kind]
            shown = listed if max_listed is None else listed[:max_listed]
            lines.extend(f"  {p.render()}" for p in shown)
            if len(shown) < len(listed):
                lines.append(
                    f"  ... and {len(listed) - len(shown)} more {kind} (pass --all to list every one)"
                )
        return "\n".join(lines)


def _check_image(path: str, decode: bool) -> tuple[str, str] | None:
    """Return (kind, message) when the image is missing or (if `decode`) does not fully decode."""
    if not os.path.isfile(path):
        return "missing_image", f"image {path} does not exist; restore the file or remove it from the report"
    if not decode:
        return None
    try:
        with Image.open(path) as im:
            im.verify()  # checksums and structure
        with Image.open(path) as im:
            im.load()  # full decode: catches truncated files that verify lets through
    except Exception as exc:  # any decoder failure means the file is unusable
        return "corrupt_image", f"image {path} does not decode ({exc}); re-export or remove it"
    return None


def report_files(data: str | os.PathLike[str]) -> list[Path]:
    """The report files named by DATA: the file itself, or the *.jsonl / *.csv files of a folder."""
    data = Path(data)
    if data.is_dir():
        files = sorted(p for p in data.iterdir() if p.is_file() and p.suffix.lower() in REPORT_SUFFIXES)
        if not files:
            raise DataError(
                f"folder {data} holds no *.jsonl or *.csv report files; pass a report file or its folder"
            )
        return files
    if not data.exists():
        raise DataError(f"{data} does not exist; pass a .jsonl/.csv report file or a folder of them")
    _format_of(data)
    return [data]


def validate_dataset(
    data: str | os.PathLike[str], max_bad_fraction: float = 0.0, decode: bool = True
) -> ValidationSummary:
    """Check a report file or folder: records parse, ids unique per file, images exist and decode.

    A report is bad when it does not parse, repeats an id, or has any image problem. Images are
    resolved against the folder of their report file; each distinct file is checked once.
    """
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise DataError(f"max_bad_fraction {max_bad_fraction} is outside [0, 1]; pass e.g. 0.01 for 1%")
    files = report_files(data)
    problems: list[Problem] = []
    checked: dict[str, tuple[str, str] | None] = {}
    records = bad = refs = 0
    for file in files:
        root = str(file.parent)
        seen: dict[str, int] = {}
        try:
            items = list(_iter_records(file))
        except DataError as exc:
            problems.append(Problem("unreadable_file", str(file), 0, None, None, str(exc)))
            continue
        for lineno, item in items:
            records += 1
            if isinstance(item, DataError):
                bad += 1
                problems.append(Problem("malformed", str(file), lineno, None, None, str(item)))
                continue
            is_bad = False
            if item.id in seen:
                is_bad = True
                problems.append(
                    Problem(
                        "duplicate_id",
                        str(file),
                        lineno,
                        item.id,
                        None,
                        f"id already used on line {seen[item.id]}; give every report a unique id",
                    )
                )
            else:
                seen[item.id] = lineno
            for rel in item.images:
                refs += 1
                try:
                    img = _resolve(root, rel)
                except DataError as exc:
                    is_bad = True
                    problems.append(Problem("unsafe_path", str(file), lineno, item.id, rel, str(exc)))
                    continue
                if img not in checked:
                    checked[img] = _check_image(img, decode)
                found = checked[img]
                if found is not None:
                    is_bad = True
                    problems.append(Problem(found[0], str(file), lineno, item.id, img, found[1]))
            bad += is_bad
    return ValidationSummary(
        files=[str(f) for f in files],
        records=records,
        bad_records=bad,
        image_refs=refs,
        images_checked=len(checked),
        problems=problems,
        max_bad_fraction=max_bad_fraction,
    )
