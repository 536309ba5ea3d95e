"""The C-FIND test corpus: a few patients, studies, series and instances with tricky values.

Everything a C-FIND test expects is written out in the tests themselves, by the short names
defined here (``"obrien_chest"`` for a study, ``"mueller_thorax_mr"`` for a series …); this
module only says what the corpus holds and turns names into UIDs and back.  Counts used by the
computed-attribute tests are derived from this definition, never from the node.

Tricky values on purpose:

- person names with carets, an apostrophe and mixed case (``O'Brien^Mary``, ``mcDonald^ANNA``),
  trailing empty components (``Doe^Jane^^^``), Latin-1 (``Müller^Jürgen``, ISO_IR 100), UTF-8
  (``Иванов^Дмитрий``, ISO_IR 192) and an accent-free look-alike (``Muller^Hans``);
- Patient IDs with ``%`` and ``_`` (``ID%1``, ``ID_2``) next to ``IDX2``, which an unescaped SQL
  LIKE pattern ``ID_2`` would wrongly match;
- a patient with an empty birth date, a study with empty Study Description and Accession Number,
  an Accession Number in lower case (``acc-004``);
- Study Date / Study Time at range boundaries (20240101, 20240131, 20240201; 000000, 120000,
  235959) and one study in 2023;
- mixed modalities in one study (CT + SR, CT + MR) and two CT series in another.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom.dsutils import encode

from tests.dicomdata import CT_IMAGE, MR_IMAGE, PREFIX, make_instance, send_datasets

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
ROOT = PREFIX + "77."  # every UID of this corpus starts here


@dataclass(frozen=True)
class PatientDef:
    name: str  # short name used in the tests
    patient_id: str
    patient_name: str
    birth_date: str
    sex: str
    charset: str | None  # Specific Character Set of the patient's instances (None: default)


@dataclass(frozen=True)
class StudyDef:
    name: str
    patient: str
    number: int  # the study's UID is ROOT + number
    date: str
    time: str
    accession: str
    description: str
    referring: str = ""
    institution: str | None = None  # an attribute the index does not hold

    @property
    def uid(self) -> str:
        return f"{ROOT}{self.number}"


@dataclass(frozen=True)
class SeriesDef:
    name: str
    study: str
    number: int  # SeriesNumber; the UID is the study's UID + "." + number
    modality: str
    sop_class: str
    count: int  # instances
    rows: int | None  # an attribute the index does not hold (None: no pixel module at all)
    image_type: str | None = None  # likewise, multi-valued
    date: str = ""  # SeriesDate; '' means the study's date
    time: str = ""  # SeriesTime; '' means the study's time


PATIENTS: dict[str, PatientDef] = {p.name: p for p in (
    PatientDef("obrien", "ID%1", "O'Brien^Mary", "19800101", "F", None),
    PatientDef("mcdonald", "ID_2", "mcDonald^ANNA", "", "F", None),
    PatientDef("mueller", "IDX2", "Müller^Jürgen", "19650315", "M", "ISO_IR 100"),
    PatientDef("ivanov", "RU-7", "Иванов^Дмитрий", "19900720", "M", "ISO_IR 192"),
    PatientDef("doe", "DOE-5", "Doe^Jane^^^", "19751111", "F", None),
    PatientDef("muller", "MUL-6", "Muller^Hans", "19551231", "M", None),
)}

STUDIES: dict[str, StudyDef] = {s.name: s for s in (
    StudyDef("obrien_chest", "obrien", 1, "20240101", "000000", "ACC-001", "CT Chest"),
    StudyDef("obrien_brain", "obrien", 2, "20240131", "120000", "ACC-002", "MR Brain",
             referring="House^Gregory"),
    StudyDef("mcdonald_ct", "mcdonald", 3, "20240201", "235959", "", ""),
    StudyDef("mueller_thorax", "mueller", 4, "20240131", "235959", "acc-004", "Thorax ñ",
             referring="Weiß^Frieda", institution="Klinikum Köln"),
    StudyDef("ivanov_head", "ivanov", 5, "20231231", "235959", "ACC-005", "Голова",
             referring="Петров^Иван"),
    StudyDef("doe_us", "doe", 6, "20240201", "000000", "ACC-006", "Follow-up"),
    StudyDef("muller_abdomen", "muller", 7, "20240115", "083000", "ACC-007", "CT Abdomen"),
    StudyDef("mueller_knee", "mueller", 8, "20240201", "120000", "ACC-008", "MR Knee",
             institution="Klinikum Köln"),
)}

SERIES: dict[str, SeriesDef] = {s.name: s for s in (
    SeriesDef("obrien_chest_ct", "obrien_chest", 1, "CT", CT_IMAGE, 4, 8,
              "ORIGINAL\\PRIMARY\\AXIAL"),
    SeriesDef("obrien_chest_sr", "obrien_chest", 2, "SR", BASIC_TEXT_SR, 2, None,
              date="20240102", time="090000"),
    SeriesDef("obrien_brain_mr", "obrien_brain", 1, "MR", MR_IMAGE, 3, 16,
              "ORIGINAL\\PRIMARY\\M"),
    SeriesDef("mcdonald_ct_ct", "mcdonald_ct", 1, "CT", CT_IMAGE, 2, 8),
    SeriesDef("mueller_thorax_ct", "mueller_thorax", 1, "CT", CT_IMAGE, 3, 8,
              "DERIVED\\SECONDARY"),
    SeriesDef("mueller_thorax_mr", "mueller_thorax", 2, "MR", MR_IMAGE, 2, 16),
    SeriesDef("ivanov_head_mr", "ivanov_head", 1, "MR", MR_IMAGE, 3, 16),
    SeriesDef("doe_us_us", "doe_us", 1, "US", US_IMAGE, 2, 8),
    SeriesDef("muller_abdomen_ct1", "muller_abdomen", 1, "CT", CT_IMAGE, 4, 8),
    SeriesDef("muller_abdomen_ct2", "muller_abdomen", 2, "CT", CT_IMAGE, 2, 8,
              time="084500"),
    SeriesDef("mueller_knee_mr", "mueller_knee", 1, "MR", MR_IMAGE, 3, 16),
)}


def series_uid(series: SeriesDef) -> str:
    return f"{STUDIES[series.study].uid}.{series.number}"


def instance_uid(series: str, number: int) -> str:
    """The SOP Instance UID of instance ``number`` (1-based) of series ``series``."""
    return f"{series_uid(SERIES[series])}.{number}"


def uid_of(name: str) -> str:
    """The UID of a study, a series or (``series#n``) an instance, by short name."""
    if name in STUDIES:
        return STUDIES[name].uid
    if name in SERIES:
        return series_uid(SERIES[name])
    series, _, number = name.partition("#")
    return instance_uid(series, int(number))


def instances_of(series: str) -> set[str]:
    """Short names (``series#n``) of every instance of ``series``."""
    return {f"{series}#{n}" for n in range(1, SERIES[series].count + 1)}


def all_instances() -> set[str]:
    return {name for series in SERIES for name in instances_of(series)}


def _names() -> dict[str, str]:
    by_uid = {uid_of(name): name for name in [*STUDIES, *SERIES, *all_instances()]}
    by_uid.update({p.patient_id: p.name for p in PATIENTS.values()})
    return by_uid


NAME_OF: dict[str, str] = _names()  # UID (or Patient ID) -> short name


def pn(name: str) -> str:
    """A person name without trailing empty components, which carry nothing (PS3.5 6.2):
    'Doe^Jane^^^' and 'Doe^Jane' are the same name, and a node may answer either."""
    return "=".join(group.rstrip("^") for group in name.split("=")).rstrip("=")


# --- Counts derived from the definition (for computed attributes) ------------------------------

def studies_of_patient(patient: str) -> list[str]:
    return [s.name for s in STUDIES.values() if s.patient == patient]


def series_of_study(study: str) -> list[str]:
    return [s.name for s in SERIES.values() if s.study == study]


def instance_count(series: list[str]) -> int:
    return sum(SERIES[s].count for s in series)


# --- Datasets ----------------------------------------------------------------------------------

_NO_PIXELS = dict.fromkeys(("Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation",
                            "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                            "PixelData"))


def dataset(series_name: str, number: int) -> Dataset:
    """Instance ``number`` of ``series_name`` as the modality would send it."""
    series = SERIES[series_name]
    study = STUDIES[series.study]
    patient = PATIENTS[study.patient]
    attributes: dict[str, object] = {
        "PatientName": patient.patient_name,
        "PatientID": patient.patient_id,
        "PatientBirthDate": patient.birth_date,
        "PatientSex": patient.sex,
        "StudyDate": study.date,
        "StudyTime": study.time,
        "AccessionNumber": study.accession,
        "StudyDescription": study.description,
        "StudyID": str(study.number),
        "Modality": series.modality,
        "SeriesNumber": series.number,
        "SeriesDescription": f"{series.modality} series {series.number}",
        "SeriesDate": series.date or study.date,
        "SeriesTime": series.time or study.time,
        "InstanceNumber": number,
    }
    if patient.charset is not None:
        attributes["SpecificCharacterSet"] = patient.charset
    if study.referring:
        attributes["ReferringPhysicianName"] = study.referring
    if study.institution is not None:
        attributes["InstitutionName"] = study.institution
    if series.image_type is not None:
        attributes["ImageType"] = series.image_type
    if series.rows is None:
        attributes.update(_NO_PIXELS)
    ds = make_instance(
        sop_class=series.sop_class,
        study=study.uid,
        series=series_uid(series),
        sop_instance=instance_uid(series_name, number),
        rows=series.rows or 8,
        **attributes,
    )
    return ds


def datasets() -> Iterator[Dataset]:
    """Every instance of the corpus, series by series."""
    for name, series in SERIES.items():
        for number in range(1, series.count + 1):
            yield dataset(name, number)


def receive_all(ingestor: Any, datasets: Iterable[Dataset]) -> None:
    """Store ``datasets`` through an archive's ingest path in this process, as a C-STORE from
    AE "T" would (implicit VR little endian)."""
    from node.index.writer import Source
    from node.ingest import Received

    for ds in datasets:
        ingestor.receive(Received(str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                                  "1.2.840.10008.1.2", encoded(ds), Source("T", "127.0.0.1")))


def encoded(ds: Dataset) -> bytes:
    """``ds`` as pynetdicom puts it on the wire (implicit VR little endian)."""
    data = encode(ds, True, True)
    assert data is not None
    return data


def bulk_datasets(count: int, patient_id: str = "BULK",
                  study_number: int = 900) -> list[Dataset]:
    """``count`` small CT instances in one series of one study (for cancel and limits)."""
    study = f"{ROOT}{study_number}"
    series = f"{study}.1"
    return [
        make_instance(study=study, series=series, sop_instance=f"{series}.{n}", rows=2,
                      PatientID=patient_id, PatientName="Bulk^Series", InstanceNumber=n,
                      StudyDate="20250101", StudyTime="101010")
        for n in range(1, count + 1)
    ]


def load(port: int, items: list[Dataset], called: str = "DICOMNODE") -> None:
    """Store ``items`` through C-STORE on one association; every one must succeed."""
    sent = send_datasets(port, items, called=called)
    failed = [s for s in sent if s.status != 0]
    assert not failed, f"corpus not stored: {failed[:3]}"
