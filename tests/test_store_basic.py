"""C-ECHO and C-STORE end to end: what is sent is kept byte-for-byte, once, and indexed."""

from __future__ import annotations

import subprocess
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from tests.conftest import NodeProcess, dcmtk_env, dcmtk_tool, echo
from tests.dicomdata import dataset_bytes_of, make_instance, send_files, sha256_file, write_part10


def test_echo_answers(node: NodeProcess) -> None:
    assert echo(node.port)


def test_wrong_called_ae_title_is_rejected(node: NodeProcess) -> None:
    assert not echo(node.port, called="NOTTHISNODE")
    node.wait_for_log("association from TESTSCU at 127.0.0.1")
    assert "rejected" in node.log()


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
