"""Readers for local copies of public Med-VQA sets and of our own data, into one `VQASample` type.

Sets: SLAKE, VQA-RAD, PathVQA (pickle or LLaVA-Med JSON), OpenI-zh (XrayGLM format), our
instruction/eval JSON (`ultra`) and our report files (`reports`, turned into eval QA exactly as
`llava-ultra instruct` does). `load_dataset("slake:/data/Slake1.0?split=test&lang=zh")` picks a
reader by scheme; nothing is ever downloaded. `to_eval_sample` turns a `VQASample` into the
single-turn sample format of `instruct.build_eval`, so eval code sees one shape for every set.

Notable choices:
- `VQASample.images` are paths relative to `VQASample.root` (the folder they resolve against),
  exactly as the source stores them; `image_paths()` gives absolute paths. Every relative path
  goes through `reports.resolve_image`, so a record cannot point outside its dataset folder.
- Errors come in two levels. A wrong folder layout, an unreadable or non-JSON file, an unknown
  split or option always raise a DataError saying which file was expected where and what was
  found. Record-level problems (missing field, bad value, missing image, duplicate id) raise a
  DataError naming the file, the record (`file record[i]`, 0-based list index, or `file:line`
  for JSONL) and the field -- unless the caller passes a `problems` list (or uses
  `load_dataset_lenient`): then each bad record is appended as a `BadItem` and skipped.
- Image existence is checked by default (each file once: SLAKE asks ~10 questions per image);
  `check_images=False` skips it for fast dry runs. Images are not decoded here
  (`llava-ultra validate` does that for our own data).
- Answers are coerced to strings (VQA-RAD stores some as numbers: 2 -> "2", 2.0 -> "2");
  answer types are stripped and upper-cased ('CLOSED ' -> 'CLOSED'). PathVQA's type is CLOSED
  for yes/no answers, OPEN otherwise, unless a LLaVA-Med JSON record names it.
- VQA-RAD has no official split; `phrase_type` is used: freeform/para -> train,
  test_freeform/test_para -> test (the 451-question test set published results use).
- PathVQA pickles are read with an unpickler that refuses every class and function reference
  (plain lists/dicts/strings only) and only from files whose real path lies under the given
  root: unpickling runs code, so a pickle is never trusted. JSON is preferred when both exist.
- OpenI-zh images `<report>_<n>` are grouped by the id before the first `_` into one sample with
  1-5 frames (the redundancy case the paper targets), asked one Chinese description question.
- Public sets have no examination site: their eval samples carry `site: None`,
  `site_cue: None`, `valid: None` and `findings: ""` (the caption for OpenI-zh).
"""

from __future__ import annotations

import json
import math
import os
import pickle
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from ..errors import DataError
from .instruct import CLOSED, OPEN, BadItem, build_eval, image_root_of, report_rng, split_of
from .reports import read_reports, read_reports_lenient, report_files, resolve_image
from .samples import IMAGE_TOKEN, check_sample, cue_flags, image_prompt

LANGUAGES = ("zh", "en")
LANGUAGE_CHOICES = ("zh", "en", "all")
ANSWER_TYPES = (OPEN, CLOSED)
OPENI_QUESTION = "请描述这组胸部X光片的影像表现。"
ULTRA_MODALITY = "US"

# Keys of an eval sample that `VQASample` holds as fields; everything else travels in `meta`.
_CORE_KEYS = ("id", "images", "conversations", "language", "answer_type", "question_type")
_DERIVED_KEYS = ("task", "question_types", "dataset", "split", "modality")
# Meta keys that `to_eval_sample` puts back at the top level (with the public-set defaults).
_PROMOTED: dict[str, Any] = {"site": None, "site_cue": None, "findings": "", "valid": None}


