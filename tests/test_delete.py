"""Deletion: `dicom-node delete`, the Deleter under it, leases against retrieves, schema upgrade.

The domain tests run on an archive opened in the test process; the command-line tests run the
real command beside a running `serve` and look at the answers of that node.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from node.config import build_config
from node.index.database import SchemaMismatch
from node.index.deletion import Level, remove_from_study
from node.index.leases import now
from node.index.models import Instance, Patient, RetrieveLease, SchemaInfo, Series, Study
from node.index.writer import Source
from node.ingest import Received
from node.query.keys import Root
from node.services import Services, open_services
from node.store import Store
from tests import retrievedata as rd
from tests.conftest import REPO, NodeProcess, poll_until
from tests.dicomdata import PREFIX, make_instance, reactor_paused, send_datasets
from tests.findcorpus import encoded, receive_all

# Two patients: P1 with studies A (two series) and B, P2 with study C.
A, B, C = f"{PREFIX}71.1", f"{PREFIX}71.2", f"{PREFIX}71.3"
LAYOUT = [  # (patient, study, series, instances)
    ("DEL-P1", A, f"{A}.1", 3),
    ("DEL-P1", A, f"{A}.2", 2),
    ("DEL-P1", B, f"{B}.1", 2),
    ("DEL-P2", C, f"{C}.1", 4),
]


def corpus() -> list[Dataset]:
    datasets = []
    for patient, study, series, count in LAYOUT:
        for n in range(1, count + 1):
            datasets.append(make_instance(study=study, series=series,
                                          sop_instance=f"{series}.{n}", PatientID=patient,
                                          InstanceNumber=n))
    return datasets


@pytest.fixture
def archive(index_settings: dict[str, Any], tmp_path: Path) -> Iterator[Services]:
    """The corpus stored in a new archive, its index on each backend."""
    settings: dict[str, Any] = {"ae_title": "DELNODE", **index_settings}
    services = open_services(build_config(settings, tmp_path))
    receive_all(services.ingestor, corpus())
    try:
        yield services
    finally:
        services.close()


def held(services: Services) -> dict[str, set[str]]:
    """UIDs at each level in the index, and the digests of the files in the store."""
    def column(model: Any, field: Any) -> set[str]:
        return {str(v) for (v,) in model.select(field).tuples().execute(services.db)}

    return {
        "patients": column(Patient, Patient.patient_id),
        "studies": column(Study, Study.study_instance_uid),
        "series": column(Series, Series.series_instance_uid),
        "instances": column(Instance, Instance.sop_instance_uid),
        "digests": column(Instance, Instance.digest),
        "files": {p.name for p in services.store.objects.rglob("*") if p.is_file()},
    }


def test_deleting_a_series_keeps_the_rest_of_its_study(archive: Services) -> None:
    report = archive.deleter.delete(Level.SERIES, [f"{A}.1"])
    after = held(archive)
    assert report.ok and report.instances == 3 and report.studies_deleted == 0
    assert after["series"] == {f"{A}.2", f"{B}.1", f"{C}.1"}
    assert after["studies"] == {A, B, C}
    assert len(after["instances"]) == 8
    assert after["files"] == after["digests"]  # the three files went with their rows


def test_deleting_the_last_series_removes_study_and_patient(archive: Services) -> None:
    archive.deleter.delete(Level.SERIES, [f"{C}.1"])
    after = held(archive)
    assert C not in after["studies"] and "DEL-P2" not in after["patients"]
    assert after["files"] == after["digests"] and len(after["files"]) == 7


def test_deleting_a_study_keeps_the_patients_other_study(archive: Services) -> None:
    report = archive.deleter.delete(Level.STUDY, [A])
    after = held(archive)
    assert report.studies_deleted == 1 and report.instances == 5
    assert after["studies"] == {B, C} and after["patients"] == {"DEL-P1", "DEL-P2"}
    assert after["files"] == after["digests"]


def test_deleting_a_patient_removes_all_of_it(archive: Services) -> None:
    report = archive.deleter.delete(Level.PATIENT, ["DEL-P1"])
    after = held(archive)
    assert report.studies_deleted == 2 and report.instances == 7
    assert after["patients"] == {"DEL-P2"} and after["studies"] == {C}
    assert after["files"] == after["digests"] and len(after["files"]) == 4


def test_deleting_single_instances(archive: Services) -> None:
    report = archive.deleter.delete(Level.INSTANCE, [f"{B}.1.1", f"{C}.1.4"])
    after = held(archive)
    assert report.instances == 2
    assert f"{B}.1.1" not in after["instances"] and f"{C}.1.4" not in after["instances"]
    assert len(after["instances"]) == 9 and after["files"] == after["digests"]


def test_a_leased_study_is_not_deleted_until_its_retrieve_ends(archive: Services) -> None:
    with archive.planner.reserve(rd.identifier("STUDY", StudyInstanceUID=A),
                                 Root.STUDY) as instances:
        assert len(instances) == 5
        report = archive.deleter.delete(Level.PATIENT, ["DEL-P1"])
        assert report.leased == [A] and not report.ok
        assert all(i.path.is_file() for i in instances)  # the retrieve can still send them
        assert held(archive)["studies"] == {A, C}  # B, not leased, went
    assert RetrieveLease.select().count(archive.db) == 0  # given back
    assert archive.deleter.delete(Level.STUDY, [A]).ok
    assert held(archive)["studies"] == {C}


def test_an_expired_lease_does_not_hold_a_study(archive: Services) -> None:
    study_id = Study.get(Study.study_instance_uid == A).id
    RetrieveLease.insert(study=study_id, holder="crashed:1",
                         expires_at=now() - timedelta(seconds=1)).execute(archive.db)
    assert archive.deleter.delete(Level.STUDY, [A]).ok
    assert A not in held(archive)["studies"]


def test_a_retrieve_after_a_deletion_finds_nothing_to_send(archive: Services) -> None:
    archive.deleter.delete(Level.STUDY, [A])
    with archive.planner.reserve(rd.identifier("STUDY", StudyInstanceUID=A),
                                 Root.STUDY) as instances:
        assert instances == []


def test_a_file_named_again_by_a_row_is_kept(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    store.open()
    try:
        kept = store.put([b"kept"]).digest
        gone = store.put([b"gone"]).digest
        failing = store.put([b"index down"]).digest

        def index_down(digest: str) -> bool:
            raise RuntimeError("index unavailable")

        assert store.remove_unreferenced(kept, lambda d: True) is False
        assert store.remove_unreferenced(gone, lambda d: False) is True
        with pytest.raises(RuntimeError):
            store.remove_unreferenced(failing, index_down)
        assert store.exists(kept) and not store.exists(gone) and store.exists(failing)
        assert list(store.tmp.iterdir()) == []  # nothing parked is left behind
    finally:
        store.close()


def _again(archive: Services, ds: Dataset) -> str:
    return archive.ingestor.receive(Received(
        str(ds.SOPClassUID), str(ds.SOPInstanceUID), ImplicitVRLittleEndian, encoded(ds),
        Source("T", "127.0.0.1"))).value


def test_an_instance_stored_again_before_its_file_goes_keeps_it(archive: Services) -> None:
    """The same instance arrives while its old copy is being deleted: rows gone, file not
    yet; it finds the file there and indexes it.  Its row must end with its file."""
    ds = corpus()[0]
    uid = str(ds.SOPInstanceUID)
    digest = Instance.get(Instance.sop_instance_uid == uid).digest
    real = archive.store.remove_unreferenced

    def stored_again_first(d: str, referenced: Any) -> bool:
        assert _again(archive, ds) == "stored"
        return real(d, referenced)

    archive.store.remove_unreferenced = stored_again_first  # type: ignore[method-assign]
    archive.deleter.delete(Level.INSTANCE, [uid])
    archive.store.remove_unreferenced = real  # type: ignore[method-assign]
    assert uid in held(archive)["instances"] and archive.store.exists(digest)


def test_an_instance_indexed_again_after_its_file_went_is_written_again(
        archive: Services) -> None:
    """The other order: the arriving copy found the file, then the deletion removed it (no
    row named it yet), then the arriving copy's row was committed: it writes the file again."""
    ds = corpus()[0]
    uid = str(ds.SOPInstanceUID)
    digest = Instance.get(Instance.sop_instance_uid == uid).digest
    study_id = Study.get(Study.study_instance_uid == A).id
    assert remove_from_study(archive.db, study_id, Level.INSTANCE, [uid]) is not None
    index = archive.ingestor.index
    real_add = index.add

    def file_deleted_first(*args: Any, **kwargs: Any) -> None:
        assert archive.store.remove_unreferenced(digest, lambda d: False)  # no row yet
        real_add(*args, **kwargs)

    index.add = file_deleted_first  # type: ignore[method-assign]
    try:
        assert _again(archive, ds) == "stored"
    finally:
        index.add = real_add  # type: ignore[method-assign]
    assert uid in held(archive)["instances"] and archive.store.exists(digest)


