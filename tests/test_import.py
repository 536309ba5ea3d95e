"""``dicom-node import``: files from disk enter the archive through the C-STORE path.

The issue's test: a mixed folder — every valid file bundled with pydicom (which files are valid,
and which share a SOP Instance UID, is decided by tests/test_corpus.py from the files alone),
plus a text file, an empty file, a DICOMDIR, a truncated file, a file whose File Meta names
another instance than its dataset, and a bare dataset without File Meta — imported with the
counts checked against what the folder holds, every stored dataset byte for byte as in its
file, and every row recorded as received from "import".  Also: import beside a running serve,
with the duplicates policy of the config it is given; the progress bar on a terminal (and none
elsewhere); a path that does not exist.
"""

from __future__ import annotations

import os
import pty
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
)

from tests.conftest import REPO, NodeProcess, echo, poll_until
from tests.dicomdata import (
    PREFIX,
    dataset_bytes_of,
    make_instance,
    no_delay,
    reactor_paused,
    send_datasets,
    send_files,
    write_part10,
    write_raw_part10,
)
from tests.test_corpus import corpus

SUMMARY = re.compile(
    r"import: (?P<seen>\d+) files: (?P<stored>\d+) stored, (?P<replaced>\d+) replaced, "
    r"(?P<duplicates>\d+) duplicates, (?P<not_dicom>\d+) not DICOM skipped, "
    r"(?P<dicomdir>\d+) DICOMDIR skipped, (?P<failed>\d+) failed"
)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def summary(done: subprocess.CompletedProcess[str]) -> dict[str, int]:
    found = SUMMARY.search(done.stdout)
    assert found, done.stdout + done.stderr
    return {name: int(value) for name, value in found.groupdict().items()}


def config(workdir: Path, **settings: Any) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "node.yaml"
    path.write_text(yaml.safe_dump({"storage": "storage", "port": 0, **settings}))
    return path


def stored_rows(storage: Path) -> dict[str, tuple[str, str, str]]:
    """SOP Instance UID -> (digest, transfer syntax, source AE) of every indexed instance."""
    import sqlite3

    with sqlite3.connect(storage / "index.sqlite") as conn:
        return {uid: (digest, syntax, source) for uid, digest, syntax, source in conn.execute(
            "SELECT sop_instance_uid, digest, transfer_syntax_uid, source_ae FROM instance")}


def stored_file(storage: Path, digest: str) -> Path:
    return storage / "objects" / digest[:2] / digest[2:4] / digest


def test_help() -> None:
    done = cli("import", "--help")
    assert done.returncode == 0
    assert "PATH" in done.stdout and "-c PATH, --config PATH" in done.stdout


