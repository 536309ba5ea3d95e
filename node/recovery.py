"""Start-up sweep: remove what a crash left in the store (temporary files, files no row names).

Files no row names are moved to ``quarantine/``; when there are more of them than a crash can
leave, the index was lost or replaced and the start is refused instead (nothing is touched).

A crash between a file's rename and its row's commit leaves an orphan; the instance was never
acknowledged, so removing it loses nothing.  The full sweep runs only when this process holds
the store alone: another process writing to it (a pull, an import, a second node) has temporary
files and files whose rows are about to be committed, which are not garbage.  The sweep walks
one fan-out folder at a time against the digests indexed under the same prefix, so memory stays
bounded at any archive size.

Several nodes sharing one store (issue 7) are seldom all stopped at once, so what a crashed one
left would stay for ever.  The shared sweep (``sweep_shared``, at start-up when another process
holds the store, and every SHARED_SWEEP_INTERVAL in ``serve``) takes only what is older than
SHARED_GRACE: write files not touched since, and files without a row written before it.  Each
such file is moved aside and the index asked again before it goes to ``quarantine/``
(``Store.remove_unreferenced``), so an instance that arrives again at that moment, finds the
file and indexes it, keeps it: the ingest writes the file again when it finds it gone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from peewee import PeeweeException

from node.errors import NodeError, StartupError
from node.index.writer import digests_with_prefix
from node.store import Store

log = logging.getLogger(__name__)

# An ingest renames its file into place and commits its row within seconds (a minute of
# database retries at most); an hour is far beyond any write in flight.
SHARED_GRACE = 3600
SHARED_SWEEP_INTERVAL = 6 * 3600


@dataclass(frozen=True)
class SweepReport:
    temporary_removed: int
    orphans_removed: int
    files_seen: int
    seconds: float
    shared: bool = False  # another process had the store open: only old files were taken


class TooManyOrphans(StartupError):
    """More files without a row than a crash can leave: the index was lost or restored."""


def sweep(store: Store, max_orphans: int, referenced: Callable[[str], bool]) -> SweepReport:
    """Clear ``tmp/`` and delete files without an index row; call before serving.

    A crash leaves at most one unacknowledged file per writer in flight, so more than
    ``max_orphans`` files without a row mean the index is not the one these files were
    written with (deleted, replaced by an older backup, a wrong ``database`` URL): the sweep
    then deletes nothing and refuses the start (TooManyOrphans), naming the way to recover.
    When another process holds the store, only what is older than SHARED_GRACE is swept
    (``sweep_shared``); ``referenced`` asks the index whether a row names a digest.
    """
    with store.exclusive() as alone:
        if alone:
            return _sweep(store, max_orphans)
    log.info("start-up sweep: another process has the store %s open (a pull, an import or "
             "another node); only files older than %d min are swept", store.root,
             SHARED_GRACE // 60)
    return sweep_shared(store, referenced, max_orphans)


def _sweep(store: Store, max_orphans: int) -> SweepReport:
    started = time.monotonic()
    orphaned, seen = _unindexed(store, max_orphans, lambda digest: True)
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


def _unindexed(store: Store, max_orphans: int,
               eligible: Callable[[str], bool]) -> tuple[list[str], int]:
    """The digests of files no row names that are ``eligible``, and how many files there are.

    A first look that moves nothing: beyond ``max_orphans`` such files the index is not the
    store's, and TooManyOrphans is raised.  One fan-out folder at a time against the digests
    indexed under the same prefix, so memory stays bounded.
    """
    orphaned: list[str] = []
    seen = 0
    for prefix in store.prefixes():
        indexed = digests_with_prefix(prefix)
        for digest in store.digests_under(prefix):
            seen += 1
            if digest not in indexed and eligible(digest):
                orphaned.append(digest)
                if len(orphaned) > max_orphans:
                    raise _lost_index(store, f"more than {max_orphans}")
    return orphaned, seen


def _lost_index(store: Store, how_many: str) -> TooManyOrphans:
    return TooManyOrphans(
        f"{how_many} stored files have no index row: the index is not the one the store "
        f"{store.root} was written with (lost, restored from a backup, or another database "
        "URL); nothing was removed. Run `dicom-node reindex` if the database was lost, or "
        "`dicom-node verify --repair` if it was restored from a backup")


def sweep_shared(store: Store, referenced: Callable[[str], bool], max_orphans: int,
                 grace: float = SHARED_GRACE) -> SweepReport:
    """Sweep what is older than ``grace`` seconds, safe while other processes write.

    A store whose index was lost is refused as at start-up (TooManyOrphans), before anything
    is moved; the files counted are only those older than ``grace``.
    """
    started = time.monotonic()
    cutoff = time.time() - grace
    candidates, seen = _unindexed(store, max_orphans,
                                  lambda digest: store.written_before(digest, cutoff))
    temporary = store.clear_stale_temporary(cutoff)
    orphans = sum(store.remove_unreferenced(digest, referenced, to_quarantine=True)
                  for digest in candidates)
    report = SweepReport(temporary, orphans, seen, time.monotonic() - started, shared=True)
    if temporary or orphans:
        log.warning("shared sweep removed %d temporary and %d unindexed files older than "
                    "%d min (of %d; moved to quarantine/) in %.1f s",
                    temporary, orphans, grace // 60, seen, report.seconds)
    else:
        log.info("shared sweep: %d files, none left over (%.1f s)", seen, report.seconds)
    return report


class SharedSweeper:
    """Runs ``sweep_shared`` every SHARED_SWEEP_INTERVAL on its own thread (in ``serve``)."""

    def __init__(self, sweep: Callable[[], SweepReport],
                 interval: float = SHARED_SWEEP_INTERVAL) -> None:
        self._sweep = sweep
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="shared-sweep", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._sweep()
            except (NodeError, OSError, PeeweeException) as exc:  # next interval tries again
                log.warning("shared sweep failed: %s", exc)
