"""Read the few header elements the index needs from an encoded dataset, without decoding the rest.

Parsing stops before group 0x0028 (image pixel description), so pixel data is never touched; the
dataset bytes themselves are kept exactly as received elsewhere.  Text is decoded through
Specific Character Set (PS3.5 6.1), so the index holds Unicode.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from io import BytesIO

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.filereader import data_element_generator
from pydicom.tag import BaseTag
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
_SPECIFIC_TAGS: list[BaseTag | int] = list(_TAGS.values())
_LAST_TAG = max(_TAGS.values())

# PS3.5 9.1: digits and dots, components without gaps, at most 64 characters.  Leading zeros
# in a component are tolerated because real modalities send them and they are harmless here.
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_MAX_UID = 64
# Bound on inflating a deflated dataset (PS3.5 A.5), so a deflate bomb cannot exhaust memory.
MAX_INFLATED_BYTES = 1 << 30


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


def _stop_after_last(tag: BaseTag, vr: str | None, length: int) -> bool:
    return bool(tag > _LAST_TAG)


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


def _raw_elements(
    data: bytes, transfer_syntax: UID
) -> dict[BaseTag, RawDataElement | DataElement]:
    elements: dict[BaseTag, RawDataElement | DataElement] = {}
    generator = data_element_generator(
        BytesIO(data),
        transfer_syntax.is_implicit_VR,
        transfer_syntax.is_little_endian,
        stop_when=_stop_after_last,
        specific_tags=_SPECIFIC_TAGS,
    )
    try:
        for element in generator:
            elements[element.tag] = element
    except (EOFError, ValueError, KeyError, NotImplementedError, OverflowError) as exc:
        raise UnreadableDataset(f"dataset cannot be decoded: {exc}") from exc
    return elements


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

    def __init__(self, elements: dict[BaseTag, RawDataElement | DataElement]) -> None:
        self.elements = elements
        charset = self.raw("SpecificCharacterSet")
        self.charset = charset.decode("ascii", "replace").strip(" \0") if charset else ""
        terms = [t.strip() for t in self.charset.split("\\")] if self.charset else None
        try:
            self.encodings = convert_encodings(terms)
        except LookupError as exc:
            raise InvalidDataset(f"unsupported Specific Character Set: {exc}") from exc

    def raw(self, keyword: str) -> bytes:
        element = self.elements.get(BaseTag(_TAGS[keyword]))
        value = element.value if element is not None else None
        return value if isinstance(value, bytes) else b""

    def text(self, keyword: str) -> str:
        """The value as one string ('' when absent); multiple values stay joined by '\\'."""
        value = self.raw(keyword)
        if not value:
            return ""
        vr = _VR[keyword]
        if vr in _DECODED_VRS:
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


def read_header(data: bytes, transfer_syntax: str) -> InstanceHeader:
    """Parse the index attributes from ``data``, a dataset encoded in ``transfer_syntax``.

    Raises UnreadableDataset when the bytes do not decode, are cut short or the SOP UIDs are
    missing, and
    InvalidDataset when a required UID is missing or malformed.
    """
    ts = UID(transfer_syntax)
    if not ts.is_transfer_syntax:
        raise UnreadableDataset(f"unknown transfer syntax {transfer_syntax}")
    if ts == DeflatedExplicitVRLittleEndian:
        data = _inflate(data)
    check_complete(data, ts.is_implicit_VR, ts.is_little_endian)
    values = _Values(_raw_elements(data, ts))
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