@dataclass
class VQASample:
    """One question about one or more images, from any supported dataset.

    Attributes:
        id: unique within the loaded set (e.g. 'slake-test-11934', 'openi-zh-162').
        images: image paths relative to `root`, in order (absolute paths when `root` is '').
        question: the question text, without image placeholders.
        answer: the reference answer (always a string).
        answer_type: 'OPEN' or 'CLOSED' (yes/no and other closed-set questions).
        language: 'zh' or 'en'.
        dataset: 'slake', 'vqa-rad', 'pathvqa', 'openi-zh', 'ultra' or 'reports'.
        split: the source split ('train', 'validate', 'val', 'test', 'all', or our file's split).
        modality: 'CT', 'MRI', 'X-Ray', 'pathology', 'US' ... ('' when the source does not say).
        question_type: the source's question category (SLAKE content_type, VQA-RAD question_type,
            our question type) or ''.
        meta: source-specific extras (report_id, location, organ, site, findings, ...).
        root: absolute folder the image paths resolve against.
    """

    id: str
    images: list[str]
    question: str
    answer: str
    answer_type: str
    language: str
    dataset: str
    split: str
    modality: str = ""
    question_type: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    root: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            raise DataError("sample has an empty id; give every sample a unique id")
        if not self.images:
            raise DataError(f"sample {self.id} has no images; every sample needs at least one image")
        if self.answer_type not in ANSWER_TYPES:
            raise DataError(f"sample {self.id}: answer_type {self.answer_type!r} is not OPEN or CLOSED")
        if self.language not in LANGUAGES:
            raise DataError(f"sample {self.id}: unknown language {self.language!r}; use 'zh' or 'en'")
        for name in ("question", "answer"):
            value = getattr(self, name)
            if not value.strip() or IMAGE_TOKEN in value:
                raise DataError(
                    f"sample {self.id}: {name} {value!r} is empty or holds {IMAGE_TOKEN}; "
                    f"give plain text without {IMAGE_TOKEN}"
                )

    def image_paths(self) -> list[Path]:
        """Absolute paths of the images."""
        return [Path(self.root, p) if self.root else Path(p) for p in self.images]


# ---------------------------------------------------------------------------- shared helpers


class _Collector:
    """Accumulates samples; a bad record raises, or is recorded when a problems list was given."""

    def __init__(self, problems: list[BadItem] | None) -> None:
        self.problems = problems
        self.samples: list[VQASample] = []
        self._seen: dict[str, str] = {}

    def bad(self, where: str, message: str) -> None:
        if self.problems is None:
            raise DataError(f"{where}: {message}")
        self.problems.append(BadItem(where, message))

    def add(self, sample: VQASample, where: str) -> None:
        if sample.id in self._seen:
            self.bad(
                where,
                f"duplicate sample id {sample.id!r} (first at {self._seen[sample.id]}); "
                "ids must be unique for predictions to pair with references: de-duplicate the file",
            )
            return
        self._seen[sample.id] = where
        self.samples.append(sample)


class _Images:
    """Resolves record image paths under a root and checks each file exists (once per file)."""

    def __init__(self, root: Path, check: bool) -> None:
        self.root = root
        self.check = check
        self._exists: dict[str, bool] = {}

    def missing(self, rel: str) -> str | None:
        """A message when `rel` is unsafe or (if checking) absent; None when it is fine."""
        try:
            path = str(resolve_image(self.root, rel))
        except DataError as exc:
            return str(exc)
        if not self.check:
            return None
        if path not in self._exists:
            self._exists[path] = os.path.isfile(path)
        if self._exists[path]:
            return None
        return (
            f"image {path} does not exist; restore it, or fix the record's image name "
            "(check_images=False / ?check_images=0 skips this check)"
        )

    def require(self, rels: Iterable[str]) -> None:
        for rel in rels:
            message = self.missing(rel)
            if message:
                raise DataError(message)


def _listing(folder: Path, limit: int = 12) -> str:
    """What a folder holds, for layout errors: 'a.json, imgs/, ...' or '(empty folder)'."""
    try:
        entries = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    except OSError:
        return "(unreadable folder)"
    if not entries:
        return "(empty folder)"
    more = f", ... {len(entries) - limit} more" if len(entries) > limit else ""
    return ", ".join(entries[:limit]) + more


def _folder(root: str | os.PathLike[str], what: str) -> Path:
    path = Path(root)
    if not path.is_dir():
        state = "is a file" if path.is_file() else "does not exist"
        raise DataError(f"{what} folder {path} {state}; pass the folder of your local {what} copy")
    return path.resolve()


