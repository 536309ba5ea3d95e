"""Record received instances in the four-level index: each write atomic, idempotent.

The upper levels (patient, study, series) are created on first sight and keep the attributes
of the first instance that named them.  A write that fails for a transient reason (database
locked, connection lost) is retried a bounded number of times, then reported as
IndexUnavailable — never as success.

SQLite has one writer at a time and each commit costs an fsync of its log.  Writers that arrive
while another commits are therefore grouped: the next one to get the write lock runs every
waiting write, each in its own savepoint, and commits them together (group commit).  Every
caller returns only after the commit that holds its row, so a C-STORE Success still follows
its own durable row; a write that fails rolls back its own savepoint and fails alone.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar, cast

from peewee import (
    ColumnBase,
    Database,
    DataError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    SqliteDatabase,
)

from node.dicom.header import InstanceHeader
from node.errors import IndexUnavailable, InvalidDataset, NodeError
from node.index.models import Instance, Patient, Series, Study

log = logging.getLogger(__name__)

T = TypeVar("T")
_RETRY_BASE_DELAY = 0.05  # seconds; doubled on each retry
# Writes committed together at most: keeps one transaction (and its lock) short.
MAX_GROUP = 64


@dataclass(frozen=True)
class Source:
    """Who sent an instance."""

    ae_title: str
    address: str


@dataclass(frozen=True)
class IndexedInstance:
    """The index's view of one stored instance."""

    sop_instance_uid: str
    digest: str
    size: int


class InstanceExists(Exception):
    """Another writer indexed the same SOP Instance UID first."""


# What one write of a group may raise on its own (its savepoint rolled back, the others go on):
# the domain's refusals, and constraint or value errors of its own rows.
_OWN_FAILURES = (NodeError, InstanceExists, IntegrityError, DataError)


class _Pending(Generic[T]):
    """One write waiting for a group commit, and how it ended."""

    def __init__(self, work: Callable[[], T]) -> None:
        self.work = work
        self.taken = False  # by the writer committing its group (under the write lock)
        self.done = False  # committed, or failed for good
        self.value: T | None = None
        self.error: BaseException | None = None

    def outcome(self) -> T:
        if self.error is not None:
            if isinstance(self.error, (IntegrityError, DataError)):
                raise IndexUnavailable(f"index unavailable: {self.error}") from self.error
            raise self.error
        return cast(T, self.value)


def _run_one(pending: _Pending[Any]) -> None:
    try:
        pending.value = pending.work()
    except _OWN_FAILURES as exc:  # its savepoint is rolled back; re-raised by its caller
        pending.error = exc


