"""C-FIND SCP queried with DCMTK's findscu: the same kinds of queries as tests/test_find.py
(and, at the end, the encoding of answers in each uncompressed transfer syntax).

findscu runs as a separate program (``-S`` study root, ``-P`` patient root), writes each pending
response to ``rspNNNN.dcm`` (``-X -od DIR``) and logs the final status and its Error Comment at
debug level (``-d``); the tests read the response files with pydicom and compare them with the
sets written out here, by the short names of tests/findcorpus.py.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
)

from tests import findcorpus as fc
from tests.conftest import NodeProcess, dcmtk_env, dcmtk_tool, make_node
from tests.dicomdata import reactor_paused

DOES_NOT_MATCH = 0xA900
U = fc.uid_of
ROOT_FLAGS = {"patient": "-P", "study": "-S"}
UNIQUE = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
          "IMAGE": "SOPInstanceUID"}


@pytest.fixture(scope="module")
def corpus_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    dcmtk_tool("findscu")  # skip early when DCMTK is missing
    node = make_node(tmp_path_factory.mktemp("dcmtk-find")).start()
    try:
        fc.load(node.port, list(fc.datasets()))
        yield node
    finally:
        node.stop()


@dataclass
class Result:
    status: int
    comment: str
    matches: list[Dataset]
    log: str


def findscu(node: NodeProcess, out: Path, root: str, level: str | None,
            *keys: str | bytes) -> Result:
    """Run findscu with ``-k`` for each key (bytes pass non-UTF-8 values through as they are)."""
    out.mkdir(parents=True, exist_ok=False)
    args: list[str | bytes] = [str(dcmtk_tool("findscu")), "-d", ROOT_FLAGS[root],
                               "-aec", "DICOMNODE", "-X", "-od", str(out)]
    if level is not None:
        args += ["-k", f"QueryRetrieveLevel={level}"]
    for key in keys:
        args += ["-k", key]
    args += ["127.0.0.1", str(node.port)]
    run = subprocess.run([os.fsencode(a) for a in args], capture_output=True, env=dcmtk_env(),
                         timeout=60)
    log = (run.stdout + run.stderr).decode("utf-8", "replace")
    assert run.returncode == 0, log
    statuses = re.findall(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})", log)
    assert statuses, f"no final status in findscu's log:\n{log}"
    final = log[log.rindex("Final Find Response"):]
    comment = re.search(r"\(0000,0902\) LO \[([^\]]*)\]", final)
    matches: list[Dataset] = []
    matches += (dcmread(p) for p in sorted(out.glob("rsp*.dcm")))
    return Result(int(statuses[-1], 16), comment.group(1) if comment else "", matches, log)


def names(result: Result, level: str) -> set[str]:
    assert result.status == 0, f"0x{result.status:04X} {result.comment}\n{result.log}"
    keys = [str(ds[UNIQUE[level]].value) for ds in result.matches]
    assert len(keys) == len(set(keys)), f"an entity answered more than once: {keys}"
    for ds in result.matches:
        assert ds.SpecificCharacterSet == "ISO_IR 192"
        assert ds.QueryRetrieveLevel == level
    return {fc.NAME_OF[k] for k in keys}


def by_name(result: Result, level: str) -> dict[str, Dataset]:
    names(result, level)
    return {fc.NAME_OF[str(ds[UNIQUE[level]].value)]: ds for ds in result.matches}


def patient_id_of(study: str) -> str:
    return fc.PATIENTS[fc.STUDIES[study].patient].patient_id


# --- Studies ---------------------------------------------------------------------------------

@pytest.mark.parametrize("root", ["study", "patient"])
def test_studies_by_patient_id(corpus_node: NodeProcess, tmp_path: Path, root: str) -> None:
    result = findscu(corpus_node, tmp_path / "r", root, "STUDY", "PatientID=ID%1",
                     "StudyInstanceUID", "StudyDate", "AccessionNumber")
    found = by_name(result, "STUDY")
    assert {n: (ds.StudyDate, ds.AccessionNumber) for n, ds in found.items()} == {
        "obrien_chest": ("20240101", "ACC-001"), "obrien_brain": ("20240131", "ACC-002")}


def test_patient_id_is_case_sensitive(corpus_node: NodeProcess, tmp_path: Path) -> None:
    result = findscu(corpus_node, tmp_path / "r", "study", "STUDY", "PatientID=id%1",
                     "StudyInstanceUID")
    assert names(result, "STUDY") == set()


@pytest.mark.parametrize(("charset", "value"), [
    ("ISO_IR 192", "PatientName=MÜLL*".encode()),
    ("ISO_IR 100", "PatientName=Müller^Jürgen".encode("latin-1")),
])
def test_studies_by_patient_name_wildcard_in_either_charset(corpus_node: NodeProcess,
                                                             tmp_path: Path, charset: str,
                                                             value: bytes) -> None:
    result = findscu(corpus_node, tmp_path / "r", "study", "STUDY",
                     f"SpecificCharacterSet={charset}", value, "StudyInstanceUID")
    found = by_name(result, "STUDY")
    assert set(found) == {"mueller_thorax", "mueller_knee"}
    assert {str(ds.PatientName) for ds in found.values()} == {"Müller^Jürgen"}


@pytest.mark.parametrize(("keys", "expected"), [
    (["StudyDate=20240101-20240131"],
     {"obrien_chest", "obrien_brain", "mueller_thorax", "muller_abdomen"}),
    (["StudyDate=-20240131"],
     {"obrien_chest", "obrien_brain", "mueller_thorax", "muller_abdomen", "ivanov_head"}),
    (["StudyDate=20240131-"],
     {"obrien_brain", "mueller_thorax", "mcdonald_ct", "doe_us", "mueller_knee"}),
    (["StudyTime=-000000"], {"obrien_chest", "doe_us"}),
    # findscu negotiates no Combined Date-Time Matching: each range alone (PS3.4 C.2.2.2.5).
    (["StudyDate=20240131-20240201", "StudyTime=120000-120000"],
     {"obrien_brain", "mueller_knee"}),
], ids=["date-closed", "date-open-low", "date-open-high", "time-open-low", "datetime"])
def test_studies_by_date_range(corpus_node: NodeProcess, tmp_path: Path, keys: list[str],
                               expected: set[str]) -> None:
    result = findscu(corpus_node, tmp_path / "r", "study", "STUDY", *keys, "StudyInstanceUID")
    assert names(result, "STUDY") == expected


def test_studies_by_modality_in_study_with_computed_attributes(corpus_node: NodeProcess,
                                                               tmp_path: Path) -> None:
    result = findscu(corpus_node, tmp_path / "r", "study", "STUDY", "ModalitiesInStudy=SR",
                     "StudyInstanceUID", "NumberOfStudyRelatedSeries",
                     "NumberOfStudyRelatedInstances", "RetrieveAETitle",
                     "InstanceAvailability", "AccessionNumber", "StudyDescription")
    found = by_name(result, "STUDY")
    assert set(found) == {"obrien_chest"}
    ds = found["obrien_chest"]
    assert sorted(ds.ModalitiesInStudy) == ["CT", "SR"]
    assert (int(ds.NumberOfStudyRelatedSeries), int(ds.NumberOfStudyRelatedInstances),
            ds.RetrieveAETitle, ds.InstanceAvailability) == (2, 6, "DICOMNODE", "ONLINE")


def test_empty_values_come_back_zero_length(corpus_node: NodeProcess, tmp_path: Path) -> None:
    result = findscu(corpus_node, tmp_path / "r", "patient", "STUDY", "PatientID=ID_2",
                     "StudyInstanceUID", "AccessionNumber", "StudyDescription",
                     "PatientBirthDate", "InstitutionName")
    found = by_name(result, "STUDY")
    assert set(found) == {"mcdonald_ct"}
    for keyword in ("AccessionNumber", "StudyDescription", "PatientBirthDate",
                    "InstitutionName"):
        assert keyword in found["mcdonald_ct"] and found["mcdonald_ct"][keyword].is_empty


# --- Patients --------------------------------------------------------------------------------

@pytest.mark.parametrize(("patient_id", "expected"), [
    ("ID_*", {"mcdonald"}), ("ID%*", {"obrien"}), ("ID?2", {"mcdonald", "mueller"}),
    ("ID_2", {"mcdonald"}), ("*", set(fc.PATIENTS)),
])
def test_patients_by_id_with_percent_and_underscore(corpus_node: NodeProcess, tmp_path: Path,
                                                    patient_id: str,
                                                    expected: set[str]) -> None:
    result = findscu(corpus_node, tmp_path / "r", "patient", "PATIENT",
                     f"PatientID={patient_id}", "PatientName")
    assert names(result, "PATIENT") == expected


def test_all_patients_with_counts(corpus_node: NodeProcess, tmp_path: Path) -> None:
    result = findscu(corpus_node, tmp_path / "r", "patient", "PATIENT", "PatientID",
                     "PatientName", "NumberOfPatientRelatedStudies",
                     "NumberOfPatientRelatedInstances")
    found = by_name(result, "PATIENT")
    assert {n: (fc.pn(str(ds.PatientName)), int(ds.NumberOfPatientRelatedStudies),
                int(ds.NumberOfPatientRelatedInstances)) for n, ds in found.items()} == {
        "obrien": ("O'Brien^Mary", 2, 9),
        "mcdonald": ("mcDonald^ANNA", 1, 2),
        "mueller": ("Müller^Jürgen", 2, 8),
        "ivanov": ("Иванов^Дмитрий", 1, 3),
        "doe": ("Doe^Jane", 1, 2),  # sent as Doe^Jane^^^: the same name
        "muller": ("Muller^Hans", 1, 6),
    }


# --- Series and images -------------------------------------------------------------------------

@pytest.mark.parametrize("root", ["study", "patient"])
def test_series_of_a_study(corpus_node: NodeProcess, tmp_path: Path, root: str) -> None:
    upper = [f"PatientID={patient_id_of('obrien_chest')}"] if root == "patient" else []
    result = findscu(corpus_node, tmp_path / "r", root, "SERIES", *upper,
                     f"StudyInstanceUID={U('obrien_chest')}", "SeriesInstanceUID", "Modality",
                     "NumberOfSeriesRelatedInstances", "Rows")
    found = by_name(result, "SERIES")
    assert {n: (ds.Modality, int(ds.NumberOfSeriesRelatedInstances), ds["Rows"].value)
            for n, ds in found.items()} == {
        "obrien_chest_ct": ("CT", 4, 8), "obrien_chest_sr": ("SR", 2, None)}


def test_series_by_modalities(corpus_node: NodeProcess, tmp_path: Path) -> None:
    result = findscu(corpus_node, tmp_path / "r", "study", "SERIES",
                     f"StudyInstanceUID={U('mueller_thorax')}", "SeriesInstanceUID",
                     "Modality=CT\\MR")
    assert names(result, "SERIES") == {"mueller_thorax_ct", "mueller_thorax_mr"}


@pytest.mark.parametrize("root", ["study", "patient"])
def test_images_of_a_series(corpus_node: NodeProcess, tmp_path: Path, root: str) -> None:
    upper = [f"PatientID={patient_id_of('obrien_chest')}"] if root == "patient" else []
    result = findscu(corpus_node, tmp_path / "r", root, "IMAGE", *upper,
                     f"StudyInstanceUID={U('obrien_chest')}",
                     f"SeriesInstanceUID={U('obrien_chest_ct')}", "SOPInstanceUID",
                     "InstanceNumber", "ImageType")
    found = by_name(result, "IMAGE")
    assert {n: (int(ds.InstanceNumber), list(ds.ImageType)) for n, ds in found.items()} == {
        f"obrien_chest_ct#{i}": (i, ["ORIGINAL", "PRIMARY", "AXIAL"]) for i in range(1, 5)}


def test_images_by_list_of_uids(corpus_node: NodeProcess, tmp_path: Path) -> None:
    wanted = "\\".join(U(n) for n in ("muller_abdomen_ct1#2", "muller_abdomen_ct1#4",
                                      "muller_abdomen_ct2#1"))
    result = findscu(corpus_node, tmp_path / "r", "study", "IMAGE",
                     f"StudyInstanceUID={U('muller_abdomen')}",
                     f"SeriesInstanceUID={U('muller_abdomen_ct1')}", f"SOPInstanceUID={wanted}")
    assert names(result, "IMAGE") == {"muller_abdomen_ct1#2", "muller_abdomen_ct1#4"}


# --- Errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("root", "level", "keys"), [
    ("study", "SERIES", ["SeriesInstanceUID"]),
    ("patient", "STUDY", ["StudyInstanceUID"]),
    ("patient", "SERIES", ["PatientID=ID*", f"StudyInstanceUID={U('obrien_chest')}",
                           "SeriesInstanceUID"]),
    ("study", "PATIENT", ["PatientID"]),
    ("study", "FOO", ["StudyInstanceUID"]),
    ("study", None, ["StudyInstanceUID"]),
], ids=["series-without-study-uid", "study-without-patient-id", "wildcarded-patient-id",
        "patient-level-in-study-root", "bad-level", "no-level"])
def test_bad_identifiers_are_refused(corpus_node: NodeProcess, tmp_path: Path, root: str,
                                     level: str | None, keys: list[str]) -> None:
    result = findscu(corpus_node, tmp_path / "r", root, level, *keys)
    assert (result.status, result.matches) == (DOES_NOT_MATCH, [])
    assert result.comment.strip(), result.log



@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian,
                                    ExplicitVRBigEndian])
def test_answers_in_each_uncompressed_transfer_syntax(corpus_node: NodeProcess,
                                                      syntax: str) -> None:
    """The node's pre-encoded answers decode the same whichever syntax the context uses."""
    ae = AE(ae_title="SYNTAXSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind, [syntax])
    assoc = ae.associate("127.0.0.1", corpus_node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = U("mueller_thorax")
    query.PatientName = ""
    query.ModalitiesInStudy = ""
    query.NumberOfStudyRelatedInstances = ""
    try:
        assert assoc.accepted_contexts[0].transfer_syntax[0] == syntax
        answers = list(reactor_paused(assoc).send_c_find(
            query, StudyRootQueryRetrieveInformationModelFind))
    finally:
        assoc.release()
    assert [int(status.Status) for status, _ in answers] == [0xFF00, 0x0000]
    ds = answers[0][1]
    series = fc.series_of_study("mueller_thorax")
    assert str(ds.PatientName) == "Müller^Jürgen"
    assert sorted(ds.ModalitiesInStudy) == sorted({fc.SERIES[s].modality for s in series})
    assert int(ds.NumberOfStudyRelatedInstances) == fc.instance_count(series)
