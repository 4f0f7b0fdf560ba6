"""DICOM PS3.15 Annex E, Table E.1-1 (Basic Application Level Confidentiality Profile), as data.

What it owns: `ACTIONS`, one entry per attribute of the table, tag -> the action of the basic
profile column (`D`, `Z`, `X`, `U`, or a choice such as `X/Z/D`, `X/Z/U*`), and `simple_action`,
which resolves a choice to the one action we apply.

Where the table comes from: nothing here is typed by hand. We read the table shipped by the
maintained `dicom-anonymizer` package (pinned in pyproject.toml), module
`dicomanonymizer.dicom_anonymization_databases.dicomfields_2026c`; its maintainers generate that
module by scraping Table E.1-1 of the DICOM standard, edition 2026c (part 15, chapter E, the
standard's own HTML). Their engine is not used: we need keyed pseudonyms, per-keyword logs that
never hold values, recursion into every sequence and the options below, so only the table is
taken. The rows written with repeating groups (Curve Data (50xx,xxxx), Overlay Data (60xx,3000),
Overlay Comments (60xx,4000)) come as masked rows in `REPEATING`; the engine in `dicom.py` goes
further and removes whole 50xx/60xx groups, and every private attribute (the table's last row).

How a choice is resolved (the standard lets the implementer pick): any choice that contains `X`
removes the attribute (the most conservative reading; it can make a Type 1/2 attribute absent,
which a viewer tolerates and a privacy officer prefers), `Z/D` empties it, and `U` replaces UIDs
with keyed ones.
"""

from __future__ import annotations

import importlib

from pydicom.tag import BaseTag, Tag

TABLE_MODULE = "dicomanonymizer.dicom_anonymization_databases.dicomfields_2026c"
TABLE_SOURCE = (
    "DICOM PS3.15 2026c Annex E Table E.1-1, as generated from the standard by the dicom-anonymizer "
    f"package ({TABLE_MODULE})"
)

# Category name in the generated module -> the action written in Table E.1-1.
_CATEGORIES = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D",
    "X_Z_D_TAGS": "X/Z/D",
    "X_Z_U_STAR_TAGS": "X/Z/U*",
}
# When a tag is listed in two categories, keep the more conservative action.
_RANK = {"X": 0, "X/Z": 1, "X/D": 1, "X/Z/D": 1, "X/Z/U*": 1, "U": 2, "Z": 3, "Z/D": 3, "D": 4}


def _load() -> tuple[dict[BaseTag, str], list[tuple[int, int, int, int, str]]]:
    module = importlib.import_module(TABLE_MODULE)
    table: dict[BaseTag, str] = {}
    repeating: list[tuple[int, int, int, int, str]] = []
    for name, action in _CATEGORIES.items():
        for row in getattr(module, name):
            if len(row) == 4:  # (group, element, group mask, element mask): a repeating-group row
                repeating.append((*row, action))
                continue
            tag = Tag(*row)
            old = table.get(tag)
            if old is None or _RANK[action] < _RANK[old]:
                table[tag] = action
    return table, repeating


ACTIONS: dict[BaseTag, str]
REPEATING: list[tuple[int, int, int, int, str]]  # (group, element, group mask, element mask, action)
ACTIONS, REPEATING = _load()


def action_for(tag: BaseTag) -> str | None:
    """The Table E.1-1 action for `tag` (repeating-group rows included), or None if not listed."""
    found = ACTIONS.get(tag)
    if found is not None:
        return found
    for group, element, gmask, emask, action in REPEATING:
        if tag.group & gmask == group & gmask and tag.element & emask == element & emask:
            return action
    return None


def simple_action(action: str) -> str:
    """The action we apply for a table action: 'X' (remove), 'Z' (empty), 'D' (dummy), 'U' (UID)."""
    if "X" in action:
        return "X"
    if action == "Z/D":
        return "Z"
    return action
