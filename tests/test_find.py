"""C-FIND SCP queried with a pynetdicom SCU: every matching rule at every level of both roots.

The corpus (tests/findcorpus.py) is stored once through C-STORE into a module-scoped node; every
test sends queries and compares the answers with sets written out here, by the corpus' short
names.  Two more nodes serve what needs another configuration: person names compared
case-sensitively (which also holds a 300-instance series for C-CANCEL), and a limit of 5 matches.

Every answer, whatever the test, is also checked for what PS3.4 requires of each response: no
File Meta (0002,xxxx) element, Specific Character Set and the Query/Retrieve Level present, every
requested key present (zero length when there is no value), one response per matching entity.

The queries to one node share an association (a new one is opened only after a failure): the
node takes about 0.1 s to accept an association, against ~0.01 s for a bare pynetdicom SCP, and
a fresh association per query would make this module several times slower.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dsutils import encode
from pynetdicom.pdu_primitives import SOPClassExtendedNegotiation
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from tests import findcorpus as fc
from tests.conftest import NodeProcess, make_node
from tests.dicomdata import CT_IMAGE, MR_IMAGE, make_instance, no_delay, reactor_paused

# pydicom warns when a query value is not valid for its VR ('?R', '2024*', '1.2.826.*' …),
# which these tests send on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR")

AE_TITLE = "FINDNODE"  # not the default, so Retrieve AE Title is really the configured one
MODELS = {"patient": PatientRootQueryRetrieveInformationModelFind,
          "study": StudyRootQueryRetrieveInformationModelFind}
PENDING = (0xFF00, 0xFF01)
SUCCESS = 0x0000
CANCELLED = 0xFE00
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH = 0xA900
UNIQUE = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
          "IMAGE": "SOPInstanceUID"}
BULK = 300  # instances of the series the C-CANCEL test queries


# --- Nodes ---------------------------------------------------------------------------------

@dataclass
class Nodes:
    corpus: NodeProcess  # the whole corpus, default settings
    strict: NodeProcess  # names_case_insensitive: false; a few names and the bulk series
    limited: NodeProcess  # find_max_matches: 5


LIMITED_STUDY = f"{fc.ROOT}950"
LIMITED_SERIES = {1: 8, 2: 5}  # series of the limited node: number -> instances
STRICT_SERIES = ["mcdonald_ct_ct", "mueller_thorax_ct", "mueller_thorax_mr", "ivanov_head_mr"]


def _limited_datasets() -> list[Dataset]:
    return [
        make_instance(study=LIMITED_STUDY, series=f"{LIMITED_STUDY}.{number}",
                      sop_instance=f"{LIMITED_STUDY}.{number}.{n}", rows=2, PatientID="LIMIT",
                      SeriesNumber=number, InstanceNumber=n)
        for number, count in LIMITED_SERIES.items() for n in range(1, count + 1)
    ]


def _strict_datasets() -> list[Dataset]:
    return [fc.dataset(s, 1) for s in STRICT_SERIES] + fc.bulk_datasets(BULK)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    """Three nodes started and loaded side by side."""
    made = Nodes(
        corpus=make_node(tmp_path_factory.mktemp("corpus"), ae_title=AE_TITLE),
        strict=make_node(tmp_path_factory.mktemp("strict"), ae_title=AE_TITLE,
                         names_case_insensitive=False),
        limited=make_node(tmp_path_factory.mktemp("limited"), ae_title=AE_TITLE,
                          find_max_matches=5),
    )
    loads: list[tuple[NodeProcess, Callable[[], list[Dataset]]]] = [
        (made.corpus, lambda: list(fc.datasets())),
        (made.strict, _strict_datasets),
        (made.limited, _limited_datasets),
    ]

    def start_and_load(item: tuple[NodeProcess, Callable[[], list[Dataset]]]) -> None:
        node, datasets = item
        node.start()
        fc.load(node.port, datasets(), called=AE_TITLE)

    try:
        with ThreadPoolExecutor(len(loads)) as pool:
            list(pool.map(start_and_load, loads))
        yield made
    finally:
        release_associations()  # before the nodes stop, or each waits out its stop_grace
        running = [n for n, _ in loads if n.process is not None and n.process.poll() is None]
        with ThreadPoolExecutor(len(running) or 1) as pool:
            list(pool.map(NodeProcess.stop, running))


@pytest.fixture(scope="module")
def corpus_node(nodes: Nodes) -> NodeProcess:
    return nodes.corpus


# --- The SCU -------------------------------------------------------------------------------

@dataclass
class Answer:
    matches: list[Dataset]
    status: int
    comment: str
    pending_statuses: list[int]


Keys = dict[str | int, Any]


def identifier(level: str | None, keys: Keys, charset: str | None = None) -> Dataset:
    """A query identifier; a key whose value is '' or None is sent with zero length."""
    ds = Dataset()
    if charset is not None:
        ds.SpecificCharacterSet = charset
    if level is not None:
        ds.QueryRetrieveLevel = level
    for key, value in keys.items():
        value = None if value == "" else value
        if isinstance(key, int):
            ds.add_new(key, _vr_of(key), value)
        else:
            setattr(ds, key, value)
    return ds


def _vr_of(tag: int) -> str:
    from pydicom.datadict import dictionary_VR

    return "UL" if tag & 0xFFFF == 0 else dictionary_VR(tag)


def associate(node: NodeProcess, transfer_syntax: list[str] | None = None) -> Association:
    ae = AE(ae_title="FINDSCU")
    for model in MODELS.values():
        if transfer_syntax is None:
            ae.add_requested_context(model)
        else:
            ae.add_requested_context(model, transfer_syntax)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE)
    assert assoc.is_established, "association rejected"
    no_delay(assoc)  # TCP_NODELAY on the SCU socket
    return assoc


def collect(responses: Iterator[tuple[Dataset, Dataset | None]]) -> Answer:
    matches: list[Dataset] = []
    pending: list[int] = []
    for status, ident in responses:
        assert "Status" in status, "no response from the node (timeout or abort)"
        code = int(status.Status)
        if code in PENDING:
            assert ident is not None
            matches.append(ident)
            pending.append(code)
            continue
        assert ident is None or len(ident) == 0, "a final response carries no identifier"
        return Answer(matches, code, str(status.get("ErrorComment", "")), pending)
    raise AssertionError("no final response")


_open: dict[int, Association] = {}  # port -> association reused by the queries of a module


def release_associations() -> None:
    while _open:
        _, assoc = _open.popitem()
        if assoc.is_established:
            assoc.release()


def c_find(node: NodeProcess, root: str, level: str | None, keys: Keys,
           charset: str | None = None, query: Dataset | None = None) -> Answer:
    """Send one C-FIND on the node's shared association; check every response's invariants."""
    ds = query if query is not None else identifier(level, keys, charset)
    assoc = _open.get(node.port)
    if assoc is None or not assoc.is_established:
        assoc = _open[node.port] = associate(node)
    try:
        answer = collect(reactor_paused(assoc).send_c_find(ds, MODELS[root]))
    except BaseException:
        # responses may still be in flight: never let the next query read them
        del _open[node.port]
        assoc.abort()
        raise
    for rsp in answer.matches:
        check_response(rsp, ds)
    return answer


def check_response(rsp: Dataset, query: Dataset) -> None:
    """What every pending response must be, whatever was asked (PS3.4 C.4.1.1.3.2)."""
    assert not [e.tag for e in rsp if e.tag.group == 0x0002], "File Meta element in a response"
    assert rsp.SpecificCharacterSet == "ISO_IR 192"
    assert rsp.QueryRetrieveLevel == query.QueryRetrieveLevel
    for element in query:
        if element.tag.group == 0x0002 or element.tag.element == 0x0000:
            assert element.tag not in rsp, f"{element.tag} must not come back"
        elif element.tag != 0x00080005:
            assert element.tag in rsp, f"requested key {element.keyword or element.tag} missing"
    unique = UNIQUE[str(query.QueryRetrieveLevel)]
    assert rsp.get(unique), f"unique key {unique} of the level missing or empty"


def names(answer: Answer, level: str) -> set[str]:
    """The short names of the matched entities; each entity must be answered once."""
    assert answer.status == SUCCESS, f"status 0x{answer.status:04X} {answer.comment}"
    keys = [str(rsp[UNIQUE[level]].value) for rsp in answer.matches]
    assert len(keys) == len(set(keys)), f"an entity answered more than once: {sorted(keys)}"
    unknown = [k for k in keys if k not in fc.NAME_OF]
    assert not unknown, f"answers outside the corpus: {unknown}"
    return {fc.NAME_OF[k] for k in keys}


def by_name(answer: Answer, level: str) -> dict[str, Dataset]:
    names(answer, level)
    return {fc.NAME_OF[str(rsp[UNIQUE[level]].value)]: rsp for rsp in answer.matches}


def values(rsp: Dataset, keyword: str) -> list[str]:
    """A returned element's values as strings ([] for zero length)."""
    element = rsp[keyword]
    if element.value is None or element.value == "":
        return []
    if isinstance(element.value, (MultiValue, list)):
        return [str(v) for v in element.value]
    return [str(element.value)]


