"""``dicom-node reindex``: the store alone rebuilds an index that answers C-FIND as before.

The main test is the issue's: a real ``serve`` receives the C-FIND corpus through C-STORE and
answers a set of queries at every level of both roots; it is stopped, its database deleted,
``reindex`` run, ``serve`` started again, and the same queries must get the same answers.  Other
tests: reindex refuses while serve holds the store; corrupt and non-DICOM files go to the
quarantine; two files of one SOP Instance UID are resolved by the duplicates policy, oldest
file first; a stale write-ahead log of the lost database is not replayed into the new one; and
the same on PostgreSQL, where the tables are emptied and filled in one transaction.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from node.dicom.part10 import file_meta_bytes
from node.store import Store
from tests import findcorpus as fc
from tests.conftest import REPO, NodeProcess, sqlite_only
from tests.dicomdata import CT_IMAGE, make_instance, no_delay, reactor_paused, send_datasets

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR")

MODELS = {"patient": PatientRootQueryRetrieveInformationModelFind,
          "study": StudyRootQueryRetrieveInformationModelFind}
PENDING = (0xFF00, 0xFF01)

PATIENT_KEYS = ["PatientID", "PatientName", "PatientBirthDate", "PatientSex",
                "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
                "NumberOfPatientRelatedInstances"]
STUDY_KEYS = ["StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
              "StudyDescription", "ReferringPhysicianName", "PatientID", "PatientName",
              "ModalitiesInStudy", "SOPClassesInStudy", "NumberOfStudyRelatedSeries",
              "NumberOfStudyRelatedInstances", "InstitutionName"]
SERIES_KEYS = ["SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDate", "SeriesTime",
               "SeriesDescription", "BodyPartExamined", "NumberOfSeriesRelatedInstances"]
IMAGE_KEYS = ["SOPInstanceUID", "SOPClassUID", "InstanceNumber", "Rows"]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def _query(level: str, keys: list[str], **values: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for key in keys:
        setattr(ds, key, values.get(key) or None)
    for key, value in values.items():
        setattr(ds, key, value)
    return ds


def _canonical(identifier: Dataset) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((str(e.tag), str(e.value)) for e in identifier))


def queries() -> list[tuple[str, Dataset]]:
    """Every level of both roots, matching rules the index answers, every series and study."""
    found = [
        ("patient", _query("PATIENT", PATIENT_KEYS)),
        ("patient", _query("PATIENT", PATIENT_KEYS, PatientName="m*")),
        ("study", _query("STUDY", STUDY_KEYS)),
        ("study", _query("STUDY", STUDY_KEYS, StudyDate="20240115-20240131")),
        ("study", _query("STUDY", STUDY_KEYS, ModalitiesInStudy="MR")),
        ("study", _query("STUDY", STUDY_KEYS, AccessionNumber="ACC*")),
    ]
    for study in fc.STUDIES.values():
        found.append(("study", _query("SERIES", SERIES_KEYS, StudyInstanceUID=study.uid)))
        patient_id = fc.PATIENTS[study.patient].patient_id
        found.append(("patient", _query("STUDY", STUDY_KEYS[:7], PatientID=patient_id)))
    for series in fc.SERIES.values():
        found.append(("study", _query("IMAGE", IMAGE_KEYS,
                                      StudyInstanceUID=fc.STUDIES[series.study].uid,
                                      SeriesInstanceUID=fc.series_uid(series))))
    return found


def answers(node: NodeProcess) -> list[tuple[int, list[tuple[tuple[str, str], ...]]]]:
    """Each query's final status and its matches, in a canonical order."""
    ae = AE(ae_title="REINDEXSCU")
    for model in MODELS.values():
        ae.add_requested_context(model)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    no_delay(assoc)
    result = []
    try:
        for root, query in queries():
            matches, status = [], None
            for rsp, identifier in reactor_paused(assoc).send_c_find(query, MODELS[root]):
                code = int(rsp.Status)
                if code in PENDING:
                    assert identifier is not None
                    matches.append(_canonical(identifier))
                else:
                    status = code
            assert status is not None, "no final response"
            result.append((status, sorted(matches)))
    finally:
        assoc.release()
    return result


def lose_database(node: NodeProcess) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{node.db_path}{suffix}").unlink(missing_ok=True)


def test_help() -> None:
    done = cli("reindex", "--help")
    assert done.returncode == 0
    assert "-c PATH, --config PATH" in done.stdout and "quarantine" in done.stdout


