"""The content-hashed file store: a file's place comes only from the SHA-256 of its bytes.

Layout under the storage directory::

    objects/ab/cd/abcd…(64 hex)   one Part 10 file per digest, two fan-out levels
    tmp/                          files being written; anything here after a crash is garbage
    .lock                         every process that opens the store holds it shared; the
                                  start-up sweep needs it alone (``exclusive``)

A write goes to ``tmp/``, is fsynced, renamed into place, and the folder is fsynced, so after
``put`` returns the file survives power loss.  No path is ever built from a dataset attribute.
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from node.errors import StorageFull

log = logging.getLogger(__name__)

_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store:
    """Files addressed by digest, written durably and atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.objects = root / "objects"
        self.tmp = root / "tmp"
        self._known_folders: set[Path] = set()  # fan-out folders known to exist (≤ 65,792)
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

    def close(self) -> None:
        """Release the shared lock (the files stay as they are)."""
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
        is left behind; a full disk raises StorageFull.
        """
        digest = digest or digest_of(parts)
        size = sum(len(p) for p in parts)
        final = self.path_of(digest)
        if final.is_file():
            return StoredFile(digest, size, created=False)
        temporary = self.tmp / f"{uuid.uuid4().hex}.part"
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                written = os.writev(fd, parts)
                if written != size:  # writev may be short; finish with plain writes
                    data = b"".join(parts)[written:]
                    while data:
                        data = data[os.write(fd, data) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            self._make_parents(final)
            try:
                os.rename(temporary, final)
            except FileNotFoundError:  # the folder was removed behind our back: make it again
                self._known_folders.discard(final.parent)
                self._make_parents(final)
                os.rename(temporary, final)
            _fsync_dir(final.parent)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            if exc.errno in _NO_SPACE:
                raise StorageFull(f"no space left in store {self.root}") from exc
            raise
        return StoredFile(digest, size, created=True)

    def _make_parents(self, final: Path) -> None:
        # A new fan-out folder must itself be made durable in its parent (fsync the parent).
        if final.parent in self._known_folders:
            return
        for folder in (final.parent.parent, final.parent):
            if not folder.is_dir():
                try:
                    folder.mkdir()
                except FileExistsError:
                    continue
                _fsync_dir(folder.parent)
        self._known_folders.add(final.parent)

    def remove(self, digest: str) -> bool:
        """Delete the file with ``digest``; False when it was not there."""
        path = self.path_of(digest)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        _fsync_dir(path.parent)
        return True

    def clear_temporary(self) -> int:
        """Remove every file in ``tmp/`` (call only when no write is in flight)."""
        removed = 0
        for entry in os.scandir(self.tmp):
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed += 1
        return removed

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