def text(rsp: Dataset, keyword: str) -> str:
    return "\\".join(values(rsp, keyword))


def uids(*names_: str) -> str:
    """A list of UIDs (backslash-separated) by short names."""
    return "\\".join(fc.uid_of(n) for n in names_)


# --- Matching rules, level by level, in both roots --------------------------------------------

ALL_STUDIES = set(fc.STUDIES)
ALL_PATIENTS = set(fc.PATIENTS)
U = fc.uid_of
CHEST_CT = fc.instances_of("obrien_chest_ct")


@dataclass(frozen=True)
class Case:
    id: str
    root: str
    level: str
    keys: Keys
    expected: set[str]
    charset: str | None = "ISO_IR 192"

    def param(self, *marks: Any) -> Any:
        return pytest.param(self, id=f"{self.root}-{self.level}-{self.id}", marks=marks)


def study(id_: str, keys: Keys, expected: set[str]) -> Case:
    return Case(id_, "study", "STUDY", {"StudyInstanceUID": "", "PatientName": "", **keys},
                expected)


def patient(id_: str, keys: Keys, expected: set[str]) -> Case:
    return Case(id_, "patient", "PATIENT", {"PatientName": "", "PatientID": "", **keys},
                expected)


def pr_study(id_: str, patient_id: str, keys: Keys, expected: set[str]) -> Case:
    return Case(id_, "patient", "STUDY",
                {"PatientID": patient_id, "StudyInstanceUID": "", **keys}, expected)


def series(id_: str, root: str, study_: str, keys: Keys, expected: set[str]) -> Case:
    upper: Keys = {"StudyInstanceUID": U(study_)}
    if root == "patient":
        upper = {"PatientID": fc.PATIENTS[fc.STUDIES[study_].patient].patient_id, **upper}
    return Case(id_, root, "SERIES", {**upper, "SeriesInstanceUID": "", "Modality": "", **keys},
                expected)


def image(id_: str, root: str, series_: str, keys: Keys, expected: set[str]) -> Case:
    study_ = fc.SERIES[series_].study
    upper: Keys = {"StudyInstanceUID": U(study_), "SeriesInstanceUID": U(series_)}
    if root == "patient":
        upper = {"PatientID": fc.PATIENTS[fc.STUDIES[study_].patient].patient_id, **upper}
    return Case(id_, root, "IMAGE", {**upper, "SOPInstanceUID": "", **keys}, expected)


SINGLE_VALUE = [
    study("patient-id", {"PatientID": "ID%1"}, {"obrien_chest", "obrien_brain"}),
    study("patient-id-other-case", {"PatientID": "id%1"}, set()),
    study("patient-id-underscore", {"PatientID": "ID_2"}, {"mcdonald_ct"}),
    study("patient-id-no-prefix-match", {"PatientID": "ID%"}, set()),
    study("accession-lower-case", {"AccessionNumber": "acc-004"}, {"mueller_thorax"}),
    study("accession-other-case", {"AccessionNumber": "ACC-004"}, set()),
    study("description-latin1-value", {"StudyDescription": "Thorax ñ"}, {"mueller_thorax"}),
    study("description-other-case", {"StudyDescription": "thorax ñ"}, set()),
    study("description-cyrillic", {"StudyDescription": "Голова"}, {"ivanov_head"}),
    study("study-id", {"StudyID": "5"}, {"ivanov_head"}),
    study("study-uid", {"StudyInstanceUID": U("doe_us")}, {"doe_us"}),
    study("patient-name-exact", {"PatientName": "O'Brien^Mary"},
          {"obrien_chest", "obrien_brain"}),
    study("referring-name", {"ReferringPhysicianName": "Петров^Иван"}, {"ivanov_head"}),
    patient("id-percent", {"PatientID": "ID%1"}, {"obrien"}),
    patient("id-percent-other-case", {"PatientID": "id%1"}, set()),
    patient("id-underscore-not-like", {"PatientID": "ID_2"}, {"mcdonald"}),
    patient("sex", {"PatientSex": "M"}, {"mueller", "ivanov", "muller"}),
    patient("name-trailing-carets-as-sent", {"PatientName": "Doe^Jane^^^"}, {"doe"}),
    pr_study("date", "IDX2", {"StudyDate": "20240131"}, {"mueller_thorax"}),
    pr_study("accession", "ID%1", {"AccessionNumber": "ACC-002"}, {"obrien_brain"}),
    pr_study("other-patients-study", "ID_2", {"StudyInstanceUID": U("obrien_chest")}, set()),
    series("modality", "study", "obrien_chest", {"Modality": "SR"}, {"obrien_chest_sr"}),
    series("modality-other-case", "study", "obrien_chest", {"Modality": "sr"}, set()),
    series("series-number", "study", "muller_abdomen", {"SeriesNumber": "2"},
           {"muller_abdomen_ct2"}),
    series("series-uid", "study", "mueller_thorax",
           {"SeriesInstanceUID": U("mueller_thorax_mr")}, {"mueller_thorax_mr"}),
    series("modality", "patient", "mueller_thorax", {"Modality": "MR"}, {"mueller_thorax_mr"}),
    Case("study-of-other-patient", "patient", "SERIES",
         {"PatientID": "ID_2", "StudyInstanceUID": U("obrien_chest"), "SeriesInstanceUID": ""},
         set()),
    image("instance-number", "study", "obrien_chest_ct", {"InstanceNumber": "3"},
          {"obrien_chest_ct#3"}),
    image("sop-class", "study", "obrien_chest_sr", {"SOPClassUID": fc.BASIC_TEXT_SR},
          fc.instances_of("obrien_chest_sr")),
    image("sop-class-none", "study", "obrien_chest_sr", {"SOPClassUID": CT_IMAGE}, set()),
    image("sop-uid", "patient", "obrien_brain_mr",
          {"SOPInstanceUID": U("obrien_brain_mr#2")}, {"obrien_brain_mr#2"}),
    Case("series-of-other-study", "study", "IMAGE",
         {"StudyInstanceUID": U("obrien_chest"), "SeriesInstanceUID": U("obrien_brain_mr"),
          "SOPInstanceUID": ""}, set()),
]

