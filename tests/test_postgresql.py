"""The same ingest on PostgreSQL: the schema and the write path run unchanged on it.

Needs a PostgreSQL server on 127.0.0.1:5432 that lets user ``postgres`` in without a password
(override with DICOMNODE_TEST_POSTGRES=postgresql://user:pass@host:port). The test creates and
drops its own database. Skipped when no server answers, except under CI, where it must.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from node.index.models import SCHEMA_VERSION
from tests.conftest import NodeProcess
from tests.dicomdata import make_instance, send_datasets, sha256_file


def pg_rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    import psycopg2

    with psycopg2.connect(url) as conn, conn.cursor() as cursor:
        cursor.execute(sql)
        return list(cursor.fetchall())


def test_ingest_on_postgresql(node_factory: Any, postgres_url: str, tmp_path: Path) -> None:
    node: NodeProcess = node_factory(database=postgres_url).start()
    study = make_instance().StudyInstanceUID
    sent = [make_instance(study=study, series="1.2.3.99.1", InstanceNumber=i,
                          SpecificCharacterSet="ISO_IR 192", PatientName="Ærøskøbing^Åse")
            for i in range(4)]
    assert [s.status for s in send_datasets(node.port, sent)] == [0] * 4
    # The same again: duplicates, nothing new.
    assert [s.status for s in send_datasets(node.port, sent[:2])] == [0, 0]

    rows = pg_rows(postgres_url,
                   "SELECT i.sop_instance_uid, i.digest, p.patient_name FROM instance i"
                   " JOIN series s ON i.series_id = s.id JOIN study st ON s.study_id = st.id"
                   " JOIN patient p ON st.patient_id = p.id")
    assert sorted(r[0] for r in rows) == sorted(str(ds.SOPInstanceUID) for ds in sent)
    assert {r[2] for r in rows} == {"Ærøskøbing^Åse"}
    files = node.stored_files()
    assert sorted(p.name for p in files) == sorted(r[1] for r in rows)
    assert all(sha256_file(p) == p.name for p in files)
    assert pg_rows(postgres_url, "SELECT version FROM schema_info") == [(SCHEMA_VERSION,)]
    assert node.stop() == 0
