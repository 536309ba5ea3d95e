"""C-GET SCP: DCMTK's getscu and a pynetdicom SCU fetch instances over their own association.

The requester proposes storage contexts with the SCP role for itself (PS3.7 D.3.3.4); what it
receives is compared with the stored files at dataset level.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from node.handlers.retrieve_common import PENDING_INTERVAL
from tests import retrievedata as rd
from tests.conftest import NodeProcess, dcmtk_tool, make_node
from tests.dicomdata import CT_IMAGE, MR_IMAGE, PREFIX, dataset_bytes_of

SUCCESS, WARNING, CANCEL, DOES_NOT_MATCH = 0x0000, 0xB000, 0xFE00, 0xA900


@dataclass
class Archive:
    node: NodeProcess
    corpus: rd.Corpus


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    dcmtk_tool("getscu")  # skip early when DCMTK is missing
    root = tmp_path_factory.mktemp("get")
    node = make_node(root / "node").start()
    corpus = rd.build_corpus(root / "corpus")
    rd.load(node.port, list(corpus.files.values()))
    try:
        yield Archive(node, corpus)
    finally:
        node.stop()


CASES = [  # (root, level, keys by short name, what arrives)
    ("patient", "PATIENT", {"PatientID": "=RET-P2"}, ["C"]),
    ("patient", "STUDY", {"PatientID": "=RET-P1", "StudyInstanceUID": "A,B"}, ["A", "B"]),
    ("patient", "SERIES", {"PatientID": "=RET-P1", "StudyInstanceUID": "A",
                           "SeriesInstanceUID": "A1"}, ["A1"]),
    ("patient", "IMAGE", {"PatientID": "=RET-P1", "StudyInstanceUID": "A",
                          "SeriesInstanceUID": "A2", "SOPInstanceUID": "A2.1,A2.2"}, ["A2"]),
    ("study", "STUDY", {"StudyInstanceUID": "B"}, ["B"]),
    ("study", "SERIES", {"StudyInstanceUID": "A", "SeriesInstanceUID": "A1,A2"}, ["A"]),
    ("study", "IMAGE", {"StudyInstanceUID": "A", "SeriesInstanceUID": "A1",
                        "SOPInstanceUID": "A1.3"}, ["A1.3"]),
]


def _key(corpus: rd.Corpus, keyword: str, names: str) -> str:
    if names.startswith("="):
        return f"{keyword}{names}"
    return f"{keyword}=" + "\\".join(corpus.uid[n] for n in names.split(","))


@pytest.mark.parametrize(("root", "level", "keys", "expected"), CASES)
def test_getscu_every_level(archive: Archive, tmp_path: Path, root: str, level: str,
                            keys: dict[str, str], expected: list[str]) -> None:
    args = [_key(archive.corpus, k, v) for k, v in keys.items()]
    result = rd.getscu(archive.node.port, root, level, args, tmp_path / "out")
    wanted = archive.corpus.instances(*expected)
    assert (result.status, result.completed, result.failed) == (SUCCESS, len(wanted), 0), \
        result.log
    rd.assert_same_datasets(rd.received_by_uid(tmp_path / "out"), archive.corpus, wanted)


def test_get_bad_identifier_is_refused(archive: Archive) -> None:
    responses, received = rd.get(archive.node.port, "study",
                                 rd.identifier("SERIES", SeriesInstanceUID="1.2.3"),
                                 [(CT_IMAGE, rd.UNCOMPRESSED)])
    assert responses.status == DOES_NOT_MATCH and received == {}
    assert "StudyInstanceUID" in str(responses.final.ErrorComment)


def test_get_no_match_is_success_with_zero_counts(archive: Archive) -> None:
    responses, received = rd.get(archive.node.port, "study",
                                 rd.identifier("STUDY", StudyInstanceUID=f"{PREFIX}99.98"),
                                 [(CT_IMAGE, rd.UNCOMPRESSED)])
    assert responses.status == SUCCESS and responses.counts() == (0, 0, 0) and received == {}


def test_get_with_only_some_storage_classes_offered(archive: Archive) -> None:
    # Study A holds a CT and an MR series; the requester offers CT storage only.
    responses, received = rd.get(archive.node.port, "study",
                                 rd.identifier("STUDY", StudyInstanceUID=archive.corpus.uid["A"]),
                                 [(CT_IMAGE, [ExplicitVRLittleEndian])])
    ct, mr = archive.corpus.instances("A1"), archive.corpus.instances("A2")
    # PS3.4 C.4.3.3.1: no appropriate presentation context is a failed sub-operation.
    assert responses.status == WARNING
    assert responses.counts() == (len(ct), len(mr), 0)
    assert set(responses.failed_list) == mr
    assert set(received) == ct
    for uid, (data, syntax) in received.items():
        assert syntax == ExplicitVRLittleEndian
        assert data == dataset_bytes_of(archive.corpus.files[uid])  # sent as stored
    rd.assert_pending_consistent(responses, len(ct | mr))


def test_get_pending_after_every_slow_sub_operation(archive: Archive) -> None:
    # PS3.4 C.4.3.3.1: Pending responses are optional; the node sends one after the first
    # sub-operation, then whenever PENDING_INTERVAL has passed, none after the last.
    slow = threading.Event()  # never set: the deliberate delay of a slow requester

    def store_slowly(event: Any) -> int:
        slow.wait(PENDING_INTERVAL * 1.5)
        return SUCCESS

    responses, received = rd.get(archive.node.port, "study",
                                 rd.identifier("STUDY", StudyInstanceUID=archive.corpus.uid["A"]),
                                 [(CT_IMAGE, [ExplicitVRLittleEndian]),
                                  (MR_IMAGE, [ExplicitVRLittleEndian])], on_store=store_slowly)
    total = len(archive.corpus.instances("A"))
    rd.assert_pending_consistent(responses, total)
    assert [int(s.NumberOfRemainingSuboperations) for s in responses.pending] == \
        list(range(total - 1, 0, -1))
    assert responses.status == SUCCESS and responses.counts() == (total, 0, 0)
    assert set(received) == archive.corpus.instances("A")


def test_get_counts_what_the_requester_answers(archive: Archive) -> None:
    # The node reads each C-STORE-RSP itself (node.scu.messages): its status and Error Comment
    # decide the sub-operation (PS3.4 C.4.3.3.1; B.2.3: 0xB007 warning, 0xA700 failure).
    def answer(event: Any) -> Dataset | int:
        if event.request.AffectedSOPClassUID == CT_IMAGE:
            return 0xB007  # Warning: Data Set does not match SOP Class
        status = Dataset()
        status.Status = 0xA700
        status.ErrorComment = "requester disk full"
        return status

    responses, _ = rd.get(archive.node.port, "study",
                          rd.identifier("STUDY", StudyInstanceUID=archive.corpus.uid["A"]),
                          [(CT_IMAGE, [ExplicitVRLittleEndian]),
                           (MR_IMAGE, [ExplicitVRLittleEndian])], on_store=answer)
    ct, mr = archive.corpus.instances("A1"), archive.corpus.instances("A2")
    assert responses.status == WARNING
    assert responses.counts() == (0, len(mr), len(ct))
    assert set(responses.failed_list) == mr
    log = archive.node.wait_for_log("requester disk full", count=len(mr))
    assert "Refused: Out of Resources" in log


def test_get_in_implicit_vr_gets_a_reencoded_copy(archive: Archive) -> None:
    series = archive.corpus.uid["A2"]
    responses, received = rd.get(
        archive.node.port, "study",
        rd.identifier("SERIES", StudyInstanceUID=archive.corpus.uid["A"],
                      SeriesInstanceUID=series),
        [(MR_IMAGE, [ImplicitVRLittleEndian])])
    wanted = archive.corpus.instances("A2")
    assert responses.status == SUCCESS and set(received) == wanted
    for uid, (data, syntax) in received.items():
        assert syntax == ImplicitVRLittleEndian
        got = read_dataset(BytesIO(data), True, True)
        assert got == dcmread(archive.corpus.files[uid])


def test_get_cancel_from_the_first_sub_operation(archive: Archive) -> None:
    sent_cancel: list[bool] = []

    def cancel_once(event: Any) -> int:
        if not sent_cancel:
            event.assoc.send_c_cancel(1, query_model=rd.GET_MODELS["patient"])
            sent_cancel.append(True)
        return 0

    responses, received = rd.get(archive.node.port, "patient",
                                 rd.identifier("PATIENT", PatientID="RET-P1"),
                                 [(CT_IMAGE, rd.UNCOMPRESSED), (MR_IMAGE, rd.UNCOMPRESSED)],
                                 on_store=cancel_once)
    total = len(archive.corpus.of_patient("RET-P1"))
    assert responses.status == CANCEL
    completed, failed, _ = responses.counts()
    assert 1 <= completed < total and failed == 0
    assert int(responses.final.NumberOfRemainingSuboperations) == total - completed
    assert len(received) == completed


def test_get_log_line(archive: Archive) -> None:
    query = rd.identifier("STUDY", StudyInstanceUID=archive.corpus.uid["C"])
    rd.get(archive.node.port, "study", query, [(MR_IMAGE, rd.UNCOMPRESSED)])
    log = archive.node.wait_for_log("C-GET STUDY (study root) from GETTER: 2 completed, 0 failed")
    assert "RET-P2" not in log
