"""When the node runs out of a resource it answers 0xA700, leaves nothing behind, and recovers
by itself once the resource is back; a store it cannot create stops start-up cleanly.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom import dcmread

from tests.conftest import REPO, NodeProcess, free_port, sqlite_only
from tests.dicomdata import (
    Sent,
    dataset_bytes_of,
    make_instance,
    sha256_file,
    store_association,
    write_part10,
)

OUT_OF_RESOURCES = 0xA700
PAGE = 4096
TMPFS_BYTES = 3 * 1024 * 1024


@contextmanager
def small_tmpfs(mountpoint: Path, size: str = "3m") -> Iterator[Path]:
    """A fresh tmpfs of ``size`` mounted at ``mountpoint``; unmounted on the way out."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                           str(mountpoint)], capture_output=True, text=True)
    if done.returncode != 0:
        reason = f"cannot mount a tmpfs (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)]).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], check=True)


def index_rows(db: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as conn:
        return list(conn.execute(sql, params))


def file_of(storage: Path, digest: str) -> Path:
    return storage / "objects" / digest[:2] / digest[2:4] / digest


def uid_of(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_full_store_answers_out_of_resources_and_recovers_when_space_returns(
    node_factory: Any, tmp_path: Path
) -> None:
    db = tmp_path / "index.sqlite"  # the index lives outside the small store
    # min_free_space 0: this is the disk really full (ENOSPC), not the threshold before it
    # (tests/test_free_space.py); a 3 MB tmpfs is always below the 100 MB default.
    node: NodeProcess = node_factory("full", database=f"sqlite:///{db}", min_free_space=0)
    files = [write_part10(make_instance(rows=512, InstanceNumber=i), tmp_path / f"{i}.dcm")
             for i in range(8)]
    file_size = files[0].stat().st_size  # every one is ~512 KiB, the same size
    pages_per_file = -(-file_size // PAGE)

    with small_tmpfs(node.storage):
        # Leave room for two instances and a half: the third cannot fit.
        filler = node.storage / "filler.bin"
        filler.write_bytes(b"\0" * (TMPFS_BYTES - (5 * pages_per_file * PAGE) // 2))
        try:
            node.start()
            results: list[Sent] = []
            with store_association(node.port, files) as send:
                for path in files:
                    results.append(send(path))
                    if results[-1].status != 0:
                        break
                stored_ok = files[: len(results) - 1]
                failed_path, failed = files[len(results) - 1], results[-1]

                assert [r.status for r in results[:-1]] == [0, 0], results
                assert failed.status == OUT_OF_RESOURCES, results
                assert failed.comment.strip(), "a failure response must carry an Error Comment"

                # Nothing of the refused instance is left: no temporary, no object, no row.
                assert node.temporary_files() == []
                kept = node.stored_files()
                assert sorted(dataset_bytes_of(p) for p in kept) == sorted(
                    dataset_bytes_of(p) for p in stored_ok
                )
                assert index_rows(db, "SELECT id FROM instance WHERE sop_instance_uid = ?",
                                  failed.sop_instance_uid) == []
                # Every instance answered Success is intact and indexed.
                for path in kept:
                    assert path.name == sha256_file(path)
                for path in stored_ok:
                    [(digest,)] = index_rows(
                        db, "SELECT digest FROM instance WHERE sop_instance_uid = ?",
                        uid_of(path))
                    assert dataset_bytes_of(file_of(node.storage, digest)) == \
                        dataset_bytes_of(path)

                # Space comes back: the same association stores again, no restart.
                filler.unlink()
                retried = send(failed_path)
                another = send(files[len(results)])
            assert (retried.status, another.status) == (0, 0), (retried, another)
            assert node.process is not None and node.process.poll() is None
            for path in [failed_path, files[len(results)]]:
                [(digest,)] = index_rows(
                    db, "SELECT digest FROM instance WHERE sop_instance_uid = ?", uid_of(path))
                stored = file_of(node.storage, digest)
                assert sha256_file(stored) == digest
                assert dataset_bytes_of(stored) == dataset_bytes_of(path)
            assert node.temporary_files() == []
            assert len(node.stored_files()) == len(stored_ok) + 2
            warnings = [line for line in node.log().splitlines()
                        if "C-STORE" in line and "status 0xA700" in line]
            assert len(warnings) == 1 and failed.sop_instance_uid in warnings[0]
        finally:
            if node.process is not None and node.process.poll() is None:
                node.stop()


@sqlite_only
def test_locked_index_answers_out_of_resources_and_recovers_when_released(
    node_factory: Any, tmp_path: Path
) -> None:
    node: NodeProcess = node_factory("locked", database_timeout=0.2,
                                     database_retries=1).start()
    victim = write_part10(make_instance(), tmp_path / "victim.dcm")
    uid = uid_of(victim)

    with store_association(node.port, [victim]) as send:
        files_before = node.stored_files()
        lock = sqlite3.connect(node.db_path, isolation_level=None, timeout=5)
        try:
            lock.execute("BEGIN EXCLUSIVE")  # the node can read (WAL) but cannot write
            refused = send(victim)
            assert refused.status == OUT_OF_RESOURCES, refused
            assert refused.comment.strip(), "a failure response must carry an Error Comment"
            assert node.stored_files() == files_before  # its file was removed again
            assert node.temporary_files() == []
            assert list(lock.execute(
                "SELECT id FROM instance WHERE sop_instance_uid = ?", (uid,))) == []
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        stored = send(victim)  # lock released: the node recovers by itself

    assert stored.status == 0, stored
    [(digest,)] = node.rows("SELECT digest FROM instance WHERE sop_instance_uid = ?", uid)
    assert node.stored_files() == [file_of(node.storage, digest)]
    assert sha256_file(file_of(node.storage, digest)) == digest
    assert dataset_bytes_of(file_of(node.storage, digest)) == dataset_bytes_of(victim)
    assert node.temporary_files() == []
    outcomes = [line.split(" status ")[1].split()[:2] for line in node.log().splitlines()
                if "C-STORE" in line and uid in line]
    assert outcomes == [["0xA700", "failed"], ["0x0000", "stored"]]


def test_store_that_cannot_be_created_stops_start_up_with_one_line(tmp_path: Path) -> None:
    # Root ignores permission bits, so "not writable" is made with a path under a regular file.
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder\n")
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({
        "ae_title": "DICOMNODE", "bind": "127.0.0.1", "port": free_port(),
        "storage": str(blocker / "store"), "log_level": "info",
    }), encoding="utf-8")

    done = subprocess.run([sys.executable, "-m", "node", "serve", "-c", str(config)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)

    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert str(blocker / "store") in lines[0], lines[0]
    assert blocker.read_text() == "not a folder\n"
