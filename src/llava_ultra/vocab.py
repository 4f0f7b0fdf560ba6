"""Clinical vocabulary shared by every layer: the medical word list and the scrub placeholders.

Core layer (imports nothing of the package), next to `sites.py`: the data layer (LLM instruction
checks), the LLM client (scrubbing) and the metrics (jieba's user dictionary) all read it, so
none of them has to import another layer for a word list.

- `medical_terms()` reads `resources/medical_dict.txt` (jieba user-dictionary format: word,
  optional frequency, optional tag) once per process.
- `PLACEHOLDERS` maps each kind of personal information to the typed placeholder the scrubber
  writes in Chinese and in English text; `PLACEHOLDER_TEXTS` lists all of them.
"""

from __future__ import annotations

import functools
from importlib import resources

# kind -> (Chinese placeholder, English placeholder)
PLACEHOLDERS: dict[str, tuple[str, str]] = {
    "name": ("[姓名]", "[NAME]"),
    "id_number": ("[身份证号]", "[ID]"),
    "phone": ("[电话]", "[PHONE]"),
    "record_number": ("[病历号]", "[MRN]"),
    "birth_date": ("[出生日期]", "[DOB]"),
    "email": ("[邮箱]", "[EMAIL]"),
    "address": ("[地址]", "[ADDRESS]"),
    "url": ("[网址]", "[URL]"),
    "ip": ("[IP]", "[IP]"),
}
PLACEHOLDER_TEXTS: tuple[str, ...] = tuple(p for pair in PLACEHOLDERS.values() for p in pair)


@functools.cache
def medical_terms() -> tuple[tuple[str, int | None, str | None], ...]:
    """(word, freq, tag) rows of `resources/medical_dict.txt` (jieba user-dictionary format)."""
    text = resources.files("llava_ultra").joinpath("resources/medical_dict.txt").read_text("utf-8")
    rows = []
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        freq = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
        tag = parts[-1] if len(parts) > 1 and not parts[-1].isdigit() else None
        rows.append((parts[0], freq, tag))
    return tuple(rows)
