"""The Query/Retrieve information model keys the index answers, level by level (PS3.4 C.6).

Each key says at which level it lives, which column holds it and how it matches.  Keys not listed
here are still answered, from a stored file of the matching entity (PS3.4 C.2.2.1.3 lets an SCP
return any attribute it holds).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum

from peewee import Field

from node.index.models import Instance, Patient, Series, Study


class Level(IntEnum):
    """Query/Retrieve levels, ordered from the top of the hierarchy."""

    PATIENT = 0
    STUDY = 1
    SERIES = 2
    IMAGE = 3


class Root(StrEnum):
    PATIENT = "patient"  # PS3.4 C.6.1
    STUDY = "study"  # PS3.4 C.6.2: no PATIENT level, patient keys answered at STUDY


class Match(StrEnum):
    """How a key's value is compared (PS3.4 C.2.2.2)."""

    TEXT = "text"  # single value, wildcard, multiple values
    PERSON_NAME = "pn"  # as TEXT, optionally case-insensitive on the folded column
    DATE = "date"  # single value or range, no wildcards
    TIME = "time"
    UID = "uid"  # single value or list of UIDs, no wildcards
    NUMBER = "number"  # single value only


@dataclass(frozen=True)
class Key:
    """An attribute the index holds."""

    keyword: str
    level: Level
    column: Field
    match: Match
    folded: Field | None = None  # case-folded twin of a person name column


KEYS: dict[str, Key] = {
    key.keyword: key
    for key in (
        Key("PatientName", Level.PATIENT, Patient.patient_name, Match.PERSON_NAME,
            Patient.patient_name_folded),
        Key("PatientID", Level.PATIENT, Patient.patient_id, Match.TEXT),
        Key("IssuerOfPatientID", Level.PATIENT, Patient.issuer_of_patient_id, Match.TEXT),
        Key("PatientBirthDate", Level.PATIENT, Patient.patient_birth_date, Match.DATE),
        Key("PatientSex", Level.PATIENT, Patient.patient_sex, Match.TEXT),
        Key("StudyInstanceUID", Level.STUDY, Study.study_instance_uid, Match.UID),
        Key("StudyDate", Level.STUDY, Study.study_date, Match.DATE),
        Key("StudyTime", Level.STUDY, Study.study_time, Match.TIME),
        Key("AccessionNumber", Level.STUDY, Study.accession_number, Match.TEXT),
        Key("StudyID", Level.STUDY, Study.study_id, Match.TEXT),
        Key("StudyDescription", Level.STUDY, Study.study_description, Match.TEXT),
        Key("ReferringPhysicianName", Level.STUDY, Study.referring_physician_name,
            Match.PERSON_NAME, Study.referring_physician_name_folded),
        Key("SeriesInstanceUID", Level.SERIES, Series.series_instance_uid, Match.UID),
        Key("Modality", Level.SERIES, Series.modality, Match.TEXT),
        Key("SeriesNumber", Level.SERIES, Series.series_number, Match.NUMBER),
        Key("SeriesDate", Level.SERIES, Series.series_date, Match.DATE),
        Key("SeriesTime", Level.SERIES, Series.series_time, Match.TIME),
        Key("SeriesDescription", Level.SERIES, Series.series_description, Match.TEXT),
        Key("BodyPartExamined", Level.SERIES, Series.body_part_examined, Match.TEXT),
        Key("SOPInstanceUID", Level.IMAGE, Instance.sop_instance_uid, Match.UID),
        Key("SOPClassUID", Level.IMAGE, Instance.sop_class_uid, Match.UID),
        Key("InstanceNumber", Level.IMAGE, Instance.instance_number, Match.NUMBER),
    )
}

# PS3.4 C.6.1.1 / C.6.2.1: the unique key of each level.
UNIQUE_KEYS: dict[Level, str] = {
    Level.PATIENT: "PatientID",
    Level.STUDY: "StudyInstanceUID",
    Level.SERIES: "SeriesInstanceUID",
    Level.IMAGE: "SOPInstanceUID",
}

# Attributes computed from the levels below (PS3.4 C.6.1.1.2-4, C.6.2.1.2).
COMPUTED: dict[str, Level] = {
    "NumberOfPatientRelatedStudies": Level.PATIENT,
    "NumberOfPatientRelatedSeries": Level.PATIENT,
    "NumberOfPatientRelatedInstances": Level.PATIENT,
    "NumberOfStudyRelatedSeries": Level.STUDY,
    "NumberOfStudyRelatedInstances": Level.STUDY,
    "ModalitiesInStudy": Level.STUDY,
    "SOPClassesInStudy": Level.STUDY,
    "NumberOfSeriesRelatedInstances": Level.SERIES,
}

# Answered for every level from the node itself (PS3.4 C.4.1.1.3.2, C.6.1.1.1).
NODE_KEYS = {"RetrieveAETitle", "InstanceAvailability"}