@sqlite_only
def test_reindex_after_losing_the_database_gives_the_same_answers(node_factory: Any) -> None:
    node: NodeProcess = node_factory().start()
    fc.load(node.port, list(fc.datasets()))
    before = answers(node)
    # The answers are the corpus, not empty lists that would trivially compare equal.
    assert all(status == 0 for status, _ in before)
    images = sum(len(m) for (status, m), (_, q) in zip(before, queries(), strict=True)
                 if q.QueryRetrieveLevel == "IMAGE")
    assert images == len(fc.all_instances())
    files = node.stored_files()
    mtimes = {p.name: p.stat().st_mtime_ns for p in files}
    assert node.stop() == 0

    lose_database(node)
    done = cli("reindex", "-c", str(node.config_path))
    assert done.returncode == 0, done.stderr
    assert f"{len(files)} files, {len(files)} instances indexed" in done.stdout
    assert "0 moved to quarantine" in done.stdout
    assert not Path(f"{node.db_path}.reindex").exists()

    # What the files cannot tell: the sender (recorded as "reindex") and the arrival time
    # (the file's modification time; a study's is its first instance's).
    rows = node.rows("SELECT digest, source_ae, source_address, received_at FROM instance")
    assert {r[1] for r in rows} == {"reindex"} and {r[2] for r in rows} == {""}
    for digest, _, _, received in rows:
        expected = datetime.fromtimestamp(mtimes[digest] / 1e9, UTC).replace(tzinfo=None)
        assert abs(datetime.fromisoformat(received) - expected).total_seconds() < 1e-3
    studies = node.rows(
        "SELECT st.received_at, MIN(i.received_at) FROM study st JOIN series s ON"
        " s.study_id = st.id JOIN instance i ON i.series_id = s.id GROUP BY st.id")
    assert len(studies) == len(fc.STUDIES)
    assert all(first == earliest for first, earliest in studies)

    node.start()
    assert answers(node) == before
    assert node.stored_files() == files  # the start-up sweep found every file indexed


@sqlite_only
def test_reindex_refuses_while_serve_holds_the_store(node_factory: Any) -> None:
    node: NodeProcess = node_factory().start()
    assert [s.status for s in send_datasets(node.port, [make_instance()])] == [0]
    inode = node.db_path.stat().st_ino
    done = cli("reindex", "-c", str(node.config_path))
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "in use by another process" in lines[0], done.stderr
    assert "Traceback" not in done.stderr
    assert node.db_path.stat().st_ino == inode  # the index was not touched
    assert node.rows("SELECT COUNT(*) FROM instance") == [(1,)]


def _put(storage: Path, ds: Dataset, mtime: float) -> str:
    """Add a file for ``ds`` to the store as the node writes them; returns its digest."""
    parts = [file_meta_bytes(ds.SOPClassUID, ds.SOPInstanceUID, ImplicitVRLittleEndian),
             fc.encoded(ds)]  # encoded in implicit VR little endian
    store = Store(storage)
    store.open()
    try:
        digest = store.put(parts).digest
    finally:
        store.close()
    os.utime(store.path_of(digest), (mtime, mtime))
    return digest


def _foreign_wal(path: Path) -> None:
    """Leave a valid write-ahead log of another database at ``path``-wal, as a crash of the
    lost database could: replayed into the new file, it would overwrite its pages."""
    other = path.with_name("other.sqlite")
    conn = sqlite3.connect(other)
    conn.execute("PRAGMA journal_mode=wal")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute("CREATE TABLE junk (x TEXT)")
    conn.executemany("INSERT INTO junk VALUES (?)", [("x" * 500,)] * 200)
    conn.commit()
    Path(f"{path}-wal").write_bytes(Path(f"{other}-wal").read_bytes())
    conn.close()
    other.unlink()