def _load_json(path: Path) -> Any:
    """Parse a whole JSON file; unreadable, non-UTF-8 or invalid files raise naming line/column."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8; re-save it as UTF-8") from None
    except OSError as exc:
        raise DataError(f"cannot read {path} ({exc.strerror}); check the path and permissions") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}: bad JSON at line {exc.lineno} column {exc.colno} ({exc.msg}); fix or re-export the file"
        ) from None


def _json_list(path: Path, what: str) -> list[Any]:
    data = _load_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of {what} records, got a {type(data).__name__}")
    return data


def _require(rec: Any, fields: Iterable[str], what: str) -> dict[str, Any]:
    """The record as a dict; raises naming the missing fields."""
    fields = tuple(fields)
    if not isinstance(rec, dict):
        raise DataError(
            f"record is a {type(rec).__name__}, expected an object with fields {', '.join(fields)}"
        )
    missing = [f for f in fields if rec.get(f) is None]
    if missing:
        raise DataError(
            f"missing field(s) {', '.join(missing)}; every {what} record needs {', '.join(fields)}"
        )
    return rec


def _text(value: Any, name: str) -> str:
    """A string field: numbers become their text (2.0 -> '2'); empty or structured values raise."""
    if isinstance(value, bool):
        value = "yes" if value else "no"
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = str(int(value))
    elif isinstance(value, int | float):
        value = str(value)
    if not isinstance(value, str):
        raise DataError(f"field {name!r} must be text, got {type(value).__name__}")
    value = value.strip()
    if not value:
        raise DataError(f"field {name!r} is empty; every record needs a non-empty {name}")
    return value


def _answer_type(value: Any) -> str:
    kind = str(value).strip().upper()
    if kind not in ANSWER_TYPES:
        raise DataError(f"field 'answer_type' is {value!r}; expected OPEN or CLOSED")
    return kind


def _yes_no_type(answer: str) -> str:
    return CLOSED if answer.strip().lower() in ("yes", "no") else OPEN


def _check_language(language: str) -> str:
    if language not in LANGUAGE_CHOICES:
        raise DataError(f"unknown language {language!r}; use one of: {', '.join(LANGUAGE_CHOICES)}")
    return language


def _splits(split: str, known: tuple[str, ...], aliases: dict[str, str], what: str) -> tuple[str, ...]:
    name = aliases.get(split, split)
    if name == "all":
        return known
    if name not in known:
        raise DataError(f"unknown {what} split {split!r}; use one of: {', '.join((*known, 'all'))}")
    return (name,)


def _question_of(human: str) -> str:
    """A human turn without its `<image>` placeholders."""
    return human.replace(IMAGE_TOKEN, "").strip()


# -------------------------------------------------------------------------------------- SLAKE

SLAKE_FILES = {"train": "train.json", "validate": "validate.json", "test": "test.json"}
SLAKE_FIELDS = ("img_name", "question", "answer", "q_lang", "answer_type")


def read_slake(
    root: str | os.PathLike[str],
    *,
    split: str = "test",
    language: str = "all",
    check_images: bool = True,
    problems: list[BadItem] | None = None,
) -> list[VQASample]:
    """SLAKE: `{train,validate,test}.json` (split 'val'/'validation' mean 'validate', 'all' all
    three), images at `imgs/<img_name>`; `language` 'zh', 'en' or 'all' filters on `q_lang`.

    question_type is `content_type`; modality is `modality` (CT, MRI, X-Ray).
    """
    folder = _folder(root, "SLAKE")
    _check_language(language)
    wanted = _splits(split, tuple(SLAKE_FILES), {"val": "validate", "validation": "validate"}, "SLAKE")
    present = [name for name in SLAKE_FILES.values() if (folder / name).is_file()]
    if not present:
        raise DataError(
            f"expected {'/'.join(SLAKE_FILES.values())} in {folder} (SLAKE layout); found: {_listing(folder)}"
        )
    for name in wanted:
        if not (folder / SLAKE_FILES[name]).is_file():
            raise DataError(
                f"expected {SLAKE_FILES[name]} in {folder} for split {name!r} (SLAKE layout); "
                f"found: {_listing(folder)}"
            )
    if check_images and not (folder / "imgs").is_dir():
        raise DataError(
            f"expected an imgs/ folder in {folder} (SLAKE layout: imgs/<img_name>); found: {_listing(folder)}"
        )
    out = _Collector(problems)
    images = _Images(folder, check_images)
    for name in wanted:
        path = folder / SLAKE_FILES[name]
        for i, rec in enumerate(_json_list(path, "SLAKE")):
            where = f"{path} record[{i}]"
            try:
                rec = _require(rec, SLAKE_FIELDS, "SLAKE")
                lang = str(rec["q_lang"]).strip().lower()
                if lang not in LANGUAGES:
                    raise DataError(f"field 'q_lang' is {rec['q_lang']!r}; expected 'en' or 'zh'")
                if language != "all" and lang != language:
                    continue
                rel = f"imgs/{_text(rec['img_name'], 'img_name')}"
                qid = rec.get("qid", i)
                sample = VQASample(
                    id=f"slake-{name}-{qid}",
                    images=[rel],
                    question=_text(rec["question"], "question"),
                    answer=_text(rec["answer"], "answer"),
                    answer_type=_answer_type(rec["answer_type"]),
                    language=lang,
                    dataset="slake",
                    split=name,
                    modality=str(rec.get("modality") or "").strip(),
                    question_type=str(rec.get("content_type") or "").strip(),
                    meta={
                        "report_id": str(rec.get("img_id", rec["img_name"])),
                        "qid": qid,
                        "location": rec.get("location"),
                        "base_type": rec.get("base_type"),
                    },
                    root=str(folder),
                )
                images.require(sample.images)
            except DataError as exc:
                out.bad(where, str(exc))
                continue
            out.add(sample, where)
    return out.samples


# ------------------------------------------------------------------------------------ VQA-RAD

VQA_RAD_FILE = "VQA_RAD Dataset Public.json"
VQA_RAD_IMAGES = "VQA_RAD Image Folder"
VQA_RAD_FIELDS = ("image_name", "question", "answer", "answer_type", "phrase_type")
VQA_RAD_PHRASES = {"freeform": "train", "para": "train", "test_freeform": "test", "test_para": "test"}


def read_vqa_rad(
    root: str | os.PathLike[str],
    *,
    split: str = "test",
    check_images: bool = True,
    problems: list[BadItem] | None = None,
) -> list[VQASample]:
    """VQA-RAD: `VQA_RAD Dataset Public.json`, images in `VQA_RAD Image Folder/`.

    No official split exists: `phrase_type` freeform/para is 'train', test_freeform/test_para is
    'test' (default), 'all' keeps both. question_type is the stripped, upper-cased
    `question_type` ('PRES', 'ABN', ...); the organ goes to meta (the set names no modality).
    """
    folder = _folder(root, "VQA-RAD")
    wanted = _splits(split, ("train", "test"), {}, "VQA-RAD")
    path = folder / VQA_RAD_FILE
    if not path.is_file():
        raise DataError(
            f"expected {VQA_RAD_FILE!r} in {folder} (VQA-RAD layout, images in {VQA_RAD_IMAGES!r}/); "
            f"found: {_listing(folder)}"
        )
    if check_images and not (folder / VQA_RAD_IMAGES).is_dir():
        raise DataError(f"expected a {VQA_RAD_IMAGES!r}/ folder in {folder}; found: {_listing(folder)}")
    out = _Collector(problems)
    images = _Images(folder, check_images)
    for i, rec in enumerate(_json_list(path, "VQA-RAD")):
        where = f"{path} record[{i}]"
        try:
            rec = _require(rec, VQA_RAD_FIELDS, "VQA-RAD")
            phrase = str(rec["phrase_type"]).strip().lower()
            if phrase not in VQA_RAD_PHRASES:
                raise DataError(
                    f"field 'phrase_type' is {rec['phrase_type']!r}; expected one of {', '.join(VQA_RAD_PHRASES)}"
                )
            if VQA_RAD_PHRASES[phrase] not in wanted:
                continue
            image = _text(rec["image_name"], "image_name")
            qid = rec.get("qid", i)
            sample = VQASample(
                id=f"vqa-rad-{qid}",
                images=[f"{VQA_RAD_IMAGES}/{image}"],
                question=_text(rec["question"], "question"),
                answer=_text(rec["answer"], "answer"),
                answer_type=_answer_type(rec["answer_type"]),
                language="en",
                dataset="vqa-rad",
                split=VQA_RAD_PHRASES[phrase],
                question_type=str(rec.get("question_type") or "").strip().upper(),
                meta={
                    "report_id": image,
                    "qid": qid,
                    "phrase_type": phrase,
                    "organ": str(rec.get("image_organ") or "").strip().upper(),
                },
                root=str(folder),
            )
            images.require(sample.images)
        except DataError as exc:
            out.bad(where, str(exc))
            continue
        out.add(sample, where)
    return out.samples


# ------------------------------------------------------------------------------------ PathVQA

PATHVQA_SPLITS = ("train", "val", "test")


class _PlainUnpickler(pickle.Unpickler):
    """Loads only built-in containers and scalars: any class or function reference is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_pickle(path: Path, root: Path) -> list[Any]:
    real = path.resolve()
    if not real.is_relative_to(root):
        raise DataError(f"{path} resolves to {real}, outside {root}; refusing to unpickle it")
    try:
        with real.open("rb") as fh:
            data = _PlainUnpickler(fh).load()
    except Exception as exc:  # any failure to decode means the file is unusable as given
        raise DataError(
            f"{path}: not a plain pickled list of dicts ({exc}); convert it to JSON "
            f"([{{'image', 'question', 'answer'}}, ...]) and put it at {root}/<split>.json"
        ) from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a pickled list of qa dicts, got a {type(data).__name__}")
    return data


