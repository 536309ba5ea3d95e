"""The node's C-FIND answers next to Orthanc 1.10's, on the same corpus (issue 3).

The corpus of tests/findcorpus.py is stored through C-STORE into a node and into a private
Orthanc; every case below is sent to both over a pynetdicom SCU (one kept-open association each)
and the answers are compared: the same set of matches (by the unique key of the level), and the
same value for every requested key that both fill.  Keys the node leaves empty while Orthanc
fills them fail the comparison too.  No expected sets are written out for the compared cases:
Orthanc is the reference, and each case says whether it must match something at all, so that
two empty answers cannot pass for agreement.

Where the standard leaves a choice, or where Orthanc 1.10 departs from it, the two answers differ
on purpose: those cases are in DIFFERENCES, each with both answers written out and the reason,
so that a change on either side shows up here (and in the README's "Choices" list).

Orthanc runs with ``DefaultEncoding: Utf8``: with its shipped default (Latin1) it answers in
ISO_IR 100 whatever the query's Specific Character Set, and Cyrillic names come back as '^'
(a Specific Character Set choice, PS3.4 C.4.1.1.3.2), so the values could not be compared.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from tests import findcorpus as fc
from tests.conftest import NodeProcess
from tests.dicomdata import CT_IMAGE, no_delay, reactor_paused
from tests.orthanc import OrthancProcess, orthanc_available

if not orthanc_available():
    pytest.skip("Orthanc is not installed (/usr/sbin/Orthanc; apt-get install orthanc)",
                allow_module_level=True)

# pydicom warns when a query value is not valid for its VR ('?R', 'ID?2' …), sent on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR")

MODELS = {"patient": PatientRootQueryRetrieveInformationModelFind,
          "study": StudyRootQueryRetrieveInformationModelFind}
PENDING = (0xFF00, 0xFF01)
SUCCESS = 0x0000
UNIQUE = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
          "IMAGE": "SOPInstanceUID"}
U = fc.uid_of
Keys = dict[str, Any]

# Keys requested (universal) in every query of a level, so that their values are compared too.
# Rows, ImageType and InstitutionName are not in either index: both read them from a stored file.
RETURNED: dict[str, list[str]] = {
    "PATIENT": ["PatientName", "PatientBirthDate", "PatientSex", "NumberOfPatientRelatedStudies",
                "NumberOfPatientRelatedSeries", "NumberOfPatientRelatedInstances"],
    "STUDY": ["PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
              "StudyTime", "AccessionNumber", "StudyID", "StudyDescription",
              "ReferringPhysicianName", "ModalitiesInStudy", "SOPClassesInStudy",
              "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances", "InstitutionName"],
    "SERIES": ["PatientName", "StudyDate", "Modality", "SeriesNumber", "SeriesDescription",
               "SeriesDate", "SeriesTime", "NumberOfSeriesRelatedInstances", "Rows",
               "ImageType"],
    "IMAGE": ["PatientName", "Modality", "SOPClassUID", "InstanceNumber", "Rows", "Columns",
              "ImageType", "InstitutionName"],
}
UNORDERED = {"ModalitiesInStudy", "SOPClassesInStudy"}  # sets: the standard gives no order
NUMBERS = {"SeriesNumber", "InstanceNumber", "Rows", "Columns", "NumberOfPatientRelatedStudies",
           "NumberOfPatientRelatedSeries", "NumberOfPatientRelatedInstances",
           "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
           "NumberOfSeriesRelatedInstances"}
NAMES = {"PatientName", "ReferringPhysicianName"}


# --- The two servers ---------------------------------------------------------------------------

@dataclass
class Pair:
    node: NodeProcess
    orthanc: OrthancProcess
    associations: dict[str, Association] = field(default_factory=dict)


@pytest.fixture(scope="module")
def pair(shared_node: NodeProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    """The conftest node and a private Orthanc, both holding the corpus."""
    orthanc = OrthancProcess(tmp_path_factory.mktemp("orthanc"),
                             extra={"DefaultEncoding": "Utf8"})
    orthanc.start()
    made = Pair(shared_node, orthanc)
    try:
        fc.load(shared_node.port, list(fc.datasets()))
        fc.load(orthanc.dicom_port, list(fc.datasets()), called=orthanc.aet)
        assert orthanc.instance_count() == len(fc.all_instances())
        yield made
    finally:
        for assoc in made.associations.values():  # before the node stops (its stop_grace)
            if assoc.is_established:
                assoc.release()
        orthanc.stop()


def _associate(port: int, called: str) -> Association:
    ae = AE(ae_title="CMPSCU")
    for model in MODELS.values():
        ae.add_requested_context(model)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established, f"{called} rejected the association"
    no_delay(assoc)
    return assoc


@dataclass
class Answer:
    status: int
    matches: list[Dataset]


def c_find(pair: Pair, server: str, root: str, query: Dataset) -> Answer:
    """One C-FIND to ``server`` ("node" or "orthanc") on its kept-open association."""
    port, called = ((pair.node.port, "DICOMNODE") if server == "node"
                    else (pair.orthanc.dicom_port, pair.orthanc.aet))
    assoc = pair.associations.get(server)
    if assoc is None or not assoc.is_established:  # Orthanc closes idle ones after 30 s
        assoc = pair.associations[server] = _associate(port, called)
    matches: list[Dataset] = []
    try:
        for status, identifier in reactor_paused(assoc).send_c_find(query, MODELS[root]):
            assert "Status" in status, f"no response from {server} (timeout or abort)"
            if int(status.Status) in PENDING:
                assert identifier is not None, f"{server}: a pending response without identifier"
                matches.append(identifier)
            else:
                return Answer(int(status.Status), matches)
    except BaseException:
        del pair.associations[server]  # responses may still be in flight
        assoc.abort()
        raise
    raise AssertionError(f"no final response from {server}")


# --- Cases ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    id: str
    root: str
    level: str
    keys: Keys
    empty: bool = False  # both must find nothing (else both must find something)

    def identifier(self) -> Dataset:
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.QueryRetrieveLevel = self.level
        keys = {UNIQUE[self.level]: "", **dict.fromkeys(RETURNED[self.level], ""), **self.keys}
        for keyword, value in keys.items():
            setattr(ds, keyword, None if value == "" else value)
        return ds

    def param(self, *marks: Any) -> Any:
        return pytest.param(self, id=f"{self.root}-{self.level}-{self.id}", marks=marks)


def _patient_id(study_name: str) -> str:
    return fc.PATIENTS[fc.STUDIES[study_name].patient].patient_id


def study(id_: str, empty: bool = False, **keys: Any) -> Case:
    return Case(id_, "study", "STUDY", keys, empty)


def patient(id_: str, empty: bool = False, **keys: Any) -> Case:
    return Case(id_, "patient", "PATIENT", {"PatientID": "", **keys}, empty)


def pr_study(id_: str, patient_id: str, empty: bool = False, **keys: Any) -> Case:
    return Case(id_, "patient", "STUDY", {"PatientID": patient_id, **keys}, empty)


def series(id_: str, root: str, study_: str, empty: bool = False, **keys: Any) -> Case:
    upper: Keys = {"StudyInstanceUID": U(study_)}
    if root == "patient":
        upper["PatientID"] = _patient_id(study_)
    return Case(id_, root, "SERIES", {**upper, **keys}, empty)


def image(id_: str, root: str, series_: str, empty: bool = False, **keys: Any) -> Case:
    study_ = fc.SERIES[series_].study
    upper: Keys = {"StudyInstanceUID": U(study_), "SeriesInstanceUID": U(series_)}
    if root == "patient":
        upper["PatientID"] = _patient_id(study_)
    return Case(id_, root, "IMAGE", {**upper, **keys}, empty)


def both_roots(make: Any, id_: str, *args: Any, **keys: Any) -> list[Case]:
    return [make(id_, root, *args, **keys) for root in ("study", "patient")]


def uids(*names: str) -> str:
    return "\\".join(U(n) for n in names)


# Where the standard leaves no choice (PS3.4 C.2.2.2), at every level of both roots.
SINGLE_VALUE = [
    study("patient-id-percent", PatientID="ID%1"),
    study("patient-id-other-case", True, PatientID="id%1"),
    study("patient-id-underscore", PatientID="ID_2"),
    study("patient-id-no-prefix-match", True, PatientID="ID%"),
    study("accession-lower-case", AccessionNumber="acc-004"),
    study("accession-other-case", True, AccessionNumber="ACC-004"),
    study("description-latin1", StudyDescription="Thorax ñ"),
    study("description-other-case", True, StudyDescription="thorax ñ"),
    study("description-cyrillic", StudyDescription="Голова"),
    study("study-id", StudyID="5"),
    study("study-uid", StudyInstanceUID=U("doe_us")),
    study("patient-name-as-stored", PatientName="O'Brien^Mary"),
    study("referring-cyrillic", ReferringPhysicianName="Петров^Иван"),
    study("patient-sex", PatientSex="F"),
    study("birth-date", PatientBirthDate="19800101"),
    study("date", StudyDate="20240201"),
    study("time", StudyTime="235959"),
    patient("id-percent", PatientID="ID%1"),
    patient("id-underscore", PatientID="ID_2"),
    patient("sex", PatientSex="M"),
    patient("name-as-stored-with-trailing-carets", PatientName="Doe^Jane^^^"),
    patient("birth-date", PatientBirthDate="19650315"),
    pr_study("date", "IDX2", StudyDate="20240131"),
    pr_study("accession", "ID%1", AccessionNumber="ACC-002"),
    pr_study("other-patients-study", "ID_2", True, StudyInstanceUID=U("obrien_chest")),
    *both_roots(series, "modality", "obrien_chest", Modality="SR"),
    *both_roots(series, "modality-other-case", "obrien_chest", True, Modality="sr"),
    *both_roots(series, "series-number", "muller_abdomen", SeriesNumber="2"),
    *both_roots(series, "series-uid", "mueller_thorax", SeriesInstanceUID=U("mueller_thorax_mr")),
    *both_roots(series, "series-date", "muller_abdomen", SeriesDate="20240115"),
    Case("study-of-other-patient", "patient", "SERIES",
         {"PatientID": "ID_2", "StudyInstanceUID": U("obrien_chest")}, empty=True),
    *both_roots(image, "instance-number", "obrien_chest_ct", InstanceNumber="3"),
    *both_roots(image, "sop-class", "obrien_chest_sr", SOPClassUID=fc.BASIC_TEXT_SR),
    *both_roots(image, "sop-class-none", "obrien_chest_sr", True, SOPClassUID=CT_IMAGE),
    *both_roots(image, "sop-uid", "obrien_brain_mr", SOPInstanceUID=U("obrien_brain_mr#2")),
    Case("series-of-other-study", "study", "IMAGE",
         {"StudyInstanceUID": U("obrien_chest"), "SeriesInstanceUID": U("obrien_brain_mr")},
         empty=True),
]

UNIVERSAL = [
    study("all"),
    patient("all"),
    pr_study("patients-studies", "IDX2"),
    *both_roots(series, "all", "muller_abdomen"),
    *both_roots(series, "all-mixed-modalities", "obrien_chest"),
    *both_roots(image, "all", "obrien_chest_ct"),
    *both_roots(image, "all-without-pixels", "obrien_chest_sr"),
]

WILDCARD = [
    study("accession-question-mark", AccessionNumber="ACC-00?"),
    study("star-matches-zero-length-too", AccessionNumber="*"),
    study("description-suffix", StudyDescription="*Brain"),
    study("description-non-ascii-suffix", StudyDescription="*ñ"),
    study("description-prefix", StudyDescription="CT*"),
    study("description-prefix-other-case", True, StudyDescription="ct*"),
    study("patient-id-star", PatientID="*"),
    patient("name-star", PatientName="*"),
    patient("name-given-name-as-stored", PatientName="*^ANNA"),
    patient("id-question-mark", PatientID="ID?2"),
    patient("id-underscore-literal", PatientID="ID_*"),
    patient("id-percent-literal", PatientID="ID%*"),
    patient("id-underscore-suffix", PatientID="*_2"),
    patient("id-percent-first", True, PatientID="%*"),
    patient("id-prefix", PatientID="ID*"),
    patient("id-prefix-other-case", True, PatientID="id*"),
    patient("id-single-question-mark", True, PatientID="?"),
    pr_study("description", "ID%1", StudyDescription="MR*"),
    *both_roots(series, "description", "muller_abdomen", SeriesDescription="*2"),
    *both_roots(series, "modality-question-mark", "mueller_thorax", Modality="?R"),
    *both_roots(series, "modality-star", "obrien_chest", Modality="*"),
]

RANGES = [  # full-precision bounds: reduced precision is a choice (DIFFERENCES)
    study("date-closed", StudyDate="20240101-20240131"),
    study("date-open-low", StudyDate="-20240131"),
    study("date-open-high", StudyDate="20240131-"),
    study("date-one-day", StudyDate="20240101-20240101"),
    study("date-reversed", True, StudyDate="20240131-20240101"),
    study("time-closed", StudyTime="000000-120000"),
    study("time-open-high", StudyTime="120000-"),
    study("time-open-low", StudyTime="-000000"),
    study("time-closed-hour-minute-second", StudyTime="080000-090000"),
    study("date-single-time-empty", StudyDate="20240101", StudyTime=""),
    # Without Combined Date-Time Matching negotiated, each range matches alone (C.2.2.2.5).
    study("datetime-closed", StudyDate="20240131-20240201", StudyTime="120000-120000"),
    study("datetime-open-high", StudyDate="20240131-", StudyTime="120000-"),
    study("datetime-open-low", StudyDate="-20240131", StudyTime="-120000"),
    patient("birth-date-open-high", PatientBirthDate="19000101-"),
    patient("birth-date-closed", PatientBirthDate="19000101-20000101"),
    pr_study("date-open-high", "IDX2", StudyDate="20240201-"),
    pr_study("time-closed", "ID%1", StudyTime="110000-130000"),
    *both_roots(series, "series-date-open-high", "obrien_chest", SeriesDate="20240102-"),
    *both_roots(series, "series-date-closed", "obrien_chest", SeriesDate="20240101-20240102"),
    *both_roots(series, "series-time-open-high", "muller_abdomen", SeriesTime="084000-"),
    *both_roots(series, "series-time-open-low", "muller_abdomen", SeriesTime="-083000"),
]

UID_LISTS = [
    study("study-uids", StudyInstanceUID=uids("obrien_chest", "ivanov_head")),
    study("study-uids-one-unknown", StudyInstanceUID=U("doe_us") + "\\1.2.3"),
    pr_study("study-uids-of-other-patient", "ID%1",
             StudyInstanceUID=uids("obrien_chest", "ivanov_head")),
    *both_roots(series, "series-uids", "mueller_thorax",
                SeriesInstanceUID=uids("mueller_thorax_ct", "mueller_thorax_mr")),
    *both_roots(series, "series-uids-of-other-study", "mueller_thorax",
                SeriesInstanceUID=uids("mueller_thorax_ct", "obrien_chest_ct")),
    *both_roots(image, "sop-uids", "obrien_chest_ct",
                SOPInstanceUID=uids("obrien_chest_ct#1", "obrien_chest_ct#3")),
    *both_roots(image, "sop-uids-of-other-series", "muller_abdomen_ct2",
                SOPInstanceUID=uids("muller_abdomen_ct2#1", "muller_abdomen_ct1#1")),
]

# Backslash-separated values of a single-valued key: both take them as "any of" (single values
# only: with wildcards they differ, see DIFFERENCES).
MULTIPLE_VALUES = [
    *both_roots(series, "modalities", "mueller_thorax", Modality="CT\\MR"),
    *both_roots(series, "modalities-one-present", "obrien_chest", Modality="CT\\MR"),
    patient("ids", PatientID="ID%1\\RU-7"),
    study("accessions", AccessionNumber="ACC-005\\acc-004"),
    pr_study("accessions", "ID%1", AccessionNumber="ACC-001\\ACC-002"),
    *both_roots(image, "instance-numbers", "obrien_brain_mr", InstanceNumber="2\\3"),
]

MODALITIES_IN_STUDY = [  # PS3.4 C.6.2.1.2: a study matches when any of its series does
    study("sr-in-mixed-study", ModalitiesInStudy="SR"),
    study("mr", ModalitiesInStudy="MR"),
    study("ct-or-us", ModalitiesInStudy="CT\\US"),
    study("ct-or-mr", ModalitiesInStudy="CT\\MR"),
    study("wildcard-question-mark", ModalitiesInStudy="?R"),
    study("wildcard-star", ModalitiesInStudy="S*"),
    study("star", ModalitiesInStudy="*"),
    study("none", True, ModalitiesInStudy="XA"),
    study("other-case", True, ModalitiesInStudy="sr"),
    pr_study("ct", "ID%1", ModalitiesInStudy="CT"),
    pr_study("mr-and-date", "IDX2", ModalitiesInStudy="MR", StudyDate="20240201"),
]

# PS3.4 C.2.2.2.1 lets PN matching ignore case; both do by default (the node's
# names_case_insensitive, Orthanc's CaseSensitivePN false), so the answers must agree as long as
# only Latin letters change case (Cyrillic: see DIFFERENCES).
PERSON_NAMES_IGNORING_CASE = [
    patient("other-case", PatientName="MCDONALD^anna"),
    patient("lower-case-umlaut", PatientName="müller^jürgen"),
    patient("no-accent-folding", True, PatientName="MULLER^JURGEN"),
    patient("upper-umlaut-prefix", PatientName="MÜLL*"),
    patient("apostrophe-prefix", PatientName="o'brien*"),
    patient("cyrillic-lower-prefix", PatientName="иванов*"),
    patient("latin-a-not-cyrillic-a", PatientName="*a*"),
    patient("trailing-carets-prefix", PatientName="doe^jane*"),
    study("other-case", PatientName="o'BRIEN^mary"),
    study("family-name-alone-is-not-the-name", True, PatientName="MCDONALD"),
    study("referring-other-case", ReferringPhysicianName="HOUSE^GREGORY"),
    study("referring-lower-prefix", ReferringPhysicianName="house^*"),
    study("referring-latin1-prefix", ReferringPhysicianName="weiß*"),
]

CASES = [*SINGLE_VALUE, *UNIVERSAL, *WILDCARD, *RANGES, *UID_LISTS, *MULTIPLE_VALUES,
         *MODALITIES_IN_STUDY, *PERSON_NAMES_IGNORING_CASE]


# --- Comparing answers --------------------------------------------------------------------------

def value_of(keyword: str, element: Any) -> Any:
    """A returned value in a comparable form (None for zero length)."""
    value = element.value
    if value is None or value == "" or (isinstance(value, MultiValue | list) and not value):
        return None
    items = [str(v).strip() for v in value] if isinstance(value, MultiValue | list) else [
        str(value).strip()]
    if keyword in NAMES:  # 'Doe^Jane^^^' and 'Doe^Jane' are one name (PS3.5 6.2, PN)
        items = [fc.pn(item) for item in items]
        if not any(items):  # '^' alone: no name
            return None
    if keyword in NUMBERS:
        return tuple(int(item) for item in items)
    return tuple(sorted(items)) if keyword in UNORDERED else tuple(items)


def by_unique(answer: Answer, level: str, server: str) -> dict[str, Dataset]:
    assert answer.status == SUCCESS, f"{server} answered 0x{answer.status:04X}"
    keys = [str(rsp[UNIQUE[level]].value) for rsp in answer.matches if UNIQUE[level] in rsp]
    assert len(keys) == len(answer.matches), f"{server}: a response without its unique key"
    assert len(set(keys)) == len(keys), f"{server} answered an entity more than once"
    return dict(zip(keys, answer.matches, strict=True))


def short(uids_: set[str]) -> list[str]:
    return sorted(fc.NAME_OF.get(u, u) for u in uids_)


def compare(pair: Pair, case: Case) -> None:
    query = case.identifier()
    node = by_unique(c_find(pair, "node", case.root, query), case.level, "node")
    orthanc = by_unique(c_find(pair, "orthanc", case.root, query), case.level, "orthanc")
    assert short(set(node)) == short(set(orthanc)), "node and Orthanc match different sets"
    assert bool(node) != case.empty, "the case expects " + ("no" if case.empty else "some") + \
        " matches"
    wrong: list[str] = []
    for uid, ours in node.items():
        theirs = orthanc[uid]
        for element in query:
            keyword = element.keyword
            if keyword in ("SpecificCharacterSet", "QueryRetrieveLevel"):
                continue
            mine = value_of(keyword, ours[keyword]) if keyword in ours else None
            other = value_of(keyword, theirs[keyword]) if keyword in theirs else None
            # Orthanc's value is the reference; where it has none the node may still answer
            # one (e.g. a count Orthanc does not compute at that level).
            if other is not None and mine != other:
                wrong.append(f"{fc.NAME_OF.get(uid, uid)} {keyword}: node {mine!r}, "
                             f"Orthanc {other!r}")
    assert not wrong, "returned values differ:\n" + "\n".join(wrong)


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_node_answers_as_orthanc(pair: Pair, case: Case) -> None:
    compare(pair, case)


# --- Where they differ on purpose ----------------------------------------------------------------

@dataclass(frozen=True)
class Difference:
    case: Case
    node: set[str]  # short names of the node's matches
    orthanc: set[str]  # short names of Orthanc's matches
    why: str


DIFFERENCES = [
    Difference(study("time-hour-minute-range", StudyTime="1200-1200"),
               {"obrien_brain", "mueller_knee"}, set(),
               "Orthanc compares TM strings: '120000' > '1200'; 12:00:00 lies in 12:00..12:00 "
               "whatever the precision (PS3.4 C.2.2.2.5, PS3.5 TM)"),
    Difference(study("time-hour-minute-upper", StudyTime="-1200"),
               {"obrien_chest", "doe_us", "muller_abdomen", "obrien_brain", "mueller_knee"},
               {"obrien_chest", "doe_us", "muller_abdomen"},
               "as above: Orthanc leaves out 12:00:00 from 'up to 12:00'"),
    Difference(study("time-hour-range", StudyTime="08-08"), {"muller_abdomen"}, set(),
               "node: an upper bound covers its own precision (08 = 08:00:00-08:59:59, a "
               "choice the README states); Orthanc: string comparison"),
    Difference(patient("birth-date-open-low-zero-length", PatientBirthDate="-19700101"),
               {"mueller", "muller"}, {"mcdonald", "mueller", "muller"},
               "Orthanc matches the zero-length birth date of mcdonald to '-19700101' ('' sorts "
               "first); a range matches dates (PS3.4 C.2.2.2.5), an empty value is none"),
    Difference(study("star-on-absent-attribute", ReferringPhysicianName="*"),
               set(fc.STUDIES), {"obrien_brain", "mueller_thorax", "ivanov_head"},
               "'*' alone is universal matching and matches zero length (PS3.4 C.2.2.2.4); "
               "Orthanc leaves out the studies whose instances lack the attribute"),
    Difference(patient("question-mark-on-umlaut", PatientName="M?LLER*"),
               {"mueller", "muller"}, {"muller"},
               "'?' matches one character (PS3.4 C.2.2.2.4); Orthanc matches one UTF-8 byte, "
               "so not 'ü'"),
    Difference(study("question-mark-on-cyrillic", StudyDescription="?олова"),
               {"ivanov_head"}, set(), "as above, 'Г' is two UTF-8 bytes"),
    Difference(study("cyrillic-case", ReferringPhysicianName="ПЕТРОВ*"), {"ivanov_head"},
               set(), "PN case folding is the SCP's choice (PS3.4 C.2.2.2.1); the node folds "
               "every script, Orthanc not Cyrillic"),
    Difference(patient("names-with-wildcards", PatientName="O'BRIEN*\\doe*"),
               {"obrien", "doe"}, set(),
               "several values of a single-valued key (no choice-free rule in PS3.4 "
               "C.2.2.2): the node ORs them, wildcards included; Orthanc matches none"),
    Difference(image("instance-number-leading-zero", "study", "obrien_chest_ct",
                     InstanceNumber="03"), {"obrien_chest_ct#3"}, set(),
               "IS compared as numbers by the node ('03' = 3), as strings by Orthanc"),
    Difference(series("series-number-leading-zero", "study", "muller_abdomen",
                      SeriesNumber="02"), {"muller_abdomen_ct2"}, set(), "as above"),
    Difference(study("unindexed-key", InstitutionName="Klinikum Köln"), set(fc.STUDIES),
               {"mueller_thorax", "mueller_knee"},
               "the node does not match on keys outside its index (treated as universal, "
               "PS3.4 C.2.2.1.3) and says so with 0xFF01 'optional keys not supported' "
               "(PS3.4 C.4.1.1.4); Orthanc matches them in the stored files"),
    Difference(image("unindexed-multi-valued-key", "study", "obrien_chest_ct",
                     ImageType="ORIGINAL\\PRIMARY\\AXIAL"),
               fc.instances_of("obrien_chest_ct"), set(), "as above"),
    Difference(patient("name-without-trailing-carets", PatientName="Doe^Jane"), {"doe"},
               set(), "trailing empty PN components carry nothing (PS3.5 6.2); Orthanc "
               "compares the strings"),
    Difference(patient("name-one-trailing-caret", PatientName="DOE^JANE^"), {"doe"}, set(),
               "as above"),
    Difference(study("name-suffix-before-trailing-carets", PatientName="*Jane"), {"doe_us"},
               set(), "as above"),
]


def _names(answer: Answer, level: str, server: str) -> set[str]:
    return set(short(set(by_unique(answer, level, server))))


@pytest.mark.parametrize("difference", [
    pytest.param(d, id=f"{d.case.root}-{d.case.level}-{d.case.id}") for d in DIFFERENCES])
def test_documented_difference(pair: Pair, difference: Difference) -> None:
    """Both answers are exactly the documented ones (a change on either side shows here)."""
    case = difference.case
    query = case.identifier()
    node = _names(c_find(pair, "node", case.root, query), case.level, "node")
    orthanc = _names(c_find(pair, "orthanc", case.root, query), case.level, "orthanc")
    assert orthanc == difference.orthanc, f"Orthanc's answer changed ({difference.why})"
    assert node == difference.node, f"the node's answer changed ({difference.why})"


# --- Counts the two fill at different levels ----------------------------------------------------

PATIENT_COUNTS = ["NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
                  "NumberOfPatientRelatedInstances"]


def test_patient_counts_at_study_root_study_level_agree_with_orthancs_patient_level(
        pair: Pair) -> None:
    """Orthanc fills these at PATIENT level only (Patient Root); the node also at Study Root
    STUDY level (PS3.4 C.6.2.1.2), where they must equal Orthanc's patient-level counts."""
    patients = by_unique(c_find(pair, "orthanc", "patient", patient("counts").identifier()),
                         "PATIENT", "orthanc")
    counts = {pid: tuple(int(rsp[k].value) for k in PATIENT_COUNTS)
              for pid, rsp in patients.items()}
    assert len(counts) == len(fc.PATIENTS)
    query = Case("counts", "study", "STUDY", dict.fromkeys(PATIENT_COUNTS, "")).identifier()
    studies = by_unique(c_find(pair, "node", "study", query), "STUDY", "node")
    assert {uid: tuple(int(rsp[k].value) if rsp[k].value not in (None, "") else None
                       for k in PATIENT_COUNTS) for uid, rsp in studies.items()} == {
        uid: counts[str(rsp.PatientID)] for uid, rsp in studies.items()}
