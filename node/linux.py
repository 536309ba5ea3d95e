"""The Linux system calls the store needs that Python's ``os`` module lacks: ``syncfs(2)`` and
``renameat2(2)`` with RENAME_NOREPLACE, called through the C library (ctypes releases the GIL
for each call, so other threads go on meanwhile)."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_AT_FDCWD, _RENAME_NOREPLACE = -100, 1  # <fcntl.h>, <linux/fs.h>
_renameat2 = getattr(_libc, "renameat2", None)


def syncfs_available() -> bool:
    """True when this system has syncfs(2)."""
    return hasattr(_libc, "syncfs")


def syncfs(fd: int) -> None:
    """Write back and flush everything pending on the filesystem holding ``fd``."""
    if _libc.syncfs(fd) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"syncfs: {os.strerror(code)}")


def rename_new(source: str, target: str) -> bool:
    """Rename ``source`` to ``target`` unless ``target`` exists (False then): one atomic
    renameat2(RENAME_NOREPLACE) where the system and filesystem have it, else a check and a
    rename."""
    global _renameat2
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target),
                      _RENAME_NOREPLACE) == 0:
            return True
        code = ctypes.get_errno()
        if code == errno.EEXIST:
            return False
        if code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(code, os.strerror(code), target)
        _renameat2 = None  # this filesystem cannot: check, then rename, from now on
    if os.path.lexists(target):
        return False
    os.rename(source, target)
    return True