def _pathvqa_source(folder: Path, split: str) -> Path:
    candidates = (f"{split}.json", f"qas/{split}.json", f"qas/{split}/{split}_qa.pkl")
    for rel in candidates:
        if (folder / rel).is_file():
            return folder / rel
    raise DataError(
        f"expected one of {', '.join(candidates)} in {folder} for PathVQA split {split!r}; "
        f"found: {_listing(folder)}"
    )


def _pathvqa_record(rec: Any) -> tuple[str, str, str, str | None]:
    """(image, question, answer, answer_type or None) from a qa dict or a LLaVA-Med record."""
    if isinstance(rec, dict) and "conversations" in rec:
        rec = _require(rec, ("image", "conversations"), "LLaVA-Med PathVQA")
        conv = rec["conversations"]
        if not isinstance(conv, list) or len(conv) < 2 or not all(isinstance(t, dict) for t in conv[:2]):
            raise DataError("field 'conversations' needs a human turn and a gpt turn")
        question = _question_of(_text(conv[0].get("value"), "conversations[0].value"))
        kind = rec.get("answer_type")
        return (
            _text(rec["image"], "image"),
            question,
            _text(conv[1].get("value"), "conversations[1].value"),
            None if kind is None else _answer_type(kind),
        )
    rec = _require(rec, ("image", "question", "answer"), "PathVQA")
    return (
        _text(rec["image"], "image"),
        _text(rec["question"], "question"),
        _text(rec["answer"], "answer"),
        None,
    )


