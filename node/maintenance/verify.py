"""``dicom-node verify``: every indexed file present and intact, every file indexed.

The walk goes one first-level fan-out folder at a time (1/256 of the archive), comparing the
files under it with the rows whose digest has the same prefix, read in chunks, so memory stays
bounded at any archive size (as ``node.recovery``'s sweep does).  Each file a row names is read
and its SHA-256 compared with its name.  The problems:

- a row whose file is missing;
- a row whose file is corrupt (its content no longer hashes to its name);
- a file no row names (an orphan: a crash between a file's rename and its row's commit leaves
  one, as does a lost or restored-from-backup database);
- a row whose digest cannot name a file at all (a damaged database).

Verify runs beside a serving node, so each problem is checked again before it counts: a row
may have been replaced or a file committed meanwhile.  With ``repair``: a missing file's row is
dropped (with its series, study and patient when they become empty); a corrupt file is moved to
``storage/quarantine/`` and its row dropped; an orphan is indexed again through the ingest path
(as C-STORE would), or moved to the quarantine when it cannot be; a row naming no possible file
is dropped.  Each repair is logged at INFO with the SOP Instance UID and digest, never patient
data.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from peewee import Database

from node.errors import RejectedInstance
from node.index.maintenance import (
    PREFIXES,
    IndexedFile,
    count_instances,
    drop_instance,
    is_indexed,
    row_by_id,
    row_by_uid,
    rows_outside_prefixes,
    rows_with_prefix,
)
from node.index.writer import Source
from node.ingest import Ingestor, Outcome, Received
from node.maintenance import NoProgress, Progress
from node.maintenance.files import NotDicom, read_dicom_file
from node.store import Store, sha256_of

log = logging.getLogger(__name__)

VERIFY_SOURCE = Source("verify", "")
_DIGEST = re.compile(r"^[0-9a-f]{64}$")  # how the store names files
# A file written this recently (seconds, by its mtime) may be a serving node's ingest between
# its rename and its row's commit: it counts as an orphan only if still without row this long
# after it was written.
IN_FLIGHT = 5.0


class Problem(StrEnum):
    MISSING = "files missing"
    CORRUPT = "files corrupt"
    ORPHAN = "files without row"
    BAD_DIGEST = "rows with an invalid digest"


@dataclass
class VerifyReport:
    rows: int = 0  # instance rows checked
    files: int = 0  # files met in the store
    found: Counter[Problem] = field(default_factory=Counter)
    repaired: Counter[Problem] = field(default_factory=Counter)
    quarantined: int = 0
    seconds: float = 0.0

    @property
    def problems(self) -> int:
        return sum(self.found.values())

    @property
    def unrepaired(self) -> int:
        return self.problems - sum(self.repaired.values())

    @property
    def ok(self) -> bool:
        return self.unrepaired == 0

    def line(self) -> str:
        found = ", ".join(f"{self.found[p]} {p.value}" for p in Problem)
        text = f"checked {self.rows} rows and {self.files} files in {self.seconds:.1f} s: {found}"
        if self.repaired:
            text += (f"; repaired {sum(self.repaired.values())}"
                     f" ({self.quarantined} files moved to quarantine)")
        return text


class Verifier:
    """One verify run over a store and its index; ``repair`` to fix what it finds."""

    def __init__(self, db: Database, store: Store, ingestor: Ingestor,
                 repair: bool = False) -> None:
        self.db = db
        self.store = store
        self.ingestor = ingestor
        self.repair = repair
        self.report = VerifyReport()

    def run(self, progress: Progress | None = None) -> VerifyReport:
        progress = progress or NoProgress()
        started = time.monotonic()
        progress.start(count_instances(self.db))
        try:
            # Rows no prefix walk meets go first: a file they lost may be met in any prefix.
            for row in rows_outside_prefixes(self.db):
                self.report.rows += 1
                self._bad_digest(row)
            for prefix in PREFIXES:
                self._verify_prefix(prefix, progress)
        finally:
            progress.finish()
        self.report.seconds = time.monotonic() - started
        return self.report

    def _verify_prefix(self, prefix: str, progress: Progress) -> None:
        report = self.report
        folder = self.store.objects / prefix
        files = set(self.store.digests_under(prefix)) if folder.is_dir() else set()
        indexed: set[str] = set()
        missing: list[IndexedFile] = []
        corrupt: list[IndexedFile] = []
        for row in rows_with_prefix(self.db, prefix):
            if row.digest[:2] != prefix:  # e.g. '3B…' sorts between '39' and '3a'
                continue  # not a lowercase hex prefix: rows_outside_prefixes has it
            report.rows += 1
            indexed.add(row.digest)
            if row.digest not in files:
                missing.append(row)
            elif not self._intact(row.digest):
                corrupt.append(row)
            progress.update(report.rows, report.problems + len(missing) + len(corrupt))
        report.files += len(files)
        # Repairs write to the index: only once the prefix's rows are read.
        for row in missing:
            self._missing(row)
        for row in corrupt:
            self._corrupt(row)
        for digest in sorted(files - indexed):
            self._orphan(digest)

    def _intact(self, digest: str) -> bool:
        """The file hashes to its name (a file removed meanwhile counts as not intact)."""
        try:
            return sha256_of(self.store.path_of(digest)) == digest
        except FileNotFoundError:
            return False

    def _still(self, row: IndexedFile) -> bool:
        """The row still names the same file (another process may have replaced it)."""
        now = row_by_id(self.db, row.id)
        return now is not None and now.digest == row.digest

    def _missing(self, row: IndexedFile) -> None:
        if not self._still(row):
            return
        if not _DIGEST.match(row.digest):  # e.g. '7fzz…': in a prefix's range, yet no name
            self._bad_digest(row)
            return
        path = self.store.path_of(row.digest)
        if path.is_file():  # written since the folder was listed
            if self._intact(row.digest):
                return
            self._corrupt(row)
            return
        self.report.found[Problem.MISSING] += 1
        if not self.repair:
            log.warning("SOP Instance UID %s: file %s is missing", row.sop_instance_uid,
                        row.digest)
            return
        if drop_instance(self.db, row):
            log.info("dropped the index row of SOP Instance UID %s: its file %s is missing",
                     row.sop_instance_uid, row.digest)
        self.report.repaired[Problem.MISSING] += 1

    def _corrupt(self, row: IndexedFile) -> None:
        if not self._still(row):
            return
        self.report.found[Problem.CORRUPT] += 1
        if not self.repair:
            log.warning("SOP Instance UID %s: file %s is corrupt (its content does not hash "
                        "to its name)", row.sop_instance_uid, row.digest)
            return
        moved = self._quarantine(self.store.path_of(row.digest))
        drop_instance(self.db, row)
        log.info("dropped the index row of SOP Instance UID %s: its file %s was corrupt "
                 "(moved to %s)", row.sop_instance_uid, row.digest, moved)
        self.report.repaired[Problem.CORRUPT] += 1

    def _bad_digest(self, row: IndexedFile) -> None:
        self.report.found[Problem.BAD_DIGEST] += 1
        if not self.repair:
            log.warning("SOP Instance UID %s: its row names no possible file (%r)",
                        row.sop_instance_uid, row.digest)
            return
        drop_instance(self.db, row)
        log.info("dropped the index row of SOP Instance UID %s: it names no possible file",
                 row.sop_instance_uid)
        self.report.repaired[Problem.BAD_DIGEST] += 1

    def _orphan(self, digest: str) -> None:
        path = self.store.path_of(digest)
        if is_indexed(self.db, digest) or not path.is_file():
            return  # committed, or cleaned up, by another process meanwhile
        if self._settled_meanwhile(digest, path):
            return
        self.report.found[Problem.ORPHAN] += 1
        if not self.repair:
            log.warning("file %s has no index row", digest)
            return
        try:
            self._index_orphan(digest, path)
        except FileNotFoundError:
            log.info("file %s without row was removed meanwhile", digest)
        self.report.repaired[Problem.ORPHAN] += 1

    def _settled_meanwhile(self, digest: str, path: Path) -> bool:
        """A file written under IN_FLIGHT seconds ago: wait until then for its row (or its
        removal); a node (this host's or another's) may be committing it right now."""
        try:
            written = path.stat().st_mtime
        except FileNotFoundError:
            return True
        pause = threading.Event()  # never set: a bounded pause between checks
        while time.time() < written + IN_FLIGHT:
            pause.wait(0.05)
            if is_indexed(self.db, digest) or not path.is_file():
                return True
        return False

    def _index_orphan(self, digest: str, path: Path) -> None:
        """Index an orphan file through the ingest path, or move it aside."""
        if sha256_of(path) != digest:
            self._quarantine(path, "its content does not hash to its name")
            return
        try:
            found = read_dicom_file(path)
            if not (found.has_meta and found.sop_class_uid and found.sop_instance_uid):
                raise NotDicom("not a Part 10 file as the store writes them")
            uid = found.sop_instance_uid
            self._drop_broken_holder(uid, digest)
            outcome = self.ingestor.receive(Received(
                found.sop_class_uid, uid, found.transfer_syntax, found.dataset, VERIFY_SOURCE))
        except (NotDicom, RejectedInstance) as exc:
            self._quarantine(path, f"it cannot be indexed: {exc}")
            return
        if is_indexed(self.db, digest):
            log.info("indexed file %s again as SOP Instance UID %s", digest, uid)
        elif outcome is Outcome.KEPT_EXISTING:
            self._quarantine(path, f"SOP Instance UID {uid} is held with other content")
        else:
            # Indexed under another digest: its File Meta was written by another version of
            # the node, and the same dataset is now held in a file of this version.
            self.store.remove(digest)
            log.info("indexed file %s again as SOP Instance UID %s (rewritten with this "
                     "node's File Meta; the old file removed)", digest, uid)

    def _drop_broken_holder(self, uid: str, digest: str) -> None:
        """If another row holds ``uid`` but its file is gone or broken, drop it now: the
        orphan is then the only copy of the instance, and the duplicates policy must not
        keep the broken row instead (its own prefix may come later in the walk)."""
        holder = row_by_uid(self.db, uid)
        if holder is None or holder.digest == digest:
            return
        if not _DIGEST.match(holder.digest):
            problem = Problem.BAD_DIGEST
        elif not self.store.path_of(holder.digest).is_file():
            problem = Problem.MISSING
        elif not self._intact(holder.digest):
            problem = Problem.CORRUPT
            self._quarantine(self.store.path_of(holder.digest))
        else:
            return  # a sound copy holds the UID: the policy decides between the two
        self.report.found[problem] += 1
        drop_instance(self.db, holder)
        self.report.repaired[problem] += 1
        log.info("dropped the index row of SOP Instance UID %s (%s: %s), to index the file "
                 "%s that holds it", uid, problem.value, holder.digest, digest)

    def _quarantine(self, path: Path, why: str = "") -> Path:
        moved = self.store.quarantine(path)
        self.report.quarantined += 1
        if why:
            log.info("moved file %s to %s: %s", path.name, moved, why)
        return moved
