"""A C-FIND runs a bounded number of SQL statements, whatever the number of matches.

In-process: the node's services are opened on a temporary folder, instances go in through the
ingest path, and SQLite's trace callback counts every statement the connection runs while
``Finder.find`` answers a request completely.  The same requests run against an index of 5 and
of 50 studies (with as many patients, series of one study and instances of one series), with
the computed attributes and an unindexed key requested, at every level: the count must be one
SELECT each time, never one per matching row.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian

from node.config import NodeConfig, build_config
from node.index.writer import Source
from node.ingest import Outcome, Received
from node.query.keys import Root
from node.query.request import parse_request
from node.services import Services, open_services
from tests.dicomdata import CT_IMAGE, MR_IMAGE, PREFIX, make_instance
from tests.findcorpus import encoded

SIZES = (5, 50)
ROOT = PREFIX + "88."
IGNORED = ("BEGIN", "COMMIT", "ROLLBACK", "PRAGMA", "SAVEPOINT", "RELEASE")


def corpus(n: int) -> list[Dataset]:
    """n patients with one study each; study 0 has n series (CT and MR alternating), its
    series 0 has n instances; every other series has one instance (3n - 2 instances)."""
    items = []
    for s in range(n):
        study = f"{ROOT}{n}.{s}"
        series_count = n if s == 0 else 1
        for r in range(series_count):
            series = f"{study}.{r}"
            sop_class = CT_IMAGE if r % 2 == 0 else MR_IMAGE
            for i in range(n if (s, r) == (0, 0) else 1):
                items.append(make_instance(
                    sop_class=sop_class, study=study, series=series,
                    sop_instance=f"{series}.{i}", rows=2, PatientID=f"STMT-{s}",
                    PatientName=f"Patient{s}^Test", StudyDate=f"202401{s % 28 + 1:02d}",
                    SeriesNumber=r, InstanceNumber=i, InstitutionName="Somewhere"))
    return items


@contextmanager
def opened(config: NodeConfig) -> Iterator[Services]:
    """The node's services on ``config``.  One at a time: opening binds the index tables
    (global peewee models) to this database."""
    services = open_services(config)
    try:
        yield services
    finally:
        services.close()


@pytest.fixture(scope="module")
def indexes(tmp_path_factory: pytest.TempPathFactory) -> dict[int, NodeConfig]:
    """One index per size, filled through the node's ingest path."""
    configs: dict[int, NodeConfig] = {}
    source = Source("TESTSCU", "127.0.0.1")
    for n in SIZES:
        config = configs[n] = build_config({"ae_title": "STMTNODE"},
                                           tmp_path_factory.mktemp(f"statements-{n}-"))
        with opened(config) as services:
            for ds in corpus(n):
                outcome = services.ingestor.receive(Received(
                    str(ds.SOPClassUID), str(ds.SOPInstanceUID), ImplicitVRLittleEndian,
                    encoded(ds), source))
                assert outcome is Outcome.STORED
    return configs


def query(level: str, **keys: Any) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, None if value == "" else value)
    return ds


def requests(n: int) -> dict[str, tuple[Root, Dataset]]:
    study0 = f"{ROOT}{n}.0"
    return {
        "patient": (Root.PATIENT, query(
            "PATIENT", PatientID="", PatientName="*^test", NumberOfPatientRelatedStudies="",
            NumberOfPatientRelatedSeries="", NumberOfPatientRelatedInstances="",
            RetrieveAETitle="", InstanceAvailability="", InstitutionName="")),
        "study": (Root.STUDY, query(
            "STUDY", StudyInstanceUID="", StudyDate="20240101-", PatientName="", PatientID="",
            ModalitiesInStudy="CT\\MR", SOPClassesInStudy="", NumberOfStudyRelatedSeries="",
            NumberOfStudyRelatedInstances="", RetrieveAETitle="", InstanceAvailability="",
            InstitutionName="")),
        "series": (Root.STUDY, query(
            "SERIES", StudyInstanceUID=study0, SeriesInstanceUID="", Modality="CT\\MR",
            SeriesNumber="", NumberOfSeriesRelatedInstances="", RetrieveAETitle="",
            InstitutionName="")),
        "image": (Root.STUDY, query(
            "IMAGE", StudyInstanceUID=study0, SeriesInstanceUID=f"{study0}.0",
            SOPInstanceUID="", SOPClassUID="", InstanceNumber="", Rows="",
            RetrieveAETitle="", InstanceAvailability="")),
    }


def run_counting(services: Services, root: Root, identifier: Dataset) -> tuple[list[str],
                                                                              list[Dataset]]:
    """Every statement SQLite runs while the request is answered completely."""
    statements: list[str] = []
    connection = services.db.connection()  # type: ignore[no-untyped-call]
    connection.set_trace_callback(statements.append)
    try:
        request = parse_request(identifier, root)
        answers = [Dataset(answer) for answer in services.finder.find(request)]
    finally:
        connection.set_trace_callback(None)
    counted = [s for s in statements if not s.lstrip().upper().startswith(IGNORED)]
    return counted, answers


@pytest.mark.parametrize("level", ["patient", "study", "series", "image"])
def test_one_select_per_query_whatever_the_number_of_matches(indexes: dict[int, NodeConfig],
                                                             level: str) -> None:
    counts = {}
    for n, config in indexes.items():
        root, identifier = requests(n)[level]
        with opened(config) as services:
            statements, answers = run_counting(services, root, identifier)
        assert len(answers) == n  # n patients, n studies, n series of study 0, n instances
        assert all(s.lstrip().upper().startswith("SELECT") for s in statements), statements
        counts[n] = len(statements)
    assert counts == dict.fromkeys(SIZES, 1)


@pytest.mark.parametrize("n", SIZES)
def test_computed_values_come_from_that_one_select(indexes: dict[int, NodeConfig],
                                                   n: int) -> None:
    """The one statement really produced the counts and the file-read keys."""
    with opened(indexes[n]) as services:
        check_computed_values(services, n)


def check_computed_values(services: Services, n: int) -> None:
    _, patients = run_counting(services, *requests(n)["patient"])
    related = {str(a.PatientID): (int(a.NumberOfPatientRelatedStudies),
                                  int(a.NumberOfPatientRelatedSeries),
                                  int(a.NumberOfPatientRelatedInstances)) for a in patients}
    assert related["STMT-0"] == (1, n, 2 * n - 1)
    assert related[f"STMT-{n - 1}"] == (1, 1, 1)
    _, studies = run_counting(services, *requests(n)["study"])
    first = next(a for a in studies if str(a.PatientID) == "STMT-0")
    assert (int(first.NumberOfStudyRelatedSeries), int(first.NumberOfStudyRelatedInstances),
            sorted(first.ModalitiesInStudy), sorted(first.SOPClassesInStudy)) == (
        n, 2 * n - 1, ["CT", "MR"], sorted([CT_IMAGE, MR_IMAGE]))
    assert {a.InstitutionName for a in studies} == {"Somewhere"}
    _, images = run_counting(services, *requests(n)["image"])
    assert {(int(a.InstanceNumber), a.Rows) for a in images} == {(i, 2) for i in range(n)}
