"""A SOP Instance UID that arrives again: identical content, other content under each policy,
and the same instance from two associations at the same moment.

One node per policy (keep, replace, reject) serves the whole module; each test looks only at
the UIDs it sent itself.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.conftest import NodeProcess, make_node
from tests.dicomdata import (
    PREFIX,
    Sent,
    dataset_bytes_of,
    make_instance,
    sha256_file,
    store_association,
    write_part10,
)

DUPLICATE_REJECTED = 0x0111
POLICIES = ("keep", "replace", "reject")


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, NodeProcess]]:
    """A running node per duplicates policy, started side by side."""
    made = {p: make_node(tmp_path_factory.mktemp(p), duplicates=p) for p in POLICIES}
    made["keep"].settings.pop("duplicates")  # keep is the default: run it unconfigured
    try:
        with ThreadPoolExecutor(len(made)) as pool:
            list(pool.map(NodeProcess.start, made.values()))
        yield made
    finally:
        running = [n for n in made.values() if n.process is not None and n.process.poll() is None]
        if running:
            with ThreadPoolExecutor(len(running)) as pool:  # each stop waits ~0.5 s
                list(pool.map(NodeProcess.stop, running))


def send_one(node: NodeProcess, path: Path) -> Sent:
    with store_association(node.port, [path]) as send:
        return send(path)


def rows_of(node: NodeProcess, uid: str) -> list[tuple[str, int]]:
    return node.rows("SELECT digest, size FROM instance WHERE sop_instance_uid = ?", uid)


def file_of(node: NodeProcess, digest: str) -> Path:
    return node.storage / "objects" / digest[:2] / digest[2:4] / digest


def outcomes_in_log(node: NodeProcess, uid: str) -> list[str]:
    """'0x0000 stored', '0x0000 duplicate', … for each C-STORE of ``uid``, in log order."""
    found = []
    for line in node.log().splitlines():
        if "C-STORE" in line and f" {uid} " in line:
            match = re.search(r"status (0x[0-9A-F]{4}) (\S+)", line)
            assert match, line
            found.append(f"{match[1]} {match[2]}")
    return found


def first_and_second(tmp_path: Path, change: str) -> tuple[Dataset, Path, Path]:
    """Two copies of one SOP Instance UID whose content differs in ``change``."""
    first = make_instance(PatientName="First^Copy")
    uid, study, series = first.SOPInstanceUID, first.StudyInstanceUID, first.SeriesInstanceUID
    if change == "patient-name":
        second = make_instance(sop_instance=uid, study=study, series=series,
                               PatientName="Second^Copy")
    else:
        second = make_instance(sop_instance=uid, study=study, series=series,
                               PatientName="First^Copy", PixelData=b"\x5a" * len(first.PixelData))
    first_path = write_part10(first, tmp_path / "first.dcm")
    second_path = write_part10(second, tmp_path / "second.dcm")
    assert dataset_bytes_of(first_path) != dataset_bytes_of(second_path)
    return first, first_path, second_path


def store_first(node: NodeProcess, first: Dataset, first_path: Path) -> tuple[str, Path]:
    """Store the first copy; return its digest and file, after checking they are right."""
    assert send_one(node, first_path).status == 0
    [(digest, _)] = rows_of(node, first.SOPInstanceUID)
    stored = file_of(node, digest)
    assert sha256_file(stored) == digest
    assert dataset_bytes_of(stored) == dataset_bytes_of(first_path)
    return digest, stored


@pytest.mark.parametrize("policy", POLICIES)
def test_identical_copy_is_answered_success_and_stored_once(
    nodes: dict[str, NodeProcess], tmp_path: Path, policy: str
) -> None:
    node = nodes[policy]
    ds = make_instance()
    path = write_part10(ds, tmp_path / "once.dcm")
    digest, stored = store_first(node, ds, path)
    files_before = node.stored_files()
    inode_before = stored.stat().st_ino

    # Twice more: on a fresh association and twice on the same one.
    assert send_one(node, path).status == 0
    with store_association(node.port, [path]) as send:
        assert [send(path).status, send(path).status] == [0, 0]

    assert node.stored_files() == files_before
    assert rows_of(node, ds.SOPInstanceUID) == [(digest, stored.stat().st_size)]
    assert stored.stat().st_ino == inode_before  # not even rewritten
    assert sha256_file(stored) == digest
    assert node.temporary_files() == []
    assert outcomes_in_log(node, ds.SOPInstanceUID) == ["0x0000 stored"] + 3 * [
        "0x0000 duplicate"
    ]


@pytest.mark.parametrize("change", ["patient-name", "pixel-data"])
def test_keep_policy_keeps_the_first_copy(nodes: dict[str, NodeProcess], tmp_path: Path,
                                          change: str) -> None:
    node = nodes["keep"]
    first, first_path, second_path = first_and_second(tmp_path, change)
    digest, stored = store_first(node, first, first_path)
    files_before = node.stored_files()

    assert send_one(node, second_path).status == 0

    assert node.stored_files() == files_before  # the second copy left no file
    assert rows_of(node, first.SOPInstanceUID) == [(digest, stored.stat().st_size)]
    assert dataset_bytes_of(stored) == dataset_bytes_of(first_path)
    assert sha256_file(stored) == digest
    assert node.temporary_files() == []
    assert outcomes_in_log(node, first.SOPInstanceUID) == ["0x0000 stored",
                                                           "0x0000 kept-existing"]


@pytest.mark.parametrize("change", ["patient-name", "pixel-data"])
def test_replace_policy_keeps_the_second_copy_only(nodes: dict[str, NodeProcess],
                                                   tmp_path: Path, change: str) -> None:
    node = nodes["replace"]
    first, first_path, second_path = first_and_second(tmp_path, change)
    old_digest, old_file = store_first(node, first, first_path)
    files_before = set(node.stored_files())

    assert send_one(node, second_path).status == 0

    [(new_digest, new_size)] = rows_of(node, first.SOPInstanceUID)  # exactly one row
    assert new_digest != old_digest
    new_file = file_of(node, new_digest)
    assert sha256_file(new_file) == new_digest
    assert new_file.stat().st_size == new_size
    assert dataset_bytes_of(new_file) == dataset_bytes_of(second_path)
    assert not old_file.exists(), "the replaced copy's file must be removed"
    assert set(node.stored_files()) == files_before - {old_file} | {new_file}
    assert node.temporary_files() == []
    assert outcomes_in_log(node, first.SOPInstanceUID) == ["0x0000 stored", "0x0000 replaced"]


@pytest.mark.parametrize("change", ["patient-name", "pixel-data"])
def test_reject_policy_refuses_the_second_copy(nodes: dict[str, NodeProcess], tmp_path: Path,
                                               change: str) -> None:
    node = nodes["reject"]
    first, first_path, second_path = first_and_second(tmp_path, change)
    digest, stored = store_first(node, first, first_path)
    files_before = node.stored_files()
    after = write_part10(make_instance(), tmp_path / "after.dcm")

    with store_association(node.port, [second_path, after]) as send:
        refused = send(second_path)
        still_serving = send(after)

    assert refused.status == DUPLICATE_REJECTED, refused
    assert refused.comment.strip(), "a failure response must carry an Error Comment"
    assert still_serving.status == 0
    assert rows_of(node, first.SOPInstanceUID) == [(digest, stored.stat().st_size)]
    assert dataset_bytes_of(stored) == dataset_bytes_of(first_path)
    assert sha256_file(stored) == digest
    new_files = set(node.stored_files()) - set(files_before)
    assert [dataset_bytes_of(p) for p in new_files] == [dataset_bytes_of(after)]
    assert node.temporary_files() == []
    assert outcomes_in_log(node, first.SOPInstanceUID) == ["0x0000 stored", "0x0111 failed"]


def test_same_instance_from_two_associations_at_once_is_stored_once(
    nodes: dict[str, NodeProcess], tmp_path: Path
) -> None:
    node = nodes["keep"]  # identical content: the policy is never consulted
    for attempt in range(5):
        ds = make_instance(sop_instance=generate_uid(PREFIX))
        path = write_part10(ds, tmp_path / f"race-{attempt}.dcm")
        files_before = set(node.stored_files())
        barrier = threading.Barrier(2, timeout=30)

        def race(path: Path = path, barrier: threading.Barrier = barrier) -> Sent:
            with store_association(node.port, [path]) as send:
                barrier.wait()  # both associations are open: send at the same moment
                return send(path)

        with ThreadPoolExecutor(2) as pool:
            results = [f.result(timeout=60) for f in [pool.submit(race), pool.submit(race)]]

        assert [r.status for r in results] == [0, 0], results
        [(digest, size)] = rows_of(node, ds.SOPInstanceUID)
        assert size == file_of(node, digest).stat().st_size
        new_files = set(node.stored_files()) - files_before
        assert new_files == {file_of(node, digest)}, f"attempt {attempt}: {new_files}"
        assert sha256_file(file_of(node, digest)) == digest
        assert dataset_bytes_of(file_of(node, digest)) == dataset_bytes_of(path)
        assert node.temporary_files() == []
        assert sorted(outcomes_in_log(node, ds.SOPInstanceUID)) == [
            "0x0000 duplicate", "0x0000 stored"
        ], f"attempt {attempt}"
