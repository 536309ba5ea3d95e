"""C-ECHO and C-STORE end to end: what is sent is kept byte-for-byte, once, and indexed."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.events import Event

from tests.conftest import NodeProcess, dcmtk_env, dcmtk_tool, echo
from tests.dicomdata import (
    CT_IMAGE,
    PREFIX,
    _chunked_sending,
    dataset_bytes_of,
    file_meta_of,
    make_instance,
    no_delay,
    send_files,
    sha256_file,
    write_part10,
    write_raw_part10,
)


def test_echo_answers(node: NodeProcess) -> None:
    assert echo(node.port)


def test_wrong_called_ae_title_is_rejected(node: NodeProcess) -> None:
    assert not echo(node.port, called="NOTTHISNODE")
    # Wait for this association's own line: the readiness poll's (also from TESTSCU) may be
    # all the log holds yet, as the line is written when the connection closes.
    log = node.wait_for_log(" rejected: 0 stored, 0 failed")
    assert any(line.split(" association from ")[-1].startswith("TESTSCU at 127.0.0.1:")
               for line in log.splitlines() if " rejected: 0 stored" in line)


def test_pynetdicom_store_keeps_dataset_bytes_and_indexes_hierarchy(
    node: NodeProcess, tmp_path: Path
) -> None:
    study, series = "1.2.3.4.100", "1.2.3.4.100.1"
    files = [
        write_part10(make_instance(study=study, series=series, InstanceNumber=i),
                     tmp_path / f"{i}.dcm", ts)
        for i, ts in enumerate([ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                                ExplicitVRBigEndian])
    ]
    results = send_files(node.port, files)
    assert [r.status for r in results] == [0, 0, 0]

    stored = node.stored_files()
    assert len(stored) == 3
    sent = {dataset_bytes_of(f) for f in files}
    kept = {dataset_bytes_of(p) for p in stored}
    assert kept == sent
    for path in stored:
        assert path.name == sha256_file(path)  # location comes from the content only
        assert path.read_bytes()[:128] == b"\x00" * 128  # zero preamble (CVE-2019-11687)
        ds = dcmread(path)
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID

    rows = node.rows(
        "SELECT i.sop_instance_uid, s.series_instance_uid, st.study_instance_uid, p.patient_id,"
        " i.transfer_syntax_uid, i.source_ae FROM instance i JOIN series s ON i.series_id = s.id"
        " JOIN study st ON s.study_id = st.id JOIN patient p ON st.patient_id = p.id"
    )
    assert sorted(r[0] for r in rows) == sorted(dcmread(f).SOPInstanceUID for f in files)
    assert {(r[1], r[2], r[3], r[5]) for r in rows} == {(series, study, "TEST-001", "TESTSCU")}
    assert {r[4] for r in rows} == {
        ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian
    }
    assert node.temporary_files() == []


def test_dcmtk_storescu_stores_once(node: NodeProcess, tmp_path: Path) -> None:
    storescu = dcmtk_tool("storescu")
    folder = tmp_path / "send"
    for i in range(5):
        write_part10(make_instance(InstanceNumber=i), folder / f"{i}.dcm")
    done = subprocess.run(
        [str(storescu), "-aec", "DICOMNODE", "127.0.0.1", str(node.port), "+sd", "+r",
         str(folder)],
        env=dcmtk_env(), capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert len(node.stored_files()) == 5
    assert node.rows("SELECT count(*) FROM instance") == [(5,)]
    # Sending the same folder again stores nothing new.
    again = subprocess.run(
        [str(storescu), "-aec", "DICOMNODE", "127.0.0.1", str(node.port), "+sd", "+r",
         str(folder)],
        env=dcmtk_env(), capture_output=True, text=True, timeout=60,
    )
    assert again.returncode == 0, again.stderr
    assert len(node.stored_files()) == 5
    assert node.rows("SELECT count(*) FROM instance") == [(5,)]


def test_info_log_names_no_patient_but_every_association_and_store(node: NodeProcess) -> None:
    from tests.dicomdata import send_datasets

    ds = make_instance(PatientName="Sensitive^Secret", PatientID="PID-CONFIDENTIAL-42")
    assert [s.status for s in send_datasets(node.port, [ds])] == [0]
    log = node.wait_for_log("released: 1 stored, 0 failed")
    assert "Sensitive" not in log and "PID-CONFIDENTIAL-42" not in log
    store_lines = [line for line in log.splitlines() if "C-STORE" in line]
    assert len(store_lines) == 1
    assert ds.SOPInstanceUID in store_lines[0] and "status 0x0000" in store_lines[0]
    assert "CTImageStorage" in store_lines[0] and " ms" in store_lines[0]
    assoc_lines = [line for line in log.splitlines() if "association from TESTSCU" in line]
    assert any("released: 1 stored, 0 failed" in line for line in assoc_lines)
    assert all("127.0.0.1" in line for line in assoc_lines)


def test_store_responses_answer_their_requests(node: NodeProcess, tmp_path: Path) -> None:
    """Each C-STORE-RSP (PS3.7 Table 9.3-2) names its request: Message ID Being Responded To,
    the command's SOP Class and Instance UIDs, no data set; a failure carries its Error
    Comment."""
    good = write_part10(make_instance(), tmp_path / "good.dcm")
    other = make_instance()  # its dataset names another SOP Instance UID than its command
    mismatch = write_raw_part10(tmp_path / "mismatch.dcm", CT_IMAGE, f"{PREFIX}9",
                                dataset_bytes_of(write_part10(other, tmp_path / "other.dcm")))
    files = [good, mismatch, good]
    sent: list[int] = []
    answers: list[dict[str, Any]] = []

    def on_sent(event: Event) -> None:
        sent.append(int(event.message.command_set.MessageID))

    def on_received(event: Event) -> None:
        command = event.message.command_set
        answers.append({keyword: command.get(keyword) for keyword in (
            "CommandField", "MessageIDBeingRespondedTo", "AffectedSOPClassUID",
            "AffectedSOPInstanceUID", "CommandDataSetType", "Status", "ErrorComment")})

    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CT_IMAGE, [ExplicitVRLittleEndian])
    with _chunked_sending():
        assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE", evt_handlers=[
            (evt.EVT_DIMSE_SENT, on_sent), (evt.EVT_DIMSE_RECV, on_received)])
        assert assoc.is_established
        no_delay(assoc)
        try:
            for path in files:
                assoc.send_c_store(path)
        finally:
            assoc.release()

    assert len(sent) == len(answers) == 3
    for path, request_id, answer in zip(files, sent, answers, strict=True):
        assert answer["CommandField"] == 0x8001
        assert answer["MessageIDBeingRespondedTo"] == request_id
        assert answer["CommandDataSetType"] == 0x0101
        assert answer["AffectedSOPClassUID"] == CT_IMAGE
        assert answer["AffectedSOPInstanceUID"] == file_meta_of(path).MediaStorageSOPInstanceUID
    assert [a["Status"] for a in answers] == [0x0000, 0xA900, 0x0000]
    assert [a["ErrorComment"] for a in answers] == [
        None, "SOP Instance UID in dataset differs from the command", None]


def test_datasets_in_many_small_pdus_are_kept_whole(node_factory: Any, tmp_path: Path) -> None:
    """With the smallest maximum PDU the node allows, every data set arrives in several
    fragments (PS3.8 9.3.5.1, Annex E); each is reassembled byte for byte, on one association
    after the other, from pynetdicom and from DCMTK's storescu."""
    node: NodeProcess = node_factory(max_pdu=4096).start()
    files = [write_part10(make_instance(rows=96, InstanceNumber=i), tmp_path / f"{i}.dcm", ts)
             for i, ts in enumerate([ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                                     ExplicitVRBigEndian, ExplicitVRLittleEndian])]
    assert all(len(dataset_bytes_of(f)) > 3 * 4096 for f in files)
    assert [r.status for r in send_files(node.port, files)] == [0, 0, 0, 0]
    folder = tmp_path / "dcmtk"
    more = [write_part10(make_instance(rows=96, InstanceNumber=10 + i), folder / f"{i}.dcm")
            for i in range(3)]
    done = subprocess.run(
        [str(dcmtk_tool("storescu")), "-aec", "DICOMNODE", "127.0.0.1", str(node.port),
         "+sd", "+r", str(folder)],
        env=dcmtk_env(), capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr

    kept = sorted(dataset_bytes_of(p) for p in node.stored_files())
    assert kept == sorted(dataset_bytes_of(f) for f in files + more)
    assert node.rows("SELECT count(*) FROM instance") == [(7,)]
    assert node.temporary_files() == []
