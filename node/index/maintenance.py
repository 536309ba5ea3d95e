"""Index reads and writes the maintenance commands need beyond the ingest path.

Verify streams the instance rows of one digest prefix at a time (keyset pagination: bounded
memory, and safe to interleave with writes on the same connection), and drops rows whose file is
gone.  Reindex lists the store's files in a temporary table so it can index them in the order
they were written, whatever the archive's size.  Stats counts.  Every statement goes through
peewee's query builder or the database's own parameter style, so SQLite and PostgreSQL both run
it unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from peewee import JOIN, Database, fn

from node.index.models import Instance, Patient, RetrieveLease, Series, Study
from node.index.writer import in_digest_prefix

PREFIXES = [f"{n:02x}" for n in range(256)]  # the store's first fan-out level
CHUNK = 1000
FILE_LIST = "reindex_file"
_FILE_ROWS_PER_INSERT = 300  # 3 parameters each: under SQLite's old limit of 999


@dataclass(frozen=True)
class IndexedFile:
    """One instance row as verify sees it: which row, which instance, which file."""

    id: int
    sop_instance_uid: str
    digest: str


def execute(db: Database, sql: str, params: Sequence[object] = ()) -> Any:
    """Run one SQL statement written for ``db`` (its parameter style); returns the cursor."""
    return db.execute_sql(sql, params)  # type: ignore[no-untyped-call]


def count_instances(db: Database) -> int:
    return int(Instance.select().count(db))


def rows_with_prefix(db: Database, prefix: str, chunk: int = CHUNK) -> Iterator[IndexedFile]:
    """The instance rows whose digest starts with ``prefix``, in digest order, ``chunk`` rows
    per SELECT."""
    return _pages(db, in_digest_prefix(prefix), by_digest=True, chunk=chunk)


def all_rows(db: Database, chunk: int = CHUNK) -> Iterator[IndexedFile]:
    """Every instance row, in id order, ``chunk`` rows per SELECT."""
    return _pages(db, None, by_digest=False, chunk=chunk)


def _pages(db: Database, condition: Any, by_digest: bool, chunk: int) -> Iterator[IndexedFile]:
    """Rows read a page at a time, each page after the last key seen (keyset pagination:
    every SELECT is an index range, however deep into the table)."""
    key = Instance.digest if by_digest else Instance.id
    last: str | int = "" if by_digest else 0
    while True:
        after = key > last
        query = (
            Instance.select(Instance.id, Instance.sop_instance_uid, Instance.digest)
            .where(after if condition is None else condition & after)
            .order_by(key)
            .limit(chunk)
            .tuples()
        )
        rows = [IndexedFile(int(i), str(u), str(d))
                for i, u, d in cast(Iterable[tuple[int, str, str]], query.execute(db))]
        yield from rows
        if len(rows) < chunk:
            return
        last = rows[-1].digest if by_digest else rows[-1].id


def row_by_id(db: Database, row_id: int) -> IndexedFile | None:
    """The row as it is now (another process may have replaced or dropped it meanwhile)."""
    query = (
        Instance.select(Instance.id, Instance.sop_instance_uid, Instance.digest)
        .where(Instance.id == row_id)
        .tuples()
    )
    for i, u, d in cast(Iterable[tuple[int, str, str]], query.execute(db)):
        return IndexedFile(int(i), str(u), str(d))
    return None


def row_by_uid(db: Database, sop_instance_uid: str) -> IndexedFile | None:
    query = (
        Instance.select(Instance.id, Instance.sop_instance_uid, Instance.digest)
        .where(Instance.sop_instance_uid == sop_instance_uid)
        .tuples()
    )
    for i, u, d in cast(Iterable[tuple[int, str, str]], query.execute(db)):
        return IndexedFile(int(i), str(u), str(d))
    return None


def is_indexed(db: Database, digest: str) -> bool:
    """True when some instance row names the file ``digest``."""
    return bool(Instance.select(Instance.id).where(Instance.digest == digest).exists(db))


def drop_instance(db: Database, row: IndexedFile) -> bool:
    """Delete ``row`` if it still names the same file, and its series, study and patient when
    nothing is left under them, in one transaction.  False when the row had changed.

    A C-FIND must not answer a study or series without instances (PS3.4 C.6.1.1: every entity
    of the model is reached through the instances it holds).
    """
    with db.atomic():
        found = (
            Instance.select(Instance.series)
            .where((Instance.id == row.id) & (Instance.digest == row.digest))
            .tuples()
        )
        series_ids = [int(s) for (s,) in cast(Iterable[tuple[int]], found.execute(db))]
        if not series_ids:
            return False
        Instance.delete().where(Instance.id == row.id).execute(db)
        prune(db, series_ids[0])
    return True


def prune(db: Database, series_id: int) -> None:
    """Remove the series if it holds no instance, then its study and patient if left empty."""
    if Instance.select(Instance.id).where(Instance.series == series_id).exists(db):
        return
    study_id = Series.select(Series.study).where(Series.id == series_id).scalar(db)
    Series.delete().where(Series.id == series_id).execute(db)
    if study_id is None or Series.select(Series.id).where(Series.study == study_id).exists(db):
        return
    patient_id = Study.select(Study.patient).where(Study.id == study_id).scalar(db)
    Study.delete().where(Study.id == study_id).execute(db)
    if patient_id is None or Study.select(Study.id).where(Study.patient == patient_id).exists(db):
        return
    Patient.delete().where(Patient.id == patient_id).execute(db)


# --- reindex ---------------------------------------------------------------------------------


def truncate_index(db: Database) -> None:
    """Empty the four level tables and the leases on them (the schema version row stays)."""
    tables = [m._meta.table_name for m in (RetrieveLease, Instance, Series, Study, Patient)]
    if db.param == "?":  # SQLite has no TRUNCATE; children first for the foreign keys
        for table in tables:
            execute(db, f'DELETE FROM "{table}"')
    else:
        quoted = ", ".join(f'"{table}"' for table in tables)
        execute(db, f"TRUNCATE {quoted} RESTART IDENTITY")


def create_file_list(db: Database) -> None:
    """A temporary table of the store's files: digest, modification time (ns), size."""
    execute(db, f'CREATE TEMPORARY TABLE "{FILE_LIST}" ("digest" VARCHAR(64) PRIMARY KEY,'
                ' "mtime_ns" BIGINT NOT NULL, "size" BIGINT NOT NULL)')
    execute(db, f'CREATE INDEX "{FILE_LIST}_order" ON "{FILE_LIST}" ("mtime_ns", "digest")')


