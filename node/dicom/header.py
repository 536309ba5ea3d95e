"""Read the few header elements the index needs from an encoded dataset, without decoding the rest.

Parsing stops before group 0x0028 (image pixel description), so pixel data is never touched; the
dataset bytes themselves are kept exactly as received elsewhere.  Text is decoded through
Specific Character Set (PS3.5 6.1), so the index holds Unicode.

This runs once per received instance, so the top-level elements are walked here with
``struct`` (PS3.5 7.1) rather than through pydicom's general reader, following the same rules
as pydicom's ``data_element_generator``: explicit VRs with a 4-byte length (PS3.5 Table 7.1-1),
an element whose VR bytes are not two capitals read as implicit VR, undefined-length sequences
stepped over item by item (PS3.5 7.5), values kept only for the wanted tags.
"""

from __future__ import annotations

import functools
import re
import struct
import zlib
from dataclasses import dataclass

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from node.dicom.structure import check_complete
from node.errors import InvalidDataset, UnreadableDataset

# Every element the index reads.  All lie below group 0x0028, so parsing stops there.
_TAGS: dict[str, int] = {
    "SpecificCharacterSet": 0x00080005,
    "SOPClassUID": 0x00080016,
    "SOPInstanceUID": 0x00080018,
    "StudyDate": 0x00080020,
    "SeriesDate": 0x00080021,
    "StudyTime": 0x00080030,
    "SeriesTime": 0x00080031,
    "AccessionNumber": 0x00080050,
    "Modality": 0x00080060,
    "ReferringPhysicianName": 0x00080090,
    "StudyDescription": 0x00081030,
    "SeriesDescription": 0x0008103E,
    "PatientName": 0x00100010,
    "PatientID": 0x00100020,
    "IssuerOfPatientID": 0x00100021,
    "PatientBirthDate": 0x00100030,
    "PatientSex": 0x00100040,
    "BodyPartExamined": 0x00180015,
    "StudyInstanceUID": 0x0020000D,
    "SeriesInstanceUID": 0x0020000E,
    "StudyID": 0x00200010,
    "SeriesNumber": 0x00200011,
    "InstanceNumber": 0x00200013,
}
_VR: dict[str, str] = {
    "SpecificCharacterSet": "CS", "SOPClassUID": "UI", "SOPInstanceUID": "UI",
    "StudyDate": "DA", "SeriesDate": "DA", "StudyTime": "TM", "SeriesTime": "TM",
    "AccessionNumber": "SH", "Modality": "CS", "ReferringPhysicianName": "PN",
    "StudyDescription": "LO", "SeriesDescription": "LO", "PatientName": "PN",
    "PatientID": "LO", "IssuerOfPatientID": "LO", "PatientBirthDate": "DA",
    "PatientSex": "CS", "BodyPartExamined": "CS", "StudyInstanceUID": "UI",
    "SeriesInstanceUID": "UI", "StudyID": "SH", "SeriesNumber": "IS", "InstanceNumber": "IS",
}
_WANTED = frozenset(_TAGS.values())
_LAST_TAG = max(_TAGS.values())
# PS3.5 Table 7.1-1: explicit VRs whose value length takes 4 bytes (after 2 reserved ones).
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                       b"UR", b"UT", b"UV"})
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD  # PS3.5 7.5
_MAX_DEPTH = 32  # sequences nested deeper than this are no real instance

# PS3.5 9.1: digits and dots, components without gaps, at most 64 characters.  Leading zeros
# in a component are tolerated because real modalities send them and they are harmless here.
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_MAX_UID = 64
# Bound on inflating a deflated dataset (PS3.5 A.5), so a deflate bomb cannot exhaust memory:
# each association may hold this much at once.  Deflate is meant for data sets without large
# pixel data (structured reports, presentation states), which stay far below it.
MAX_INFLATED_BYTES = 256 << 20


@dataclass(frozen=True)
class InstanceHeader:
    """What the four-level index records of one instance, as Unicode text or numbers."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    patient_name: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    study_date: str = ""
    study_time: str = ""
    accession_number: str = ""
    study_id: str = ""
    study_description: str = ""
    referring_physician_name: str = ""
    modality: str = ""
    series_number: int | None = None
    series_date: str = ""
    series_time: str = ""
    series_description: str = ""
    body_part_examined: str = ""
    instance_number: int | None = None
    specific_character_set: str = ""


def is_valid_uid(value: str) -> bool:
    """True when ``value`` is a syntactically usable UID (PS3.5 9.1)."""
    return 0 < len(value) <= _MAX_UID and bool(_UID.match(value))


def _inflate(data: bytes) -> bytes:
    """The dataset of a Deflated Explicit VR Little Endian transfer (PS3.5 A.5)."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(data, MAX_INFLATED_BYTES)
    except zlib.error as exc:
        raise UnreadableDataset(f"deflated dataset does not inflate: {exc}") from exc
    if inflater.unconsumed_tail:
        raise UnreadableDataset("deflated dataset inflates beyond the size limit")
    if not inflater.eof:
        raise UnreadableDataset("deflated dataset is cut short")
    return inflated


