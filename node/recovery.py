"""Start-up sweep: remove what a crash left in the store (temporary files, files no row names).

Files no row names are moved to ``quarantine/``; when there are more of them than a crash can
leave, the index was lost or replaced and the start is refused instead (nothing is touched).

A crash between a file's rename and its row's commit leaves an orphan; the instance was never
acknowledged, so removing it loses nothing.  The sweep runs only when this process holds the
store alone: another process writing to it (a pull, an import, a second node) has temporary
files and files whose rows are about to be committed, which are not garbage.  The sweep walks
one fan-out folder at a time against the digests indexed under the same prefix, so memory stays
bounded at any archive size.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from node.errors import StartupError
from node.index.writer import digests_with_prefix
from node.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepReport:
    temporary_removed: int
    orphans_removed: int
    files_seen: int
    seconds: float
    skipped: bool = False  # another process had the store open


class TooManyOrphans(StartupError):
    """More files without a row than a crash can leave: the index was lost or restored."""


def sweep(store: Store, max_orphans: int) -> SweepReport:
    """Clear ``tmp/`` and delete files without an index row; call before serving.

    A crash leaves at most one unacknowledged file per writer in flight, so more than
    ``max_orphans`` files without a row mean the index is not the one these files were
    written with (deleted, replaced by an older backup, a wrong ``database`` URL): the sweep
    then deletes nothing and refuses the start (TooManyOrphans), naming the way to recover.
    """
    with store.exclusive() as alone:
        if not alone:
            log.warning("start-up sweep skipped: another process has the store %s open "
                        "(a pull, an import or another node); it runs at the next start",
                        store.root)
            return SweepReport(0, 0, 0, 0.0, skipped=True)
        return _sweep(store, max_orphans)


def _sweep(store: Store, max_orphans: int) -> SweepReport:
    started = time.monotonic()
    orphaned: list[str] = []
    seen = 0
    for prefix in store.prefixes():  # first look, delete nothing
        indexed = digests_with_prefix(prefix)
        for digest in store.digests_under(prefix):
            seen += 1
            if digest not in indexed:
                orphaned.append(digest)
                if len(orphaned) > max_orphans:
                    raise _lost_index(store, f"more than {max_orphans}")
    if seen > 1 and len(orphaned) == seen:  # an empty index beside a store that is not
        raise _lost_index(store, f"all {seen}")
    temporary = store.clear_temporary()
    for digest in orphaned:
        # Never acknowledged, so nothing is lost by removing them; they are moved aside
        # rather than deleted, so that even a misjudged case destroys nothing.
        store.quarantine(store.path_of(digest))
    orphans = len(orphaned)
    report = SweepReport(temporary, orphans, seen, time.monotonic() - started)
    if temporary or orphans:
        log.warning(
            "start-up sweep removed %d temporary and %d unindexed files (of %d; moved to "
            "quarantine/) in %.1f s",
            temporary, orphans, seen, report.seconds,
        )
    else:
        log.info("start-up sweep: %d files, all indexed (%.1f s)", seen, report.seconds)
    return report


def _lost_index(store: Store, how_many: str) -> TooManyOrphans:
    return TooManyOrphans(
        f"{how_many} stored files have no index row: the index is not the one the store "
        f"{store.root} was written with (lost, restored from a backup, or another database "
        "URL); nothing was removed. Run `dicom-node reindex` if the database was lost, or "
        "`dicom-node verify --repair` if it was restored from a backup")
