"""``dicom-node import``: bring DICOM files from disk into the archive through the C-STORE path.

Each file becomes a ``Received`` item, exactly as a C-STORE would deliver it: the SOP Class and
Instance UIDs and the transfer syntax from the File Meta (the command's role in PS3.4 B.2), the
dataset bytes after the File Meta as they are in the file, and the source "import".  It then
goes through ``Ingestor.receive``, so the checks, the duplicates policy, the durable write and
the index row are those of C-STORE, and an import runs safely beside a serving node (each holds
the store's shared lock; SQLite waits out the other's writes up to database_timeout).

DICOMDIR files and files that are not DICOM are skipped and counted (each named at DEBUG).
Files without File Meta are read as ``node.maintenance.files`` describes; their SOP UIDs come
from the dataset.  A few files are ingested at once (``workers``): each waits mostly for its
fsyncs, and the index commits writes that arrive together in one go.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter, deque
from collections.abc import Collection, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from node.dicom.header import read_header
from node.errors import NodeError, OutOfResources
from node.index.writer import Source
from node.ingest import Ingestor, Outcome, Received
from node.maintenance import NoProgress, Progress
from node.maintenance.files import NotDicom, read_dicom_file

log = logging.getLogger(__name__)

IMPORT_SOURCE = Source("import", "")
DEFAULT_WORKERS = 4


class Result(StrEnum):
    """What became of one file."""

    STORED = "stored"
    REPLACED = "replaced"  # same UID held with other content; policy replace
    DUPLICATE = "duplicate"  # same UID and content already held, or other content kept
    NOT_DICOM = "not DICOM"
    DICOMDIR = "DICOMDIR"
    FAILED = "failed"


_OUTCOMES = {
    Outcome.STORED: Result.STORED,
    Outcome.REPLACED: Result.REPLACED,
    Outcome.DUPLICATE: Result.DUPLICATE,
    Outcome.KEPT_EXISTING: Result.DUPLICATE,
}


@dataclass
class ImportSummary:
    """Counts of an import; ``errors`` says why files failed (reason -> files)."""

    seen: int = 0
    results: Counter[Result] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    stopped: str = ""  # why the import stopped before the end ('' when it did not)
    seconds: float = 0.0

    @property
    def failed(self) -> int:
        return self.results[Result.FAILED]

    @property
    def ok(self) -> bool:
        return self.failed == 0 and not self.stopped

    def line(self) -> str:
        r = self.results
        return (
            f"{self.seen} files: {r[Result.STORED]} stored, {r[Result.REPLACED]} replaced, "
            f"{r[Result.DUPLICATE]} duplicates, {r[Result.NOT_DICOM]} not DICOM skipped, "
            f"{r[Result.DICOMDIR]} DICOMDIR skipped, {r[Result.FAILED]} failed "
            f"in {self.seconds:.1f} s"
        )


def iter_files(paths: Sequence[Path]) -> Iterator[Path]:
    """The files named, and every file under the folders named, in sorted order.

    Symbolic links to folders are not followed (a link loop cannot make the walk endless);
    links to files are read as the files they point to.
    """
    for path in paths:
        if not path.is_dir():
            yield path
            continue
        for folder, subfolders, names in os.walk(path):
            subfolders.sort()
            for name in sorted(names):
                yield Path(folder) / name


class Importer:
    """Imports files through an ``Ingestor``; one instance per run."""

    def __init__(self, ingestor: Ingestor, accepted_syntaxes: Collection[str] | None = None,
                 workers: int = DEFAULT_WORKERS) -> None:
        self.ingestor = ingestor
        self.accepted_syntaxes = accepted_syntaxes
        self.workers = max(1, workers)

    def run(self, paths: Sequence[Path], progress: Progress | None = None) -> ImportSummary:
        started = time.monotonic()
        summary = ImportSummary()
        if progress is None:
            progress = NoProgress()
        else:  # the total costs a walk of the tree: only when someone watches
            progress.start(sum(1 for _ in iter_files(paths)))
        in_flight: deque[Future[tuple[Result, str]]] = deque()
        with ThreadPoolExecutor(self.workers, thread_name_prefix="import") as pool:
            try:
                for path in iter_files(paths):
                    if summary.stopped:
                        break
                    in_flight.append(pool.submit(self.import_file, path))
                    if len(in_flight) >= 2 * self.workers:  # bounded: files are read whole
                        self._count(summary, in_flight.popleft(), progress)
                while in_flight:
                    self._count(summary, in_flight.popleft(), progress)
            finally:
                for future in in_flight:
                    future.cancel()
                progress.finish()
        summary.seconds = time.monotonic() - started
        return summary

    def _count(self, summary: ImportSummary, future: Future[tuple[Result, str]],
               progress: Progress) -> None:
        try:
            result, reason = future.result()
        except OutOfResources as exc:
            # The disk is full or the index unreachable: every further file would fail the
            # same way, so no more are started (those in flight finish and are counted).
            result, reason = Result.FAILED, str(exc)
            if not summary.stopped:
                log.error("import stopping: %s", exc)
                summary.stopped = reason
        summary.seen += 1
        summary.results[result] += 1
        if result is Result.FAILED:
            summary.errors[reason] += 1
        progress.update(summary.seen, summary.failed)

    def import_file(self, path: Path) -> tuple[Result, str]:
        """Import one file: its result and, for a failure, why."""
        try:
            item = self._received(path)
        except NotDicom:
            log.debug("import %s: not DICOM, skipped", path)
            return Result.NOT_DICOM, ""
        except NodeError as exc:
            return self._failed(path, str(exc))
        except OSError as exc:
            return self._failed(path, exc.strerror or str(exc))
        if item is None:
            log.debug("import %s: DICOMDIR, skipped", path)
            return Result.DICOMDIR, ""
        try:
            outcome = self.ingestor.receive(item)
        except OutOfResources:
            raise
        except NodeError as exc:
            return self._failed(path, str(exc), item.sop_instance_uid)
        except OSError as exc:  # an I/O error in the store
            return self._failed(path, f"store: {exc.strerror or exc}", item.sop_instance_uid)
        log.debug("import %s: %s %s", path, item.sop_instance_uid, outcome.value)
        return _OUTCOMES[outcome], ""

    def _received(self, path: Path) -> Received | None:
        """The file as a C-STORE would carry it; None for a DICOMDIR."""
        found = read_dicom_file(path)
        if found.is_directory:
            return None
        if self.accepted_syntaxes is not None and (
            found.transfer_syntax not in self.accepted_syntaxes
        ):
            raise NotAccepted(f"transfer syntax {found.transfer_syntax} is not one the node "
                              "accepts")
        sop_class, sop_instance = found.sop_class_uid, found.sop_instance_uid
        if not (sop_class and sop_instance):
            # No File Meta (or one without the SOP UIDs): the dataset names itself.
            header = read_header(found.dataset, found.transfer_syntax)
            sop_class = sop_class or header.sop_class_uid
            sop_instance = sop_instance or header.sop_instance_uid
        return Received(sop_class, sop_instance, found.transfer_syntax, found.dataset,
                        IMPORT_SOURCE)

    @staticmethod
    def _failed(path: Path, reason: str, uid: str = "") -> tuple[Result, str]:
        log.warning("import %s%s failed: %s", path, f" ({uid})" if uid else "", reason)
        return Result.FAILED, reason


class NotAccepted(NodeError):
    """The file is DICOM, but in a form a C-STORE to the node would not be accepted in."""