class _Scanner:
    """Walks encoded elements (PS3.5 7.1) and steps over sequences without decoding them."""

    def __init__(self, data: bytes, implicit_vr: bool, little_endian: bool) -> None:
        order = "<" if little_endian else ">"
        self.data = data
        self.end = len(data)
        self.implicit_vr = implicit_vr
        self.head = struct.Struct(f"{order}HHL")  # tag and (implicit VR) 4-byte length
        self.short = struct.Struct(f"{order}H")
        self.long = struct.Struct(f"{order}L")

    def element(self, pos: int) -> tuple[int, int, int]:
        """The tag, value offset and value length of the element at ``pos``."""
        if pos + 8 > self.end:
            raise _cut("element header")
        group, number, length = self.head.unpack_from(self.data, pos)
        tag = group << 16 | number
        if self.implicit_vr or group == 0xFFFE:  # items and delimiters have no VR
            return tag, pos + 8, length
        vr = self.data[pos + 4:pos + 6]
        if vr in _LONG_VRS:
            if pos + 12 > self.end:
                raise _cut("element header")
            return tag, pos + 12, self.long.unpack_from(self.data, pos + 8)[0]
        if not b"AA" <= vr <= b"ZZ":  # implicit VR inside explicit VR data, as pydicom reads it
            return tag, pos + 8, length
        return tag, pos + 8, self.short.unpack_from(self.data, pos + 6)[0]

    def top_level(self) -> dict[int, bytes]:
        """The values of the wanted elements, up to the last wanted tag."""
        values: dict[int, bytes] = {}
        pos = 0
        while pos < self.end:
            tag, start, length = self.element(pos)
            if tag > _LAST_TAG:
                break
            if length == _UNDEFINED:
                pos = self.items(start, 1)
                continue
            pos = start + length
            if tag in _WANTED:
                values[tag] = self.data[start:pos]
            # A value longer than the data ends it, as pydicom reads it (check_complete, which
            # tells VRs apart by its own rule, has accepted the dataset as whole).
        return values

    def items(self, pos: int, depth: int) -> int:
        """Step over the items of an undefined-length sequence; the offset after its end."""
        if depth > _MAX_DEPTH:
            raise UnreadableDataset("dataset is malformed (sequences nested too deeply)")
        while True:
            if pos + 8 > self.end:
                raise _cut("sequence")
            group, number, length = self.head.unpack_from(self.data, pos)
            tag = group << 16 | number
            pos += 8
            if tag == _SEQUENCE_END:
                return pos
            if tag != _ITEM:
                raise UnreadableDataset("dataset is malformed (element where an item belongs)")
            if length == _UNDEFINED:
                pos = self.item_elements(pos, depth)
            else:
                pos += length
                if pos > self.end:
                    raise _cut("item")

    def item_elements(self, pos: int, depth: int) -> int:
        """Step over the elements of an undefined-length item; the offset after its end."""
        while True:
            tag, start, length = self.element(pos)
            if tag == _ITEM_END:
                return start
            if length == _UNDEFINED:
                pos = self.items(start, depth + 1)
            else:
                pos = start + length
                if pos > self.end:
                    raise _cut("value")


def _cut(what: str) -> UnreadableDataset:
    return UnreadableDataset(f"dataset cannot be decoded: {what} cut short")


# VRs of the elements read; values decoded through Specific Character Set (PS3.5 6.1.2.3).
_DECODED_VRS = {"PN", "LO", "SH", "LT", "ST", "UT", "UC"}
_PN_DELIMITERS = {0x5E, 0x3D, 0x5C}  # '^', '=', '\\': ISO 2022 escapes reset at these
_TEXT_DELIMITERS = {0x5C}


def normalise_person_name(text: str) -> str:
    """A PN value without its insignificant trailing delimiters (PS3.5 6.2.1.1, 6.2 Table 6.2-1).

    ``Doe^Jane^^^`` and ``Doe^Jane`` are the same name, as are ``Doe^Jane=`` and ``Doe^Jane``:
    trailing empty components of each group and trailing empty groups are dropped, each of
    several values (backslash-separated) on its own, so indexed names and query values compare
    equal whichever form the sender chose.
    """
    values = []
    for value in text.split("\\"):
        groups = [group.rstrip("^ ") for group in value.split("=")]
        values.append("=".join(groups).rstrip("="))
    return "\\".join(values)