UNIVERSAL = [
    study("all", {}, ALL_STUDIES),
    study("all-with-empty-keys", {"AccessionNumber": "", "StudyDescription": "",
                                  "StudyDate": "", "ModalitiesInStudy": ""}, ALL_STUDIES),
    patient("all", {"PatientBirthDate": ""}, ALL_PATIENTS),
    pr_study("patients-studies", "IDX2", {}, {"mueller_thorax", "mueller_knee"}),
    series("all", "study", "muller_abdomen", {}, {"muller_abdomen_ct1", "muller_abdomen_ct2"}),
    series("all", "patient", "obrien_chest", {}, {"obrien_chest_ct", "obrien_chest_sr"}),
    image("all", "study", "obrien_chest_ct", {}, CHEST_CT),
    image("all", "patient", "mueller_thorax_ct", {},
          fc.instances_of("mueller_thorax_ct")),
]

WILDCARD = [
    study("name-upper-umlaut", {"PatientName": "MÜLL*"}, {"mueller_thorax", "mueller_knee"}),
    study("accession-question-mark", {"AccessionNumber": "ACC-00?"},
          {"obrien_chest", "obrien_brain", "ivanov_head", "doe_us", "muller_abdomen",
           "mueller_knee"}),
    study("star-alone-matches-empty-values-too", {"AccessionNumber": "*"}, ALL_STUDIES),
    study("description-suffix", {"StudyDescription": "*Brain"}, {"obrien_brain"}),
    study("description-non-ascii", {"StudyDescription": "*ñ"}, {"mueller_thorax"}),
    study("referring-lower", {"ReferringPhysicianName": "house^*"}, {"obrien_brain"}),
    study("referring-cyrillic-upper", {"ReferringPhysicianName": "ПЕТРОВ*"}, {"ivanov_head"}),
    study("referring-latin1", {"ReferringPhysicianName": "weiß*"}, {"mueller_thorax"}),
    patient("name-upper-umlaut", {"PatientName": "MÜLL*"}, {"mueller"}),
    patient("name-question-mark-on-umlaut", {"PatientName": "M?LLER*"}, {"mueller", "muller"}),
    patient("name-star", {"PatientName": "*"}, ALL_PATIENTS),
    patient("name-apostrophe", {"PatientName": "o'brien*"}, {"obrien"}),
    patient("name-given-name", {"PatientName": "*^ANNA"}, {"mcdonald"}),
    patient("name-cyrillic-lower", {"PatientName": "иванов*"}, {"ivanov"}),
    patient("name-latin-a-not-cyrillic-a", {"PatientName": "*a*"},
            {"obrien", "mcdonald", "doe", "muller"}),
    patient("name-trailing-carets-prefix", {"PatientName": "doe^jane*"}, {"doe"}),
    patient("id-question-mark", {"PatientID": "ID?2"}, {"mcdonald", "mueller"}),
    patient("id-underscore-literal", {"PatientID": "ID_*"}, {"mcdonald"}),
    patient("id-percent-literal", {"PatientID": "ID%*"}, {"obrien"}),
    patient("id-underscore-suffix", {"PatientID": "*_2"}, {"mcdonald"}),
    patient("id-percent-first", {"PatientID": "%*"}, set()),
    patient("id-prefix", {"PatientID": "ID*"}, {"obrien", "mcdonald", "mueller"}),
    patient("id-prefix-other-case", {"PatientID": "id*"}, set()),
    patient("id-single-question-mark", {"PatientID": "?"}, set()),
    pr_study("description", "ID%1", {"StudyDescription": "MR*"}, {"obrien_brain"}),
    series("description", "study", "muller_abdomen", {"SeriesDescription": "*2"},
           {"muller_abdomen_ct2"}),
    series("modality-question-mark", "study", "mueller_thorax", {"Modality": "?R"},
           {"mueller_thorax_mr"}),
    series("modality-star", "patient", "obrien_chest", {"Modality": "*"},
           {"obrien_chest_ct", "obrien_chest_sr"}),
]

# name, StudyDate, StudyTime, matches as one date-time range, matches with each range alone
DATE_TIME_RANGES = [
    ("datetime-closed", "20240131-20240201", "120000-120000",  # 31 Jan 12:00 .. 1 Feb 12:00
     {"obrien_brain", "mueller_thorax", "doe_us", "mueller_knee"},
     {"obrien_brain", "mueller_knee"}),
    ("datetime-open-high", "20240131-", "120000-",
     {"obrien_brain", "mueller_thorax", "mcdonald_ct", "doe_us", "mueller_knee"},
     {"obrien_brain", "mueller_thorax", "mcdonald_ct", "mueller_knee"}),
    ("datetime-open-low", "-20240131", "-120000",
     {"obrien_chest", "obrien_brain", "ivanov_head", "muller_abdomen"},
     {"obrien_chest", "obrien_brain", "muller_abdomen"}),
]

RANGES = [
    study("date-closed", {"StudyDate": "20240101-20240131"},
          {"obrien_chest", "obrien_brain", "mueller_thorax", "muller_abdomen"}),
    study("date-open-low", {"StudyDate": "-20240131"},
          {"obrien_chest", "obrien_brain", "mueller_thorax", "muller_abdomen", "ivanov_head"}),
    study("date-open-high", {"StudyDate": "20240131-"},
          {"obrien_brain", "mueller_thorax", "mcdonald_ct", "doe_us", "mueller_knee"}),
    study("date-single", {"StudyDate": "20240201"}, {"mcdonald_ct", "doe_us", "mueller_knee"}),
    study("date-one-day-range", {"StudyDate": "20240101-20240101"}, {"obrien_chest"}),
    study("time-closed", {"StudyTime": "000000-120000"},
          {"obrien_chest", "obrien_brain", "doe_us", "muller_abdomen", "mueller_knee"}),
    study("time-open-high", {"StudyTime": "120000-"},
          {"obrien_brain", "mcdonald_ct", "mueller_thorax", "ivanov_head", "mueller_knee"}),
    study("time-open-low", {"StudyTime": "-000000"}, {"obrien_chest", "doe_us"}),
    study("time-single", {"StudyTime": "235959"},
          {"mcdonald_ct", "mueller_thorax", "ivanov_head"}),
    # Without Combined Date-Time Matching negotiated, a date range and a time range each
    # match alone (PS3.4 C.2.2.2.5): either day, at 12:00:00 (test_combined_date_time...).
    *[study(name, {"StudyDate": day, "StudyTime": moment}, separately)
      for name, day, moment, _, separately in DATE_TIME_RANGES],
    study("single-date-and-time-range", {"StudyDate": "20240131", "StudyTime": "120000-"},
          {"obrien_brain", "mueller_thorax"}),
    study("date-range-and-single-time", {"StudyDate": "20240131-20240201",
                                         "StudyTime": "235959"},
          {"mueller_thorax", "mcdonald_ct"}),
    patient("birth-date-open-high-skips-empty", {"PatientBirthDate": "19000101-"},
            {"obrien", "mueller", "ivanov", "doe", "muller"}),
    patient("birth-date-open-low", {"PatientBirthDate": "-19700101"}, {"mueller", "muller"}),
    pr_study("date-open-high", "IDX2", {"StudyDate": "20240201-"}, {"mueller_knee"}),
    pr_study("time-closed", "ID%1", {"StudyTime": "110000-130000"}, {"obrien_brain"}),
    series("series-date-open-high", "study", "obrien_chest", {"SeriesDate": "20240102-"},
           {"obrien_chest_sr"}),
    series("series-date-closed", "study", "obrien_chest", {"SeriesDate": "20240101-20240102"},
           {"obrien_chest_ct", "obrien_chest_sr"}),
    series("series-time-open-high", "patient", "muller_abdomen", {"SeriesTime": "084000-"},
           {"muller_abdomen_ct2"}),
    series("series-time-open-low", "patient", "muller_abdomen", {"SeriesTime": "-083000"},
           {"muller_abdomen_ct1"}),
]

