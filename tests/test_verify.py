"""``dicom-node verify [--repair]``: missing, corrupt and unindexed files found, and repaired.

The issue's test: a real ``serve`` receives two studies through C-STORE; one stored file is
corrupted, another (the only instance of its study) deleted, and one row deleted so that its
file has no row.  ``verify``, run while the node serves, reports the three (exit 1, SOP Instance
UIDs in the log, no patient data); ``verify --repair`` drops the rows of the missing and corrupt
files (and the study left empty), moves the corrupt file to the quarantine and indexes the
orphan again; the node's own C-FIND then answers accordingly, and a second ``verify`` finds
nothing.  Orphans that cannot be indexed go to the quarantine too; the row walk pages through
a prefix in chunks and meets every row once.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
)

from node.config import DatabaseURL
from node.dicom.header import InstanceHeader
from node.index.database import connect, ensure_schema
from node.index.maintenance import rows_with_prefix
from node.index.writer import IndexWriter, Source
from tests.conftest import REPO, NodeProcess
from tests.dicomdata import PREFIX, make_instance, no_delay, reactor_paused, send_datasets

PATIENT_NAME, PATIENT_ID = "Verify^Victoria", "VERIFY-42"
PG_SERVER = os.environ.get("DICOMNODE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def counts(stdout: str) -> dict[str, int]:
    """The figures of verify's summary line, by name."""
    return {name: int(n) for n, name in re.findall(
        r"(\d+) (files missing|files corrupt|files without row|rows with an invalid digest)",
        stdout)}


