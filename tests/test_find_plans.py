"""C-FIND statements are served by indexes: SQLite's query plan scans no table it can search.

The node's own SELECT for each kind of query the issue names (study by Patient ID, by a name
prefix wildcard, by a date range, by accession number, series of a study with counts, images of
a series, studies with Modalities in Study as a matching key) is handed to ``EXPLAIN QUERY
PLAN``.  A full ``SCAN`` of a table would make the query grow with the archive; only the
"all patients" style of universal query may scan (it returns every row anyway).
"""

from __future__ import annotations

import re

import pytest
from pydicom.dataset import Dataset

from node.config import NodeConfig
from node.query.keys import Root
from node.query.request import parse_request
from tests.test_find_statements import ROOT, indexes, opened, query  # noqa: F401 (fixture)

N = 50
STUDY0 = f"{ROOT}{N}.0"
QUERIES: dict[str, tuple[Root, Dataset]] = {
    "study by PatientID": (Root.STUDY, query(
        "STUDY", PatientID="STMT-7", StudyInstanceUID="", StudyDate="", ModalitiesInStudy="",
        NumberOfStudyRelatedInstances="", NumberOfStudyRelatedSeries="")),
    "study by PatientName prefix": (Root.STUDY, query(
        "STUDY", PatientName="patient1*", StudyInstanceUID="", PatientID="")),
    "study by date range": (Root.STUDY, query(
        "STUDY", StudyDate="20240105-20240110", StudyInstanceUID="", PatientID="")),
    "study by accession": (Root.STUDY, query(
        "STUDY", AccessionNumber="A1", StudyInstanceUID="")),
    "study by ModalitiesInStudy with a date": (Root.STUDY, query(
        "STUDY", ModalitiesInStudy="MR", StudyDate="20240105", StudyInstanceUID="")),
    "study by ModalitiesInStudy alone": (Root.STUDY, query(
        "STUDY", ModalitiesInStudy="MR", StudyInstanceUID="")),
    "patient with counts": (Root.PATIENT, query(
        "PATIENT", PatientID="STMT-3", NumberOfPatientRelatedStudies="",
        NumberOfPatientRelatedSeries="", NumberOfPatientRelatedInstances="")),
    "series of a study": (Root.STUDY, query(
        "SERIES", StudyInstanceUID=STUDY0, SeriesInstanceUID="", Modality="",
        NumberOfSeriesRelatedInstances="")),
    "images of a series": (Root.STUDY, query(
        "IMAGE", StudyInstanceUID=STUDY0, SeriesInstanceUID=f"{STUDY0}.0", SOPInstanceUID="",
        InstanceNumber="")),
    "one image by UID": (Root.PATIENT, query(
        "IMAGE", PatientID="STMT-0", StudyInstanceUID=STUDY0, SeriesInstanceUID=f"{STUDY0}.0",
        SOPInstanceUID=f"{STUDY0}.0.3")),
}


def plan(config: NodeConfig, root: Root, identifier: Dataset) -> list[str]:
    with opened(config) as services:
        select, _ = services.finder.select(parse_request(identifier, root))
        sql, params = select.sql()
        rows = services.db.execute_sql(f"EXPLAIN QUERY PLAN {sql}", params).fetchall()
    return [str(row[-1]) for row in rows]


@pytest.mark.parametrize("name", list(QUERIES))
def test_no_table_scanned(indexes: dict[int, NodeConfig], name: str) -> None:  # noqa: F811
    steps = plan(indexes[N], *QUERIES[name])
    scans = [step for step in steps if re.match(r"SCAN \w+(?! USING COVERING INDEX)", step)
             and "USING INDEX" not in step and "USING COVERING INDEX" not in step]
    assert not scans, f"{name}: full table scan in the plan {steps}"
    assert any(step.startswith("SEARCH") for step in steps), steps


def test_the_check_sees_a_scan(indexes: dict[int, NodeConfig]) -> None:  # noqa: F811
    """The only query that may scan (every patient) is reported as a scan by the same check."""
    steps = plan(indexes[N], Root.PATIENT, query("PATIENT", PatientID="", PatientName=""))
    assert any(step.startswith("SCAN") for step in steps), steps
