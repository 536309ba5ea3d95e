"""``dicom-node reindex``: rebuild the whole index from the store alone, after a lost database.

Every file of the store is a Part 10 file the node wrote: its name is its SHA-256, its File
Meta gives the SOP UIDs and transfer syntax, and the node's own header reader
(``node.dicom.header.read_header``) gives the rest, so the store is enough to recover the index.
What only the database knew is lost: the sender's AE title and address (recorded as "reindex")
and the time of arrival (the file's modification time stands in for it).

The rebuild needs the store alone: a serving node (or an import) holding it is refused, never
raced.  SQLite: a new database is built in a file next to the old one (``index.sqlite.reindex``)
without fsyncs, then fsynced and renamed over the old one in one step, so a crash at any point
leaves either the old index or the new one.  PostgreSQL: the four tables are emptied and filled
in one transaction.  Files are indexed oldest first (by modification time, listed in a
temporary table so memory stays bounded), so the upper levels keep the attributes of the
first instance received, and a SOP Instance UID held in two files is resolved as the
``duplicates`` policy resolved it on arrival.  A file that cannot be indexed (corrupt, not a
Part 10 file, dataset rejected) is moved to ``storage/quarantine/``, never left for the
start-up sweep to delete.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from peewee import Database

from node.config import DatabaseURL, DuplicatePolicy, NodeConfig
from node.dicom.header import InstanceHeader, read_header
from node.errors import InvalidDataset, NodeError, RejectedInstance
from node.index.database import connect, ensure_schema
from node.index.maintenance import (
    CHUNK,
    add_to_file_list,
    create_file_list,
    date_studies_by_instances,
    drop_file_list,
    execute,
    file_list_count,
    files_in_order,
    set_received_at,
    truncate_index,
)
from node.index.writer import IndexWriter, InstanceExists, Source
from node.maintenance import NoProgress, Progress
from node.maintenance.files import DicomFile, NotDicom, frame
from node.store import Store
from node.store_sync import fsync

log = logging.getLogger(__name__)

REINDEX_SOURCE = Source("reindex", "")
BUILDING_SUFFIX = ".reindex"


class StoreInUse(NodeError):
    """Another process (a serving node, an import) has the store open."""


@dataclass
class ReindexReport:
    database: str
    files: int = 0
    indexed: int = 0
    duplicates: int = 0  # files whose SOP Instance UID another file holds (policy decided)
    quarantined: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # why files were quarantined
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.quarantined == 0

    def line(self) -> str:
        return (f"reindexed {self.database}: {self.files} files, {self.indexed} instances "
                f"indexed, {self.duplicates} duplicates left unindexed, {self.quarantined} "
                f"moved to quarantine, in {self.seconds:.1f} s")


def reindex(config: NodeConfig, store: Store, progress: Progress | None = None) -> ReindexReport:
    """Rebuild the index named by ``config`` from ``store`` (which must be open)."""
    with store.exclusive() as alone:
        if not alone:
            raise StoreInUse(f"store {store.root} is in use by another process (a running "
                             "serve, an import or a pull): stop it before reindexing")
        started = time.monotonic()
        report = ReindexReport(config.database.describe())
        if config.database.scheme == "sqlite":
            _rebuild_sqlite(config, store, report, progress or NoProgress())
        else:
            _rebuild_in_place(config, store, report, progress or NoProgress())
        report.seconds = time.monotonic() - started
    return report


def _sqlite_files(path: Path) -> list[Path]:
    return [path, *(path.with_name(path.name + s) for s in ("-wal", "-shm", "-journal"))]


def _rebuild_sqlite(config: NodeConfig, store: Store, report: ReindexReport,
                    progress: Progress) -> None:
    target = config.database.path
    assert target is not None
    building = target.with_name(target.name + BUILDING_SUFFIX)
    for leftover in _sqlite_files(building):  # of a reindex that crashed
        leftover.unlink(missing_ok=True)
    db = connect(DatabaseURL("sqlite", building), timeout=config.database_timeout)
    try:
        db.connect()
        # Nothing reads this file until it is renamed into place after an fsync: per-commit
        # durability would only slow the build down.
        execute(db, "PRAGMA synchronous=OFF")
        ensure_schema(db)
        _fill(db, store, config.duplicates, report, progress)
        execute(db, "PRAGMA wal_checkpoint(TRUNCATE)")
        db.close()
        fsync(building)
    except BaseException:
        if not db.is_closed():
            db.close()
        for leftover in _sqlite_files(building):
            leftover.unlink(missing_ok=True)
        raise
    # The old database's log would be replayed into the new file if it outlived the rename.
    for old in _sqlite_files(target)[1:]:
        old.unlink(missing_ok=True)
    os.replace(building, target)
    fsync(target.parent, directory=True)


def _rebuild_in_place(config: NodeConfig, store: Store, report: ReindexReport,
                      progress: Progress) -> None:
    db = connect(config.database, max_connections=1, timeout=config.database_timeout)
    try:
        db.connect()
        ensure_schema(db)
        with db.atomic():
            truncate_index(db)
            _fill(db, store, config.duplicates, report, progress)
    finally:
        if not db.is_closed():
            db.close()
        if hasattr(db, "close_all"):
            db.close_all()


def _fill(db: Database, store: Store, policy: DuplicatePolicy, report: ReindexReport,
          progress: Progress) -> None:
    create_file_list(db)
    listed: list[tuple[str, int, int]] = []
    for prefix in store.prefixes():
        for digest in store.digests_under(prefix):
            with contextlib.suppress(FileNotFoundError):
                stat = store.path_of(digest).stat()
                listed.append((digest, stat.st_mtime_ns, stat.st_size))
            if len(listed) >= CHUNK:
                add_to_file_list(db, listed)
                listed.clear()
    add_to_file_list(db, listed)
    filler = _Filler(db, store, policy, report)
    progress.start(file_list_count(db))
    try:
        for digest, mtime_ns, _ in files_in_order(db):
            filler.index(digest, mtime_ns)
            progress.update(report.files, report.quarantined)
    finally:
        progress.finish()
    date_studies_by_instances(db)
    drop_file_list(db)


class _Filler:
    """Indexes the listed files one by one into a fresh index."""

    def __init__(self, db: Database, store: Store, policy: DuplicatePolicy,
                 report: ReindexReport) -> None:
        self.db = db
        self.store = store
        self.policy = policy
        self.report = report
        self.writer = IndexWriter(db, retries=0)

    def index(self, digest: str, mtime_ns: int) -> None:
        self.report.files += 1
        path = self.store.path_of(digest)
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            self._quarantine(path, "content does not hash to its name (corrupt)")
            return
        try:
            found = frame(data)
            header = _header(found)
        except (NotDicom, RejectedInstance) as exc:
            self._quarantine(path, str(exc))
            return
        try:
            if not self._add(header, digest, len(data), found.transfer_syntax):
                return
        except InvalidDataset as exc:  # e.g. its series already held under another study
            self._quarantine(path, str(exc))
            return
        # Arrival time is lost with the database; the file was written when it arrived.
        when = datetime.fromtimestamp(mtime_ns / 1e9, UTC).replace(tzinfo=None)
        set_received_at(self.db, digest, when)

    def _add(self, header: InstanceHeader, digest: str, size: int, syntax: str) -> bool:
        """Index the file; False when an earlier file keeps its SOP Instance UID."""
        try:
            self.writer.add(header, digest, size, syntax, REINDEX_SOURCE)
            self.report.indexed += 1
            return True
        except InstanceExists:
            pass
        self.report.duplicates += 1
        # Files come oldest first: the one indexed already arrived earlier.
        if self.policy is DuplicatePolicy.REPLACE:
            old = self.writer.replace(header, digest, size, syntax, REINDEX_SOURCE)
            log.info("SOP Instance UID %s: file %s replaces the earlier file %s, now "
                     "unindexed (duplicates: replace)", header.sop_instance_uid, digest, old)
            return True
        log.info("SOP Instance UID %s: file %s left unindexed, an earlier file holds it "
                 "(duplicates: %s)", header.sop_instance_uid, digest, self.policy.value)
        return False

    def _quarantine(self, path: Path, why: str) -> None:
        moved = self.store.quarantine(path)
        self.report.quarantined += 1
        self.report.errors[why] += 1
        log.warning("file %s cannot be indexed (%s): moved to %s", path.name, why, moved)


def _header(found: DicomFile) -> InstanceHeader:
    if not (found.has_meta and found.sop_class_uid and found.sop_instance_uid):
        raise NotDicom("not a Part 10 file as the store writes them")
    header = read_header(found.dataset, found.transfer_syntax)
    if (header.sop_class_uid, header.sop_instance_uid) != (
        found.sop_class_uid, found.sop_instance_uid
    ):
        raise InvalidDataset("File Meta SOP UIDs differ from the dataset's")
    return header
