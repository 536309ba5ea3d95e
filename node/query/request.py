"""Read a C-FIND identifier into a checked FindRequest (PS3.4 C.4.1.2, hierarchical search).

The identifier says the level, the keys to match (non-empty values) and the keys to return (all
of them).  The hierarchical rules are checked here: at a given level, the unique key of every
level above must be one single value (PS3.4 C.4.1.2.2.1), else the query is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag

from node.errors import NodeError
from node.query.keys import COMPUTED, KEYS, NODE_KEYS, UNIQUE_KEYS, Level, Root

QUERY_RETRIEVE_LEVEL = 0x00080052
SPECIFIC_CHARACTER_SET = 0x00080005


class InvalidQuery(NodeError):
    """The identifier breaks the rules of the information model (answered 0xA900)."""


@dataclass(frozen=True)
class Returned:
    """A key the response must carry: its tag, keyword ('' for unknown tags) and VR."""

    tag: BaseTag  # (pydicom's own type: a response identifier is keyed by it)
    keyword: str
    vr: str


@dataclass(frozen=True)
class FindRequest:
    root: Root
    level: Level
    conditions: dict[str, str] = field(default_factory=dict)  # keyword -> value to match
    returned: tuple[Returned, ...] = ()
    # Keys that carried a value but are not matched (treated as universal, PS3.4 C.2.2.1.3):
    # the matches are then answered "optional keys not supported" (PS3.4 C.4.1.1.4).
    unmatched: tuple[int, ...] = ()
    # StudyDate and StudyTime ranges together form one date-time range only when the SCU
    # negotiated Combined Date-Time Matching (PS3.4 C.2.2.2.5, C.5.1.1.2); else each alone.
    combined_date_time: bool = False


def _text(element: DataElement) -> str:
    value = element.value
    if value is None:
        return ""
    if isinstance(value, (MultiValue, list, tuple)):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def query_level(identifier: Dataset, root: Root,
                invalid: type[NodeError] = InvalidQuery) -> Level:
    """The identifier's Query/Retrieve Level, checked against the model (C-FIND, C-MOVE and
    C-GET alike); ``invalid`` is raised, naming what is wrong, when it is missing or bad."""
    raw = identifier.get("QueryRetrieveLevel")
    name = str(raw or "").strip().upper()
    if name not in Level.__members__:
        raise invalid("Query/Retrieve Level missing or not PATIENT/STUDY/SERIES/IMAGE")
    level = Level[name]
    if root is Root.STUDY and level is Level.PATIENT:
        raise invalid("the Study Root model has no PATIENT level")  # PS3.4 C.6.2.1
    return level


def parse_request(identifier: Dataset, root: Root,
                  combined_date_time: bool = False) -> FindRequest:
    """Check ``identifier`` against the information model and split it into match/return."""
    level = query_level(identifier, root)
    conditions: dict[str, str] = {}
    returned: list[Returned] = []
    unmatched: list[int] = []
    for element in identifier:
        tag = int(element.tag)
        # File Meta never belongs in an identifier; group lengths are ignored (PS3.5 7.2).
        if element.tag.group == 0x0002 or element.tag.element == 0x0000:
            continue
        if tag in (QUERY_RETRIEVE_LEVEL, SPECIFIC_CHARACTER_SET):
            continue
        keyword = element.keyword or ""
        returned.append(Returned(element.tag, keyword, element.VR))
        if element.VR == "SQ":
            if element.value:  # sequence matching is not supported; the key is returned
                unmatched.append(tag)
            continue
        value = _text(element)
        if not value:
            continue  # universal matching (PS3.4 C.2.2.2.3)
        key = KEYS.get(keyword)
        matchable = (key is not None and key.level <= level) or (
            keyword == "ModalitiesInStudy" and level >= Level.STUDY  # PS3.4 C.6.2.1.2
        )
        if matchable:
            conditions[keyword] = value
        else:
            unmatched.append(tag)
        # Other keys (lower levels, computed counts, unindexed attributes) are returned, not
        # matched: PS3.4 C.2.2.1.3 lets an SCP that does not support matching on a key
        # treat it as universal.
    _check_hierarchy(root, level, conditions)
    # The unique key of the query level is always returned, even when not asked for.
    unique = UNIQUE_KEYS[level]
    if all(r.keyword != unique for r in returned):
        returned.insert(0, _returned_for(unique))
    return FindRequest(root, level, conditions, tuple(returned), tuple(unmatched),
                       combined_date_time)


def _returned_for(keyword: str) -> Returned:
    tag = tag_for_keyword(keyword)
    assert tag is not None
    return Returned(BaseTag(tag), keyword, dictionary_VR(tag))


def _check_hierarchy(root: Root, level: Level, conditions: dict[str, str]) -> None:
    """PS3.4 C.4.1.2.2.1: above the query level, each unique key is one single value."""
    top = Level.PATIENT if root is Root.PATIENT else Level.STUDY
    for upper in Level:
        if upper < top or upper >= level:
            continue
        keyword = UNIQUE_KEYS[upper]
        value = conditions.get(keyword, "")
        if not value:
            raise InvalidQuery(f"{keyword} is required at {level.name} level")
        if "\\" in value or "*" in value or "?" in value:
            raise InvalidQuery(f"{keyword} must be a single value at {level.name} level")


def is_known(keyword: str) -> bool:
    """True when the node answers ``keyword`` without reading a stored file."""
    return keyword in KEYS or keyword in COMPUTED or keyword in NODE_KEYS
