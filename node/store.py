"""The content-hashed file store: a file's place comes only from the SHA-256 of its bytes.

Layout under the storage directory::

    objects/ab/cd/abcd…(64 hex)   one Part 10 file per digest, two fan-out levels
    tmp/                          files being written; anything here after a crash is garbage
    quarantine/                   files taken out of objects/ (corrupt, or no row): kept
    .lock                         every process that opens the store holds it shared; the
                                  start-up sweep needs it alone (``exclusive``)

A write goes to ``tmp/`` and is renamed into place; after ``put`` returns the file, its folder
entry and its fan-out folders survive power loss.  The 256 first-level folders are made (and
their parent fsynced) when the store opens; second-level folders as instances need them.  How
the writes become durable is node.store_sync: by default one filesystem sync shared by every
writer of the moment (``store_sync: filesystem``), else an fsync of each file before its
rename and of its folder after it (``store_sync: file``).  No path is ever built from a dataset
attribute.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from node.errors import StorageFull
from node.free_space import FreeSpaceGuard
from node.linux import rename_new, syncfs_available
from node.store_sync import (
    DirectorySync,
    FilesystemSync,
    StoreSync,
    SyncJob,
    fsync_dir,
)

log = logging.getLogger(__name__)

_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
_FANOUT = [f"{n:02x}" for n in range(256)]
# Folder fsyncs that may run beside the writers' own file fsyncs.
_FOLDER_SYNC_THREADS = 2


@dataclass(frozen=True)
class StoredFile:
    """A file held by the store."""

    digest: str
    size: int
    created: bool  # False when identical content was already there


def digest_of(parts: Sequence[bytes]) -> str:
    """SHA-256 hex digest of the concatenated ``parts``."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.hexdigest()