def read_pathvqa(
    root: str | os.PathLike[str],
    *,
    split: str = "test",
    check_images: bool = True,
    problems: list[BadItem] | None = None,
) -> list[VQASample]:
    """PathVQA: per split the first of `<split>.json`, `qas/<split>.json` (LLaVA-Med JSON or a
    JSON qa list) or `qas/<split>/<split>_qa.pkl` (a pickled list of {image, question, answer});
    images at `images/<split>/<image>` ('.jpg' added when the name has no extension).
    """
    folder = _folder(root, "PathVQA")
    out = _Collector(problems)
    images = _Images(folder, check_images)
    for name in _splits(split, PATHVQA_SPLITS, {"validate": "val", "validation": "val"}, "PathVQA"):
        source = _pathvqa_source(folder, name)
        records = _read_pickle(source, folder) if source.suffix == ".pkl" else _json_list(source, "PathVQA")
        for i, rec in enumerate(records):
            where = f"{source} record[{i}]"
            try:
                image, question, answer, kind = _pathvqa_record(rec)
                file = image if Path(image).suffix else f"{image}.jpg"
                sample = VQASample(
                    id=f"pathvqa-{name}-{rec.get('id', i)}",
                    images=[file if "/" in file else f"images/{name}/{file}"],
                    question=question,
                    answer=answer,
                    answer_type=kind or _yes_no_type(answer),
                    language="en",
                    dataset="pathvqa",
                    split=name,
                    modality="pathology",
                    meta={"report_id": Path(file).stem},
                    root=str(folder),
                )
                images.require(sample.images)
            except DataError as exc:
                out.bad(where, str(exc))
                continue
            out.add(sample, where)
    return out.samples


# ----------------------------------------------------------------------------------- OpenI-zh

OPENI_FILE = "openi-zh.json"
OPENI_IMAGE_DIRS = ("images", "Xray")


def _openi_file(path: Path) -> Path:
    if path.is_file():
        return path
    folder = _folder(path, "OpenI-zh")
    if (folder / OPENI_FILE).is_file():
        return folder / OPENI_FILE
    jsons = sorted(folder.glob("*.json"))
    if len(jsons) == 1:
        return jsons[0]
    raise DataError(
        f"expected {OPENI_FILE} (XrayGLM format: {{'annotations': [{{'image_id', 'caption'}}]}}) in "
        f"{folder}; found: {_listing(folder)}"
    )


def _frame_key(image_id: str) -> tuple[int, str]:
    tail = image_id.partition("_")[2]
    return (int(tail), "") if tail.isdigit() else (1 << 30, tail)


