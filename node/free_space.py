"""The store's free-space guard: refuse new files while its disk is below ``min_free_space``.

A disk filled to the last byte hurts more than the instance that fills it: the index (SQLite's
WAL, PostgreSQL on the same disk) and the log need room too.  So while the file system of the
store has less than ``min_free_space`` bytes available, ``Store.put`` raises StorageFull (the
C-STORE handler answers 0xA700, PS3.4 B.2.3, and nothing is kept), and once space returns it
stores again by itself.

Reading: ``os.statvfs`` (f_bavail, the space an unprivileged writer may use).  On a local disk
it costs ~1.6 µs (≈0.1 % of a core at 500 instances/s), but on NFS or FUSE it is a round trip
to the server, so it is not done per instance.  The reading is kept for ``max_age`` seconds and
the bytes written since are subtracted from it; it is read again sooner when that estimate
would fall below the threshold, so the decision near the threshold always rests on a fresh
reading and a burst of writes cannot overshoot it by more than the other processes writing to
the same disk within ``max_age``.  While refusing, every put reads again: a refused put is cheap
anyway, and the first instance after space returns is stored.  The one state change each way is
logged (WARNING when it starts refusing, INFO when it stores again), not each instance.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from node.errors import StorageFull

log = logging.getLogger(__name__)

MAX_AGE = 1.0  # seconds a free-space reading is trusted, less the bytes written since
_MB = 1000**2


def available_bytes(path: Path | str) -> int:
    """Bytes an unprivileged process may still write on the file system holding ``path``."""
    reading = os.statvfs(path)
    return reading.f_bavail * reading.f_frsize


class FreeSpaceGuard:
    """Says, before each new file, whether the store's disk still has ``minimum`` bytes free."""

    def __init__(self, path: Path, minimum: int, max_age: float = MAX_AGE,
                 read: Callable[[Path | str], int] = available_bytes,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.minimum = minimum
        self.max_age = max_age
        self._read = read
        self._clock = clock
        self._lock = threading.Lock()
        self._free = 0  # the last reading
        self._read_at = -max_age - 1.0  # monotonic time of that reading: none yet
        self._written = 0  # bytes let through since that reading
        self._refusing = False

    def claim(self, size: int) -> None:
        """Let ``size`` new bytes be written, or raise StorageFull while space is short."""
        if self.minimum <= 0:
            return
        with self._lock:
            now = self._clock()
            if (self._refusing or now - self._read_at > self.max_age
                    or self._free - self._written - size < self.minimum):
                self._free, self._read_at, self._written = self._read(self.path), now, 0
            free = self._free - self._written
            enough = free >= self.minimum
            if enough:
                self._written += size
            changed, self._refusing = self._refusing == enough, not enough
        if changed:  # logged outside the lock: a slow log handler must not hold up writers
            if enough:
                log.info("store has %d MB free again (min_free_space %d MB): storing again",
                         free // _MB, self.minimum // _MB)
            else:
                log.warning("store has %d MB free, below min_free_space %d MB: refusing new "
                            "instances (0xA700) until space returns", free // _MB,
                            self.minimum // _MB)
        if not enough:
            raise StorageFull(f"store below min_free_space ({self.minimum // _MB} MB free "
                              "needed): out of resources, retry later")
