"""C-FIND requests the node sends, checked and built before anything goes on the network.

Identifiers follow the baseline (hierarchical) rules of PS3.4 C.4.1.2.1: the Query/Retrieve
Level, every requested key (an empty value asks the peer to return it: universal matching,
PS3.4 C.2.2.2.3), and one exact value for the unique key of each level above the query level.
The identifier always declares UTF-8 (PS3.4 C.4.1.1.3.1: Specific Character Set is part of the
identifier), so values in any script match and come back readable.

``resolve_peer`` turns an AE title into a configured peer (or the node itself).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag

from node.config import NodeConfig, Peer
from node.remote.errors import InvalidQuery, UnknownPeer

# --- Information models and levels (PS3.4 C.6.1.1, C.6.2.1) ---------------------------------
LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
ROOTS = ("patient", "study")
_MODEL_LEVELS = {"patient": LEVELS, "study": LEVELS[1:]}  # the Study Root has no PATIENT level
_MODELS = {
    "patient": "1.2.840.10008.5.1.4.1.2.1.1",  # Patient Root Q/R Information Model - FIND
    "study": "1.2.840.10008.5.1.4.1.2.2.1",  # Study Root Q/R Information Model - FIND
}
UNIQUE_KEYS = {  # PS3.4 C.6.1.1.2-C.6.1.1.5: one unique key per level
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}
DEFAULT_KEYS: dict[str, tuple[str, ...]] = {
    "PATIENT": ("PatientID", "PatientName", "PatientBirthDate", "PatientSex"),
    "STUDY": (
        "PatientID", "PatientName", "StudyDate", "StudyTime", "AccessionNumber",
        "ModalitiesInStudy", "StudyDescription", "StudyInstanceUID",
        "NumberOfStudyRelatedInstances",
    ),
    "SERIES": (
        "StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber",
        "SeriesDescription", "NumberOfSeriesRelatedInstances",
    ),
    "IMAGE": (
        "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "InstanceNumber",
        "SOPClassUID",
    ),
}
UTF8 = "ISO_IR 192"  # PS3.3 C.12.1.1.2: Unicode in UTF-8
# Set by the query itself, never by a user key.
_RESERVED = {
    Tag("QueryRetrieveLevel"): "is set by the query level (-L/--level)",
    Tag("SpecificCharacterSet"): f"is always {UTF8} (UTF-8)",
}

_TAG_TEXT = re.compile(r"^\(?([0-9A-Fa-f]{4}),?([0-9A-Fa-f]{4})\)?$")
_INT_VRS = {"US", "SS", "UL", "SL", "UV", "SV"}
_FLOAT_VRS = {"FL", "FD"}
_TEXT_VRS = {
    "AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI",
    "UR", "UT",
}


@dataclass(frozen=True)
class Query:
    """A checked C-FIND request: level, information model, identifier and its keys in order."""

    level: str
    root: str
    identifier: Dataset
    keys: tuple[BaseTag, ...]  # the level's default keys first, then the user's

    @property
    def model(self) -> str:
        """The SOP Class UID of the information model's FIND (the request's abstract syntax)."""
        return _MODELS[self.root]


def key_name(tag: BaseTag) -> str:
    """The keyword of a tag, or ``gggg,eeee`` when the dictionary has none."""
    return keyword_for_tag(tag) or f"{tag.group:04X},{tag.element:04X}"


def parse_key(name: str) -> BaseTag:
    """A query key given as a keyword (``PatientName``) or a tag (``0010,0010``, ``00100010``)."""
    text = name.strip()
    match = _TAG_TEXT.match(text)
    if match:
        tag = Tag(int(match[1] + match[2], 16))
    else:
        number = tag_for_keyword(text)
        if number is None:
            raise InvalidQuery(
                f"unknown key {name!r}: give a DICOM keyword such as PatientName "
                "or a tag such as 0010,0010"
            )
        tag = Tag(number)
    if tag.group in (0x0000, 0x0002, 0xFFFE) or tag.is_private:
        raise InvalidQuery(f"{name}: not an attribute a query can ask for")
    try:
        dictionary_VR(tag)
    except KeyError:
        raise InvalidQuery(f"{name}: tag {tag} is not in the DICOM dictionary") from None
    if tag in _RESERVED:
        raise InvalidQuery(f"{key_name(tag)} {_RESERVED[tag]}")
    return tag


def _element(tag: BaseTag, text: str) -> DataElement:
    """The identifier element for ``KEY=VALUE``; an empty value asks for the key (C.2.2.2.3)."""
    vr = dictionary_VR(tag).split(" or ")[0]  # "US or SS": either serves a query
    value: Any
    if vr == "SQ":
        if text:
            raise InvalidQuery(f"{key_name(tag)}: a sequence key can only be asked for (KEY=)")
        value = []  # PS3.4 C.2.2.2.6: an empty sequence matches (and returns) any
    elif not text:
        value = None
    elif vr in _TEXT_VRS:
        value = text  # a backslash separates values: list of UID matching (C.2.2.2.2)
    elif vr in _INT_VRS | _FLOAT_VRS:
        convert = int if vr in _INT_VRS else float
        try:
            numbers = [convert(part) for part in text.split("\\")]
        except ValueError:
            raise InvalidQuery(f"{key_name(tag)}: {text!r} is not a {vr} number") from None
        value = numbers[0] if len(numbers) == 1 else numbers
    else:
        raise InvalidQuery(f"{key_name(tag)}: a {vr} key can only be asked for (KEY=)")
    # Query values are not stored values: ranges and wildcards (C.2.2.2.4, C.2.2.2.5) are
    # legal in a request, so pydicom's checks of stored values must not complain; a value it
    # cannot convert at all (IS, DS: numbers only, no wildcards) is the user's mistake.
    try:
        return DataElement(tag, vr, value, validation_mode=pydicom_config.IGNORE)
    except (ValueError, TypeError, OverflowError):
        raise InvalidQuery(f"{key_name(tag)}: {text!r} is not a valid {vr} value") from None


def parse_key_values(items: Iterable[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings (``KEY`` or ``KEY=`` alone: return the key) -> {KEY: VALUE}."""
    keys: dict[str, str] = {}
    for item in items:
        name, _, value = item.partition("=")
        if not name.strip():
            raise InvalidQuery(f"bad key {item!r}: use KEY=VALUE, e.g. PatientID=12345")
        keys[name.strip()] = value
    return keys