def read_openi_zh(
    root: str | os.PathLike[str],
    *,
    check_images: bool = True,
    problems: list[BadItem] | None = None,
) -> list[VQASample]:
    """OpenI-zh (XrayGLM): `openi-zh.json` (or the folder's only *.json, or the file itself),
    images `images/<image_id>.png` (or XrayGLM's `Xray/`).

    Images sharing the id before the first '_' form one report ('162_1', '162_2' -> '162'),
    frames ordered by their number; the sample asks OPENI_QUESTION and the answer is the
    caption (also in meta['findings']). A missing frame is dropped (and reported) in lenient
    mode; a report with no frame left is dropped.
    """
    path = _openi_file(Path(root))
    folder = path.parent.resolve()
    image_dir = next((d for d in OPENI_IMAGE_DIRS if (folder / d).is_dir()), None)
    if image_dir is None:
        if check_images:
            raise DataError(
                f"expected an images/ (or Xray/) folder beside {path.name} in {folder} "
                f"(OpenI-zh layout: images/<image_id>.png); found: {_listing(folder)}"
            )
        image_dir = OPENI_IMAGE_DIRS[0]
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise DataError(
            f"{path}: expected {{'annotations': [{{'image_id', 'caption'}}, ...]}} (XrayGLM format)"
        )
    out = _Collector(problems)
    images = _Images(folder, check_images)
    groups: dict[str, list[tuple[str, str, str]]] = {}  # report id -> [(image id, caption, where)]
    seen: dict[str, str] = {}
    for i, rec in enumerate(data["annotations"]):
        where = f"{path} annotations[{i}]"
        try:
            rec = _require(rec, ("image_id", "caption"), "OpenI-zh")
            image_id = _text(rec["image_id"], "image_id")
            caption = _text(rec["caption"], "caption")
            if image_id in seen:
                raise DataError(
                    f"image_id {image_id!r} repeats {seen[image_id]}; keep one annotation per image"
                )
            seen[image_id] = where
            file = image_id if Path(image_id).suffix else f"{image_id}.png"
            message = images.missing(f"{image_dir}/{file}")
            if message:
                raise DataError(message)
        except DataError as exc:
            out.bad(where, str(exc))
            continue
        groups.setdefault(image_id.partition("_")[0], []).append((image_id, caption, where))
    for report_id, frames in groups.items():
        frames.sort(key=lambda f: _frame_key(f[0]))
        captions = list(dict.fromkeys(c for _, c, _ in frames))
        meta: dict[str, Any] = {
            "report_id": report_id,
            "image_ids": [f[0] for f in frames],
            "findings": captions[0],
        }
        if len(captions) > 1:
            meta["captions"] = captions
        sample = VQASample(
            id=f"openi-zh-{report_id}",
            images=[f"{image_dir}/{f if Path(f).suffix else f + '.png'}" for f, _, _ in frames],
            question=OPENI_QUESTION,
            answer=captions[0],
            answer_type=OPEN,
            language="zh",
            dataset="openi-zh",
            split="all",
            modality="X-Ray",
            question_type="findings",
            meta=meta,
            root=str(folder),
        )
        out.add(sample, frames[0][2])
    return out.samples


# ------------------------------------------------------------------------ our own data formats


def _ultra_split(path: Path) -> str:
    """'eval.test.json' -> 'test' (instruct outputs), 'mine.json' -> 'mine'."""
    parts = path.name.split(".")
    if len(parts) >= 3 and parts[0] in ("stage1", "stage2", "eval"):
        return parts[1]
    return parts[0]