def add_to_file_list(db: Database, files: Sequence[tuple[str, int, int]]) -> None:
    """Record (digest, mtime_ns, size) rows."""
    for start in range(0, len(files), _FILE_ROWS_PER_INSERT):
        batch = files[start:start + _FILE_ROWS_PER_INSERT]
        slots = ", ".join(f"({db.param}, {db.param}, {db.param})" for _ in batch)
        params: list[Any] = [value for row in batch for value in row]
        execute(db, f'INSERT INTO "{FILE_LIST}" ("digest", "mtime_ns", "size") VALUES {slots}',
                params)


def file_list_count(db: Database) -> int:
    cursor = execute(db, f'SELECT COUNT(*) FROM "{FILE_LIST}"')
    return int(cursor.fetchone()[0])


def files_in_order(db: Database, chunk: int = CHUNK) -> Iterator[tuple[str, int, int]]:
    """(digest, mtime_ns, size) of the listed files, oldest first (ties by digest)."""
    p = db.param
    select = f'SELECT "digest", "mtime_ns", "size" FROM "{FILE_LIST}"'
    order = f' ORDER BY "mtime_ns", "digest" LIMIT {p}'
    last: tuple[int, str] | None = None
    while True:
        if last is None:
            cursor = execute(db, select + order, (chunk,))
        else:
            after = f' WHERE "mtime_ns" > {p} OR ("mtime_ns" = {p} AND "digest" > {p})'
            cursor = execute(db, select + after + order, (last[0], last[0], last[1], chunk))
        rows = [(str(d), int(m), int(s)) for d, m, s in cursor.fetchall()]
        yield from rows
        if len(rows) < chunk:
            return
        last = (rows[-1][1], rows[-1][0])