def build_query(level: str, keys: Mapping[str, str], root: str | None = None) -> Query:
    """Check a request and build its identifier; raises InvalidQuery naming what is wrong.

    ``root`` None picks the Patient Root for the PATIENT level and the Study Root otherwise.
    User keys are added to the level's defaults and override their values.
    """
    level = level.upper()
    if level not in LEVELS:
        raise InvalidQuery(f"unknown level {level!r} (use one of {', '.join(LEVELS)})")
    root = (root or ("patient" if level == "PATIENT" else "study")).lower()
    if root not in ROOTS:
        raise InvalidQuery(f"unknown information model {root!r} (use patient or study)")
    levels = _MODEL_LEVELS[root]
    if level not in levels:  # PS3.4 C.6.2.1: the Study Root starts at the STUDY level
        raise InvalidQuery(f"the Study Root model has no {level} level (use --root patient)")

    values: dict[BaseTag, str] = {Tag(keyword): "" for keyword in DEFAULT_KEYS[level]}
    for name, value in keys.items():
        values[parse_key(name)] = value
    # PS3.4 C.4.1.2.1: one exact value for the unique key of every level above the query level.
    for upper in levels[: levels.index(level)]:
        unique = UNIQUE_KEYS[upper]
        given = values.get(Tag(unique), "")
        if not given or any(c in given for c in "\\*?"):
            raise InvalidQuery(
                f"a {level} query needs one exact {unique}: add -k {unique}=VALUE "
                "(PS3.4 C.4.1.2.1)"
            )

    identifier = Dataset()
    identifier.SpecificCharacterSet = UTF8
    identifier.QueryRetrieveLevel = level
    for tag, value in values.items():
        identifier[tag] = _element(tag, value)
    return Query(level, root, identifier, tuple(values))


def resolve_peer(config: NodeConfig, ae_title: str) -> Peer:
    """The peer called ``ae_title``: a configured peer, or this node itself by its own title."""
    if ae_title in config.peers:
        return config.peers[ae_title]
    if ae_title == config.ae_title:
        # A wildcard bind address listens on loopback too.
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(config.bind, config.bind)
        return Peer(config.ae_title, host, config.port)
    known = [*sorted(config.peers), f"{config.ae_title} (this node)"]
    raise UnknownPeer(f"unknown peer {ae_title!r}: known peers are {', '.join(known)}")