def from_eval_sample(
    rec: Any, *, root: str, dataset: str, split: str, modality: str = ULTRA_MODALITY
) -> list[VQASample]:
    """Our instruction/eval sample (instruct format) -> one VQASample per human/gpt turn pair.

    A single-turn sample keeps its id; turn t of a multi-turn sample becomes '<id>-t<t>'. Only
    single-turn samples keep their `answer_type` (later turns of a conversation are OPEN).
    Extra keys (report_id, site, site_cue, findings, valid, ...) go to `meta`.
    """
    rec = _require(rec, ("id", "images", "conversations", "language"), "instruction/eval")
    check_sample(rec)
    images = rec["images"]
    if not all(isinstance(p, str) for p in images):
        raise DataError("field 'images' must be a list of path strings")
    conv = rec["conversations"]
    qtypes = rec.get("question_types") or []
    single = len(conv) == 2
    meta = {k: v for k, v in rec.items() if k not in _CORE_KEYS + _DERIVED_KEYS}
    meta.setdefault("report_id", rec["id"])
    out = []
    for t in range(0, len(conv), 2):
        turn = t // 2
        qtype = rec.get("question_type") if single else None
        if qtype is None:
            qtype = qtypes[turn] if turn < len(qtypes) else ""
        out.append(
            VQASample(
                id=str(rec["id"]) if single else f"{rec['id']}-t{turn}",
                images=list(images),
                question=_question_of(str(conv[t]["value"])),
                answer=str(conv[t + 1]["value"]).strip(),
                answer_type=_answer_type(rec.get("answer_type", OPEN)) if single else OPEN,
                language=rec["language"],
                dataset=dataset,
                split=split,
                modality=rec.get("modality", modality),
                question_type=str(qtype),
                meta=dict(meta),
                root=root,
            )
        )
    return out


def read_ultra(
    path: str | os.PathLike[str],
    *,
    language: str = "all",
    image_root: str | os.PathLike[str] | None = None,
    check_images: bool = True,
    problems: list[BadItem] | None = None,
) -> list[VQASample]:
    """Our instruction/eval JSON (a list of samples, e.g. `eval.test.json` from `llava-ultra
    instruct`). Images resolve against `image_root`, else the `image_root` of the folder's
    `instruct_meta.json`, else the file's folder. Multi-turn samples give one VQASample per turn.
    """
    path = Path(path)
    _check_language(language)
    if not path.is_file():
        where = "a folder" if path.is_dir() else "missing"
        raise DataError(
            f"{path} is {where}; pass an instruction/eval JSON file such as <instruct out>/eval.test.json"
        )
    if image_root is not None:
        root = Path(image_root).resolve()
    elif (path.parent / "instruct_meta.json").is_file():
        root = image_root_of(path.parent)
    else:
        root = path.parent.resolve()
    out = _Collector(problems)
    images = _Images(root, check_images)
    split = _ultra_split(path)
    for i, rec in enumerate(_json_list(path, "instruction/eval")):
        where = f"{path} record[{i}]"
        try:
            if isinstance(rec, dict) and language != "all" and rec.get("language") != language:
                continue
            samples = from_eval_sample(rec, root=str(root), dataset="ultra", split=split)
            images.require(samples[0].images)
        except DataError as exc:
            out.bad(where, str(exc))
            continue
        for sample in samples:
            out.add(sample, where)
    return out.samples


def read_report_qa(
    path: str | os.PathLike[str],
    *,
    language: str = "all",
    site_cue: str = "both",
    seed: int = 0,
    check_images: bool = True,
    problems: list[BadItem] | None = None,
) -> list[VQASample]:
    """Report files (.jsonl/.csv, or a folder of them) -> the eval QA `llava-ultra instruct`
    would write for them with the same seed and site-cue choice (`instruct.build_eval`)."""
    _check_language(language)
    cues = cue_flags(site_cue)
    out = _Collector(problems)
    for file in report_files(path):
        root = file.parent.resolve()
        images = _Images(root, check_images)
        if problems is None:
            reports = read_reports(file)
        else:
            reports, bad_lines = read_reports_lenient(file)
            problems += [BadItem(f"{file}:{line}", message) for line, message in bad_lines]
        for report in reports:
            if language != "all" and report.language != language:
                continue
            where = f"{file} report {report.id}"
            try:
                images.require(report.images)
                evals = build_eval(report, report_rng(seed, report, "eval"), cues)
                samples = [
                    s
                    for rec in evals
                    for s in from_eval_sample(rec, root=str(root), dataset="reports", split=split_of(file))
                ]
            except DataError as exc:
                out.bad(where, str(exc))
                continue
            for sample in samples:
                out.add(sample, where)
    return out.samples


# -------------------------------------------------------------------------------- conversion


