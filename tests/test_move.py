"""C-MOVE SCP: DCMTK's movescu and a pynetdicom SCU ask the node to send instances to a peer.

The destinations are real: DCMTK's storescp (bit-preserving, so what it writes is compared with
the stored files at dataset level) and, where a test needs to hold a sub-operation, a pynetdicom
storage SCP in the test process.  Peers are configured in the node's YAML like an
administrator's.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.association import Association

from node.config import build_config
from node.handlers.retrieve_common import PENDING_INTERVAL
from node.index.writer import Source
from node.ingest import Received
from node.query.keys import Root
from node.retrieve.stored import can_reencode
from node.scu.messages import StoreResponse, _store_response
from node.services import open_services
from tests import retrievedata as rd
from tests.conftest import NodeProcess, dcmtk_tool, free_port, make_node
from tests.dicomdata import (
    CT_IMAGE,
    MR_IMAGE,
    PREFIX,
    dataset_bytes_of,
    make_instance,
    write_part10,
    write_raw_part10,
)
from tests.findcorpus import encoded

SUCCESS, WARNING, CANCEL = 0x0000, 0xB000, 0xFE00
UNKNOWN_DESTINATION, ALL_FAILED, DOES_NOT_MATCH = 0xA801, 0xA702, 0xA900


@dataclass
class Archive:
    node: NodeProcess
    corpus: rd.Corpus
    dest_port: int
    implicit_port: int
    uncompressed_port: int


def _peers(**ports: int) -> dict[str, Any]:
    return {ae: {"host": "127.0.0.1", "port": port} for ae, port in ports.items()}


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    dcmtk_tool("movescu")  # skip early when DCMTK is missing
    root = tmp_path_factory.mktemp("move")
    ports = {"DEST": free_port(), "IMPLICIT": free_port(), "UNCOMP": free_port(),
             "DOWN": free_port()}
    peers = _peers(**ports)
    peers["NOSEND"] = {"host": "127.0.0.1", "port": ports["DEST"], "move_destination": False}
    node = make_node(root / "node", peers=peers).start()
    corpus = rd.build_corpus(root / "corpus")
    rd.load(node.port, list(corpus.files.values()))
    try:
        yield Archive(node, corpus, ports["DEST"], ports["IMPLICIT"], ports["UNCOMP"])
    finally:
        node.stop()


# --- every level, both roots, with DCMTK's movescu ------------------------------------------

def _keys(corpus: rd.Corpus, level: str, root: str, names: dict[str, str]) -> list[str]:
    keys = []
    if root == "patient" and "patient" in names:
        keys.append(f"PatientID={names['patient']}")
    for keyword, name in (("StudyInstanceUID", "study"), ("SeriesInstanceUID", "series"),
                          ("SOPInstanceUID", "image")):
        if name in names:
            keys.append(f"{keyword}=" + "\\".join(corpus.uid[n] for n in names[name].split(",")))
    return keys


CASES = [  # (root, level, names, what arrives)
    ("patient", "PATIENT", {"patient": "RET-P1"}, ["A", "B"]),
    ("patient", "STUDY", {"patient": "RET-P1", "study": "A"}, ["A"]),
    ("patient", "STUDY", {"patient": "RET-P1", "study": "A,B"}, ["A", "B"]),
    ("patient", "SERIES", {"patient": "RET-P1", "study": "A", "series": "A2"}, ["A2"]),
    ("patient", "IMAGE", {"patient": "RET-P1", "study": "A", "series": "A1",
                          "image": "A1.1,A1.3"}, ["A1.1", "A1.3"]),
    ("study", "STUDY", {"study": "C"}, ["C"]),
    ("study", "STUDY", {"study": "A,C"}, ["A", "C"]),
    ("study", "SERIES", {"study": "A", "series": "A1,A2"}, ["A1", "A2"]),
    ("study", "IMAGE", {"study": "A", "series": "A2", "image": "A2.2"}, ["A2.2"]),
]


@pytest.mark.parametrize(("root", "level", "names", "expected"), CASES)
def test_movescu_every_level(archive: Archive, tmp_path: Path, root: str, level: str,
                             names: dict[str, str], expected: list[str]) -> None:
    keys = _keys(archive.corpus, level, root, names)
    with rd.storescp(tmp_path / "out", archive.dest_port) as dest:
        result = rd.movescu(archive.node.port, root, level, keys)
        received = dest.received()
    wanted = archive.corpus.instances(*expected)
    assert (result.status, result.completed, result.failed) == (SUCCESS, len(wanted), 0), \
        result.log
    rd.assert_same_datasets(received, archive.corpus, wanted)


def test_movescu_unknown_destination(archive: Archive) -> None:
    result = rd.movescu(archive.node.port, "study", "STUDY",
                        [f"StudyInstanceUID={archive.corpus.uid['A']}"], destination="NOWHERE")
    assert result.status == UNKNOWN_DESTINATION, result.log
    assert "NOWHERE" in result.comment


def test_movescu_destination_not_allowed(archive: Archive, tmp_path: Path) -> None:
    with rd.storescp(tmp_path / "out", archive.dest_port, ae_title="NOSEND") as dest:
        result = rd.movescu(archive.node.port, "study", "STUDY",
                            [f"StudyInstanceUID={archive.corpus.uid['A']}"], destination="NOSEND")
        assert dest.received() == {}
    assert result.status == UNKNOWN_DESTINATION, result.log
    assert "not a move destination" in result.comment


def test_movescu_cancel_after_first_response(archive: Archive) -> None:
    # A destination slower than PENDING_INTERVAL per instance: with a fast one the node can
    # finish every sub-operation before movescu's C-CANCEL arrives, and rightly ends Success.
    slow = SlowStorageSCP(archive.dest_port, ae_title="DEST")
    try:
        result = rd.movescu(archive.node.port, "patient", "PATIENT", ["PatientID=RET-P1"],
                            extra=["--cancel", "1"])
    finally:
        slow.close()
    total = len(archive.corpus.of_patient("RET-P1"))
    assert result.status == CANCEL, result.log
    assert 1 <= result.completed < total and result.failed == 0
    assert len(slow.stored) == result.completed


# --- statuses and counts, with a pynetdicom SCU ----------------------------------------------

def test_pending_responses_after_the_first_then_now_and_then(archive: Archive,
                                                              tmp_path: Path) -> None:
    # PS3.4 C.4.2.3.1: Pending responses are optional; the node sends one after the first
    # sub-operation, then at most one per PENDING_INTERVAL, none after the last.
    query = rd.identifier("STUDY", StudyInstanceUID=archive.corpus.uid["A"])
    with rd.storescp(tmp_path / "out", archive.dest_port):
        started = time.monotonic()
        responses = rd.move(archive.node.port, "study", query)
        elapsed = time.monotonic() - started
    total = len(archive.corpus.instances("A"))
    rd.assert_pending_consistent(responses, total)
    assert len(responses.pending) <= 1 + elapsed / PENDING_INTERVAL
    assert responses.status == SUCCESS and responses.counts() == (total, 0, 0)
    assert "NumberOfRemainingSuboperations" not in responses.final  # PS3.4 C.4.2.1.6
    assert responses.items[-1][1] is None  # no failures: no data set


class SlowStorageSCP:
    """A pynetdicom storage SCP that takes longer than PENDING_INTERVAL over every C-STORE."""

    def __init__(self, port: int, ae_title: str = "SLOW") -> None:
        self.stored: list[str] = []
        self._slow = threading.Event()  # never set: the deliberate delay of a slow peer
        ae = AE(ae_title=ae_title)
        for sop_class in (CT_IMAGE, MR_IMAGE):
            ae.add_supported_context(sop_class, [ExplicitVRLittleEndian])
        server = ae.start_server(("127.0.0.1", port), block=False,
                                 evt_handlers=[(evt.EVT_C_STORE, self._store)])
        assert server is not None
        self.server = server

    def _store(self, event: Any) -> int:
        self._slow.wait(PENDING_INTERVAL * 1.5)
        self.stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0

    def close(self) -> None:
        self.server.shutdown()


def test_pending_after_every_slow_sub_operation_counts_down(node_factory: Any,
                                                            tmp_path: Path) -> None:
    slow_port = free_port()
    node = node_factory(peers=_peers(SLOW=slow_port)).start()
    corpus = rd.build_corpus(tmp_path / "corpus")
    rd.load(node.port, list(corpus.files.values()))
    slow = SlowStorageSCP(slow_port)
    try:
        responses = rd.move(node.port, "study",
                            rd.identifier("STUDY", StudyInstanceUID=corpus.uid["A"]),
                            destination="SLOW")
    finally:
        slow.close()
    total = len(corpus.instances("A"))
    rd.assert_pending_consistent(responses, total)
    assert [int(s.NumberOfRemainingSuboperations) for s in responses.pending] == \
        list(range(total - 1, 0, -1))
    assert [int(s.NumberOfCompletedSuboperations) for s in responses.pending] == \
        list(range(1, total))
    assert responses.status == SUCCESS and responses.counts() == (total, 0, 0)
    assert set(slow.stored) == corpus.instances("A")


def test_no_match_is_success_with_zero_counts(archive: Archive) -> None:
    query = rd.identifier("STUDY", StudyInstanceUID=f"{PREFIX}99.99")
    responses = rd.move(archive.node.port, "study", query)
    assert responses.status == SUCCESS and responses.counts() == (0, 0, 0)
    assert responses.pending == []


@pytest.mark.parametrize(("root", "query", "says"), [
    ("study", rd.identifier(None, StudyInstanceUID="1.2.3"), "Query/Retrieve Level"),
    ("study", rd.identifier("PATIENT", PatientID="RET-P1"), "no PATIENT level"),
    ("study", rd.identifier("SERIES", SeriesInstanceUID="1.2.3"), "StudyInstanceUID"),
    ("study", rd.identifier("SERIES", StudyInstanceUID=["1.2.3", "1.2.4"],
                            SeriesInstanceUID="1.2.3.1"), "single value"),
    ("study", rd.identifier("STUDY", StudyInstanceUID="1.2.*"), "wildcards"),
    ("study", rd.identifier("STUDY", StudyInstanceUID=""), "StudyInstanceUID is required"),
    ("patient", rd.identifier("STUDY", StudyInstanceUID="1.2.3"), "PatientID is required"),
    ("patient", rd.identifier("PATIENT", PatientID=["RET-P1", "RET-P2"]), "single value"),
    ("patient", rd.identifier("IMAGE", PatientID="RET-P1", StudyInstanceUID="1.2",
                              SeriesInstanceUID="1.2.3"), "SOPInstanceUID is required"),
])
def test_identifier_breaking_the_model_is_refused(archive: Archive, root: str, query: Any,
                                                  says: str) -> None:
    responses = rd.move(archive.node.port, root, query)
    assert responses.status == DOES_NOT_MATCH
    assert says in str(responses.final.ErrorComment)


def test_unknown_destination_status_and_comment(archive: Archive) -> None:
    query = rd.identifier("STUDY", StudyInstanceUID=archive.corpus.uid["A"])
    responses = rd.move(archive.node.port, "study", query, destination="NOWHERE")
    assert responses.status == UNKNOWN_DESTINATION
    assert "not a configured peer" in str(responses.final.ErrorComment)


def test_destination_down_fails_every_sub_operation(archive: Archive) -> None:
    query = rd.identifier("STUDY", StudyInstanceUID=archive.corpus.uid["A"])
    responses = rd.move(archive.node.port, "study", query, destination="DOWN")
    wanted = archive.corpus.instances("A")
    # PS3.4 C.4.2.3.1: all sub-operations failed -> Failure (0xA702), not 0xA801.
    assert responses.status == ALL_FAILED
    assert responses.counts() == (0, len(wanted), 0)
    assert set(responses.failed_list) == wanted
    assert "cannot connect" in str(responses.final.ErrorComment)


def test_implicit_only_destination_gets_a_reencoded_copy(archive: Archive,
                                                         tmp_path: Path) -> None:
    # storescp +xi accepts Implicit VR Little Endian only; the corpus is stored explicit.
    query = rd.identifier("SERIES", StudyInstanceUID=archive.corpus.uid["A"],
                          SeriesInstanceUID=archive.corpus.uid["A1"])
    with rd.storescp(tmp_path / "out", archive.implicit_port, options=["+xi"],
                     ae_title="IMPLICIT") as dest:
        responses = rd.move(archive.node.port, "study", query, destination="IMPLICIT")
        received = dest.received()
    wanted = archive.corpus.instances("A1")
    assert responses.status == SUCCESS and responses.counts() == (len(wanted), 0, 0)
    assert set(received) == wanted
    for uid, path in received.items():
        got = dcmread(path)
        assert got.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
        assert got == dcmread(archive.corpus.files[uid])  # same elements and values


def test_log_line_without_patient_identity(archive: Archive, tmp_path: Path) -> None:
    query = rd.identifier("PATIENT", PatientID="RET-P2")
    with rd.storescp(tmp_path / "out", archive.dest_port):
        rd.move(archive.node.port, "patient", query, calling="LOGCHECK")
    log = archive.node.wait_for_log("C-MOVE PATIENT (patient root) from LOGCHECK to DEST")
    assert "RET-P2" not in log and "Retrieve^" not in log


# --- holding a sub-operation: C-CANCEL, Move Originator ---------------------------------------

class HeldStorageSCP:
    """A pynetdicom storage SCP that holds its first C-STORE until released."""

    def __init__(self, port: int, ae_title: str = "HOLD") -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.requests: list[Any] = []
        ae = AE(ae_title=ae_title)
        ae.add_supported_context(CT_IMAGE, [ExplicitVRLittleEndian])
        server = ae.start_server(("127.0.0.1", port), block=False,
                                 evt_handlers=[(evt.EVT_C_STORE, self._store)])
        assert server is not None
        self.server = server

    def _store(self, event: Any) -> int:
        self.requests.append(event.request)
        if len(self.requests) == 1:
            self.entered.set()
            self.release.wait(30)
        return 0

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()


def test_c_cancel_between_sub_operations(node_factory: Any, tmp_path: Path) -> None:
    hold_port = free_port()
    node = node_factory(peers=_peers(HOLD=hold_port)).start()
    study = f"{PREFIX}41.1"
    paths = [write_part10(make_instance(study=study, series=f"{study}.1",
                                        sop_instance=f"{study}.1.{n}", InstanceNumber=n),
                          tmp_path / f"{n}.dcm") for n in range(1, 51)]
    rd.load(node.port, paths)
    held = HeldStorageSCP(hold_port)

    def cancel_while_held(assoc: Association, context_id: int) -> None:
        assert held.entered.wait(30), "no sub-operation arrived"
        assoc.send_c_cancel(1, context_id)  # on its way before the held sub-operation ends
        held.release.set()

    try:
        responses = rd.move(node.port, "study", rd.identifier("STUDY", StudyInstanceUID=study),
                            destination="HOLD", during=cancel_while_held)
    finally:
        held.close()
    # PS3.4 C.4.2.3.1: Canceled, with the counts; Remaining = sub-operations not initiated.
    assert responses.status == CANCEL
    completed, failed, warning = responses.counts()
    assert 1 <= completed < 50 and (failed, warning) == (0, 0)
    assert int(responses.final.NumberOfRemainingSuboperations) == 50 - completed
    assert len(held.requests) == completed
    # PS3.7 9.1.1.1: the sub-operation names the C-MOVE it serves.
    assert held.requests[0].MoveOriginatorApplicationEntityTitle == "RETRIEVER"
    assert held.requests[0].MoveOriginatorMessageID == 1


# --- what is stored cannot always be sent as stored -------------------------------------------

def _single_instance_node(node_factory: Any, tmp_path: Path, transfer_syntax: str,
                          dest_port: int, dataset_bytes: bytes | None = None) -> tuple[Any, Any]:
    node = node_factory(peers=_peers(DEST=dest_port)).start()
    ds = make_instance(study=f"{PREFIX}42.1", series=f"{PREFIX}42.1.1",
                       sop_instance=f"{PREFIX}42.1.1.1")
    if dataset_bytes is None:
        if transfer_syntax == RLELossless:
            write_part10(ds, tmp_path / "native.dcm")  # gives it the File Meta compress() needs
            ds.compress(RLELossless, generate_instance_uid=False)
        path = write_part10(ds, tmp_path / "in.dcm", transfer_syntax)
    else:
        path = write_raw_part10(tmp_path / "in.dcm", CT_IMAGE, ds.SOPInstanceUID, dataset_bytes,
                                transfer_syntax)
    rd.load(node.port, [path])
    return node, ds


def test_deflated_stored_is_inflated_for_a_destination_that_refuses_it(
        node_factory: Any, tmp_path: Path) -> None:
    dest_port = free_port()
    node, original = _single_instance_node(node_factory, tmp_path, DeflatedExplicitVRLittleEndian,
                                           dest_port)
    with rd.storescp(tmp_path / "out", dest_port, options=[]) as dest:  # uncompressed only
        responses = rd.move(node.port, "study",
                            rd.identifier("STUDY", StudyInstanceUID=original.StudyInstanceUID))
        received = dest.received()
    assert responses.status == SUCCESS and responses.counts() == (1, 0, 0)
    got = dcmread(received[original.SOPInstanceUID])
    assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert got.PixelData == original.PixelData and got.PatientID == original.PatientID


def test_rle_stored_is_decompressed_when_pydicom_can_else_fails(node_factory: Any,
                                                                tmp_path: Path) -> None:
    dest_port = free_port()
    node, original = _single_instance_node(node_factory, tmp_path, RLELossless, dest_port)
    uncompressed = make_instance(sop_instance=original.SOPInstanceUID).PixelData
    # A second instance of the same series, stored uncompressed, so the association comes about.
    plain = make_instance(study=original.StudyInstanceUID, series=original.SeriesInstanceUID,
                          sop_instance=f"{original.SeriesInstanceUID}.2", InstanceNumber=2)
    rd.load(node.port, [write_part10(plain, tmp_path / "plain.dcm")])
    with rd.storescp(tmp_path / "out", dest_port, options=[]) as dest:  # uncompressed only
        responses = rd.move(node.port, "study",
                            rd.identifier("STUDY", StudyInstanceUID=original.StudyInstanceUID))
        received = dest.received()
    if can_reencode(RLELossless):  # NumPy installed: pydicom decodes RLE itself
        assert responses.status == SUCCESS and responses.counts() == (2, 0, 0)
        assert dcmread(received[original.SOPInstanceUID]).PixelData == uncompressed
    else:  # the RLE sub-operation fails, with a warning saying why; the other completes
        assert responses.status == WARNING and responses.counts() == (1, 1, 0)
        assert responses.failed_list == [original.SOPInstanceUID]
        assert set(received) == {plain.SOPInstanceUID}
        node.wait_for_log("no pixel data decoder available")


def test_only_undecodable_instances_for_a_destination_that_refuses_them(
        node_factory: Any, tmp_path: Path) -> None:
    dest_port = free_port()
    node, original = _single_instance_node(node_factory, tmp_path, RLELossless, dest_port)
    if can_reencode(RLELossless):
        pytest.skip("pydicom can decode RLE here (NumPy installed)")
    with rd.storescp(tmp_path / "out", dest_port, options=[]) as dest:  # uncompressed only
        responses = rd.move(node.port, "study",
                            rd.identifier("STUDY", StudyInstanceUID=original.StudyInstanceUID))
        assert dest.received() == {}
    # The one sub-operation failed: all failed (0xA702), with the Failed list and the reason.
    assert responses.status == ALL_FAILED and responses.counts() == (0, 1, 0)
    assert responses.failed_list == [original.SOPInstanceUID]
    assert "does not offer" in str(responses.final.ErrorComment)


def test_undecodable_jpeg_for_a_destination_that_refuses_it_fails(node_factory: Any,
                                                                  tmp_path: Path) -> None:
    # A JPEG Baseline dataset whose fragment is not JPEG: no decoder can help, whatever is
    # installed; the destination accepts uncompressed syntaxes only.
    dest_port = free_port()
    ds = make_instance(sop_instance=f"{PREFIX}42.1.1.1", study=f"{PREFIX}42.1",
                       series=f"{PREFIX}42.1.1")
    del ds.PixelData
    header = write_part10(ds, tmp_path / "header.dcm", ExplicitVRLittleEndian)
    item = b"\xfe\xff\x00\xe0" + (8).to_bytes(4, "little") + b"notjpeg!"
    pixel = (b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff"
             + b"\xfe\xff\x00\xe0\x00\x00\x00\x00" + item + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")
    node, original = _single_instance_node(node_factory, tmp_path, JPEGBaseline8Bit, dest_port,
                                           dataset_bytes=dataset_bytes_of(header) + pixel)
    with rd.storescp(tmp_path / "out", dest_port, options=[]) as dest:
        responses = rd.move(node.port, "study",
                            rd.identifier("STUDY", StudyInstanceUID=original.StudyInstanceUID))
        assert dest.received() == {}
    assert responses.status == ALL_FAILED and responses.failed_list == [original.SOPInstanceUID]


def test_file_missing_from_the_store_is_one_failed_sub_operation(node_factory: Any,
                                                                 tmp_path: Path) -> None:
    dest_port = free_port()
    node = node_factory(peers=_peers(DEST=dest_port)).start()
    corpus = rd.build_corpus(tmp_path / "corpus")
    rd.load(node.port, list(corpus.files.values()))
    lost = corpus.uid["A1.2"]
    (digest,) = node.rows("SELECT digest FROM instance WHERE sop_instance_uid = ?", lost)[0]
    (node.storage / "objects" / digest[:2] / digest[2:4] / digest).unlink()
    with rd.storescp(tmp_path / "out", dest_port) as dest:
        responses = rd.move(node.port, "study",
                            rd.identifier("STUDY", StudyInstanceUID=corpus.uid["A"]))
        received = dest.received()
    wanted = corpus.instances("A")
    assert responses.status == WARNING
    assert responses.counts() == (len(wanted) - 1, 1, 0)
    assert responses.failed_list == [lost]
    rd.assert_same_datasets(received, corpus, wanted - {lost})
    node.wait_for_log("stored file missing")



# --- the planner: one SELECT through the index ------------------------------------------------

def test_plan_is_one_select_whatever_the_level(tmp_path: Path) -> None:
    services = open_services(build_config({"ae_title": "PLANNODE"}, tmp_path))
    try:
        study = f"{PREFIX}43.1"
        for n in range(1, 6):
            ds = make_instance(study=study, series=f"{study}.{n % 2}",
                               sop_instance=f"{study}.9.{n}", PatientID="PLAN-1",
                               InstanceNumber=6 - n)
            services.ingestor.receive(Received(str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                                               "1.2.840.10008.1.2", encoded(ds),
                                               Source("T", "127.0.0.1")))
        statements: list[str] = []
        services.db.connection().set_trace_callback(statements.append)
        plans = {
            "patient": services.planner.plan(rd.identifier("PATIENT", PatientID="PLAN-1"),
                                             Root.PATIENT),
            "image": services.planner.plan(
                rd.identifier("IMAGE", StudyInstanceUID=study, SeriesInstanceUID=f"{study}.1",
                              SOPInstanceUID=[f"{study}.9.1", f"{study}.9.3"]), Root.STUDY),
        }
        services.db.connection().set_trace_callback(None)
    finally:
        services.close()
    selects = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    assert len(selects) == len(statements) == 2, statements
    assert len(plans["patient"]) == 5
    # Series by series, in Instance Number order within each.
    assert [p.sop_instance_uid for p in plans["image"]] == [f"{study}.9.3", f"{study}.9.1"]
    assert all(p.path.is_file() and p.transfer_syntax_uid == "1.2.840.10008.1.2"
               for p in plans["patient"])


# --- the C-STORE-RSP the node reads off the socket itself ------------------------------------

def _store_rsp_pdu(*pdvs: tuple[int, bytes]) -> bytes:
    """A P-DATA-TF PDU of (control header, fragment) PDVs on context 1 (PS3.8 9.3.5, E.2)."""
    items = b"".join(struct.pack(">IBB", len(data) + 2, 1, control) + data
                     for control, data in pdvs)
    return struct.pack(">BBI", 4, 0, len(items)) + items


def _command(*elements: tuple[int, bytes]) -> bytes:
    body = b"".join(struct.pack("<HHI", 0, tag, len(value)) + value for tag, value in elements)
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def _us(value: int) -> bytes:
    return struct.pack("<H", value)


RSP = _command((0x0002, CT_IMAGE.encode() + b"\x00" * (len(CT_IMAGE) % 2)),
               (0x0100, _us(0x8001)), (0x0120, _us(7)), (0x0800, _us(0x0101)),
               (0x0900, _us(0xB000)), (0x0902, b"coerced "))


def test_store_response_read_directly_or_left_to_pynetdicom() -> None:
    # A whole C-STORE-RSP without a data set, in one PDV or in command fragments, is read.
    for pdu in (_store_rsp_pdu((3, RSP)), _store_rsp_pdu((1, RSP[:20]), (3, RSP[20:]))):
        assert _store_response(pdu) == StoreResponse(7, 0xB000, "coerced")
    # Anything else is left for pynetdicom to read: a command not yet complete, a data set
    # fragment, a data set announced, another command, a truncated element.
    with_data_set = RSP.replace(struct.pack("<HHI", 0, 0x0800, 2) + _us(0x0101),
                                struct.pack("<HHI", 0, 0x0800, 2) + _us(0x0000))
    c_cancel = RSP.replace(_us(0x8001), _us(0x0FFF), 1)
    for pdu in (_store_rsp_pdu((1, RSP)), _store_rsp_pdu((2, RSP)),
                _store_rsp_pdu((3, with_data_set)), _store_rsp_pdu((3, c_cancel)),
                _store_rsp_pdu((3, RSP[:-3])), _store_rsp_pdu((3, RSP), (3, RSP))):
        assert _store_response(pdu) is None