def test_import_of_a_mixed_folder(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's remarks on the odd values of its files
        found = corpus()
    source = tmp_path / "source"
    (source / "bundled").mkdir(parents=True)
    # Named so that the walk meets them in the corpus' order: the first file of each SOP
    # Instance UID is the one of round 0, the others are duplicates.
    copies = {}
    for n, item in enumerate(found.valid):
        copies[item.path] = source / "bundled" / f"{n:04d}.dcm"
        shutil.copyfile(item.path, copies[item.path])
    first = found.rounds[0]
    (source / "notes.txt").write_text("not an image\n")
    (source / "empty").write_bytes(b"")
    shutil.copyfile(str(get_testdata_file("DICOMDIR")), source / "DICOMDIR")
    # Failures: a file cut inside its dataset, and File Meta naming another instance.
    whole = first[0].path.read_bytes()
    (source / "broken").mkdir()
    (source / "broken" / "truncated.dcm").write_bytes(whole[:len(whole) - 7])
    other = make_instance()
    other_bytes = encode(other, False, True)
    assert other_bytes is not None
    write_raw_part10(source / "broken" / "other-uid.dcm", str(other.SOPClassUID),
                     f"{PREFIX}999.1", other_bytes, ExplicitVRLittleEndian)
    # A bare dataset (no preamble, no File Meta), as old archives hold them: imported.
    bare = make_instance(sop_instance=f"{PREFIX}999.2")
    bare_bytes = encode(bare, True, True)
    assert bare_bytes is not None
    (source / "bare.raw").write_bytes(bare_bytes)

    workdir = tmp_path / "node"
    # One worker: which of two files with one SOP Instance UID comes first is then the walk's
    # order (with several, as with several associations, whichever is ingested first).
    done = cli("import", "--workers", "1", "-c", str(config(workdir)), str(source))
    assert done.returncode == 1, done.stdout + done.stderr  # two files failed
    assert summary(done) == {
        "seen": len(found.valid) + 6,
        "stored": len(first) + 1,
        "replaced": 0,
        "duplicates": len(found.valid) - len(first),
        "not_dicom": 2,
        "dicomdir": 1,
        "failed": 2,
    }
    assert "1 failed: dataset is truncated or malformed" in done.stderr
    assert "1 failed: SOP Instance UID in dataset differs" in done.stderr
    assert "Traceback" not in done.stderr

    storage = workdir / "storage"
    rows = stored_rows(storage)
    assert set(rows) == {item.sop_instance_uid for item in first} | {f"{PREFIX}999.2"}
    assert {source_ae for _, _, source_ae in rows.values()} == {"import"}
    mismatched = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for item in first:
            digest, syntax, _ = rows[item.sop_instance_uid]
            kept = dataset_bytes_of(stored_file(storage, digest))
            if syntax != item.transfer_syntax or kept != dataset_bytes_of(copies[item.path]):
                mismatched.append(item.path.name)
    assert not mismatched, f"not kept byte for byte: {mismatched}"
    digest, syntax, _ = rows[f"{PREFIX}999.2"]
    assert syntax == ImplicitVRLittleEndian
    assert dataset_bytes_of(stored_file(storage, digest)) == bare_bytes
    files = sorted(p.name for p in (storage / "objects").rglob("*") if p.is_file())
    assert files == sorted(digest for digest, _, _ in rows.values())  # nothing else written

    # Again: everything is a duplicate now, nothing new is written.
    done = cli("import", "-c", str(config(workdir)), str(source / "bundled"),
               str(source / "bare.raw"))
    assert done.returncode == 0, done.stdout + done.stderr
    again = summary(done)
    assert again["stored"] == 0 and again["failed"] == 0
    assert again["duplicates"] == len(found.valid) + 1


def _study_uids(node: NodeProcess) -> set[str]:
    ae = AE(ae_title="IMPORTSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    no_delay(assoc)
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = None
    try:
        return {str(identifier.StudyInstanceUID)
                for rsp, identifier in reactor_paused(assoc).send_c_find(
                    query, StudyRootQueryRetrieveInformationModelFind)
                if int(rsp.Status) in (0xFF00, 0xFF01) and identifier is not None}
    finally:
        assoc.release()


def test_import_beside_serve_follows_the_duplicates_policy(node_factory: Any,
                                                           tmp_path: Path) -> None:
    node: NodeProcess = node_factory(duplicates="reject").start()
    held = make_instance(sop_instance=f"{PREFIX}777.1", InstanceNumber=1)
    assert [s.status for s in send_datasets(node.port, [held])] == [0]
    held_digest = node.rows("SELECT digest FROM instance")[0][0]
    folder = tmp_path / "incoming"
    write_part10(make_instance(sop_instance=f"{PREFIX}777.1", InstanceNumber=99),
                 folder / "same-uid-other-content.dcm")
    new = make_instance(sop_instance=f"{PREFIX}777.2")
    write_part10(new, folder / "new.dcm")

    done = cli("import", "-c", str(node.config_path), str(folder))
    assert done.returncode == 1, done.stdout + done.stderr
    counted = summary(done)
    assert (counted["stored"], counted["duplicates"], counted["failed"]) == (1, 0, 1)
    assert "1 failed: SOP Instance UID already held with other content" in done.stderr
    # The running node answers for what was imported, and still serves.
    assert _study_uids(node) == {str(held.StudyInstanceUID), str(new.StudyInstanceUID)}
    assert echo(node.port)

    # The same store under a config whose policy is keep: a duplicate, and success.
    keep = dict(node.settings, duplicates="keep")
    keep["storage"] = str(node.storage)
    keep_config = tmp_path / "keep.yaml"
    keep_config.write_text(yaml.safe_dump(keep))
    done = cli("import", "-c", str(keep_config), str(folder))
    assert done.returncode == 0, done.stdout + done.stderr
    counted = summary(done)
    assert (counted["stored"], counted["duplicates"], counted["failed"]) == (0, 2, 0)
    assert node.rows("SELECT digest FROM instance WHERE sop_instance_uid = ?",
                     f"{PREFIX}777.1") == [(held_digest,)]


def test_import_while_serve_receives_the_same_instances(node_factory: Any,
                                                       tmp_path: Path) -> None:
    """Import and C-STORE at the same moment, some of them the same files: one file and one
    row per instance, every C-STORE a Success, the import without failure."""
    node: NodeProcess = node_factory().start()
    study = f"{PREFIX}778"
    paths = [write_part10(make_instance(study=study, series=f"{study}.1",
                                        sop_instance=f"{study}.1.{n}", InstanceNumber=n, rows=2),
                          tmp_path / "incoming" / f"{n:04d}.dcm") for n in range(600)]
    own = [write_part10(make_instance(rows=2), tmp_path / "sent" / f"{n}.dcm")
           for n in range(100)]
    # The C-STORE side sends imported files from the end of the walk backwards (byte for byte:
    # the same content, so the two meet on the same instances), between files of its own.
    to_send = [p for pair in zip(paths[::-3], own * 2, strict=False) for p in pair]
    process = subprocess.Popen(
        [sys.executable, "-m", "node", "import", "--workers", "2", "-c", str(node.config_path),
         str(tmp_path / "incoming")], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    assert poll_until(lambda: node.rows(
        "SELECT COUNT(*) FROM instance WHERE source_ae = 'import'")[0][0] > 0, 30)
    statuses = [s.status for s in send_files(node.port, to_send)]
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stdout + stderr
    assert set(statuses) == {0}
    counted = SUMMARY.search(stdout)
    assert counted, stdout
    assert int(counted["stored"]) + int(counted["duplicates"]) == len(paths)
    assert int(counted["duplicates"]) > 0  # some arrived by C-STORE first
    uids = [uid for (uid,) in node.rows("SELECT sop_instance_uid FROM instance")]
    assert len(uids) == len(set(uids)) == len(paths) + len(own)
    assert len(node.stored_files()) == len(uids)
    # They did run at the same time: C-STOREs were indexed between the import's first and
    # last rows.
    (first, last), = node.rows("SELECT MIN(received_at), MAX(received_at) FROM instance"
                               " WHERE source_ae = 'import'")
    assert node.rows("SELECT COUNT(*) FROM instance WHERE source_ae = 'TESTSCU'"
                     " AND received_at > ? AND received_at < ?", first, last)[0][0] > 0


def test_progress_bar_only_on_a_terminal(tmp_path: Path) -> None:
    folder = tmp_path / "incoming"
    for n in range(5):
        write_part10(make_instance(), folder / f"{n}.dcm")
    master, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "node", "import", "-c", str(config(tmp_path / "tty")),
         str(folder)], cwd=REPO, stdout=subprocess.PIPE, stderr=terminal)
    os.close(terminal)
    shown = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    stdout, _ = process.communicate(timeout=60)
    assert process.returncode == 0
    assert b"[" + b"." * 24 + b"]  0/5 instances" in shown, shown
    assert shown.endswith(b"\r\x1b[K")  # the bar is cleared for the summary
    assert b"5 stored" in stdout

    done = cli("import", "-c", str(config(tmp_path / "pipe")), str(folder))
    assert done.returncode == 0
    assert "[" not in done.stderr and "\r" not in done.stderr


def test_a_path_that_does_not_exist(tmp_path: Path) -> None:
    done = cli("import", "-c", str(config(tmp_path)), str(tmp_path / "nowhere"))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"dicom-node: no such file or folder: {tmp_path / 'nowhere'}"]
    assert not (tmp_path / "storage").exists()


@pytest.mark.parametrize("workers", ["0", "65", "x"])
def test_workers_must_be_sensible(tmp_path: Path, workers: str) -> None:
    done = cli("import", "--workers", workers, str(tmp_path))
    assert done.returncode == 2 and "--workers" in done.stderr
