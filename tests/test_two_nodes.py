"""Several nodes, one archive: two ``dicom-node serve`` processes sharing one PostgreSQL database
and one store directory behave as one archive.

Nodes A and B are real processes with the same ``database`` URL and the same absolute
``storage`` path (A's folder), on their own ports or, with ``reuse_port``, on one.  What one
stores the other finds and sends; the same instance arriving at both at once ends as one file
and one row; a node killed mid-ingest loses nothing it acknowledged while the other keeps
serving; ``verify``, ``delete`` and retention run beside both without harm.

Needs a PostgreSQL server (see tests/test_postgresql.py); skipped when none answers, except
under CI, where it must.
"""

from __future__ import annotations

import random
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from tests import retrievedata as rd
from tests.conftest import REPO, NodeProcess, dcmtk_tool, echo, free_port, poll_until
from tests.crashing import Senders, ingest_until_stopped, verify_acknowledged
from tests.dicomdata import (
    CT_IMAGE,
    MR_IMAGE,
    PREFIX,
    dataset_bytes_of,
    make_instance,
    no_delay,
    reactor_paused,
    send_datasets,
    sha256_file,
    store_association,
    write_part10,
)

WAIT = 30.0  # seconds: an upper bound on anything a node should do promptly


def two_nodes(node_factory: Any, database: str, **settings: Any) -> tuple[NodeProcess,
                                                                           NodeProcess]:
    """A and B (not started) on one database and one store: A's, by its absolute path.

    ``NodeProcess.storage`` is right for A only, so the tests look at the store through A.
    """
    a: NodeProcess = node_factory("a", database=database, **settings)
    a.settings["storage"] = str(a.storage)
    b: NodeProcess = node_factory("b", database=database, storage=str(a.storage), **settings)
    return a, b


def study_counts(port: int) -> dict[str, int]:
    """Study Instance UID -> Number of Study Related Instances, by a study-level C-FIND."""
    ae = AE(ae_title="TWOFIND")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = WAIT
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    no_delay(assoc)
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    query.NumberOfStudyRelatedInstances = None
    found: dict[str, int] = {}
    try:
        for status, identifier in reactor_paused(assoc).send_c_find(query,
                                                    StudyRootQueryRetrieveInformationModelFind):
            if int(status.Status) in (0xFF00, 0xFF01):
                assert identifier is not None
                found[str(identifier.StudyInstanceUID)] = int(
                    identifier.NumberOfStudyRelatedInstances)
            else:
                assert int(status.Status) == 0x0000, status
    finally:
        assoc.release()
    return found


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, check=False)


@contextmanager
def ingesting(ports: list[int], per_port: int = 2) -> Iterator[dict[int, Senders]]:
    """``per_port`` associations per port sending new instances until the block ends."""
    senders = {port: Senders() for port in ports}
    rng = random.Random(7)
    threads = [
        threading.Thread(target=ingest_until_stopped,
                         args=(port, senders[port], random.Random(rng.random()), f"ING{n}"),
                         name=f"two-nodes-sender-{port}-{n}")
        for port in ports for n in range(per_port)
    ]
    for thread in threads:
        thread.start()
    try:
        yield senders
    finally:
        for s in senders.values():
            s.stop.set()
        for thread in threads:
            thread.join(60)