@sqlite_only
def test_corrupt_and_duplicate_files(node_factory: Any) -> None:
    node: NodeProcess = node_factory().start()
    study, series = f"{fc.ROOT}9001", f"{fc.ROOT}9001.1"
    sent = [make_instance(study=study, series=series, sop_instance=f"{series}.{n}",
                          InstanceNumber=n) for n in (1, 2, 3)]
    assert [s.status for s in send_datasets(node.port, sent)] == [0, 0, 0]
    by_uid = dict(node.rows("SELECT sop_instance_uid, digest FROM instance"))
    assert node.stop() == 0
    store = Store(node.storage)

    # Instance 1's file is corrupted; a file of garbage sits in the store under its own hash.
    corrupt = store.path_of(by_uid[f"{series}.1"])
    data = bytearray(corrupt.read_bytes())
    data[-1] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    garbage = b"not DICOM at all" * 10
    garbage_digest = hashlib.sha256(garbage).hexdigest()
    garbage_path = store.path_of(garbage_digest)
    garbage_path.parent.mkdir(parents=True, exist_ok=True)
    garbage_path.write_bytes(garbage)
    # Instance 2 again with other content, in a file one hour newer than the first.
    original = store.path_of(by_uid[f"{series}.2"])
    newer = _put(node.storage, make_instance(study=study, series=series,
                                             sop_instance=f"{series}.2", InstanceNumber=22),
                 original.stat().st_mtime + 3600)

    lose_database(node)
    _foreign_wal(node.db_path)
    done = cli("reindex", "-c", str(node.config_path))
    assert done.returncode == 1, done.stderr  # files went to the quarantine
    assert "5 files, 2 instances indexed, 1 duplicates left unindexed, 2 moved to quarantine" \
        in done.stdout
    assert "content does not hash to its name" in done.stderr
    assert "not a DICOM file" in done.stderr
    quarantined = sorted(p.name for p in (node.storage / "quarantine").iterdir())
    assert quarantined == sorted([corrupt.name, garbage_digest])
    assert not corrupt.exists() and not garbage_path.exists()
    with sqlite3.connect(node.db_path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("PRAGMA journal_mode").fetchall() == [("wal",)]
    rows = dict(node.rows("SELECT sop_instance_uid, digest FROM instance"))
    # duplicates: keep — the older file holds the UID, as it did on arrival.
    assert rows == {f"{series}.2": original.name, f"{series}.3": by_uid[f"{series}.3"]}

    # duplicates: replace — the newer file wins, as it would have on arrival.
    node.settings["duplicates"] = "replace"
    node.write_config()
    done = cli("reindex", "-c", str(node.config_path))
    assert done.returncode == 0, done.stderr
    assert "3 files, 2 instances indexed, 1 duplicates left unindexed" in done.stdout
    rows = dict(node.rows("SELECT sop_instance_uid, digest FROM instance"))
    assert rows[f"{series}.2"] == newer
    assert node.rows("SELECT instance_number FROM instance WHERE sop_instance_uid = ?",
                     f"{series}.2") == [(22,)]


def test_reindex_of_an_empty_or_missing_store(tmp_path: Path) -> None:
    config = tmp_path / "node.yaml"
    config.write_text("storage: nothing-here\nport: 0\n")
    done = cli("reindex", "-c", str(config))
    assert done.returncode == 1
    assert "no store at" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "nothing-here").exists()


# --- PostgreSQL ---------------------------------------------------------------------------


def test_reindex_on_postgresql(node_factory: Any, postgres_url: str) -> None:
    import psycopg2

    node: NodeProcess = node_factory(database=postgres_url).start()
    fc.load(node.port, list(fc.datasets()))
    # An instance whose row goes with the rest, to see it come back.
    extra = make_instance(sop_class=CT_IMAGE, PatientID="PG-1")
    assert [s.status for s in send_datasets(node.port, [extra])] == [0]
    before = answers(node)
    assert node.stop() == 0
    with psycopg2.connect(postgres_url) as conn, conn.cursor() as cursor:
        cursor.execute('DELETE FROM "instance"; DELETE FROM "series"; DELETE FROM "study";'
                       ' DELETE FROM "patient"')
    done = cli("reindex", "-c", str(node.config_path))
    assert done.returncode == 0, done.stderr
    count = len(fc.all_instances()) + 1
    assert f"{count} files, {count} instances indexed" in done.stdout
    with psycopg2.connect(postgres_url) as conn, conn.cursor() as cursor:
        cursor.execute('SELECT COUNT(*), MIN("source_ae"), MAX("source_ae") FROM "instance"')
        assert cursor.fetchone() == (count, "reindex", "reindex")
        cursor.execute('SELECT COUNT(*) FROM "instance" WHERE "sop_instance_uid" = %s',
                       (str(extra.SOPInstanceUID),))
        assert cursor.fetchone() == (1,)
    node.start()
    assert answers(node) == before
