"""How the store makes its writes durable: a shared filesystem sync, or an fsync per file.

``filesystem`` (config ``store_sync``, the default on Linux): every writer renames its file
into place and waits for a ``syncfs(2)`` of the store's filesystem that started after its
rename.  One sync writes back every file, folder entry and new fan-out folder written before
it and flushes the disk's cache once, for all the writers that arrived meanwhile: the group
commit of node.index.writer, for files.  An fsync per file costs a flush for the file, one
for its folder and one for a new folder's parent, one writer at a time.  The price: the sync
also writes back whatever else is waiting on that filesystem, so a large unrelated writer there
(a restore, a database) slows C-STORE responses down.

``file``: each file is fsynced, then its folder; a new second-level folder's parent is
fsynced on a helper thread (``DirectorySync``) while the file's own fsync runs.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from enum import StrEnum
from pathlib import Path

from node import linux

log = logging.getLogger(__name__)

# Failed generations kept for writers still waiting on them (a sync's error goes to its group).
_REMEMBERED_FAILURES = 1024


class StoreSync(StrEnum):
    """How new files are made durable (config ``store_sync``)."""

    FILESYSTEM = "filesystem"  # one syncfs(2) for every writer of the moment
    FILE = "file"  # fsync each file and its folder


def fsync(path: Path | str, directory: bool = False) -> None:
    """Make a file's content, or a folder's entries, durable."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path | str) -> None:
    fsync(path, directory=True)


class FilesystemSync:
    """Group syncs of the filesystem holding one folder."""

    def __init__(self, folder: Path) -> None:
        self._fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._started = 0  # generations of syncs started, and finished
        self._finished = 0
        self._running = False
        self._failures: dict[int, OSError] = {}

    def close(self) -> None:
        os.close(self._fd)

    def wait(self) -> None:
        """Return when everything written before the call is durable.

        Raises the OSError of a sync that should have covered the caller's writes: syncfs
        reports a writeback error only once, so each writer of that group gets it.
        """
        with self._changed:
            # A sync running now may have started before the caller's writes: the next one
            # is the first sure to cover them.
            ticket = self._started + 1
            while self._finished < ticket:
                if self._running:
                    self._changed.wait()
                else:
                    self._run_one()
            failures = [self._failures[g] for g in range(ticket, self._finished + 1)
                        if g in self._failures]
        if failures:
            raise failures[0]

    def _run_one(self) -> None:
        """Run one sync, the lock released meanwhile (called holding it)."""
        self._running = True
        self._started += 1
        generation = self._started
        error: OSError | None = None
        self._lock.release()
        try:
            linux.syncfs(self._fd)
        except OSError as exc:  # handed to every writer of this generation
            error = exc
        finally:
            self._lock.acquire()
            self._running = False
            self._finished = generation
            if error is not None:
                self._failures[generation] = error
                for old in [g for g in self._failures if g <= generation - _REMEMBERED_FAILURES]:
                    del self._failures[old]
            self._changed.notify_all()


class SyncJob:
    """One directory fsync run on a helper thread; ``wait`` returns when it is done."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.error: Exception | None = None
        self._finished = threading.Lock()
        self._finished.acquire()  # released by the helper thread

    def finish(self, error: Exception | None) -> None:
        self.error = error
        self._finished.release()

    def wait(self) -> None:
        """Block until the directory is synced; raises the helper's error if it is not."""
        with self._finished:
            pass
        if self.error is not None:
            raise self.error

    def settle(self) -> None:
        """Wait after the write itself failed: the write's error is the one raised, this
        job's own is logged."""
        with self._finished:
            pass
        if self.error is not None:
            log.warning("fan-out folder could not be made durable: %s", self.error)


class DirectorySync:
    """Helper threads that fsync a directory while the writer waits for its own file's fsync:
    two waits on the disk at once instead of one after the other (``store_sync: file``)."""

    def __init__(self, threads: int) -> None:
        self._jobs: queue.SimpleQueue[SyncJob | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._serve, name=f"store-folder-sync-{n}", daemon=True)
            for n in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, directory: str) -> SyncJob:
        job = SyncJob(directory)
        self._jobs.put(job)
        return job

    def close(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                fsync_dir(job.directory)
            except OSError as exc:  # handed to the writer waiting for it, which raises it
                job.finish(exc)
            except Exception as exc:  # a bug: the writer fails, this thread serves on
                log.exception("directory fsync job failed")
                job.finish(exc)
            else:
                job.finish(None)
