"""How the store makes new files durable (node.store_sync): one syncfs shared by the writers of
the moment, never one that started before a writer's rename; a failed sync fails its whole
group and leaves nothing; a torn file left in place by a crash is not trusted."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from node import linux
from node.config import build_config
from node.index.writer import Source
from node.ingest import Received
from node.linux import syncfs_available
from node.services import open_services
from node.store import Store
from node.store_sync import FilesystemSync, StoreSync
from tests.conftest import poll_until
from tests.dicomdata import make_instance
from tests.findcorpus import encoded

pytestmark = pytest.mark.skipif(not syncfs_available(), reason="no syncfs(2) here")


class FakeSyncfs:
    """Stands in for syncfs(2): counts calls, can hold them until released, can fail."""

    def __init__(self) -> None:
        self.calls = 0
        self.held = threading.Event()
        self.held.set()
        self.fail_next: OSError | None = None
        self.failing_calls: set[int] = set()  # numbers (from 1) of the calls that fail EIO
        self.running = threading.Event()

    def __call__(self, fd: int) -> None:
        self.calls += 1
        self.running.set()
        self.held.wait(30)
        error, self.fail_next = self.fail_next, None
        if error is not None:
            raise error
        if self.calls in self.failing_calls:
            raise OSError(errno.EIO, "syncfs: Input/output error")


@pytest.fixture
def fake_syncfs(monkeypatch: pytest.MonkeyPatch) -> FakeSyncfs:
    fake = FakeSyncfs()
    monkeypatch.setattr(linux, "syncfs", fake)
    return fake


@pytest.fixture
def group(tmp_path: Path) -> Iterator[FilesystemSync]:
    sync = FilesystemSync(tmp_path)
    yield sync
    sync.close()


def start(target: Callable[[], None], results: list[Any]) -> threading.Thread:
    def run() -> None:
        try:
            target()
            results.append("ok")
        except OSError as exc:
            results.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def waiting(sync: FilesystemSync) -> int:
    return len(sync._changed._waiters)  # type: ignore[attr-defined]


def behind_a_held_sync(group: FilesystemSync, fake: FakeSyncfs, writers: int,
                       results: list[Any]) -> list[threading.Thread]:
    """A first writer whose sync is held, then ``writers`` more queued behind it."""
    fake.held.clear()
    first = start(group.wait, results)
    assert fake.running.wait(10)
    # They finish their files while the first sync runs: that sync may have started before
    # their renames, so none of them may return with it.
    others = [start(group.wait, results) for _ in range(writers)]
    poll_until(lambda: waiting(group) == writers, timeout=10)
    assert results == []
    fake.held.set()
    for thread in [first, *others]:
        thread.join(10)
    return others


def test_writers_arriving_during_a_sync_share_the_next_one(
        group: FilesystemSync, fake_syncfs: FakeSyncfs) -> None:
    results: list[Any] = []
    behind_a_held_sync(group, fake_syncfs, 7, results)
    assert results == ["ok"] * 8
    assert fake_syncfs.calls == 2  # one for the first, one shared by the seven


def test_a_failed_sync_fails_every_writer_it_covered_and_the_next_one_succeeds(
        group: FilesystemSync, fake_syncfs: FakeSyncfs) -> None:
    fake_syncfs.failing_calls = {2}
    results: list[Any] = []
    behind_a_held_sync(group, fake_syncfs, 3, results)
    assert results[0] == "ok"  # the first writer's own sync
    assert len(results) == 4
    assert all(isinstance(r, OSError) and r.errno == errno.EIO for r in results[1:])
    group.wait()  # a writer after the failure gets a sync of its own, which succeeds
    assert fake_syncfs.calls == 3


def test_a_real_syncfs_runs_once_per_put(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    real = linux.syncfs
    calls: list[int] = []

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(linux, "syncfs", counting)
    store = Store(tmp_path / "s")
    store.open()
    try:
        assert store.sync is StoreSync.FILESYSTEM
        stored = store.put([b"first ", b"file"])
        assert stored.created
        assert store.path_of(stored.digest).read_bytes() == b"first file"
        assert stored.digest == hashlib.sha256(b"first file").hexdigest()
        assert len(calls) == 1
        assert list(store.tmp.iterdir()) == []
    finally:
        store.close()


def test_per_file_mode_writes_without_syncfs(tmp_path: Path, fake_syncfs: FakeSyncfs) -> None:
    store = Store(tmp_path / "s", sync=StoreSync.FILE)
    store.open()
    try:
        stored = store.put([b"fsynced"])
        assert store.path_of(stored.digest).read_bytes() == b"fsynced"
        assert store.put([b"fsynced"]).created is False
        assert fake_syncfs.calls == 0
    finally:
        store.close()


def test_a_torn_file_left_in_place_is_written_again(tmp_path: Path) -> None:
    """Until its sync, a file sits under its final name; after a crash it may be torn."""
    store = Store(tmp_path / "s")
    store.open()
    try:
        content = b"the whole instance"
        digest = hashlib.sha256(content).hexdigest()
        path = store.path_of(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content[:5])  # what a crash before the sync may leave
        stored = store.put([content])
        assert stored.created is True
        assert path.read_bytes() == content
        again = store.put([content])
        assert again.created is False and path.read_bytes() == content
    finally:
        store.close()


def test_a_failed_sync_leaves_no_file_and_no_row(tmp_path: Path,
                                                 fake_syncfs: FakeSyncfs) -> None:
    services = open_services(build_config({"ae_title": "SYNCNODE"}, tmp_path))
    try:
        ds = make_instance()
        item = Received(str(ds.SOPClassUID), str(ds.SOPInstanceUID), "1.2.840.10008.1.2",
                        encoded(ds), Source("T", "127.0.0.1"))
        fake_syncfs.fail_next = OSError(errno.EIO, "syncfs: Input/output error")
        with pytest.raises(OSError):
            services.ingestor.receive(item)
        assert services.ingestor.index.find(str(ds.SOPInstanceUID)) is None
        objects = services.store.objects
        assert [f for _, _, files in os.walk(objects) for f in files] == []
        assert list(services.store.tmp.iterdir()) == []
        # The same instance sent again is stored and indexed.
        services.ingestor.receive(item)
        row = services.ingestor.index.find(str(ds.SOPInstanceUID))
        assert row is not None and services.store.exists(row.digest)
    finally:
        services.close()


def test_many_writers_at_once_each_find_their_file_durable_and_whole(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    store.open()
    contents = [f"instance {n}".encode() * 100 for n in range(64)]
    results: list[Any] = []
    lock = threading.Lock()

    def write(content: bytes) -> None:
        stored = store.put([content])
        with lock:
            results.append((stored.digest, content))

    try:
        threads = [threading.Thread(target=write, args=(c,)) for c in contents]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert not any(thread.is_alive() for thread in threads)
        assert len(results) == 64
        for digest, content in results:
            assert store.path_of(digest).read_bytes() == content
    finally:
        store.close()