UID_LISTS = [
    study("study-uids", {"StudyInstanceUID": uids("obrien_chest", "ivanov_head")},
          {"obrien_chest", "ivanov_head"}),
    pr_study("study-uids-of-other-patient", "ID%1",
             {"StudyInstanceUID": uids("obrien_chest", "ivanov_head")}, {"obrien_chest"}),
    series("series-uids", "study", "mueller_thorax",
           {"SeriesInstanceUID": uids("mueller_thorax_ct", "mueller_thorax_mr")},
           {"mueller_thorax_ct", "mueller_thorax_mr"}),
    series("series-uids-of-other-study", "patient", "mueller_thorax",
           {"SeriesInstanceUID": uids("mueller_thorax_ct", "obrien_chest_ct")},
           {"mueller_thorax_ct"}),
    image("sop-uids", "study", "obrien_chest_ct",
          {"SOPInstanceUID": uids("obrien_chest_ct#1", "obrien_chest_ct#3")},
          {"obrien_chest_ct#1", "obrien_chest_ct#3"}),
    image("sop-uids-of-other-series", "patient", "muller_abdomen_ct2",
          {"SOPInstanceUID": uids("muller_abdomen_ct2#1", "muller_abdomen_ct1#1")},
          {"muller_abdomen_ct2#1"}),
]

MULTIPLE_VALUES = [
    series("modalities", "study", "mueller_thorax", {"Modality": "CT\\MR"},
           {"mueller_thorax_ct", "mueller_thorax_mr"}),
    series("modalities-one-present", "study", "obrien_chest", {"Modality": "CT\\MR"},
           {"obrien_chest_ct"}),
    series("modalities", "patient", "obrien_chest", {"Modality": "MR\\SR"},
           {"obrien_chest_sr"}),
    patient("ids", {"PatientID": "ID%1\\RU-7"}, {"obrien", "ivanov"}),
    patient("names-with-wildcards", {"PatientName": "O'BRIEN*\\doe*"}, {"obrien", "doe"}),
    study("accessions", {"AccessionNumber": "ACC-005\\acc-004"},
          {"ivanov_head", "mueller_thorax"}),
    image("instance-numbers", "patient", "obrien_brain_mr", {"InstanceNumber": "2\\3"},
          {"obrien_brain_mr#2", "obrien_brain_mr#3"}),
    image("instance-numbers", "study", "obrien_chest_ct", {"InstanceNumber": "1\\4"},
          {"obrien_chest_ct#1", "obrien_chest_ct#4"}),
    pr_study("accessions", "ID%1", {"AccessionNumber": "ACC-001\\ACC-002"},
             {"obrien_chest", "obrien_brain"}),
]

MODALITIES_IN_STUDY = [
    study("sr-in-mixed-study", {"ModalitiesInStudy": "SR"}, {"obrien_chest"}),
    study("mr", {"ModalitiesInStudy": "MR"},
          {"obrien_brain", "mueller_thorax", "ivanov_head", "mueller_knee"}),
    study("ct-or-us", {"ModalitiesInStudy": "CT\\US"},
          {"obrien_chest", "mcdonald_ct", "mueller_thorax", "doe_us", "muller_abdomen"}),
    study("wildcard", {"ModalitiesInStudy": "?R"},
          {"obrien_chest", "obrien_brain", "mueller_thorax", "ivanov_head", "mueller_knee"}),
    study("none", {"ModalitiesInStudy": "XA"}, set()),
    pr_study("ct", "ID%1", {"ModalitiesInStudy": "CT"}, {"obrien_chest"}),
    pr_study("mr-and-date", "IDX2", {"ModalitiesInStudy": "MR", "StudyDate": "20240201"},
             {"mueller_knee"}),
]

PERSON_NAMES_DEFAULT = [
    patient("other-case", {"PatientName": "MCDONALD^anna"}, {"mcdonald"}),
    patient("lower-case-umlaut", {"PatientName": "müller^jürgen"}, {"mueller"}),
    patient("no-accent-folding", {"PatientName": "MULLER^JURGEN"}, set()),
    study("other-case", {"PatientName": "o'BRIEN^mary"}, {"obrien_chest", "obrien_brain"}),
    study("referring-other-case", {"ReferringPhysicianName": "HOUSE^GREGORY"},
          {"obrien_brain"}),
]

CASES = {
    "single-value": SINGLE_VALUE,
    "universal": UNIVERSAL,
    "wildcard": WILDCARD,
    "range": RANGES,
    "uid-list": UID_LISTS,
    "multiple-values": MULTIPLE_VALUES,
    "modalities-in-study": MODALITIES_IN_STUDY,
    "person-name-case-insensitive": PERSON_NAMES_DEFAULT,
}


def _run(node: NodeProcess, case: Case) -> None:
    answer = c_find(node, case.root, case.level, case.keys, case.charset)
    assert names(answer, case.level) == case.expected
    assert answer.pending_statuses == [0xFF00] * len(answer.matches)


@pytest.mark.parametrize("case", [c.param() for c in SINGLE_VALUE])
def test_single_value_matching(corpus_node: NodeProcess, case: Case) -> None:
    _run(corpus_node, case)


@pytest.mark.parametrize("case", [c.param() for c in UNIVERSAL])
def test_universal_matching(corpus_node: NodeProcess, case: Case) -> None:
    _run(corpus_node, case)


@pytest.mark.parametrize("case", [c.param() for c in WILDCARD])
def test_wildcard_matching(corpus_node: NodeProcess, case: Case) -> None:
    _run(corpus_node, case)


@pytest.mark.parametrize("case", [c.param() for c in RANGES])
def test_range_matching(corpus_node: NodeProcess, case: Case) -> None:
    _run(corpus_node, case)


@pytest.mark.parametrize("case", [c.param() for c in UID_LISTS])
def test_list_of_uids_matching(corpus_node: NodeProcess, case: Case) -> None:
    _run(corpus_node, case)


@pytest.mark.parametrize("case", [c.param() for c in MULTIPLE_VALUES])
def test_multiple_values_matching(corpus_node: NodeProcess, case: Case) -> None:
    _run(corpus_node, case)


@pytest.mark.parametrize("case", [c.param() for c in MODALITIES_IN_STUDY])
def test_modalities_in_study_matching(corpus_node: NodeProcess, case: Case) -> None:
    _run(corpus_node, case)


@pytest.mark.parametrize("case", [c.param() for c in PERSON_NAMES_DEFAULT])
def test_person_names_match_case_insensitively_by_default(corpus_node: NodeProcess,
                                                           case: Case) -> None:
    _run(corpus_node, case)


@pytest.mark.parametrize("query", ["Doe^Jane", "DOE^JANE^"])
def test_person_name_trailing_empty_components_are_insignificant(corpus_node: NodeProcess,
                                                                  query: str) -> None:
    answer = c_find(corpus_node, "patient", "PATIENT", {"PatientID": "", "PatientName": query})
    assert names(answer, "PATIENT") == {"doe"}


# Where a rule has no key to apply to: no UID key at PATIENT level; no indexed text, date or
# time key at IMAGE level (SOP Class UID and Instance Number are UI and IS).
NOT_APPLICABLE = {
    "uid-list": {("patient", "PATIENT")},
    "wildcard": {("patient", "IMAGE"), ("study", "IMAGE")},
    "range": {("patient", "IMAGE"), ("study", "IMAGE")},
}
LEVELS = {("patient", "PATIENT"), ("patient", "STUDY"), ("patient", "SERIES"),
          ("patient", "IMAGE"), ("study", "STUDY"), ("study", "SERIES"), ("study", "IMAGE")}


