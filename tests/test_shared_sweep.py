"""The shared sweep (node.recovery.sweep_shared): what crashes leave in a store that other
processes keep writing to goes once it is old, and nothing an ingest is about to index does.

Run in process against a real index on each backend; the start-up path with a second process
holding the store is tests/test_durability.py, and with two nodes tests/test_two_nodes.py.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from node.config import build_config
from node.errors import IndexUnavailable
from node.recovery import SharedSweeper, SweepReport, TooManyOrphans, sweep_shared
from node.services import Services, open_services
from tests.dicomdata import make_instance
from tests.findcorpus import receive_all

HOUR = 3600.0


@pytest.fixture
def archive(index_settings: dict[str, Any], tmp_path: Path) -> Iterator[Services]:
    services = open_services(build_config(dict(index_settings), tmp_path))
    receive_all(services.ingestor, [make_instance(InstanceNumber=n) for n in range(3)])
    try:
        yield services
    finally:
        services.close()


def plant(services: Services, content: bytes, age: float) -> str:
    """A file without a row, last written ``age`` seconds ago; its digest."""
    digest = hashlib.sha256(content).hexdigest()
    path = services.store.path_of(digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    os.utime(path, (time.time() - age, time.time() - age))
    return digest


def files(services: Services) -> set[str]:
    return {p.name for p in services.store.objects.glob("*/*/*")}


def test_old_files_without_rows_go_to_quarantine_recent_ones_stay(archive: Services) -> None:
    indexed = files(archive)
    old = plant(archive, b"left by a crash", age=2 * HOUR)
    recent = plant(archive, b"row about to be committed", age=5)

    report = sweep_shared(archive.store, archive.index.is_referenced, max_orphans=10)

    assert (report.orphans_removed, report.files_seen, report.shared) == (1, len(indexed) + 2,
                                                                          True)
    assert files(archive) == indexed | {recent}
    assert (archive.store.quarantined / old).read_bytes() == b"left by a crash"


def test_a_file_indexed_while_the_sweep_runs_is_kept(archive: Services) -> None:
    """The row that names the file was committed after the sweep listed the file as unindexed
    (the same instance arrived again and found the file there): the sweep asks the index once
    more with the file moved aside, and puts it back."""
    indexed = files(archive)
    raced = plant(archive, b"indexed at the last moment", age=2 * HOUR)
    asked: list[str] = []

    def referenced(digest: str) -> bool:
        asked.append(digest)
        return digest == raced

    report = sweep_shared(archive.store, referenced, max_orphans=10)

    assert asked == [raced] and report.orphans_removed == 0
    assert files(archive) == indexed | {raced}
    assert archive.store.path_of(raced).read_bytes() == b"indexed at the last moment"
    assert not list(archive.store.tmp.iterdir())  # nothing left parked


def test_a_lost_index_is_refused_before_anything_moves(archive: Services) -> None:
    before = files(archive)
    planted = {plant(archive, f"orphan {n}".encode(), age=2 * HOUR) for n in range(5)}

    with pytest.raises(TooManyOrphans, match="more than 3 stored files have no index row"):
        sweep_shared(archive.store, archive.index.is_referenced, max_orphans=3)

    assert files(archive) == before | planted
    assert not archive.store.quarantined.exists() or not list(
        archive.store.quarantined.iterdir())


def test_stale_write_files_go_recent_and_parked_ones_stay(archive: Services) -> None:
    tmp = archive.store.tmp
    ages = {"stale.part": 2 * HOUR, "in-flight.part": 1.0, f"{'a' * 64}.deleting": 2 * HOUR}
    for name, age in ages.items():
        (tmp / name).write_bytes(b"x")
        os.utime(tmp / name, (time.time() - age, time.time() - age))

    report = sweep_shared(archive.store, archive.index.is_referenced, max_orphans=10)

    assert report.temporary_removed == 1
    assert sorted(p.name for p in tmp.iterdir()) == sorted(["in-flight.part",
                                                            f"{'a' * 64}.deleting"])


def test_the_sweeper_goes_on_after_a_failed_pass_and_stops_when_asked() -> None:
    """In serve it runs every six hours; a failed pass (index down) is logged, not fatal."""
    calls: list[int] = []
    third = threading.Event()

    def one_pass() -> SweepReport:
        calls.append(len(calls))
        if len(calls) == 1:
            raise IndexUnavailable("index down")
        if len(calls) == 3:
            third.set()
        return SweepReport(0, 0, 0, 0.0, shared=True)

    sweeper = SharedSweeper(one_pass, interval=0.01)
    sweeper.start()
    try:
        assert third.wait(30)
    finally:
        sweeper.stop()
    stopped_at = len(calls)
    assert stopped_at >= 3
    assert not any(t.name == "shared-sweep" for t in threading.enumerate())
    assert len(calls) == stopped_at