def sha256_of(path: Path | str) -> str:
    """The SHA-256 hex digest of a file's bytes, read in chunks (bounded memory)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _create_folder(folder: str) -> None:
    """Create a second-level fan-out folder unless it is there (its first level too, when that
    was removed behind our back, then made durable in ``objects/`` at once)."""
    try:
        os.mkdir(folder)
    except FileExistsError:
        pass
    except FileNotFoundError:
        parent = os.path.dirname(folder)
        with contextlib.suppress(FileExistsError):
            os.mkdir(parent)
        fsync_dir(os.path.dirname(parent))
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder)


def _unlink_if_there(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class Store:
    """Files addressed by digest, written durably and atomically."""

    def __init__(self, root: Path, min_free_space: int = 0,
                 sync: StoreSync = StoreSync.FILESYSTEM) -> None:
        self.root = root
        if sync is StoreSync.FILESYSTEM and not syncfs_available():
            log.warning("store_sync: this system has no syncfs(2); each file is fsynced")
            sync = StoreSync.FILE
        self.sync = sync
        self._group: FilesystemSync | None = None  # store_sync: filesystem, once open
        # New files are refused while the disk has less free (node.free_space); 0: never.
        self.space = FreeSpaceGuard(root, min_free_space)
        self.objects = root / "objects"
        self.tmp = root / "tmp"
        self.quarantined = root / "quarantine"  # files taken out of objects/, never deleted
        self._objects = str(self.objects)  # the hot path joins plain strings
        self._tmp = str(self.tmp)
        # Second-level fan-out folders whose entry in their parent is known durable (≤ 65,536).
        self._durable_folders: set[str] = set()
        self._folder_sync: DirectorySync | None = None
        self._lock: int | None = None

    def open(self) -> None:
        """Create the folders if needed and take the store's shared lock.

        Fails clearly when the store is not writable.
        """
        for folder in (self.root, self.objects, self.tmp):
            folder.mkdir(parents=True, exist_ok=True)
        if not os.access(self.tmp, os.W_OK | os.X_OK):
            raise PermissionError(f"store {self.root} is not writable")
        if self._lock is None:
            self._lock = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o640)
            fcntl.flock(self._lock, fcntl.LOCK_SH)
        # Every first-level folder, once: from here on a new second-level folder needs only
        # its own parent made durable.  The fsync covers folders an earlier run made too.
        for prefix in _FANOUT:
            with contextlib.suppress(FileExistsError):
                os.mkdir(os.path.join(self._objects, prefix))
        fsync_dir(self.objects)
        if self.sync is StoreSync.FILESYSTEM:
            if self._group is None:
                self._group = FilesystemSync(self.root)
        elif self._folder_sync is None:
            self._folder_sync = DirectorySync(_FOLDER_SYNC_THREADS)

    def close(self) -> None:
        """Release the shared lock (the files stay as they are)."""
        if self._folder_sync is not None:
            self._folder_sync.close()
            self._folder_sync = None
        if self._group is not None:
            self._group.close()
            self._group = None
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[bool]:
        """Hold the store alone while the block runs, if no other process has it open.

        Yields False (without waiting) when another process (a serve, a pull, an import)
        holds the store: its temporary files and its files whose rows are not committed yet
        are not garbage then.  The shared lock is held again afterwards.
        """
        if self._lock is None:
            raise RuntimeError("store is not open")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # flock converts a lock by dropping it first (flock(2)): take the shared one again.
            fcntl.flock(self._lock, fcntl.LOCK_SH)
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(self._lock, fcntl.LOCK_SH)

    def path_of(self, digest: str) -> Path:
        """Where the file with ``digest`` lives (whether or not it exists)."""
        if not _DIGEST.match(digest):
            raise ValueError("not a SHA-256 hex digest")
        return self.objects / digest[:2] / digest[2:4] / digest

    def exists(self, digest: str) -> bool:
        return self.path_of(digest).is_file()

    def put(self, parts: Sequence[bytes], digest: str | None = None) -> StoredFile:
        """Write the concatenation of ``parts`` durably and return its digest.

        ``digest`` may be passed when the caller computed it already.  On any failure no file
        is left behind; a full disk, or one below the store's ``min_free_space``, raises
        StorageFull (content already held needs no space and is never refused).
        """
        digest = digest or digest_of(parts)
        if not _DIGEST.match(digest):
            raise ValueError("not a SHA-256 hex digest")
        size = sum(len(p) for p in parts)
        folder = os.path.join(self._objects, digest[:2], digest[2:4])
        final = os.path.join(folder, digest)
        try:
            if self._group is not None:
                return self._put_synced_together(parts, size, folder, final, self._group)
            return self._put_fsynced(parts, size, folder, final)
        except OSError as exc:
            if exc.errno in _NO_SPACE:
                raise StorageFull(f"no space left in store {self.root}") from exc
            raise

    def _put_synced_together(self, parts: Sequence[bytes], size: int, folder: str, final: str,
                             group: FilesystemSync) -> StoredFile:
        """``store_sync: filesystem``: rename into place, then wait for a shared syncfs.

        Until that sync a crash may leave the file torn under its final name; no row points
        to it yet (rows are committed after ``put`` returns), the start-up sweep takes it, and
        a file found in place is trusted only once its content is checked.
        """
        digest = os.path.basename(final)
        try:
            self.space.claim(size)  # StorageFull below min_free_space; nothing written yet
        except StorageFull:
            if not (os.path.isfile(final) and sha256_of(final) == digest):
                raise
            created = False  # content already held needs no space
        else:
            created = self._place(self._write_temporary(parts, size), folder, final)
        try:
            group.wait()
        except OSError:
            if created:
                _unlink_if_there(final)
            raise
        return StoredFile(digest, size, created=created)

    @staticmethod
    def _place(temporary: str, folder: str, final: str) -> bool:
        """Rename ``temporary`` to ``final``; False (and ``temporary`` removed) when the same
        content is there already.  A file there with other bytes is a torn leftover of a crash
        before its sync: replaced."""
        try:
            try:
                if rename_new(temporary, final):
                    return True
            except FileNotFoundError:  # a new second-level folder (or one removed meanwhile)
                _create_folder(folder)
                if rename_new(temporary, final):
                    return True
            # Rare: an unindexed file, or another writer's in flight (its sync may be ahead).
            if sha256_of(final) == os.path.basename(final):
                _unlink_if_there(temporary)
                return False
            os.rename(temporary, final)
            return True
        except OSError:
            _unlink_if_there(temporary)
            raise

    def _put_fsynced(self, parts: Sequence[bytes], size: int, folder: str,
                     final: str) -> StoredFile:
        """``store_sync: file``: fsync the file, rename it into place, fsync its folder."""
        digest = os.path.basename(final)
        if os.path.isfile(final):
            # Rare (an unindexed file, or another process's write of the same instance):
            # its writer may not have made its entries durable yet, so this one does.
            self._make_durable_folder(folder)
            fsync_dir(folder)
            return StoredFile(digest, size, created=False)
        self.space.claim(size)  # StorageFull below min_free_space; nothing written yet
        new_folder = folder not in self._durable_folders
        if new_folder:  # made before the file, so that one journal commit can carry both
            _create_folder(folder)
        folder_synced = self._sync_later(os.path.dirname(folder)) if new_folder else None
        try:
            temporary = self._write_temporary(parts, size, fsynced=True)
        except OSError:
            if folder_synced is not None:
                folder_synced.settle()
            raise
        try:
            if folder_synced is not None:
                folder_synced.wait()
                self._durable_folders.add(folder)
            try:
                os.rename(temporary, final)
            except FileNotFoundError:  # the folder was removed behind our back: make it again
                self._durable_folders.discard(folder)
                self._make_durable_folder(folder)
                os.rename(temporary, final)
            fsync_dir(folder)
        except OSError:
            _unlink_if_there(temporary)
            raise
        return StoredFile(digest, size, created=True)

    def _write_temporary(self, parts: Sequence[bytes], size: int, fsynced: bool = False) -> str:
        """A new file in ``tmp/`` holding ``parts``; removed again if writing it fails."""
        temporary = os.path.join(self._tmp, f"{uuid.uuid4().hex}.part")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            written = os.writev(fd, parts)
            if written != size:  # writev may be short; finish with plain writes
                data = b"".join(parts)[written:]
                while data:
                    data = data[os.write(fd, data) :]
            if fsynced:
                os.fsync(fd)
        except OSError:
            os.close(fd)
            _unlink_if_there(temporary)
            raise
        os.close(fd)
        return temporary

    def _make_durable_folder(self, folder: str) -> None:
        """Create ``folder`` if needed and make its entry durable, here and now.

        Its parent is fsynced also when the folder was there already: another writer may
        have made it a moment ago and still be waiting for that fsync, or an earlier run may
        have stopped between the two.  A row must never point into a folder whose entry could
        still vanish on power loss.
        """
        if folder not in self._durable_folders:
            _create_folder(folder)
            fsync_dir(os.path.dirname(folder))
            self._durable_folders.add(folder)

    def _sync_later(self, directory: str) -> SyncJob | None:
        """fsync ``directory`` on a helper thread while the caller's own fsync runs (both are
        waits on the disk, not work for the interpreter); here and now (None) on a store
        that was not opened."""
        if self._folder_sync is None:
            fsync_dir(directory)
            return None
        return self._folder_sync.submit(directory)

    def quarantine(self, path: Path, name: str | None = None) -> Path:
        """Move ``path`` (a file of the store) into ``quarantine/``, never overwriting.

        The file keeps its name, or takes ``name`` (a digest either way, never a dataset
        attribute), with ``.1``, ``.2``… added when that name is taken.  Linked first, then
        unlinked, so that at no moment is it in neither place; both folders are fsynced.
        Returns where it went.
        """
        self.quarantined.mkdir(exist_ok=True)
        name = name or path.name
        target = self.quarantined / name
        suffix = 0
        while True:
            try:
                os.link(path, target)
                break
            except FileExistsError:
                suffix += 1
                target = self.quarantined / f"{name}.{suffix}"
        with contextlib.suppress(FileNotFoundError):  # removed meanwhile: the copy counts
            os.unlink(path)
        fsync_dir(self.quarantined)
        fsync_dir(path.parent)
        return target

    def remove(self, digest: str) -> bool:
        """Delete the file with ``digest``; False when it was not there."""
        path = self.path_of(digest)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        fsync_dir(path.parent)
        return True

    def remove_unreferenced(self, digest: str, referenced: Callable[[str], bool],
                            to_quarantine: bool = False) -> bool:
        """Delete the file with ``digest`` unless an index row names it; True when removed.

        For files whose rows were just deleted (or never committed).  The same instance may
        arrive again meanwhile and find the file still there, so nothing new is written, and
        index it: deleting the file then would leave a row without its file.  So the file is
        first moved aside (into ``tmp/``, cleared at start-up), then the index is asked: a row
        that names it now puts the file back; else it is deleted, or moved into
        ``quarantine/`` with ``to_quarantine``.  An ingest that committed its row after that
        question finds the file gone and writes it again (node.ingest).
        """
        path = self.path_of(digest)
        parked = os.path.join(self._tmp, f"{digest}.deleting")
        try:
            os.rename(path, parked)
        except FileNotFoundError:
            return False
        keep = True  # also when the index cannot be asked
        try:
            keep = referenced(digest)
        finally:
            if keep:
                with contextlib.suppress(FileExistsError):  # written again: same content
                    os.link(parked, path)
            if to_quarantine and not keep:
                self.quarantine(Path(parked), name=digest)
            else:
                os.unlink(parked)
            fsync_dir(path.parent)
        return not keep

    def clear_temporary(self) -> int:
        """Remove every file in ``tmp/`` (call only when no write is in flight)."""
        removed = 0
        for entry in os.scandir(self.tmp):
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed += 1
        return removed

    def clear_stale_temporary(self, older_than: float) -> int:
        """Remove the write files in ``tmp/`` last written before ``older_than`` (epoch s).

        Safe while other processes write: a write in flight touches its file continually.
        Files parked by a deletion (``*.deleting``) keep their old times and may still be put
        back, so they are left to ``clear_temporary`` at a start with the store held alone.
        """
        removed = 0
        for entry in os.scandir(self.tmp):
            if (entry.name.endswith(".part") and entry.is_file(follow_symlinks=False)
                    and entry.stat(follow_symlinks=False).st_mtime < older_than):
                with contextlib.suppress(FileNotFoundError):  # finished meanwhile
                    os.unlink(entry.path)
                    removed += 1
        return removed

    def written_before(self, digest: str, older_than: float) -> bool:
        """True when the file ``digest`` exists and was written before ``older_than``."""
        try:
            return self.path_of(digest).stat().st_mtime < older_than
        except FileNotFoundError:
            return False

    def prefixes(self) -> Iterator[str]:
        """The two-hex-digit first fan-out folders present, sorted."""
        if not self.objects.is_dir():
            return
        yield from sorted(
            e.name for e in os.scandir(self.objects) if e.is_dir() and len(e.name) == 2
        )

    def digests_under(self, prefix: str) -> Iterator[str]:
        """Digests of the files under the first-level fan-out folder ``prefix``."""
        top = self.objects / prefix
        for sub in sorted(os.scandir(top), key=lambda e: e.name):
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub.path):
                if entry.is_file(follow_symlinks=False) and _DIGEST.match(entry.name):
                    yield entry.name
