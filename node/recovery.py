"""Start-up sweep: remove what a crash left in the store (temporary files, files no row names).

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


def sweep(store: Store) -> SweepReport:
    """Clear ``tmp/`` and delete files without an index row; call before serving."""
    with store.exclusive() as alone:
        if not alone:
            log.warning("start-up sweep skipped: another process has the store %s open "
                        "(a pull, an import or another node); it runs at the next start",
                        store.root)
            return SweepReport(0, 0, 0, 0.0, skipped=True)
        return _sweep(store)


def _sweep(store: Store) -> SweepReport:
    started = time.monotonic()
    temporary = store.clear_temporary()
    orphans = seen = 0
    for prefix in store.prefixes():
        indexed = digests_with_prefix(prefix)
        for digest in store.digests_under(prefix):
            seen += 1
            if digest not in indexed:
                store.remove(digest)
                orphans += 1
    report = SweepReport(temporary, orphans, seen, time.monotonic() - started)
    if temporary or orphans:
        log.warning(
            "start-up sweep removed %d temporary and %d unindexed files (of %d) in %.1f s",
            temporary, orphans, seen, report.seconds,
        )
    else:
        log.info("start-up sweep: %d files, all indexed (%.1f s)", seen, report.seconds)
    return report