def fold_name(name: str) -> str:
    """Person names compare case-insensitively by their case-folded form."""
    return name.casefold()


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class IndexWriter:
    """Writes and looks up instances; safe to share between association threads."""

    def __init__(self, db: Database, retries: int = 3, shared: bool = False) -> None:
        self.db = db
        self.retries = retries
        # SQLite has one writer at a time, and a writer that finds the lock taken sleeps in
        # SQLite's busy handler (1, 2, 5, 10… ms).  Queueing writers on a Python lock instead
        # hands the lock over at once, and lets the holder commit the queue in one go (see the
        # module docstring).  PostgreSQL writers run concurrently, each in its transaction.
        self._grouped = isinstance(db, SqliteDatabase)
        self._write_lock = threading.Lock()
        # ``shared``: other processes may write the same SQLite file (several nodes on one
        # host).  The group's writer then also holds an flock on a file beside the database,
        # which another process waits for in the kernel and gets the moment it is released;
        # SQLite's own lock would make it sleep instead (1, 2, 5… ms).
        self._process_lock: int | None = None
        if shared and self._grouped and str(db.database) not in ("", ":memory:"):
            self._process_lock = os.open(f"{db.database}.writer", os.O_RDWR | os.O_CREAT, 0o640)
        self._queue: deque[_Pending[Any]] = deque()
        self._sql = _HotPath(db.param)

    def _execute(self, sql: str, params: Sequence[object]) -> Any:
        return self.db.execute_sql(sql, params)  # type: ignore[no-untyped-call]

    def _fetch_one(self, sql: str, params: Sequence[object]) -> Any:
        return self._execute(sql, params).fetchone()

    def _writing(self, work: Callable[[], T]) -> T:
        """Run ``work`` (a write in its own ``atomic`` block) and commit it, with retries.

        SQLite: queued, and committed by whichever writer holds the lock next together with
        the others waiting then; returns once that commit is done.
        """
        if not self._grouped:
            return self._retrying(work)
        pending = _Pending(work)
        self._queue.append(pending)
        with self._write_lock:
            while not pending.taken:  # no earlier holder took it along: commit the queue now
                with self._other_processes_out():
                    group = [self._queue.popleft()
                             for _ in range(min(len(self._queue), MAX_GROUP))]
                    for member in group:
                        member.taken = True
                    self._commit_group(group)
        if not pending.done:  # another write of its group broke the whole group (a bug)
            raise IndexUnavailable("index write abandoned with its group")
        return pending.outcome()

    @contextmanager
    def _other_processes_out(self) -> Iterator[None]:
        """Hold the writers' flock (SQLite file on disk) while the block runs."""
        if self._process_lock is None:
            yield
            return
        fcntl.flock(self._process_lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._process_lock, fcntl.LOCK_UN)

    def close(self) -> None:
        """Release the writers' lock file (the database itself is closed by its owner)."""
        if self._process_lock is not None:
            os.close(self._process_lock)
            self._process_lock = None

    def _commit_group(self, group: list[_Pending[Any]]) -> None:
        """Run ``group``'s writes in one transaction (a savepoint each) and commit it.

        A transient failure of the transaction (locked, connection lost, commit failed)
        rolls all back and retries all; after the retries each write fails IndexUnavailable.
        Anything else escaping (a bug) leaves the group not done, which its callers report.
        """
        def run() -> None:
            for pending in group:
                pending.value, pending.error = None, None
            if len(group) == 1:  # alone: its own atomic block is the transaction
                _run_one(group[0])
                return
            with self.db.atomic():  # each write's own atomic() nests as a savepoint
                for pending in group:
                    _run_one(pending)

        try:
            self._retrying(run)
        except IndexUnavailable as exc:
            for pending in group:
                pending.value, pending.error = None, exc
        for pending in group:
            pending.done = True

    def _retrying(self, work: Callable[[], T]) -> T:
        delay = _RETRY_BASE_DELAY
        for attempt in range(self.retries + 1):
            try:
                return work()
            # IntegrityError here means a concurrent writer created the same patient, study
            # or series first (PostgreSQL); the retry finds its row.
            except (OperationalError, InterfaceError, IntegrityError) as exc:
                if self.db.in_transaction():
                    raise
                if attempt == self.retries:
                    raise IndexUnavailable(f"index unavailable: {exc}") from exc
                log.warning("index write failed (%s); retry %d of %d", exc, attempt + 1,
                            self.retries)
                if not self.db.is_closed():
                    self.db.close()  # a broken connection is reopened on next use
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def find(self, sop_instance_uid: str) -> IndexedInstance | None:
        """The indexed instance with this SOP Instance UID, if any."""

        def lookup() -> IndexedInstance | None:
            row = self._fetch_one(self._sql.find, (sop_instance_uid,))
            return None if row is None else IndexedInstance(sop_instance_uid, row[0], row[1])

        return self._retrying(lookup)

    def is_referenced(self, digest: str) -> bool:
        """True when some instance row points at the file ``digest``."""
        return self._retrying(
            lambda: Instance.select(Instance.id).where(Instance.digest == digest).exists()
        )

    def add(self, header: InstanceHeader, digest: str, size: int, transfer_syntax: str,
            source: Source) -> None:
        """Index a new instance; raises InstanceExists when its SOP Instance UID is taken."""

        def write() -> None:
            with self.db.atomic():
                series = self._series_for(header)
                fields = _instance_fields(header, digest, size, transfer_syntax, source)
                # ON CONFLICT DO NOTHING rather than catching the unique violation: PostgreSQL
                # aborts a transaction at a failed statement unless it ran in a savepoint, and
                # a savepoint is two more round trips for every instance.
                inserted = self._execute(self._sql.insert_instance,
                                         self._sql.instance_params(fields, series))
                if inserted.rowcount == 0:
                    raise InstanceExists(header.sop_instance_uid)

        self._writing(write)

    def replace(self, header: InstanceHeader, digest: str, size: int, transfer_syntax: str,
                source: Source) -> str | None:
        """Point the instance at new content; returns the digest it had before (or None)."""

        def write() -> str | None:
            with self.db.atomic():
                series = self._series_for(header)
                old = (
                    Instance.select(Instance.id, Instance.digest)
                    .where(Instance.sop_instance_uid == header.sop_instance_uid)
                    .first()
                )
                fields = _instance_fields(header, digest, size, transfer_syntax, source)
                if old is None:
                    Instance.insert(**fields, series=series).execute()
                    return None
                Instance.update(**fields, series=series).where(Instance.id == old.id).execute()
                return str(old.digest)

        return self._writing(write)

    def _series_for(self, header: InstanceHeader) -> int:
        """The id of the instance's series, creating series, study and patient as needed."""
        row = self._fetch_one(self._sql.series, (header.series_instance_uid,))
        if row is not None:
            series_id, study_uid = row
            if study_uid != header.study_instance_uid:
                # PS3.4 C.6.1.1: a series belongs to exactly one study.
                raise InvalidDataset("Series Instance UID already belongs to another study")
            return int(series_id)
        study_id = self._study_for(header)
        return int(
            Series.insert(
                series_instance_uid=header.series_instance_uid,
                study=study_id,
                modality=header.modality,
                series_number=header.series_number,
                series_date=header.series_date,
                series_time=header.series_time,
                series_description=header.series_description,
                body_part_examined=header.body_part_examined,
            ).execute()
        )

    def _study_for(self, header: InstanceHeader) -> int:
        row = (
            Study.select(Study.id)
            .where(Study.study_instance_uid == header.study_instance_uid)
            .tuples()
            .first()
        )
        if row is not None:
            return int(row[0])
        return int(
            Study.insert(
                study_instance_uid=header.study_instance_uid,
                patient=self._patient_for(header),
                study_date=header.study_date,
                study_time=header.study_time,
                accession_number=header.accession_number,
                study_id=header.study_id,
                study_description=header.study_description,
                referring_physician_name=header.referring_physician_name,
                referring_physician_name_folded=fold_name(header.referring_physician_name),
                received_at=_now(),
            ).execute()
        )

    def _patient_for(self, header: InstanceHeader) -> int:
        key = (Patient.patient_id == header.patient_id) & (
            Patient.issuer_of_patient_id == header.issuer_of_patient_id
        )
        row = Patient.select(Patient.id).where(key).tuples().first()
        if row is not None:
            return int(row[0])
        return int(
            Patient.insert(
                patient_id=header.patient_id,
                issuer_of_patient_id=header.issuer_of_patient_id,
                patient_name=header.patient_name,
                patient_name_folded=fold_name(header.patient_name),
                patient_birth_date=header.patient_birth_date,
                patient_sex=header.patient_sex,
            ).execute()
        )


