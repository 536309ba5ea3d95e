"""What survives: a clean restart, the start-up sweep, a kill -9 (repeated kill -9 rounds during
parallel ingest are tests/test_crash.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pynetdicom import AE
from pynetdicom.presentation import build_context

from node.dicom.part10 import file_meta_bytes
from tests.conftest import NodeProcess, sqlite_only
from tests.dicomdata import (
    CT_IMAGE,
    dataset_bytes_of,
    make_instance,
    send_datasets,
    send_files,
    sha256_file,
    write_part10,
)


def test_restart_keeps_everything(node: NodeProcess) -> None:
    first = [make_instance(InstanceNumber=i) for i in range(5)]
    assert [s.status for s in send_datasets(node.port, first)] == [0] * 5
    rows_before = node.rows("SELECT sop_instance_uid, digest FROM instance ORDER BY 1")
    files_before = node.stored_files()

    assert node.stop() == 0  # SIGTERM is a clean stop
    assert "stopped" in node.log()
    node.start()

    assert node.rows("SELECT sop_instance_uid, digest FROM instance ORDER BY 1") == rows_before
    assert node.stored_files() == files_before
    assert [s.status for s in send_datasets(node.port, first[:1])] == [0]
    assert "duplicate" in node.log().splitlines()[-2] + node.log().splitlines()[-1]
    assert len(node.stored_files()) == 5


def test_fan_out_folders_exist_from_the_start_and_come_back_when_removed(
    node: NodeProcess, tmp_path: Path
) -> None:
    """The 256 first-level folders are made (and made durable) when the store opens, so a new
    instance needs at most its second-level folder made; one removed behind the node's back is
    made again when an instance needs it."""
    import hashlib

    objects = node.storage / "objects"
    assert sorted(p.name for p in objects.iterdir()) == [f"{n:02x}" for n in range(256)]
    ds = make_instance()
    path = write_part10(ds, tmp_path / "one.dcm")
    digest = hashlib.sha256(
        file_meta_bytes(CT_IMAGE, ds.SOPInstanceUID, str(ds.file_meta.TransferSyntaxUID))
        + dataset_bytes_of(path)
    ).hexdigest()
    (objects / digest[:2]).rmdir()  # empty: nothing is stored under it yet

    assert [s.status for s in send_files(node.port, [path])] == [0]
    stored = objects / digest[:2] / digest[2:4] / digest
    assert stored.is_file() and sha256_file(stored) == digest
    assert node.rows("SELECT digest FROM instance") == [(digest,)]
    assert node.temporary_files() == []


def test_startup_sweeps_temporary_and_unindexed_files(node: NodeProcess) -> None:
    assert [s.status for s in send_datasets(node.port, [make_instance()])] == [0]
    kept = node.stored_files()
    assert node.stop() == 0

    leftover = node.storage / "tmp" / "deadbeef.part"
    leftover.write_bytes(b"half a file")
    orphan_bytes = b"a file that no row names"
    import hashlib

    digest = hashlib.sha256(orphan_bytes).hexdigest()
    orphan = node.storage / "objects" / digest[:2] / digest[2:4] / digest
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(orphan_bytes)

    node.start()
    assert not leftover.exists()
    assert not orphan.exists()
    assert (node.storage / "quarantine" / digest).read_bytes() == orphan_bytes  # moved aside
    assert node.stored_files() == kept
    assert "removed 1 temporary and 1 unindexed" in node.log()


@sqlite_only
def test_a_lost_index_stops_the_start_and_removes_nothing(node: NodeProcess) -> None:
    """Without its database every stored file looks unindexed: the sweep must not take that
    for crash leftovers (the store is what `dicom-node reindex` rebuilds the index from)."""
    sent = [make_instance(InstanceNumber=i) for i in range(3)]
    assert [s.status for s in send_datasets(node.port, sent)] == [0] * 3
    files = node.stored_files()
    assert node.stop() == 0
    for path in node.storage.glob("index.sqlite*"):
        path.unlink()
    try:
        node.start()
    except RuntimeError:
        pass  # expected: the node refuses to start
    else:
        raise AssertionError("the node started on a store whose index was lost")
    assert node.process is not None and node.process.wait(30) != 0
    assert "all 3 stored files have no index row" in node.log()
    assert "dicom-node reindex" in node.log()
    assert node.stored_files() == files


def _orphan(node: NodeProcess, content: bytes, age: float = 0.0) -> Path:
    """A file in the store that no row names, last written ``age`` seconds ago."""
    import hashlib

    digest = hashlib.sha256(content).hexdigest()
    path = node.storage / "objects" / digest[:2] / digest[2:4] / digest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    if age:
        os.utime(path, (time.time() - age, time.time() - age))
    return path


def test_sweep_beside_another_process_takes_only_old_leftovers(node: NodeProcess) -> None:
    """A pull, an import or another node writing to the store: its recent temporary files and
    files whose rows are about to be committed are not garbage; what is over an hour old is
    (a crash's leftovers, which several nodes that never all stop would keep for ever)."""
    assert [s.status for s in send_datasets(node.port, [make_instance()])] == [0]
    kept = node.stored_files()
    assert node.stop() == 0
    in_flight = node.storage / "tmp" / "in-flight.part"
    in_flight.write_bytes(b"being written by another process")
    stale = node.storage / "tmp" / "stale.part"
    stale.write_bytes(b"left by a crash")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    parked = node.storage / "tmp" / f"{'0' * 64}.deleting"  # a deletion in another process
    parked.write_bytes(b"parked")
    os.utime(parked, (two_hours_ago, two_hours_ago))
    fresh_orphan = _orphan(node, b"renamed into place, row not committed yet")
    old_orphan = _orphan(node, b"left by a crash two hours ago", age=7200)
    holder = subprocess.Popen(  # holds the store open like a running pull
        [sys.executable, "-c", HOLD_STORE, str(node.config_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"open\n"
        node.start()
        assert "another process has the store" in node.log()
        assert in_flight.exists() and fresh_orphan.exists() and parked.exists()
        assert not stale.exists() and not old_orphan.exists()
        assert (node.storage / "quarantine" / old_orphan.name).read_bytes() == \
            b"left by a crash two hours ago"
        assert "shared sweep removed 1 temporary and 1 unindexed" in node.log()
        assert node.stop() == 0
    finally:
        holder.communicate(b"\n", timeout=30)
    node.start()  # alone again: the full sweep takes the rest
    assert not in_flight.exists() and not fresh_orphan.exists() and not parked.exists()
    assert "removed 2 temporary and 1 unindexed" in node.log()
    assert node.stored_files() == kept


HOLD_STORE = """
import sys
from pathlib import Path
from node.config import load_config
from node.services import open_services
services = open_services(load_config(Path(sys.argv[1])))
print("open", flush=True)
sys.stdin.readline()
services.close()
"""


@sqlite_only
def test_database_survives_as_valid_sqlite(node: NodeProcess, tmp_path: Path) -> None:
    assert [s.status for s in send_datasets(node.port, [make_instance()])] == [0]
    node.kill()
    assert node.rows("PRAGMA integrity_check") == [("ok",)]


def test_sigterm_with_an_idle_association_open_stops_within_the_grace(node_factory: Any) -> None:
    node = node_factory(stop_grace=1).start()
    ae = AE(ae_title="IDLESCU")
    ae.requested_contexts = [build_context(CT_IMAGE)]
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        started = time.monotonic()
        assert node.stop(timeout=20) == 0
        assert time.monotonic() - started < 10
        assert "aborting an association still open after 1 s" in node.log()
        assert "stopped" in node.log()
    finally:
        if assoc.is_established:
            assoc.abort()
