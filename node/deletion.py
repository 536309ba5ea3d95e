"""Delete patients, studies, series or instances from the archive: rows first, then files.

The one way anything leaves the archive on purpose: ``dicom-node delete`` and the retention
policy (node.retention) both come here.  Work goes a study at a time (node.index.deletion): its
rows are removed in one transaction unless a retrieve holds the study, then its files are
deleted, each only if no row names it again by then (Store.remove_unreferenced).  A crash between
the two leaves files without rows, which the start-up sweep moves to quarantine; never a row
without its file.  Each deleted study is logged by UID at INFO (never a patient name or ID).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from peewee import Database, PeeweeException

from node.errors import IndexUnavailable
from node.index.deletion import Level, StudyRemoval, remove_from_study, study_ids_for
from node.index.maintenance import is_indexed
from node.store import Store

log = logging.getLogger(__name__)


@dataclass
class DeletionReport:
    """What a deletion did, summed over its studies."""

    studies_deleted: int = 0  # studies removed whole
    studies_touched: int = 0  # studies some instances were removed from
    instances: int = 0
    bytes: int = 0
    files_kept: int = 0  # files a row named again (the same instance arrived meanwhile)
    leased: list[str] = field(default_factory=list)  # study UIDs left: a retrieve holds them

    @property
    def ok(self) -> bool:
        return not self.leased

    def add(self, removal: StudyRemoval, files_deleted: int) -> None:
        if removal.leased:
            self.leased.append(removal.study_uid)
            return
        self.studies_touched += 1
        self.studies_deleted += int(removal.study_gone)
        self.instances += len(removal.files)
        self.bytes += sum(f.size for f in removal.files)
        self.files_kept += len(removal.files) - files_deleted

    def line(self) -> str:
        text = (f"{self.instances} instances ({self.bytes / 1e6:.1f} MB) deleted; "
                f"{self.studies_deleted} studies removed whole")
        if self.leased:
            text += f"; {len(self.leased)} studies left because a retrieve is sending them"
        return text


class Deleter:
    """Removes what it is told from the index and the store."""

    def __init__(self, db: Database, store: Store) -> None:
        self.db = db
        self.store = store

    def studies(self, level: Level, values: Sequence[str],
                issuer: str | None = None) -> list[tuple[int, str]]:
        """(id, Study Instance UID) of the studies holding what ``level``/``values`` name."""
        try:
            return study_ids_for(self.db, level, values, issuer)
        except PeeweeException as exc:
            raise IndexUnavailable(f"cannot read the index: {exc}") from exc

    def delete(self, level: Level, values: Sequence[str], issuer: str | None = None,
               reason: str = "deleted on request",
               progress: Callable[[int, int], None] | None = None) -> DeletionReport:
        """Delete what ``level``/``values`` name; ``progress(done, total)`` per study."""
        targets = self.studies(level, values, issuer)
        report = DeletionReport()
        whole = level in (Level.PATIENT, Level.STUDY)
        for done, (study_id, _) in enumerate(targets, 1):
            self.delete_study(study_id, report, reason,
                              Level.STUDY if whole else level, () if whole else values)
            if progress is not None:
                progress(done, len(targets))
        return report

    def delete_study(self, study_id: int, report: DeletionReport, reason: str,
                     level: Level = Level.STUDY, values: Sequence[str] = ()) -> StudyRemoval | None:
        """Remove one study (or the named part of it), rows then files; add to ``report``."""
        try:
            removal = remove_from_study(self.db, study_id, level, values)
        except PeeweeException as exc:
            raise IndexUnavailable(f"cannot delete from the index: {exc}") from exc
        if removal is None:  # gone already (another deletion)
            return None
        deleted = 0
        if not removal.leased:
            for removed in removal.files:
                deleted += self.store.remove_unreferenced(removed.digest, self._referenced)
            log.info("%s: study %s %s (%d instances, %.1f MB)", reason, removal.study_uid,
                     "deleted" if removal.study_gone else "partly deleted", len(removal.files),
                     sum(f.size for f in removal.files) / 1e6)
        else:
            log.info("%s: study %s left, a retrieve is sending it", reason, removal.study_uid)
        report.add(removal, deleted)
        return removal

    def _referenced(self, digest: str) -> bool:
        try:
            return is_indexed(self.db, digest)
        except PeeweeException as exc:
            raise IndexUnavailable(f"cannot read the index: {exc}") from exc