def test_a_version_1_index_is_upgraded_and_a_newer_one_refused(tmp_path: Path) -> None:
    services = open_services(build_config({}, tmp_path))
    services.close()
    db_path = tmp_path / "storage" / "index.sqlite"
    with sqlite3.connect(db_path) as con:  # as version 1 left it
        con.execute("DROP TABLE retrieve_lease")
        con.execute("UPDATE schema_info SET version = 1")
    services = open_services(build_config({}, tmp_path))
    try:
        assert SchemaInfo.get().version == 2
        assert RetrieveLease.select().count(services.db) == 0
    finally:
        services.close()
    with sqlite3.connect(db_path) as con:
        con.execute("UPDATE schema_info SET version = 99")
    with pytest.raises(SchemaMismatch, match="newer"):
        open_services(build_config({}, tmp_path))


# --- the command, beside a running node ------------------------------------------------------

def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)


def find_studies(port: int, patient_id: str) -> set[str]:
    ae = AE(ae_title="DELSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientID = patient_id
    query.StudyInstanceUID = ""
    found = set()
    try:
        for status, identifier in reactor_paused(assoc).send_c_find(query,
                                                    StudyRootQueryRetrieveInformationModelFind):
            if status.Status in (0xFF00, 0xFF01):
                found.add(str(identifier.StudyInstanceUID))
    finally:
        assoc.release()
    return found


def test_delete_command_while_serve_runs(node: NodeProcess) -> None:
    send_datasets(node.port, corpus())
    assert find_studies(node.port, "DEL-P1") == {A, B}
    config = str(node.config_path)

    dry = run_cli("delete", "-c", config, "--patient", "DEL-P1", "--dry-run")
    assert dry.returncode == 0 and A in dry.stdout and B in dry.stdout
    assert find_studies(node.port, "DEL-P1") == {A, B}

    done = run_cli("delete", "-c", config, "--study", A)
    assert done.returncode == 0, done.stderr
    assert "5 instances" in done.stdout
    assert find_studies(node.port, "DEL-P1") == {B}
    assert len(node.stored_files()) == 6
    assert f"study {A} deleted" in done.stderr  # logged by UID

    nothing = run_cli("delete", "-c", config, "--study", A)
    assert nothing.returncode == 1 and "no study held matches" in nothing.stderr
    bad = run_cli("delete", "-c", config, "--study", B, "--series", f"{C}.1")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert find_studies(node.port, "DEL-P1") == {B}  # the refused command deleted nothing


def test_delete_during_a_c_get_waits_for_it(node: NodeProcess, tmp_path: Path) -> None:
    """A study a C-GET is sending is left by `delete`; once the retrieve ends it goes."""
    send_datasets(node.port, corpus())
    first_received = threading.Event()
    carry_on = threading.Event()
    received: list[str] = []

    def on_store(event: Any) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        first_received.set()
        carry_on.wait(60)
        return 0x0000

    ae = AE(ae_title="DELGET")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE",
                         ext_neg=[build_role(CTImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    statuses: list[int] = []

    def retrieve() -> None:
        for status, _ in assoc.send_c_get(rd.identifier("STUDY", StudyInstanceUID=C),
                                          StudyRootQueryRetrieveInformationModelGet):
            statuses.append(int(status.Status))

    getter = threading.Thread(target=retrieve)
    getter.start()
    try:
        assert first_received.wait(30)
        refused = run_cli("delete", "-c", str(node.config_path), "--study", C)
        assert refused.returncode == 1
        assert f"study {C} not deleted: a retrieve is sending it" in refused.stderr
    finally:
        carry_on.set()
        getter.join(60)
    assoc.release()
    assert statuses[-1] == 0x0000 and len(received) == 4  # every instance arrived
    done = run_cli("delete", "-c", str(node.config_path), "--study", C)
    assert done.returncode == 0, done.stderr
    assert poll_until(lambda: find_studies(node.port, "DEL-P2") == set(), 10)