def to_eval_sample(sample: VQASample, image_root: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The single-turn eval sample (`instruct.build_eval` format) for a VQASample.

    Image paths are made relative to `image_root` when given, else absolute. `site`,
    `site_cue`, `findings` and `valid` come from meta (None, None, '', None for public sets);
    other meta keys are kept under 'meta'. The result passes `samples.check_sample`.
    """
    paths = [str(p) for p in sample.image_paths()]
    if image_root is not None:
        base = os.fspath(image_root)
        paths = [os.path.relpath(p, base).replace(os.sep, "/") for p in paths]
    meta = dict(sample.meta)
    report_id = meta.pop("report_id", sample.id)
    promoted = {k: meta.pop(k, default) for k, default in _PROMOTED.items()}
    out = {
        "id": sample.id,
        "report_id": report_id,
        "images": paths,
        "conversations": [
            {"from": "human", "value": image_prompt(sample.question, len(paths))},
            {"from": "gpt", "value": sample.answer},
        ],
        "language": sample.language,
        "site": promoted["site"],
        "task": "qa",
        "question_types": [sample.question_type],
        "site_cue": promoted["site_cue"],
        "findings": promoted["findings"],
        "valid": promoted["valid"],
        "question_type": sample.question_type,
        "answer_type": sample.answer_type,
        "dataset": sample.dataset,
        "split": sample.split,
        "modality": sample.modality,
    }
    if meta:
        out["meta"] = meta
    check_sample(out)
    return out


# ----------------------------------------------------------------------------------- dispatch

# scheme -> (reader, {spec option: (reader keyword, parser)})
_Reader = Callable[..., list[VQASample]]


def _bool(value: str) -> bool:
    table = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
    if value.lower() not in table:
        raise DataError(f"expected a true/false value (1/0, true/false), got {value!r}")
    return table[value.lower()]


def _int(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataError(f"expected an integer, got {value!r}") from None


_COMMON = {"check_images": ("check_images", _bool)}
_LANG = {"lang": ("language", str)}
READERS: dict[str, tuple[_Reader, dict[str, tuple[str, Callable[[str], Any]]]]] = {
    "slake": (read_slake, {"split": ("split", str), **_LANG, **_COMMON}),
    "vqa-rad": (read_vqa_rad, {"split": ("split", str), **_COMMON}),
    "pathvqa": (read_pathvqa, {"split": ("split", str), **_COMMON}),
    "openi-zh": (read_openi_zh, dict(_COMMON)),
    "ultra": (read_ultra, {**_LANG, "root": ("image_root", str), **_COMMON}),
    "reports": (read_report_qa, {**_LANG, "site_cue": ("site_cue", str), "seed": ("seed", _int), **_COMMON}),
}
SPEC_HELP = "SCHEME:PATH[?key=value&...], e.g. slake:/data/Slake1.0?split=test&lang=zh"


def parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """'slake:/d/Slake1.0?split=test&lang=zh' -> ('slake', '/d/Slake1.0', {'split': 'test', ...})."""
    scheme, sep, rest = spec.partition(":")
    scheme = scheme.strip().lower()
    if not sep or not rest or scheme not in READERS:
        what = f"unknown dataset scheme {scheme!r}" if sep and rest else f"bad dataset spec {spec!r}"
        raise DataError(f"{what}; write {SPEC_HELP}; known schemes: {', '.join(READERS)}")
    path, _, query = rest.partition("?")
    try:
        options = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
    except ValueError:
        raise DataError(
            f"bad options {query!r} in dataset spec {spec!r}; write key=value&key=value"
        ) from None
    return scheme, path, options


def _read(spec: str, check_images: bool, problems: list[BadItem] | None) -> list[VQASample]:
    scheme, path, options = parse_spec(spec)
    reader, allowed = READERS[scheme]
    kwargs: dict[str, Any] = {"check_images": check_images}
    for key, value in options.items():
        if key not in allowed:
            raise DataError(
                f"unknown option {key!r} for {scheme} in {spec!r}; {scheme} accepts: {', '.join(allowed)}"
            )
        name, parse = allowed[key]
        try:
            kwargs[name] = parse(value)
        except DataError as exc:
            raise DataError(f"option {key!r} in {spec!r}: {exc}") from None
    return reader(path, problems=problems, **kwargs)


def load_dataset(spec: str, *, check_images: bool = True) -> list[VQASample]:
    """Read the dataset named by SPEC (see SPEC_HELP); the first bad record raises a DataError.

    Schemes: slake (split, lang), vqa-rad (split), pathvqa (split), openi-zh, ultra (lang, root),
    reports (lang, site_cue, seed); every scheme also takes check_images=0|1.
    """
    return _read(spec, check_images, None)


def load_dataset_lenient(spec: str, *, check_images: bool = True) -> tuple[list[VQASample], list[BadItem]]:
    """Like `load_dataset`, but bad records are skipped and returned as `BadItem`s (for batch
    use: print and count them). Layout errors still raise."""
    problems: list[BadItem] = []
    samples = _read(spec, check_images, problems)
    return samples, problems
