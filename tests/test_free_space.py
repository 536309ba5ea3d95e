"""min_free_space: below it C-STORE answers 0xA700 and keeps nothing, import stops, and the node
stores again by itself once space returns.

The node runs on the file system of the test's tmp dir with ``min_free_space`` set just under
what that file system has free; a ballast file (``posix_fallocate``, tens of MB) takes it below,
and deleting the ballast brings it back.  The ballast is always removed.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from node.errors import StorageFull
from node.free_space import FreeSpaceGuard, available_bytes
from tests.conftest import REPO, NodeProcess, poll_until
from tests.dicomdata import Sent, make_instance, sha256_file, store_association, write_part10

OUT_OF_RESOURCES = 0xA700
MB = 1000**2
HEADROOM = 48 * MB  # free space above the threshold when the node starts
BELOW = 64 * MB  # how far under the threshold the ballast takes the disk (room for other writers)


@contextmanager
def ballast(path: Path, size: int) -> Iterator[Path]:
    """A file holding ``size`` bytes of disk (allocated, not written); removed on the way out."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError:
        os.close(fd)
        path.unlink()
        raise
    os.close(fd)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def rows_of(node: NodeProcess, uid: str) -> list[tuple[Any, ...]]:
    return node.rows("SELECT digest FROM instance WHERE sop_instance_uid = ?", uid)


def test_below_min_free_space_refuses_keeps_nothing_and_recovers(node_factory: Any,
                                                                 tmp_path: Path) -> None:
    threshold = available_bytes(tmp_path) - HEADROOM
    node: NodeProcess = node_factory(min_free_space=threshold).start()
    instances = [make_instance(InstanceNumber=i) for i in range(400)]
    files = [write_part10(ds, tmp_path / "in" / f"{i}.dcm") for i, ds in enumerate(instances)]
    file_of = {str(ds.SOPInstanceUID): path for ds, path in zip(instances, files, strict=True)}
    pending = iter(files)
    results: list[Sent] = []
    with store_association(node.port, files) as send:
        first = send(next(pending))
        assert first.status == 0, "the disk is above the threshold: the store must succeed"

        with ballast(tmp_path / "ballast.bin",
                     available_bytes(tmp_path) - threshold + BELOW) as held:
            assert available_bytes(tmp_path) < threshold

            # The node trusts a free-space reading for up to a second (node.free_space): poll
            # with new instances until the first refusal.
            def refused() -> bool:
                results.append(send(next(pending)))
                return results[-1].status == OUT_OF_RESOURCES

            assert poll_until(refused, timeout=10, interval=0.05), results[-5:]
            refusal = results[-1]
            assert all(r.status == 0 for r in results[:-1]), results
            assert "min_free_space" in refusal.comment
            more = [send(next(pending)) for _ in range(3)]
            assert [r.status for r in more] == [OUT_OF_RESOURCES] * 3, more

            # Nothing of a refused instance is kept: no row, no file, no temporary file.
            for sent in [refusal, *more]:
                assert rows_of(node, sent.sop_instance_uid) == []
            stored = 1 + len(results) - 1
            assert len(node.stored_files()) == stored
            assert node.rows("SELECT COUNT(*) FROM instance") == [(stored,)]
            assert node.temporary_files() == []

            # An import beside the serving node stops at the first refusal, keeps nothing.
            folder = tmp_path / "import"
            for n in range(3):
                write_part10(make_instance(InstanceNumber=n), folder / f"{n}.dcm")
            done = subprocess.run(
                [sys.executable, "-m", "node", "import", "-c", str(node.config_path),
                 "--workers", "1", str(folder)],
                cwd=REPO, capture_output=True, text=True, timeout=60)
            assert done.returncode == 1, done.stdout + done.stderr
            assert "import stopped early" in done.stderr and "min_free_space" in done.stderr
            assert len(node.stored_files()) == stored
            assert node.temporary_files() == []
        assert not held.exists()

        # Space is back: the refused instance and the next one are stored, no restart.
        again = [send(file_of[sent.sop_instance_uid]) for sent in [refusal, *more]]
        assert [r.status for r in again] == [0] * 4, again
    for sent in again:
        [(digest,)] = rows_of(node, sent.sop_instance_uid)
        path = node.storage / "objects" / digest[:2] / digest[2:4] / digest
        assert sha256_file(path) == digest
    assert node.process is not None and node.process.poll() is None
    log = node.log()
    # The state change is logged once each way; each refused C-STORE has its own line anyway.
    assert log.count("refusing new instances") == 1, "one WARNING when refusing starts"
    assert log.count("storing again") == 1, "one INFO when it ends"
    warning = next(line for line in log.splitlines() if "refusing new instances" in line)
    again_line = next(line for line in log.splitlines() if "storing again" in line)
    assert " WARNING " in warning and " INFO " in again_line
    assert log.index("refusing new instances") < log.index("storing again")


# --- The guard's reading: cached, re-read near the threshold and while refusing -------------

class FakeDisk:
    """Free bytes and time under the test's control, counting the readings taken."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.now = 100.0
        self.readings = 0

    def read(self, path: Path | str) -> int:
        self.readings += 1
        return self.free

    def clock(self) -> float:
        return self.now


def test_guard_reads_once_a_second_except_near_the_threshold(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    disk = FakeDisk(free=1000 * MB)
    guard = FreeSpaceGuard(tmp_path, 100 * MB, max_age=1.0, read=disk.read, clock=disk.clock)
    for _ in range(500):  # far above the threshold: one reading for the whole burst
        guard.claim(MB // 2)
    assert disk.readings == 1
    disk.now += 1.5
    guard.claim(MB)
    assert disk.readings == 2  # too old: read again

    # Written bytes count against the cached reading: close to the threshold it reads again
    # at once, and refuses as soon as the disk (not the estimate) says so.
    disk.free = 101 * MB
    disk.now += 1.5
    guard.claim(MB)
    assert disk.readings == 3
    disk.free = 99 * MB  # another process wrote meanwhile
    with caplog.at_level(logging.INFO, logger="node.free_space"):
        with pytest.raises(StorageFull):
            guard.claim(MB)
        assert disk.readings == 4  # the estimate fell under the threshold: fresh reading
        for _ in range(3):
            with pytest.raises(StorageFull):
                guard.claim(MB)
        assert disk.readings == 7  # refusing: every claim reads again
        disk.free = 500 * MB
        guard.claim(MB)
        guard.claim(MB)
    assert disk.readings == 8
    assert [(r.levelname, "refusing" in r.message, "again" in r.message)
            for r in caplog.records] == [("WARNING", True, False), ("INFO", False, True)]


def test_guard_off_at_zero_never_reads(tmp_path: Path) -> None:
    disk = FakeDisk(free=0)
    guard = FreeSpaceGuard(tmp_path, 0, read=disk.read, clock=disk.clock)
    guard.claim(10 * MB)
    assert disk.readings == 0