def drop_file_list(db: Database) -> None:
    execute(db, f'DROP TABLE "{FILE_LIST}"')


def received_at_of(db: Database, sop_instance_uid: str) -> datetime | None:
    value = (
        Instance.select(Instance.received_at)
        .where(Instance.sop_instance_uid == sop_instance_uid)
        .scalar(db)
    )
    return cast(datetime | None, value)


def set_received_at(db: Database, digest: str, when: datetime) -> None:
    """Date the instance stored in file ``digest`` (reindex: the file's modification time)."""
    Instance.update(received_at=when).where(Instance.digest == digest).execute(db)


def date_studies_by_instances(db: Database) -> None:
    """Each study's received time becomes that of its first instance (one statement)."""
    first = (
        Instance.select(fn.MIN(Instance.received_at))
        .join(Series)
        .where(Series.study == Study.id)
    )
    Study.update(received_at=first).execute(db)


# --- stats -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModalityCount:
    modality: str
    studies: int
    series: int
    instances: int


def level_counts(db: Database) -> dict[str, int]:
    """Rows per level of the model: patients, studies, series, instances."""
    return {
        "patients": int(Patient.select().count(db)),
        "studies": int(Study.select().count(db)),
        "series": int(Series.select().count(db)),
        "instances": int(Instance.select().count(db)),
    }


def indexed_bytes(db: Database) -> int:
    """The sum of the indexed files' sizes."""
    return int(Instance.select(fn.COALESCE(fn.SUM(Instance.size), 0)).scalar(db) or 0)


def modality_counts(db: Database, top: int) -> list[ModalityCount]:
    """The ``top`` modalities by instances held, with their studies, series and instances."""
    instances = fn.COUNT(Instance.id)
    query = (
        Series.select(
            Series.modality,
            fn.COUNT(Series.study.distinct()),
            fn.COUNT(Series.id.distinct()),
            instances,
        )
        .join(Instance, JOIN.LEFT_OUTER)
        .group_by(Series.modality)
        .order_by(instances.desc(), Series.modality)
        .limit(top)
        .tuples()
    )
    return [
        ModalityCount(str(m), int(st), int(se), int(i))
        for m, st, se, i in cast(Iterable[tuple[str, int, int, int]], query.execute(db))
    ]


def received_range(db: Database) -> tuple[datetime | None, datetime | None]:
    """When the first and the last indexed instance were received (UTC)."""
    query = Instance.select(fn.MIN(Instance.received_at), fn.MAX(Instance.received_at)).tuples()
    for first, last in cast(Iterable[tuple[Any, Any]], query.execute(db)):
        return _datetime(first), _datetime(last)
    return None, None


def _datetime(value: Any) -> datetime | None:
    """SQLite hands MIN/MAX of a datetime column back as text; PostgreSQL as a datetime."""
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))


_HEX = list("0123456789abcdef")


def rows_outside_prefixes(db: Database) -> list[IndexedFile]:
    """Rows whose digest does not start with two lowercase hex digits: no prefix walk meets
    them, and no file can have their name (the store names files by lowercase hex)."""
    query = (
        Instance.select(Instance.id, Instance.sop_instance_uid, Instance.digest)
        .where(~(fn.SUBSTR(Instance.digest, 1, 1).in_(_HEX)
                 & fn.SUBSTR(Instance.digest, 2, 1).in_(_HEX)))
        .order_by(Instance.id)
        .tuples()
    )
    return [IndexedFile(int(i), str(u), str(d))
            for i, u, d in cast(Iterable[tuple[int, str, str]], query.execute(db))]
