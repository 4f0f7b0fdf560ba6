"""LLaVA-Med's own evaluation files, read as they are: ground truth, candidate answers, text files.

What this file owns: reading the files LLaVA-Med v1.0.0's `run_eval.py` takes, so that
`llava-ultra score` scores LLaVA-Med's released answers without conversion:

- ground truth / question file (`--gt test.json`): a JSON list (or JSONL) of
  `{id, image, conversations: [{from: human, value}, {from: gpt, value}], answer_type}`; the
  misspelt key `conversatons` is accepted as v1.0.0 accepts it. Empty reference answers are kept
  (v1.0.0 scores them; VQA-RAD's released file has 49), unlike our dataset readers, which refuse
  them as malformed training data.
- candidate file (`--candidate`): `{"0": [answers]}` (a plain list is accepted too), the answer
  set of "open accuracy".
- predictions (`--pred`): JSONL `{question_id, prompt, text, answer_id, model_id, metadata}`,
  the same format `llava-ultra eval` writes; read by `runner.read_predictions` with
  `read_text_file` below.

Every file is decoded as UTF-8 (a byte-order mark is allowed); any other encoding is an error
naming the file, the byte offset and line, and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import DataError

SCHEME = "llava-med"
CANDIDATE_KEY = "0"


def read_text_file(path: str | Path, what: str) -> str:
    """The UTF-8 text of `path` (BOM stripped); a DataError naming the problem and the fix otherwise."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{what} {path} not found; check the path") from None
    except IsADirectoryError:
        raise DataError(f"{what} {path} is a folder; pass the file itself") from None
    except OSError as exc:
        raise DataError(
            f"cannot read {what} {path} ({exc.strerror}); check the path and permissions"
        ) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{what} {path} is not UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start} (line {line}) "
            f"cannot be decoded; it was probably saved in another encoding (GBK, Latin-1, UTF-16): re-save it "
            f"as UTF-8, e.g. `iconv -f GBK -t UTF-8 {path.name} > utf8-{path.name}`"
        ) from None


def _records(path: Path, what: str) -> list[Any]:
    """A JSON list, or JSONL (one object a line), parsed with the line of any syntax error."""
    text = read_text_file(path, what)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as whole:
        rows = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                # a JSON Lines file (its first lines parsed) names its bad line; otherwise the whole-file error
                lineno, colno, msg = (
                    (line_no, exc.colno, exc.msg) if rows else (whole.lineno, whole.colno, whole.msg)
                )
                raise DataError(
                    f"{what} {path}: bad JSON at line {lineno} column {colno} ({msg}); "
                    "give a JSON list or one JSON object per line"
                ) from None
        return rows
    if isinstance(data, dict):
        return [data]
    if not isinstance(data, list):
        raise DataError(f"{what} {path}: expected a JSON list of records, got a {type(data).__name__}")
    return data


def _conversations(rec: dict[str, Any]) -> Any:
    return rec["conversations"] if "conversations" in rec else rec.get("conversatons")


def looks_like_llava_med(path: str | Path) -> bool:
    """True for a .json/.jsonl file whose first record has LLaVA-Med's ground-truth shape: an id,
    conversations (or `conversatons`) and answer_type, and neither `images` nor `language` (which
    our own eval files have)."""
    path = Path(path)
    if path.suffix not in (".json", ".jsonl") or not path.is_file():
        return False
    try:
        records = _records(path, "ground-truth file")
    except DataError:
        return False
    first = records[0] if records else None
    return (
        isinstance(first, dict)
        and "id" in first
        and _conversations(first) is not None
        and "answer_type" in first
        and "images" not in first
        and "language" not in first
    )


def read_ground_truth(path: str | Path) -> list[dict[str, Any]]:
    """LLaVA-Med ground-truth records -> our eval-sample dicts (id, images, conversations,
    answer_type, language 'auto'), in file order. Empty reference answers are kept."""
    path = Path(path)
    records = _records(path, "LLaVA-Med ground-truth file")
    if not records:
        raise DataError(f"LLaVA-Med ground-truth file {path} has no records")
    out = []
    seen: dict[str, int] = {}
    for i, rec in enumerate(records):
        where = f"{path} record[{i}]"
        if not isinstance(rec, dict) or "id" not in rec:
            raise DataError(
                f"{where} has no id; LLaVA-Med ground truth records are {{id, image, conversations, answer_type}}"
            )
        conv = _conversations(rec)
        if (
            not isinstance(conv, list)
            or len(conv) < 2
            or not all(isinstance(turn, dict) and isinstance(turn.get("value"), str) for turn in conv[:2])
        ):
            raise DataError(
                f"{where} (id {rec['id']!r}): conversations must hold a human turn and a gpt turn with "
                "string values (the reference answer is the second turn's value)"
            )
        if "answer_type" not in rec:
            raise DataError(f"{where} (id {rec['id']!r}) has no answer_type; give OPEN or CLOSED")
        key = str(rec["id"])
        if key in seen:
            raise DataError(
                f"{where}: id {rec['id']!r} also at record[{seen[key]}]; ids must be unique to pair predictions"
            )
        seen[key] = i
        image = rec.get("image")
        out.append(
            {
                "id": rec["id"],
                "images": [image] if isinstance(image, str) and image else [],
                "conversations": [dict(conv[0]), dict(conv[1])],
                "answer_type": rec["answer_type"],
                "language": "auto",
                "dataset": SCHEME,
            }
        )
    return out


def read_candidates(path: str | Path) -> list[Any]:
    """The candidate answers of a LLaVA-Med candidate file (`{"0": [answers]}` or a plain list)."""
    path = Path(path)
    text = read_text_file(path, "candidate file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"candidate file {path}: bad JSON at line {exc.lineno} column {exc.colno} ({exc.msg})"
        ) from None
    if isinstance(data, dict):
        if CANDIDATE_KEY not in data:
            raise DataError(
                f'candidate file {path} has no key "0"; LLaVA-Med\'s format is {{"0": [answers]}} '
                f"(keys found: {', '.join(map(repr, list(data)[:5])) or 'none'})"
            )
        data = data[CANDIDATE_KEY]
    if not isinstance(data, list):
        raise DataError(
            f'candidate file {path}: expected a list of answers under "0", got {type(data).__name__}'
        )
    if not data:
        raise DataError(f"candidate file {path} lists no answers; open accuracy needs at least one candidate")
    return data