@pytest.mark.parametrize("rule", ["single-value", "universal", "wildcard", "range", "uid-list",
                                  "multiple-values"])
def test_every_rule_is_tested_at_every_level_of_both_roots(rule: str) -> None:
    covered = {(c.root, c.level) for c in CASES[rule]}
    assert LEVELS - covered == NOT_APPLICABLE.get(rule, set())


# --- Names: configured case sensitivity, character sets --------------------------------------

STRICT_NAMES = [
    patient("exact-case", {"PatientName": "mcDonald^ANNA"}, {"mcdonald"}),
    patient("other-case", {"PatientName": "mcdonald^anna"}, set()),
    patient("wildcard-exact-case", {"PatientName": "mc*"}, {"mcdonald"}),
    patient("wildcard-other-case", {"PatientName": "MC*"}, set()),
    patient("umlaut-exact-case", {"PatientName": "Müll*"}, {"mueller"}),
    patient("umlaut-other-case", {"PatientName": "MÜLL*"}, set()),
    patient("cyrillic-exact-case", {"PatientName": "Иванов^Дмитрий"}, {"ivanov"}),
    patient("cyrillic-other-case", {"PatientName": "иванов*"}, set()),
    study("referring-exact-case", {"ReferringPhysicianName": "Weiß^Frieda"},
          {"mueller_thorax"}),
    study("referring-other-case", {"ReferringPhysicianName": "weiß^frieda"}, set()),
    study("name-exact-case", {"PatientName": "Müller^Jürgen"}, {"mueller_thorax"}),
    study("name-other-case", {"PatientName": "MÜLLER^JÜRGEN"}, set()),
]


@pytest.mark.parametrize("case", [c.param() for c in STRICT_NAMES])
def test_person_names_match_case_sensitively_when_configured(nodes: Nodes, case: Case) -> None:
    """names_case_insensitive: false (the strict node holds one instance per series of
    mcdonald_ct, mueller_thorax, ivanov_head, and the bulk patient)."""
    _run(nodes.strict, case)


@pytest.mark.parametrize(("charset", "query", "encoded"), [
    ("ISO_IR 192", "Müller^Jürgen", "Müller^Jürgen".encode()),
    ("ISO_IR 100", "Müller^Jürgen", "Müller^Jürgen".encode("latin-1")),
    ("ISO_IR 100", "MÜLLER*", "MÜLLER*".encode("latin-1")),
])
def test_latin1_name_found_by_decoded_value(corpus_node: NodeProcess, charset: str, query: str,
                                            encoded: bytes) -> None:
    """Stored in ISO_IR 100, queried in UTF-8 or Latin-1: compared as characters, answered in
    UTF-8 with Specific Character Set saying so."""
    ds = identifier("PATIENT", {"PatientID": "", "PatientName": query}, charset)
    assert encoded in (encode(ds, True, True) or b"")  # the query really goes out in that encoding
    answer = c_find(corpus_node, "patient", "PATIENT", {}, query=ds)
    assert names(answer, "PATIENT") == {"mueller"}
    rsp = answer.matches[0]
    assert rsp.SpecificCharacterSet == "ISO_IR 192"
    assert str(rsp.PatientName) == "Müller^Jürgen"


def test_utf8_names_and_descriptions_come_back_decoded(corpus_node: NodeProcess) -> None:
    answer = c_find(corpus_node, "study", "STUDY",
                    {"PatientName": "Иванов*", "StudyInstanceUID": "", "StudyDescription": "",
                     "ReferringPhysicianName": ""}, "ISO_IR 192")
    found = by_name(answer, "STUDY")
    assert set(found) == {"ivanov_head"}
    rsp = found["ivanov_head"]
    assert (str(rsp.PatientName), rsp.StudyDescription, str(rsp.ReferringPhysicianName)) == (
        "Иванов^Дмитрий", "Голова", "Петров^Иван")


def test_corpus_went_out_in_its_character_sets(corpus_node: NodeProcess) -> None:
    """The corpus' non-ASCII values are really Latin-1 / UTF-8 bytes on the wire, and all of
    it is indexed."""
    latin1 = fc.encoded(fc.dataset("mueller_thorax_ct", 1))
    assert "Müller^Jürgen".encode("latin-1") in latin1
    assert "Weiß^Frieda".encode("latin-1") in latin1
    assert "Müller".encode() not in latin1
    utf8 = fc.encoded(fc.dataset("ivanov_head_mr", 1))
    assert "Иванов^Дмитрий".encode() in utf8 and b"ISO_IR 192" in utf8
    assert corpus_node.rows("SELECT count(*) FROM instance") == [(len(fc.all_instances()),)]


# --- Hierarchical rules and bad identifiers ---------------------------------------------------

ERRORS = [
    ("study", "SERIES", {"SeriesInstanceUID": ""}, "series-without-study-uid"),
    ("study", "SERIES", {"StudyInstanceUID": "", "SeriesInstanceUID": ""},
     "series-with-empty-study-uid"),
    ("study", "IMAGE", {"StudyInstanceUID": U("obrien_chest"), "SOPInstanceUID": ""},
     "image-without-series-uid"),
    ("patient", "STUDY", {"StudyInstanceUID": ""}, "study-without-patient-id"),
    ("patient", "SERIES", {"StudyInstanceUID": U("obrien_chest"), "SeriesInstanceUID": ""},
     "series-without-patient-id"),
    ("patient", "IMAGE", {"PatientID": "ID%1", "StudyInstanceUID": U("obrien_chest"),
                          "SOPInstanceUID": ""}, "image-without-series-uid"),
    ("patient", "STUDY", {"PatientID": "ID*", "StudyInstanceUID": ""},
     "wildcarded-patient-id"),
    ("patient", "SERIES", {"PatientID": "ID%1", "StudyInstanceUID": "1.2.826.*",
                           "SeriesInstanceUID": ""}, "wildcarded-study-uid"),
    ("study", "SERIES", {"StudyInstanceUID": uids("obrien_chest", "obrien_brain"),
                         "SeriesInstanceUID": ""}, "list-of-study-uids"),
    ("study", "IMAGE", {"StudyInstanceUID": U("obrien_chest"), "SeriesInstanceUID": "1.2.?",
                        "SOPInstanceUID": ""}, "wildcarded-series-uid"),
    ("study", None, {"StudyInstanceUID": ""}, "no-level"),
    ("study", "", {"StudyInstanceUID": ""}, "empty-level"),
    ("patient", "STUDIES", {"PatientID": "ID%1", "StudyInstanceUID": ""}, "bad-level"),
    ("study", "PATIENT", {"PatientID": ""}, "patient-level-in-study-root"),
    ("study", "STUDY", {"StudyDate": "2024*", "StudyInstanceUID": ""}, "wildcard-on-date"),
    ("study", "STUDY", {"StudyDate": "2024-01-01", "StudyInstanceUID": ""}, "not-a-date"),
    ("study", "STUDY", {"StudyInstanceUID": "1.2.826.*"}, "wildcard-on-uid"),
]


@pytest.mark.parametrize(("root", "level", "keys"),
                         [pytest.param(r, lv, k, id=f"{r}-{i}") for r, lv, k, i in ERRORS])
def test_bad_identifier_is_refused(corpus_node: NodeProcess, root: str, level: str | None,
                                   keys: Keys) -> None:
    answer = c_find(corpus_node, root, level, keys)
    assert (answer.status, answer.matches) == (DOES_NOT_MATCH, [])
    assert answer.comment.strip(), "a failure must say why (Error Comment)"


