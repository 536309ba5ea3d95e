"""How the command line prints query matches: an aligned table, or JSON for programs."""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from typing import TextIO

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag

from node.remote.query import key_name

MAX_CELL = 40  # characters; longer cells end in an ellipsis
# Not answers but how they travel: every response carries them.
_TRANSPORT_KEYS = {Tag("QueryRetrieveLevel"), Tag("SpecificCharacterSet")}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def element_text(element: DataElement) -> str:
    """A value as one string; values of a multi-valued element joined by a backslash."""
    value = element.value
    if element.VR == "SQ":
        return f"({len(value)} items)"
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, (MultiValue, list, tuple)):
        return "\\".join(str(v) for v in value)
    return str(value)


def match_rows(
    keys: Sequence[BaseTag], matches: Sequence[Dataset]
) -> tuple[list[str], list[dict[str, str]]]:
    """The column names (the requested keys, then any other key a peer returned, e.g. its
    Retrieve AE Title) and one {name: text} per match, "" where a match lacks a key."""
    columns = list(keys)
    rows: list[dict[BaseTag, str]] = []
    # A peer's odd values or character sets must not add warning lines to the answer.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for match in matches:
            row: dict[BaseTag, str] = {}
            for element in match:
                if element.tag in _TRANSPORT_KEYS:
                    continue
                row[element.tag] = element_text(element)
                if element.tag not in columns:
                    columns.append(element.tag)
            rows.append(row)
    names = [key_name(tag) for tag in columns]
    return names, [
        {name: row.get(tag, "") for name, tag in zip(names, columns, strict=True)}
        for row in rows
    ]


def _cell(text: str) -> str:
    text = _CONTROL.sub(" ", text)
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"


def table_lines(columns: Sequence[str], rows: Sequence[dict[str, str]]) -> list[str]:
    """A header row of key names and aligned columns, cells cut at MAX_CELL characters."""
    cells = [[_cell(row[name]) for name in columns] for row in rows]
    widths = [
        max([len(name), *(len(line[i]) for line in cells)]) for i, name in enumerate(columns)
    ]
    return [
        "  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip()
        for line in [list(columns), *cells]
    ]


def print_matches(
    keys: Sequence[BaseTag], matches: Sequence[Dataset], as_json: bool, out: TextIO
) -> None:
    """Print the matches to ``out`` as a table or as a JSON list of {keyword: text}."""
    columns, rows = match_rows(keys, matches)
    if as_json:
        out.write(json.dumps(rows, indent=2, ensure_ascii=False) + "\n")
    else:
        out.write("\n".join(table_lines(columns, rows)) + "\n")
