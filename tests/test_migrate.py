"""`dicom-node migrate --to postgresql://…`: the index copied from SQLite answers the same on
PostgreSQL, new instances get new ids, and unsafe copies are refused."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
)

from tests.conftest import REPO, NodeProcess
from tests.dicomdata import PREFIX, make_instance, reactor_paused, send_datasets
from tests.test_postgresql import pg_rows


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)


def corpus() -> list[Dataset]:
    datasets = []
    for p in range(3):
        for s in range(2):
            study = f"{PREFIX}95.{p}.{s}"
            datasets += [make_instance(study=study, series=f"{study}.1",
                                       sop_instance=f"{study}.1.{n}", PatientID=f"MIG-{p}",
                                       PatientName=f"Migr^Patient{p}", InstanceNumber=n)
                         for n in range(1, 4)]
    return datasets


def answers(port: int) -> list[tuple[str, ...]]:
    """Every instance, as a Patient Root IMAGE query with counts answers it."""
    ae = AE(ae_title="MIGSCU")
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelFind)
    found: list[tuple[str, ...]] = []
    for patient in ("MIG-0", "MIG-1", "MIG-2"):
        assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
        assert assoc.is_established
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.PatientID = patient
        query.PatientName = ""
        query.StudyInstanceUID = ""
        query.NumberOfStudyRelatedInstances = ""
        for status, identifier in reactor_paused(assoc).send_c_find(
                query, PatientRootQueryRetrieveInformationModelFind):
            if status.Status == 0xFF00:
                found.append((str(identifier.PatientID), str(identifier.PatientName),
                              str(identifier.StudyInstanceUID),
                              str(identifier.NumberOfStudyRelatedInstances)))
        assoc.release()
    return sorted(found)


def test_migrate_to_postgresql(node_factory: Any, postgres_url: str) -> None:
    node: NodeProcess = node_factory().start()
    send_datasets(node.port, corpus())
    before = answers(node.port)
    assert len(before) == 6
    config = str(node.config_path)

    busy = run_cli("migrate", "-c", config, "--to", postgres_url)
    assert busy.returncode == 1 and "stop it before migrating" in busy.stderr
    assert busy.stderr.count("\n") == 1

    assert node.stop() == 0
    done = run_cli("migrate", "-c", config, "--to", postgres_url)
    assert done.returncode == 0, done.stderr
    assert "6 study" in done.stdout and "18 instance" in done.stdout

    again = run_cli("migrate", "-c", config, "--to", postgres_url)
    assert again.returncode == 1 and "holds index rows already" in again.stderr

    node.settings["database"] = postgres_url
    node.start()
    assert answers(node.port) == before
    # New rows take ids after the copied ones (the sequences were moved on).
    extra = make_instance(study=f"{PREFIX}95.0.0", series=f"{PREFIX}95.0.0.1",
                          sop_instance=f"{PREFIX}95.0.0.1.9", PatientID="MIG-0",
                          PatientName="Migr^Patient0", InstanceNumber=9)
    assert send_datasets(node.port, [extra])[0].status == 0
    ids = pg_rows(postgres_url, "SELECT id FROM instance ORDER BY id")
    assert len(ids) == 19 and ids[-1][0] == 19
    assert node.stop() == 0


def test_migrate_refuses_a_target_that_is_not_postgresql(node_factory: Any) -> None:
    node: NodeProcess = node_factory()
    node.storage.joinpath("objects").mkdir(parents=True)
    node.write_config()
    result = run_cli("migrate", "-c", str(node.config_path), "--to", "mysql://x/y")
    assert result.returncode == 2 and "--to: database: unsupported URL" in result.stderr