def studies(node: NodeProcess) -> dict[str, int]:
    """StudyInstanceUID -> Number of Study Related Instances, as the node's C-FIND answers."""
    ae = AE(ae_title="VERIFYSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    no_delay(assoc)
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = None
    query.NumberOfStudyRelatedInstances = None
    found = {}
    try:
        for rsp, identifier in reactor_paused(assoc).send_c_find(
                query, StudyRootQueryRetrieveInformationModelFind):
            if int(rsp.Status) in (0xFF00, 0xFF01):
                assert identifier is not None
                found[str(identifier.StudyInstanceUID)] = int(
                    identifier.NumberOfStudyRelatedInstances)
            else:
                assert int(rsp.Status) == 0
    finally:
        assoc.release()
    return found


def test_help() -> None:
    done = cli("verify", "--help")
    assert done.returncode == 0
    assert "--repair" in done.stdout and "-c PATH, --config PATH" in done.stdout


def test_verify_and_repair_beside_a_serving_node(node_factory: Any) -> None:
    node: NodeProcess = node_factory().start()
    big, small = f"{PREFIX}81", f"{PREFIX}82"
    sent = [make_instance(study=big, series=f"{big}.1", sop_instance=f"{big}.1.{n}",
                          InstanceNumber=n, PatientName=PATIENT_NAME, PatientID=PATIENT_ID)
            for n in range(1, 6)]
    sent.append(make_instance(study=small, series=f"{small}.1", sop_instance=f"{small}.1.1",
                              PatientName=PATIENT_NAME, PatientID=PATIENT_ID))
    assert [s.status for s in send_datasets(node.port, sent)] == [0] * 6
    digest = dict(node.rows("SELECT sop_instance_uid, digest FROM instance"))
    objects = node.storage / "objects"

    def path(uid: str) -> Path:
        d = str(digest[uid])
        return objects / d[:2] / d[2:4] / d

    corrupt, missing, orphan = f"{big}.1.1", f"{small}.1.1", f"{big}.1.3"
    data = bytearray(path(corrupt).read_bytes())
    data[200] ^= 0x01  # one bit inside the File Meta: the file still parses
    path(corrupt).write_bytes(bytes(data))
    path(missing).unlink()
    node.rows("DELETE FROM instance WHERE sop_instance_uid = ?", orphan)
    assert node.rows("SELECT COUNT(*) FROM instance") == [(5,)]

    done = cli("verify", "-c", str(node.config_path))
    assert done.returncode == 1, done.stdout + done.stderr
    assert counts(done.stdout) == {"files missing": 1, "files corrupt": 1,
                                   "files without row": 1, "rows with an invalid digest": 0}
    assert "checked 5 rows and 5 files" in done.stdout
    assert "3 problems not repaired (--repair fixes them)" in done.stderr
    for uid in (corrupt, missing):
        assert uid in done.stderr
    assert digest[orphan] in done.stderr
    assert PATIENT_NAME not in done.stderr + done.stdout
    assert PATIENT_ID not in done.stderr + done.stdout
    assert path(corrupt).exists()  # without --repair nothing changes
    assert node.rows("SELECT COUNT(*) FROM instance") == [(5,)]

    done = cli("verify", "--repair", "-c", str(node.config_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "repaired 3 (1 files moved to quarantine)" in done.stdout
    log = done.stderr
    assert re.search(rf"INFO .*dropped the index row of SOP Instance UID {re.escape(missing)}"
                     r": its file \w+ is missing", log)
    assert re.search(rf"INFO .*dropped the index row of SOP Instance UID {re.escape(corrupt)}"
                     r": its file \w+ was corrupt", log)
    assert re.search(rf"INFO .*indexed file {digest[orphan]} again as SOP Instance UID "
                     rf"{re.escape(orphan)}", log)
    assert PATIENT_NAME not in log and PATIENT_ID not in log
    # The corrupt file is kept aside, not deleted.
    quarantined = node.storage / "quarantine" / digest[corrupt]
    assert quarantined.read_bytes() == bytes(data)
    assert not path(corrupt).exists()
    rows = dict(node.rows("SELECT sop_instance_uid, source_ae FROM instance"))
    assert set(rows) == {f"{big}.1.{n}" for n in (2, 3, 4, 5)}
    assert rows[orphan] == "verify"
    # The study whose only instance was lost is gone from the index and from C-FIND.
    assert node.rows("SELECT COUNT(*) FROM study WHERE study_instance_uid = ?", small) == [(0,)]
    assert node.rows("SELECT COUNT(*) FROM series") == [(1,)]
    assert studies(node) == {big: 4}

    done = cli("verify", "-c", str(node.config_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert set(counts(done.stdout).values()) == {0}
    assert "checked 4 rows and 4 files" in done.stdout
    # The node kept serving throughout, and takes the lost instance back when it is resent.
    assert [s.status for s in send_datasets(node.port, [sent[-1]])] == [0]
    assert studies(node) == {big: 4, small: 1}


def test_orphans_that_cannot_be_indexed_go_to_quarantine(node_factory: Any) -> None:
    node: NodeProcess = node_factory().start()
    assert [s.status for s in send_datasets(node.port, [make_instance()])] == [0]
    assert node.stop() == 0
    objects = node.storage / "objects"
    garbage = b"neither DICOM nor indexed" * 4
    name = hashlib.sha256(garbage).hexdigest()
    (objects / name[:2] / name[2:4]).mkdir(parents=True, exist_ok=True)
    (objects / name[:2] / name[2:4] / name).write_bytes(garbage)
    misnamed = "ab" * 32  # its content does not hash to its name
    (objects / "ab" / "ab").mkdir(parents=True, exist_ok=True)
    (objects / "ab" / "ab" / misnamed).write_bytes(b"something else")

    done = cli("verify", "--repair", "-c", str(node.config_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert counts(done.stdout)["files without row"] == 2
    assert "repaired 2 (2 files moved to quarantine)" in done.stdout
    assert sorted(p.name for p in (node.storage / "quarantine").iterdir()) == sorted(
        [name, misnamed])
    assert "it cannot be indexed: not a DICOM file" in done.stderr
    assert "its content does not hash to its name" in done.stderr
    assert node.rows("SELECT COUNT(*) FROM instance") == [(1,)]


def test_rows_naming_no_possible_file(node_factory: Any) -> None:
    node: NodeProcess = node_factory().start()
    sent = [make_instance(), make_instance()]
    assert [s.status for s in send_datasets(node.port, sent)] == [0, 0]
    assert node.stop() == 0
    rows = dict(node.rows("SELECT sop_instance_uid, digest FROM instance"))
    first, second = (str(ds.SOPInstanceUID) for ds in sent)
    # One digest no prefix walk meets (upper case); one inside the range of the last prefix
    # walked, so its lost file (in an earlier prefix) is met first and must not be kept out
    # of the index by it.
    node.rows("UPDATE instance SET digest = ? WHERE sop_instance_uid = ?",
              rows[first].upper(), first)
    last = "ff" if not rows[second].startswith("ff") else "fe"
    node.rows("UPDATE instance SET digest = ? WHERE sop_instance_uid = ?",
              last + "z" * 62, second)

    done = cli("verify", "-c", str(node.config_path))
    assert done.returncode == 1
    found = counts(done.stdout)
    assert (found["rows with an invalid digest"], found["files without row"]) == (2, 2)
    done = cli("verify", "--repair", "-c", str(node.config_path))
    assert done.returncode == 0, done.stdout + done.stderr
    # The rows are dropped, and the files they lost are indexed again.
    assert dict(node.rows("SELECT sop_instance_uid, digest FROM instance")) == rows
    assert set(counts(cli("verify", "-c", str(node.config_path)).stdout).values()) == {0}


def test_rows_of_a_prefix_are_read_in_chunks_each_once(tmp_path: Path) -> None:
    db = connect(DatabaseURL("sqlite", tmp_path / "index.sqlite"))
    db.connect()
    ensure_schema(db)
    writer = IndexWriter(db)
    # Inserted out of order, with neighbours on either side of the prefix.
    digests = [*(f"7f{n:062x}" for n in (5, 1, 6, 0, 3, 2, 4)), "7e" + "f" * 62, "80" + "0" * 62]
    for n, d in enumerate(digests):
        header = InstanceHeader(sop_class_uid="1.2.3", sop_instance_uid=f"1.2.3.{n}",
                                study_instance_uid="1.2.4", series_instance_uid="1.2.5")
        writer.add(header, d, 1, "1.2.840.10008.1.2", Source("TEST", ""))
    found = [row.digest for row in rows_with_prefix(db, "7f", chunk=2)]
    db.close()
    assert found == sorted(d for d in digests if d.startswith("7f"))


# --- PostgreSQL with a collation that is not bytewise -------------------------------------


# libc's en_US ignores punctuation at first; ICU's sorts it before digits: either way a range
# '09' <= digest < '0:' is empty under them.
COLLATIONS = [
    "LC_COLLATE 'en_US.UTF-8' LC_CTYPE 'en_US.UTF-8'",
    "LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'",
]


@pytest.fixture
def postgres_en_us() -> Iterator[str]:
    """A database whose collation is en_US.UTF-8, as many PostgreSQL installations default to:
    it ignores punctuation when comparing strings, unlike SQLite and the C locale."""
    psycopg2 = pytest.importorskip("psycopg2")
    try:
        admin = psycopg2.connect(f"{PG_SERVER}/postgres", connect_timeout=3)
    except psycopg2.OperationalError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL not reachable at {PG_SERVER}: {exc}")
        pytest.skip(f"PostgreSQL not reachable at {PG_SERVER}")
    admin.autocommit = True
    name = f"dicomnode_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.cursor() as cursor:
            for collation in COLLATIONS:
                try:
                    cursor.execute(f"CREATE DATABASE \"{name}\" TEMPLATE template0"
                                   f" ENCODING 'UTF8' {collation}")
                    break
                except psycopg2.Error:  # this server lacks that locale: try the next
                    continue
            else:
                pytest.skip("PostgreSQL here has no en_US collation (libc or ICU)")
        yield f"{PG_SERVER}/{name}"
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def test_verify_on_postgresql_with_a_locale_collation(node_factory: Any,
                                                      postgres_en_us: str) -> None:
    node: NodeProcess = node_factory(database=postgres_en_us).start()
    # Until some digest lies under a prefix such as '09', whose naive upper bound '0:' a
    # locale collation sorts before '09…' (it ignores the colon).
    digests: list[str] = []
    while len(digests) < 320 and not any(d[1] == "9" for d in digests):
        sent = send_datasets(node.port, [make_instance() for _ in range(16)])
        assert {s.status for s in sent} == {0}
        digests = [d for (d,) in _pg_rows(postgres_en_us, 'SELECT "digest" FROM "instance"')]
    assert any(d[1] == "9" for d in digests)
    done = cli("verify", "-c", str(node.config_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"checked {len(digests)} rows and {len(digests)} files" in done.stdout
    assert set(counts(done.stdout).values()) == {0}

    # A lost file under such a prefix is found and its row dropped.
    lost = next(d for d in digests if d[1] == "9")
    (node.storage / "objects" / lost[:2] / lost[2:4] / lost).unlink()
    done = cli("verify", "--repair", "-c", str(node.config_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert counts(done.stdout)["files missing"] == 1
    assert counts(done.stdout)["files without row"] == 0
    assert lost not in [d for (d,) in _pg_rows(postgres_en_us, 'SELECT "digest" FROM "instance"')]


def _pg_rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    import psycopg2

    with psycopg2.connect(url) as conn, conn.cursor() as cursor:
        cursor.execute(sql)
        return list(cursor.fetchall())