@contextmanager
def held_get(port: int, study: str) -> Iterator[tuple[list[int], dict[str, bytes]]]:
    """A C-GET of ``study`` through ``port``, held at its first sub-operation for the block.

    Yields the final statuses (filled once it ends) and the datasets received by SOP Instance
    UID; on leaving, the retrieve goes on and is waited for.
    """
    first = threading.Event()
    carry_on = threading.Event()
    received: dict[str, bytes] = {}
    statuses: list[int] = []

    def on_store(event: Any) -> int:
        received[str(event.request.AffectedSOPInstanceUID)] = event.encoded_dataset(
            include_meta=False)
        first.set()
        carry_on.wait(WAIT * 2)
        return 0x0000

    ae = AE(ae_title="TWOGET")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = WAIT * 3
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CT_IMAGE, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE",
                         ext_neg=[build_role(CT_IMAGE, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established

    def retrieve() -> None:
        for status, _ in assoc.send_c_get(rd.identifier("STUDY", StudyInstanceUID=study),
                                          StudyRootQueryRetrieveInformationModelGet):
            statuses.append(int(status.Status))

    getter = threading.Thread(target=retrieve, name="two-nodes-getter")
    getter.start()
    try:
        assert first.wait(WAIT), "the C-GET sent nothing"
        yield statuses, received
    finally:
        carry_on.set()
        getter.join(WAIT * 2)
        assoc.release()


def total_size(node: NodeProcess) -> int:
    return int(node.rows("SELECT COALESCE(SUM(size), 0) FROM instance")[0][0])


def study_files(study: str, folder: Path, count: int = 4, rows: int = 32) -> list[Path]:
    return [write_part10(make_instance(study=study, series=f"{study}.1",
                                       sop_instance=f"{study}.1.{n}", InstanceNumber=n,
                                       PatientID="TWO-HELD", rows=rows),
                         folder / f"{study}.{n}.dcm")
            for n in range(1, count + 1)]


# --- one archive through either node ---------------------------------------------------------

def test_stored_through_a_found_and_retrieved_through_b(node_factory: Any, postgres_url: str,
                                                        tmp_path: Path) -> None:
    dcmtk_tool("movescu")  # skip early when DCMTK is missing
    dest = free_port()
    peers = {rd.DEST_AE: {"host": "127.0.0.1", "port": dest}}
    a, b = two_nodes(node_factory, postgres_url, peers=peers)
    a.start()
    b.start()
    corpus = rd.build_corpus(tmp_path / "corpus")
    rd.load(a.port, list(corpus.files.values()))

    # C-FIND through B sees every study A stored, with its instances.
    counts = study_counts(b.port)
    assert counts == {corpus.uid[s]: len(corpus.instances(s)) for s in ("A", "B", "C")}

    # C-MOVE through B to DCMTK's storescp: every dataset byte for byte.
    wanted = corpus.instances("A", "C")
    with rd.storescp(tmp_path / "moved", port=dest) as scp:
        result = rd.movescu(b.port, "study", "STUDY",
                            [f"StudyInstanceUID={corpus.uid['A']}\\{corpus.uid['C']}"])
        assert (result.status, result.completed, result.failed) == (0, len(wanted), 0), \
            result.log
        rd.assert_same_datasets(scp.received(), corpus, wanted)

    # C-GET through B: the same.
    wanted = corpus.instances("B")
    responses, received = rd.get(
        b.port, "study", rd.identifier("STUDY", StudyInstanceUID=corpus.uid["B"]),
        [(CT_IMAGE, [ExplicitVRLittleEndian]), (MR_IMAGE, [ExplicitVRLittleEndian])])
    assert responses.status == 0x0000 and responses.counts() == (len(wanted), 0, 0)
    assert set(received) == wanted
    for uid, (data, syntax) in received.items():
        assert syntax == ExplicitVRLittleEndian
        assert data == dataset_bytes_of(corpus.files[uid]), uid

    # One file per instance in the one store, each named by its hash.
    files = a.stored_files()
    assert len(files) == len(corpus.files) and all(sha256_file(p) == p.name for p in files)
    # A had the store open: B swept only what is older than an hour (nothing here).
    assert "only files older than 60 min are swept" in b.log()
    assert "shared sweep: " in b.log()
    assert a.stop() == 0 and b.stop() == 0


def test_the_same_instance_at_both_nodes_at_once(node_factory: Any, postgres_url: str,
                                                 tmp_path: Path) -> None:
    a, b = two_nodes(node_factory, postgres_url)
    a.start()
    b.start()
    for attempt in range(12):
        ds = make_instance(sop_instance=generate_uid(PREFIX), rows=64)
        path = write_part10(ds, tmp_path / f"race-{attempt}.dcm")
        barrier = threading.Barrier(2, timeout=WAIT)

        def race(port: int, path: Path = path, barrier: threading.Barrier = barrier) -> Any:
            with store_association(port, [path]) as send:
                barrier.wait()  # both associations open: send at the same moment
                return send(path)

        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(race, a.port), pool.submit(race, b.port)]
            results = [f.result(timeout=WAIT * 2) for f in futures]

        assert [r.status for r in results] == [0, 0], f"attempt {attempt}: {results}"
        rows = a.rows("SELECT digest, size FROM instance WHERE sop_instance_uid = ?",
                      str(ds.SOPInstanceUID))
        assert len(rows) == 1, f"attempt {attempt}: {rows}"
        [(digest, size)] = rows
        assert [p.name for p in a.stored_files()].count(digest) == 1
        assert len(a.stored_files()) == attempt + 1, f"attempt {attempt}: a second file"
        stored = a.storage / "objects" / digest[:2] / digest[2:4] / digest
        assert stored.stat().st_size == size and sha256_file(stored) == digest
        assert dataset_bytes_of(stored) == dataset_bytes_of(path)
        assert a.temporary_files() == []
    # Each instance: once "stored" (by either node) and once "duplicate" (by the other).
    for text in ("stored", "duplicate"):
        logged = a.log().count(f"status 0x0000 {text}") + b.log().count(f"status 0x0000 {text}")
        assert logged == 12, (text, logged)


# --- one port, two processes ------------------------------------------------------------------

def test_two_nodes_share_one_port_with_reuse_port(node_factory: Any, postgres_url: str,
                                                  tmp_path: Path) -> None:
    port = free_port()
    a, b = two_nodes(node_factory, postgres_url, port=port, reuse_port=True)
    a.start()
    b.start()

    # A third without reuse_port cannot join them: refused at start-up, in one line.
    c: NodeProcess = node_factory("c", database=postgres_url, port=port, log_level="error")
    c.write_config()
    refused = subprocess.run([sys.executable, "-m", "node", "serve", "-c", str(c.config_path)],
                             cwd=REPO, capture_output=True, text=True, timeout=WAIT)
    lines = (refused.stdout + refused.stderr).strip().splitlines()
    assert refused.returncode == 1
    assert len(lines) == 1 and f"cannot listen on 127.0.0.1:{port}" in lines[0], lines

    # The kernel spreads new associations over both.
    for _ in range(24):
        assert echo(port)
    assert poll_until(lambda: a.log().count("association from TESTSCU")
                      + b.log().count("association from TESTSCU") >= 24, WAIT)
    assert a.log().count("association from TESTSCU") > 0
    assert b.log().count("association from TESTSCU") > 0

    # Stored through the port: whichever node took it, both answer for it.
    sent = [make_instance(rows=16) for _ in range(6)]
    assert [s.status for s in send_datasets(port, sent)] == [0] * 6
    assert sum(study_counts(port).values()) == 6

    # One node gone: the port still serves, through the other.
    a.kill()
    for _ in range(10):
        assert echo(port)
    more = [make_instance(rows=16) for _ in range(4)]
    assert [s.status for s in send_datasets(port, more)] == [0] * 4
    assert sum(study_counts(port).values()) == 10
    assert b.stop() == 0


def test_a_node_without_reuse_port_keeps_its_port(node_factory: Any, postgres_url: str) -> None:
    port = free_port()
    plain: NodeProcess = node_factory("plain", database=postgres_url, port=port).start()
    shared: NodeProcess = node_factory("shared", database=postgres_url, port=port,
                                       reuse_port=True, log_level="error")
    shared.write_config()
    refused = subprocess.run([sys.executable, "-m", "node", "serve", "-c",
                              str(shared.config_path)],
                             cwd=REPO, capture_output=True, text=True, timeout=WAIT)
    assert refused.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in refused.stderr + refused.stdout
    assert plain.stop() == 0


# --- a node killed mid-ingest ----------------------------------------------------------------

def test_kill_one_node_mid_ingest_while_the_other_serves(node_factory: Any,
                                                         postgres_url: str) -> None:
    a, b = two_nodes(node_factory, postgres_url)
    a.start()
    b.start()
    acknowledged: list[str] = []
    with ingesting([a.port, b.port]) as senders:
        assert poll_until(lambda: len(senders[a.port].acknowledged) >= 40
                          and len(senders[b.port].acknowledged) >= 40, WAIT * 2)
        threading.Event().wait(random.Random(3).uniform(0, 0.02))  # a moment mid-transfer
        a.kill()
        at_kill = len(senders[b.port].acknowledged)
        # B keeps storing, and answers C-ECHO and C-FIND meanwhile.
        assert poll_until(lambda: len(senders[b.port].acknowledged) >= at_kill + 40, WAIT * 2)
        assert echo(b.port)
        assert len(study_counts(b.port)) >= at_kill
    for port, s in senders.items():
        assert s.refused == [], (port, s.refused[:5])
        acknowledged.extend(s.acknowledged)
    assert senders[b.port].errors == []  # B's associations never failed

    # A starts again beside B: B has the store open, so only old leftovers are swept (none:
    # A's crash is seconds old); nothing is lost.
    a.start()
    assert "only files older than 60 min are swept" in a.log()
    indexed = {uid for (uid,) in a.rows("SELECT sop_instance_uid FROM instance")}
    assert not set(acknowledged) - indexed
    counted = sum(study_counts(a.port).values())
    assert counted == len(indexed)

    # B stopped, A started alone: the sweep runs, and every acknowledged instance is intact.
    assert b.stop() == 0
    assert a.stop() == 0
    a.start()
    assert verify_acknowledged(a, acknowledged) == len(acknowledged) > 80
    assert a.stop() == 0


# --- maintenance beside two working nodes ----------------------------------------------------

def test_verify_and_delete_while_both_nodes_ingest(node_factory: Any, postgres_url: str,
                                                   tmp_path: Path) -> None:
    a, b = two_nodes(node_factory, postgres_url)
    a.start()
    b.start()
    held = f"{PREFIX}97.{random.Random().randint(1, 10**9)}"
    files = study_files(held, tmp_path)
    rd.load(a.port, files)
    with ingesting([a.port, b.port]) as senders:
        assert poll_until(lambda: all(len(s.acknowledged) >= 20 for s in senders.values()),
                          WAIT * 2)
        for _ in range(3):
            checked = run_cli("verify", "-c", str(b.config_path))
            assert checked.returncode == 0, checked.stdout + checked.stderr
        # A study B is sending is left by a `delete` run with A's config.
        with held_get(b.port, held) as (statuses, received):
            refused = run_cli("delete", "-c", str(a.config_path), "--study", held)
            assert refused.returncode == 1, refused.stderr
            assert f"study {held} not deleted: a retrieve is sending it" in refused.stderr
        assert statuses[-1] == 0x0000
        assert {uid: received[uid] for uid in received} == {
            f"{held}.1.{n}": dataset_bytes_of(files[n - 1]) for n in range(1, 5)}
        # Once the retrieve ended it goes, while the nodes go on ingesting.
        done = run_cli("delete", "-c", str(a.config_path), "--study", held)
        assert done.returncode == 0, done.stderr
        assert held not in study_counts(b.port)
        # A study just stored through B, deleted through A's config.
        fresh = senders[b.port].acknowledged[0]
        [(study,)] = a.rows("SELECT st.study_instance_uid FROM instance i JOIN series s"
                            " ON i.series_id = s.id JOIN study st ON s.study_id = st.id"
                            " WHERE i.sop_instance_uid = ?", fresh)
        gone = run_cli("delete", "-c", str(a.config_path), "--study", study)
        assert gone.returncode == 0, gone.stderr
    for s in senders.values():
        assert s.refused == [] and s.errors == [], (s.refused[:3], s.errors[:3])
    final = run_cli("verify", "-c", str(a.config_path))
    assert final.returncode == 0, final.stdout + final.stderr
    indexed = {uid for (uid,) in a.rows("SELECT sop_instance_uid FROM instance")}
    kept = [u for s in senders.values() for u in s.acknowledged if u != fresh]
    assert not set(kept) - indexed  # the deletions took nothing else
    assert len(a.stored_files()) == len(indexed)
    assert a.stop() == 0 and b.stop() == 0


def test_retention_on_one_node_spares_what_the_other_is_sending(
        node_factory: Any, postgres_url: str, tmp_path: Path) -> None:
    limit = 120_000  # bytes: the held study and about three others
    a, b = two_nodes(node_factory, postgres_url)
    # A's own stores wake its retention at once; what B stores it sees at its next check.
    a.settings["retention"] = {"max_store_size": limit, "check_interval": 1}
    b.start()
    held = f"{PREFIX}98.{random.Random().randint(1, 10**9)}"
    files = study_files(held, tmp_path, rows=64)
    rd.load(b.port, files)  # the oldest study
    a.start()
    with held_get(b.port, held) as (statuses, received):
        # Both nodes take new studies; A's retention must make room.
        for n in range(12):
            study = f"{PREFIX}98.{n}.{random.Random().randint(1, 10**9)}"
            target = a.port if n % 2 else b.port
            sent = [make_instance(study=study, series=f"{study}.1", rows=64,
                                  sop_instance=f"{study}.1.{k}", InstanceNumber=k)
                    for k in (1, 2, 3)]
            assert [s.status for s in send_datasets(target, sent)] == [0, 0, 0]
        assert poll_until(
            lambda: "retention (store over its size limit): study" in a.log(), WAIT)
        assert poll_until(lambda: total_size(a) <= limit, WAIT), total_size(a)
        # The study B is sending is still whole, rows and files.
        rows = a.rows("SELECT i.digest FROM instance i JOIN series s ON i.series_id = s.id"
                      " JOIN study st ON s.study_id = st.id WHERE st.study_instance_uid = ?",
                      held)
        assert len(rows) == 4
        assert all((a.storage / "objects" / d[:2] / d[2:4] / d).is_file() for (d,) in rows)
    assert statuses[-1] == 0x0000
    assert {uid: received[uid] for uid in received} == {
        f"{held}.1.{n}": dataset_bytes_of(files[n - 1]) for n in range(1, 5)}
    assert a.stop() == 0 and b.stop() == 0