class _HotPath:
    """The SQL run for every received instance, written once for the database's parameter
    style: peewee's query builder costs more CPU per statement than the statement itself."""

    def __init__(self, param: str) -> None:
        instance, series, study = (m._meta.table_name for m in (Instance, Series, Study))
        self.find = (
            f'SELECT "digest", "size" FROM "{instance}" WHERE "sop_instance_uid" = {param}'
        )
        self.series = (
            f'SELECT s."id", st."study_instance_uid" FROM "{series}" AS s'
            f' JOIN "{study}" AS st ON st."id" = s."study_id"'
            f' WHERE s."series_instance_uid" = {param}'
        )
        self.instance_columns = [*_INSTANCE_FIELD_NAMES, "series"]
        fields = Instance._meta.fields
        columns = ", ".join(f'"{fields[name].column_name}"' for name in self.instance_columns)
        slots = ", ".join(param for _ in self.instance_columns)
        # SQLite (3.24+) and PostgreSQL alike: an instance already indexed inserts no row.
        self.insert_instance = (f'INSERT INTO "{instance}" ({columns}) VALUES ({slots})'
                                ' ON CONFLICT ("sop_instance_uid") DO NOTHING')
        self._converters = [fields[name].db_value for name in self.instance_columns]

    def instance_params(self, values: dict[str, object], series: int) -> list[object]:
        row = [*(values[name] for name in _INSTANCE_FIELD_NAMES), series]
        return [convert(value) for convert, value in zip(self._converters, row, strict=True)]


_INSTANCE_FIELD_NAMES = [
    "sop_instance_uid", "sop_class_uid", "instance_number", "specific_character_set",
    "transfer_syntax_uid", "digest", "size", "received_at", "source_ae", "source_address",
]


def _instance_fields(header: InstanceHeader, digest: str, size: int, transfer_syntax: str,
                     source: Source) -> dict[str, object]:
    return {
        "sop_instance_uid": header.sop_instance_uid,
        "sop_class_uid": header.sop_class_uid,
        "instance_number": header.instance_number,
        "specific_character_set": header.specific_character_set,
        "transfer_syntax_uid": transfer_syntax,
        "digest": digest,
        "size": size,
        "received_at": _now(),
        "source_ae": source.ae_title,
        "source_address": source.address,
    }


def in_digest_prefix(prefix: str) -> ColumnBase:
    """Digests starting with the hex string ``prefix``, as an index range.

    The upper bound is the next prefix in hex ('09' -> '0a', never '0:'): a locale collation
    (PostgreSQL with en_US, ICU) sorts punctuation apart from digits and letters, while among
    strings of hex digits every collation agrees with byte order.
    """
    condition = Instance.digest >= prefix
    if prefix != "f" * len(prefix):
        condition &= Instance.digest < f"{int(prefix, 16) + 1:0{len(prefix)}x}"
    return condition


def digests_with_prefix(prefix: str) -> set[str]:
    """Digests of all indexed files whose digest starts with the hex string ``prefix``."""
    rows = Instance.select(Instance.digest).where(in_digest_prefix(prefix)).tuples()
    return {str(digest) for (digest,) in cast(Iterable[tuple[str]], rows)}