class _Values:
    """Decoded text of the raw elements, on demand."""

    def __init__(self, elements: dict[int, bytes]) -> None:
        self.elements = elements
        charset = self.raw("SpecificCharacterSet")
        self.charset = charset.decode("ascii", "replace").strip(" \0") if charset else ""
        terms = [t.strip() for t in self.charset.split("\\")] if self.charset else None
        try:
            self.encodings = convert_encodings(terms)
        except LookupError as exc:
            raise InvalidDataset(f"unsupported Specific Character Set: {exc}") from exc
        except ValueError as exc:  # codecs.lookup refuses a name with a NUL in it
            raise UnreadableDataset(f"Specific Character Set cannot be read: {exc}") from exc

    def raw(self, keyword: str) -> bytes:
        return self.elements.get(_TAGS[keyword], b"")

    def text(self, keyword: str) -> str:
        """The value as one string ('' when absent); multiple values stay joined by '\\'."""
        value = self.raw(keyword)
        if not value:
            return ""
        vr = _VR[keyword]
        if vr in _DECODED_VRS:
            if value.isascii() and b"\x1b" not in value:
                # Every character set of PS3.3 C.12.1.1.2 reads 7-bit bytes without an ISO 2022
                # escape (ESC, 0x1B) as ASCII: the common case needs no codec.
                text = value.decode("ascii")
            else:
                delimiters = _PN_DELIMITERS if vr == "PN" else _TEXT_DELIMITERS
                text = decode_bytes(value, self.encodings, delimiters)
            if vr == "PN":
                text = normalise_person_name(text)
        else:
            text = value.decode("ascii", "replace")
        return text.strip(" \0")

    def number(self, keyword: str) -> int | None:
        """An IS value as int; None when absent or not an integer (never a reason to reject)."""
        text = self.text(keyword).split("\\")[0].strip()
        try:
            return int(text) if text else None
        except ValueError:
            return None

    def uid(self, keyword: str, missing: type[Exception]) -> str:
        value = self.text(keyword)
        if not value:
            raise missing(f"dataset has no {keyword}")
        if not is_valid_uid(value):
            raise InvalidDataset(f"{keyword} is not a valid UID")
        return value


@functools.lru_cache(maxsize=64)  # a node meets a handful of transfer syntaxes
def _encoding(transfer_syntax: str) -> tuple[bool, bool, bool] | None:
    """(implicit VR, little endian, deflated) of a transfer syntax; None if it is not one."""
    ts = UID(transfer_syntax)
    if not ts.is_transfer_syntax:
        return None
    return ts.is_implicit_VR, ts.is_little_endian, ts == DeflatedExplicitVRLittleEndian


def read_header(data: bytes, transfer_syntax: str) -> InstanceHeader:
    """Parse the index attributes from ``data``, a dataset encoded in ``transfer_syntax``.

    Raises UnreadableDataset when the bytes do not decode, are cut short or the SOP UIDs are
    missing, and
    InvalidDataset when a required UID is missing or malformed.
    """
    encoding = _encoding(transfer_syntax)
    if encoding is None:
        raise UnreadableDataset(f"unknown transfer syntax {transfer_syntax}")
    implicit_vr, little_endian, deflated = encoding
    if deflated:
        data = _inflate(data)
    check_complete(data, implicit_vr, little_endian)
    values = _Values(_Scanner(data, implicit_vr, little_endian).top_level())
    text = values.text
    return InstanceHeader(
        sop_class_uid=values.uid("SOPClassUID", UnreadableDataset),
        sop_instance_uid=values.uid("SOPInstanceUID", UnreadableDataset),
        study_instance_uid=values.uid("StudyInstanceUID", InvalidDataset),
        series_instance_uid=values.uid("SeriesInstanceUID", InvalidDataset),
        patient_id=text("PatientID"),
        issuer_of_patient_id=text("IssuerOfPatientID"),
        patient_name=text("PatientName"),
        patient_birth_date=text("PatientBirthDate"),
        patient_sex=text("PatientSex"),
        study_date=text("StudyDate"),
        study_time=text("StudyTime"),
        accession_number=text("AccessionNumber"),
        study_id=text("StudyID"),
        study_description=text("StudyDescription"),
        referring_physician_name=text("ReferringPhysicianName"),
        modality=text("Modality"),
        series_number=values.number("SeriesNumber"),
        series_date=text("SeriesDate"),
        series_time=text("SeriesTime"),
        series_description=text("SeriesDescription"),
        body_part_examined=text("BodyPartExamined"),
        instance_number=values.number("InstanceNumber"),
        specific_character_set=values.charset,
    )
