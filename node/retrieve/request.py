"""Read a C-MOVE/C-GET identifier into a checked RetrieveRequest (PS3.4 C.4.2.1.4, C.4.3.1.3).

A retrieve identifier names entities by their unique keys only (hierarchical, baseline
behaviour; relational retrieve is not negotiated): the Query/Retrieve Level, one single value
for the unique key of every level above it (PS3.4 C.4.2.2.1, C.4.3.2.1), and at the retrieve
level one Patient ID, or one UID or a list of UIDs (STUDY, SERIES, IMAGE).  Other attributes are
ignored: the SCP identifies the entities "based upon the values in the Unique Keys" (C.4.2.3.1).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from node.errors import NodeError
from node.query.keys import UNIQUE_KEYS, Level, Root
from node.query.request import query_level

# More UIDs than this in one list is refused rather than turned into a SQL statement with as many
# parameters (SQLite allows 32,766); a retrieve of that many entities should be split.
MAX_LIST_LENGTH = 10_000


class InvalidRetrieve(NodeError):
    """The identifier breaks the rules of the information model (answered 0xA900)."""


@dataclass(frozen=True)
class RetrieveRequest:
    """The entities a retrieve names: unique key values from the top level down to ``level``."""

    root: Root
    level: Level
    keys: dict[Level, tuple[str, ...]]  # one value above ``level``, one or more at ``level``


def _values(identifier: Dataset, keyword: str) -> list[str]:
    """The element's values, stripped (leading/trailing spaces and UI's NUL padding are not
    significant, PS3.5 6.2); empty items of a list are dropped."""
    element = identifier.get(keyword)
    if element is None:
        return []
    raw = element if isinstance(element, (MultiValue, list, tuple)) else [element]
    values = []
    for item in raw:
        for part in str(item if item is not None else "").split("\\"):
            value = part.strip(" \x00")
            if value:
                values.append(value)
    return values


def parse_retrieve(identifier: Dataset, root: Root) -> RetrieveRequest:
    """Check ``identifier`` against the information model; raises InvalidRetrieve."""
    level = query_level(identifier, root, InvalidRetrieve)
    top = Level.PATIENT if root is Root.PATIENT else Level.STUDY
    keys: dict[Level, tuple[str, ...]] = {}
    for current in Level:
        if current < top or current > level:
            continue
        keyword = UNIQUE_KEYS[current]
        values = _values(identifier, keyword)
        if not values:
            raise InvalidRetrieve(f"{keyword} is required at {level.name} level")
        if any("*" in v or "?" in v for v in values):
            raise InvalidRetrieve(f"{keyword} does not take wildcards in a retrieve")
        # PS3.4 C.4.2.2.1: single values above the retrieve level, and for Patient ID; a list
        # of UIDs only at the retrieve level itself.
        if len(values) > 1 and (current < level or current is Level.PATIENT):
            raise InvalidRetrieve(f"{keyword} must be a single value at {level.name} level")
        if len(values) > MAX_LIST_LENGTH:
            raise InvalidRetrieve(f"more than {MAX_LIST_LENGTH} values of {keyword}")
        keys[current] = tuple(dict.fromkeys(values))  # a UID listed twice is retrieved once
    return RetrieveRequest(root, level, keys)