# --- What comes back ---------------------------------------------------------------------------

STUDY_KEYS = ["PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
              "StudyTime", "AccessionNumber", "StudyID", "StudyDescription",
              "ReferringPhysicianName", "ModalitiesInStudy", "SOPClassesInStudy",
              "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances", "RetrieveAETitle",
              "InstanceAvailability", "InstitutionName", "OtherPatientIDsSequence"]


def test_every_requested_key_comes_back_zero_length_when_empty(
        corpus_node: NodeProcess) -> None:
    keys: Keys = dict.fromkeys(STUDY_KEYS, "")
    answer = c_find(corpus_node, "study", "STUDY",
                    {**keys, "StudyInstanceUID": uids("mcdonald_ct", "mueller_thorax")})
    found = by_name(answer, "STUDY")
    assert set(found) == {"mcdonald_ct", "mueller_thorax"}
    empty = found["mcdonald_ct"]
    for keyword in ("PatientBirthDate", "AccessionNumber", "StudyDescription",
                    "ReferringPhysicianName", "InstitutionName"):
        assert empty[keyword].is_empty, f"{keyword}: {empty[keyword].value!r}"
    assert empty["OtherPatientIDsSequence"].VR == "SQ"
    assert len(empty.OtherPatientIDsSequence) == 0
    assert {k: text(empty, k) for k in ("PatientName", "PatientID", "PatientSex", "StudyDate",
                                        "StudyTime", "StudyID")} == {
        "PatientName": "mcDonald^ANNA", "PatientID": "ID_2", "PatientSex": "F",
        "StudyDate": "20240201", "StudyTime": "235959", "StudyID": "3"}
    full = found["mueller_thorax"]
    assert {k: text(full, k) for k in ("PatientName", "PatientBirthDate", "AccessionNumber",
                                       "StudyDescription", "ReferringPhysicianName",
                                       "InstitutionName")} == {
        "PatientName": "Müller^Jürgen", "PatientBirthDate": "19650315",
        "AccessionNumber": "acc-004", "StudyDescription": "Thorax ñ",
        "ReferringPhysicianName": "Weiß^Frieda", "InstitutionName": "Klinikum Köln"}


def test_unique_key_of_the_level_comes_back_unasked(corpus_node: NodeProcess) -> None:
    answer = c_find(corpus_node, "study", "SERIES",
                    {"StudyInstanceUID": U("obrien_chest"), "Modality": "SR"})
    assert names(answer, "SERIES") == {"obrien_chest_sr"}


def test_private_and_unknown_keys_come_back_zero_length(corpus_node: NodeProcess) -> None:
    """Keys nobody holds are returned empty (and never break the query)."""
    query = identifier("STUDY", {"StudyInstanceUID": U("doe_us")})
    query.add_new(0x00090010, "LO", "ACME 1.0")  # private creator
    query.add_new(0x00091001, "LO", None)
    query.add_new(0x00091002, "LO", "some value")  # not matched: the node does not hold it
    query.add_new(0x0011ABCD, "UN", None)  # a private element without creator
    answer = c_find(corpus_node, "study", "STUDY", {}, query=query)
    assert names(answer, "STUDY") == {"doe_us"}
    rsp = answer.matches[0]
    for tag in (0x00091001, 0x00091002, 0x0011ABCD):
        assert rsp[tag].is_empty, f"{tag:08X}: {rsp[tag].value!r}"


def test_universal_match_returns_the_values(corpus_node: NodeProcess) -> None:
    answer = c_find(corpus_node, "patient", "PATIENT",
                    {"PatientID": "", "PatientName": "", "PatientBirthDate": "",
                     "PatientSex": ""})
    found = by_name(answer, "PATIENT")
    assert {n: (fc.pn(text(r, "PatientName")), text(r, "PatientBirthDate"),
                text(r, "PatientSex")) for n, r in found.items()} == {
        "obrien": ("O'Brien^Mary", "19800101", "F"),
        "mcdonald": ("mcDonald^ANNA", "", "F"),
        "mueller": ("Müller^Jürgen", "19650315", "M"),
        "ivanov": ("Иванов^Дмитрий", "19900720", "M"),
        "doe": ("Doe^Jane", "19751111", "F"),  # sent as Doe^Jane^^^: the same name
        "muller": ("Muller^Hans", "19551231", "M"),
    }


def test_responses_never_carry_file_meta(corpus_node: NodeProcess) -> None:
    """A (0002,xxxx) element in the query is not a key; responses carry no group 0002."""
    answer = c_find(corpus_node, "study", "IMAGE",
                    {"StudyInstanceUID": U("obrien_chest"),
                     "SeriesInstanceUID": U("obrien_chest_ct"), "SOPInstanceUID": "",
                     0x00020010: ImplicitVRLittleEndian, 0x00020002: ""})
    assert names(answer, "IMAGE") == CHEST_CT  # check_response: no group 0002 in any


def test_group_length_in_query_is_ignored(corpus_node: NodeProcess,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """pydicom never writes group lengths, so the identifier is put together by hand: the
    encoded elements of group 0008, then (0010,0000) UL with the true length of group 0010,
    then groups 0010 and 0020 (implicit VR little endian, the only syntax proposed)."""
    query = identifier("STUDY", {"PatientID": "ID%1", "PatientName": "",
                                 "StudyInstanceUID": ""})
    original = encode  # pynetdicom.dsutils.encode, which send_c_find calls
    sent: list[bytes] = []

    def with_group_length(ds: Dataset, implicit: bool, little: bool,
                          deflated: bool = False) -> bytes | None:
        assert implicit and little and not deflated
        groups = [Dataset(), Dataset(), Dataset()]
        for element in ds:
            groups[(element.tag.group >= 0x0010) + (element.tag.group > 0x0010)].add(element)
        head, patient, rest = (original(g, True, True) or b"" for g in groups)
        length = struct.pack("<HHII", 0x0010, 0x0000, 4, len(patient))
        sent.append(head + length + patient + rest)
        return sent[-1]

    monkeypatch.setattr("pynetdicom.association.encode", with_group_length)
    assoc = associate(corpus_node, [ImplicitVRLittleEndian])
    try:
        answer = collect(reactor_paused(assoc).send_c_find(query, MODELS["study"]))
    finally:
        assoc.release()
    monkeypatch.undo()
    assert len(sent) == 1 and struct.pack("<HH", 0x0010, 0x0000) in sent[0]
    query.add_new(0x00100000, "UL", 0)  # so that check_response insists it is not returned
    for rsp in answer.matches:
        check_response(rsp, query)
    assert names(answer, "STUDY") == {"obrien_chest", "obrien_brain"}
    assert {str(r.PatientName) for r in answer.matches} == {"O'Brien^Mary"}


def test_unindexed_keys_come_from_the_stored_file_at_image_level(
        corpus_node: NodeProcess) -> None:
    """Rows (0028,0010), Image Type and Institution Name are not in the index."""
    keys: Keys = {"Rows": "", "ImageType": "", "InstitutionName": "", 0x00280011: ""}
    chest = by_name(c_find(corpus_node, "study", "IMAGE", {
        "StudyInstanceUID": U("obrien_chest"), "SeriesInstanceUID": U("obrien_chest_ct"),
        "SOPInstanceUID": "", **keys}), "IMAGE")
    assert set(chest) == CHEST_CT
    for rsp in chest.values():
        assert (rsp.Rows, rsp.Columns, values(rsp, "ImageType")) == (
            8, 8, ["ORIGINAL", "PRIMARY", "AXIAL"])
        assert rsp["InstitutionName"].is_empty
    sr = by_name(c_find(corpus_node, "patient", "IMAGE", {
        "PatientID": "ID%1", "StudyInstanceUID": U("obrien_chest"),
        "SeriesInstanceUID": U("obrien_chest_sr"), "SOPInstanceUID": "", **keys}), "IMAGE")
    assert set(sr) == fc.instances_of("obrien_chest_sr")
    for rsp in sr.values():  # the SR has no pixel module: zero length
        assert rsp["Rows"].is_empty and rsp["ImageType"].is_empty
    thorax = by_name(c_find(corpus_node, "study", "IMAGE", {
        "StudyInstanceUID": U("mueller_thorax"), "SeriesInstanceUID": U("mueller_thorax_mr"),
        "SOPInstanceUID": "", **keys}), "IMAGE")
    assert {(r.Rows, r.InstitutionName) for r in thorax.values()} == {(16, "Klinikum Köln")}


def test_unindexed_keys_come_from_a_stored_file_at_series_and_study_level(
        corpus_node: NodeProcess) -> None:
    found = by_name(c_find(corpus_node, "study", "SERIES", {
        "StudyInstanceUID": U("obrien_chest"), "SeriesInstanceUID": "", "Rows": "",
        "ImageType": ""}), "SERIES")
    assert {n: (r["Rows"].value, values(r, "ImageType")) for n, r in found.items()} == {
        "obrien_chest_ct": (8, ["ORIGINAL", "PRIMARY", "AXIAL"]),
        "obrien_chest_sr": (None, []),
    }
    found = by_name(c_find(corpus_node, "patient", "SERIES", {
        "PatientID": "IDX2", "StudyInstanceUID": U("mueller_thorax"), "SeriesInstanceUID": "",
        "Rows": "", "ImageType": ""}), "SERIES")
    assert {n: (r.Rows, values(r, "ImageType")) for n, r in found.items()} == {
        "mueller_thorax_ct": (8, ["DERIVED", "SECONDARY"]),
        "mueller_thorax_mr": (16, []),
    }
    found = by_name(c_find(corpus_node, "study", "STUDY",
                           {"StudyInstanceUID": "", "InstitutionName": ""}), "STUDY")
    assert {n: text(r, "InstitutionName") for n, r in found.items()} == {
        n: s.institution or "" for n, s in fc.STUDIES.items()}


# --- Computed attributes ---------------------------------------------------------------------

def _expected_study(name: str) -> dict[str, Any]:
    series = fc.series_of_study(name)
    return {
        "NumberOfStudyRelatedSeries": len(series),
        "NumberOfStudyRelatedInstances": fc.instance_count(series),
        "ModalitiesInStudy": {fc.SERIES[s].modality for s in series},
        "SOPClassesInStudy": {fc.SERIES[s].sop_class for s in series},
        "RetrieveAETitle": AE_TITLE,
        "InstanceAvailability": "ONLINE",
    }


def _actual_study(rsp: Dataset) -> dict[str, Any]:
    return {
        "NumberOfStudyRelatedSeries": int(rsp.NumberOfStudyRelatedSeries),
        "NumberOfStudyRelatedInstances": int(rsp.NumberOfStudyRelatedInstances),
        "ModalitiesInStudy": set(values(rsp, "ModalitiesInStudy")),
        "SOPClassesInStudy": set(values(rsp, "SOPClassesInStudy")),
        "RetrieveAETitle": rsp.RetrieveAETitle,
        "InstanceAvailability": rsp.InstanceAvailability,
    }


COMPUTED_STUDY_KEYS = ["NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
                       "ModalitiesInStudy", "SOPClassesInStudy", "RetrieveAETitle",
                       "InstanceAvailability"]


def test_computed_study_attributes_study_root(corpus_node: NodeProcess) -> None:
    answer = c_find(corpus_node, "study", "STUDY",
                    {"StudyInstanceUID": "", **dict.fromkeys(COMPUTED_STUDY_KEYS, "")})
    found = by_name(answer, "STUDY")
    assert len(answer.matches) == len(fc.STUDIES)  # one response per study, not per image
    assert {n: _actual_study(r) for n, r in found.items()} == {
        n: _expected_study(n) for n in fc.STUDIES}
    # written out for the two mixed studies, in case the helpers above are wrong
    assert _actual_study(found["obrien_chest"])["ModalitiesInStudy"] == {"CT", "SR"}
    assert _actual_study(found["obrien_chest"])["NumberOfStudyRelatedInstances"] == 6
    assert _actual_study(found["obrien_chest"])["SOPClassesInStudy"] == {CT_IMAGE,
                                                                          fc.BASIC_TEXT_SR}
    assert _actual_study(found["mueller_thorax"])["SOPClassesInStudy"] == {CT_IMAGE, MR_IMAGE}


def test_computed_study_attributes_when_matching_on_modalities(
        corpus_node: NodeProcess) -> None:
    """Matching on SR still answers every modality of the study."""
    answer = c_find(corpus_node, "patient", "STUDY",
                    {"PatientID": "ID%1", "StudyInstanceUID": "", "ModalitiesInStudy": "SR",
                     **dict.fromkeys(COMPUTED_STUDY_KEYS[:2], "")})
    found = by_name(answer, "STUDY")
    assert set(found) == {"obrien_chest"}
    rsp = found["obrien_chest"]
    assert set(values(rsp, "ModalitiesInStudy")) == {"CT", "SR"}
    assert (int(rsp.NumberOfStudyRelatedSeries), int(rsp.NumberOfStudyRelatedInstances)) == (2, 6)


PATIENT_COUNTS = ["NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
                  "NumberOfPatientRelatedInstances"]


def _expected_patient_counts(patient_name: str) -> tuple[int, int, int]:
    studies = fc.studies_of_patient(patient_name)
    series = [s for st in studies for s in fc.series_of_study(st)]
    return len(studies), len(series), fc.instance_count(series)


def test_computed_patient_attributes(corpus_node: NodeProcess) -> None:
    answer = c_find(corpus_node, "patient", "PATIENT",
                    {"PatientID": "", **dict.fromkeys(PATIENT_COUNTS, ""),
                     "RetrieveAETitle": "", "InstanceAvailability": ""})
    found = by_name(answer, "PATIENT")
    assert len(answer.matches) == len(fc.PATIENTS)  # one response per patient
    counts = {n: tuple(int(r[k].value) for k in PATIENT_COUNTS) for n, r in found.items()}
    assert counts == {n: _expected_patient_counts(n) for n in fc.PATIENTS}
    assert counts["obrien"] == (2, 3, 9) and counts["mueller"] == (2, 3, 8)
    assert {(r.RetrieveAETitle, r.InstanceAvailability) for r in found.values()} == {
        (AE_TITLE, "ONLINE")}


def test_computed_patient_attributes_at_study_root_study_level(
        corpus_node: NodeProcess) -> None:
    answer = c_find(corpus_node, "study", "STUDY",
                    {"StudyInstanceUID": "", "PatientID": "",
                     **dict.fromkeys(PATIENT_COUNTS, "")})
    found = by_name(answer, "STUDY")
    assert {n: tuple(int(r[k].value) for k in PATIENT_COUNTS) for n, r in found.items()} == {
        n: _expected_patient_counts(fc.STUDIES[n].patient) for n in fc.STUDIES}


def test_computed_series_and_image_attributes(corpus_node: NodeProcess) -> None:
    found = by_name(c_find(corpus_node, "study", "SERIES", {
        "StudyInstanceUID": U("muller_abdomen"), "SeriesInstanceUID": "",
        "NumberOfSeriesRelatedInstances": "", "RetrieveAETitle": "",
        "InstanceAvailability": ""}), "SERIES")
    assert {n: (int(r.NumberOfSeriesRelatedInstances), r.RetrieveAETitle,
                r.InstanceAvailability) for n, r in found.items()} == {
        "muller_abdomen_ct1": (4, AE_TITLE, "ONLINE"),
        "muller_abdomen_ct2": (2, AE_TITLE, "ONLINE")}
    found = by_name(c_find(corpus_node, "patient", "SERIES", {
        "PatientID": "ID%1", "StudyInstanceUID": U("obrien_chest"), "SeriesInstanceUID": "",
        "NumberOfSeriesRelatedInstances": ""}), "SERIES")
    assert {n: int(r.NumberOfSeriesRelatedInstances) for n, r in found.items()} == {
        "obrien_chest_ct": 4, "obrien_chest_sr": 2}
    found = by_name(c_find(corpus_node, "study", "IMAGE", {
        "StudyInstanceUID": U("doe_us"), "SeriesInstanceUID": U("doe_us_us"),
        "SOPInstanceUID": "", "SOPClassUID": "", "InstanceNumber": "",
        "RetrieveAETitle": "", "InstanceAvailability": ""}), "IMAGE")
    assert {n: (r.SOPClassUID, int(r.InstanceNumber), r.RetrieveAETitle,
                r.InstanceAvailability) for n, r in found.items()} == {
        "doe_us_us#1": (fc.US_IMAGE, 1, AE_TITLE, "ONLINE"),
        "doe_us_us#2": (fc.US_IMAGE, 2, AE_TITLE, "ONLINE")}


@pytest.mark.parametrize(("root", "level", "keys", "expected"), [
    ("study", "STUDY", {"StudyInstanceUID": ""}, len(fc.STUDIES)),
    ("patient", "PATIENT", {"PatientID": ""}, len(fc.PATIENTS)),
    ("patient", "STUDY", {"PatientID": "ID%1", "StudyInstanceUID": ""}, 2),
    ("study", "SERIES", {"StudyInstanceUID": U("muller_abdomen"), "SeriesInstanceUID": ""}, 2),
])
def test_one_response_per_entity_not_per_instance(corpus_node: NodeProcess, root: str,
                                                  level: str, keys: Keys,
                                                  expected: int) -> None:
    answer = c_find(corpus_node, root, level, keys)
    assert answer.status == SUCCESS
    assert len(answer.matches) == expected
    assert len(names(answer, level)) == expected


# --- C-CANCEL and the match limit --------------------------------------------------------------

def test_c_cancel_stops_the_query(nodes: Nodes) -> None:
    """Cancel after the first pending response of a 300-match IMAGE query: the node answers
    0xFE00 before it has sent every match, and the association stays usable."""
    bulk = fc.bulk_datasets(1)[0]
    query = identifier("IMAGE", {"StudyInstanceUID": bulk.StudyInstanceUID,
                                 "SeriesInstanceUID": bulk.SeriesInstanceUID,
                                 "SOPInstanceUID": "", "InstanceNumber": "", "Rows": ""})
    assoc = associate(nodes.strict)
    try:
        context = next(cx for cx in assoc.accepted_contexts
                       if cx.abstract_syntax == MODELS["study"])
        message_id = 7
        pending = 0
        final: Dataset | None = None
        for status, _ in reactor_paused(assoc).send_c_find(query, MODELS["study"],
                                                            msg_id=message_id):
            assert "Status" in status, "no response (timeout or abort)"
            if int(status.Status) in PENDING:
                pending += 1
                if pending == 1:
                    assoc.send_c_cancel(message_id, context.context_id)
            else:
                final = status
        assert final is not None and int(final.Status) == CANCELLED
        assert 1 <= pending < BULK, f"{pending} responses of {BULK} arrived"
        # the same association still answers a complete query afterwards
        again = collect(reactor_paused(assoc).send_c_find(query, MODELS["study"], msg_id=8))
        assert (again.status, len(again.matches)) == (SUCCESS, BULK)
    finally:
        assoc.release()
    nodes.strict.wait_for_log("status 0xFE00")


def test_max_matches_stops_after_the_limit(nodes: Nodes) -> None:
    """find_max_matches: 5 -> five pending responses, then 0xA700 with an Error Comment."""
    answer = c_find(nodes.limited, "study", "IMAGE",
                    {"StudyInstanceUID": LIMITED_STUDY,
                     "SeriesInstanceUID": f"{LIMITED_STUDY}.1", "SOPInstanceUID": ""})
    assert (answer.status, len(answer.matches)) == (OUT_OF_RESOURCES, 5)
    assert answer.comment.strip()
    assert len({r.SOPInstanceUID for r in answer.matches}) == 5


@pytest.mark.parametrize(("level", "keys", "expected"), [
    ("IMAGE", {"SeriesInstanceUID": f"{LIMITED_STUDY}.2", "SOPInstanceUID": ""}, 5),
    ("SERIES", {"SeriesInstanceUID": ""}, 2),
    ("STUDY", {}, 1),
])
def test_max_matches_allows_up_to_the_limit(nodes: Nodes, level: str, keys: Keys,
                                            expected: int) -> None:
    answer = c_find(nodes.limited, "study", level,
                    {"StudyInstanceUID": LIMITED_STUDY, **keys})
    assert (answer.status, len(answer.matches)) == (SUCCESS, expected)


@pytest.mark.parametrize(("name", "day", "moment", "combined", "separately"), DATE_TIME_RANGES,
                         ids=[r[0] for r in DATE_TIME_RANGES])
def test_combined_date_time_matching_when_negotiated(corpus_node: NodeProcess, name: str,
                                                     day: str, moment: str,
                                                     combined: set[str],
                                                     separately: set[str]) -> None:
    """PS3.4 C.5.1.1.2: byte 2 of the C-FIND extended negotiation asks for one date-time
    range; the node accepts it (and declines relational queries, byte 1)."""
    assert combined != separately  # the case tells the two behaviours apart
    item = SOPClassExtendedNegotiation()
    item.sop_class_uid = StudyRootQueryRetrieveInformationModelFind
    item.service_class_application_information = b"\x01\x01"
    ae = AE(ae_title="DTSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", corpus_node.port, ae_title=AE_TITLE, ext_neg=[item])
    assert assoc.is_established
    try:
        accepted = {str(k): v for k, v in assoc.acceptor.sop_class_extended.items()}
        assert accepted == {str(StudyRootQueryRetrieveInformationModelFind): b"\x00\x01"}
        query = identifier("STUDY", {"StudyDate": day, "StudyTime": moment,
                                     "StudyInstanceUID": ""})
        found = {fc.NAME_OF[str(ds.StudyInstanceUID)]
                 for status, ds in reactor_paused(assoc).send_c_find(
                     query, StudyRootQueryRetrieveInformationModelFind)
                 if ds is not None and int(status.Status) in PENDING}
    finally:
        assoc.release()
    assert found == combined


def test_a_key_not_used_for_matching_is_answered_ff01(corpus_node: NodeProcess) -> None:
    """PS3.4 C.4.1.1.4: matches of a query with a value on a key the node does not match on
    (here InstitutionName, not indexed: treated as universal) are Pending 0xFF01."""
    answer = c_find(corpus_node, "study", "STUDY",
                    {"StudyInstanceUID": U("doe_us"), "InstitutionName": "Nowhere"})
    assert names(answer, "STUDY") == {"doe_us"}
    assert answer.pending_statuses == [0xFF01]
    matched = c_find(corpus_node, "study", "STUDY",
                     {"StudyInstanceUID": U("doe_us"), "InstitutionName": ""})
    assert matched.pending_statuses == [0xFF00]
