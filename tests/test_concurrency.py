"""Many associations at once against one node process: stores, queries and retrieves side by side.

(a) max_associations associations held at once (pynetdicom, plus DCMTK storescu processes)
    storing into the same new studies while others C-FIND and C-GET a reference study: every
    store Success, every answer exact.  The node's own gauge (``/metrics``) says how many it
    held at once; the figure is printed.
(b) The same instance sent by several associations at the same moment (a barrier), many times:
    one file, one row, every sender answered Success.
(c) C-GET and C-MOVE of a study while new instances of it keep arriving: the retrieve sends at
    least what was there when it started, with no failed sub-operation, each dataset intact.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from tests import retrievedata as rd
from tests.conftest import NodeProcess, dcmtk_env, dcmtk_tool, free_port, make_node, poll_until
from tests.dicomdata import (
    CT_IMAGE,
    PREFIX,
    Sent,
    dataset_bytes_of,
    file_meta_of,
    make_instance,
    no_delay,
    reactor_paused,
    sha256_file,
    write_part10,
)
from tests.test_metrics import scrape, value

MAX_ASSOCIATIONS = 32
STORERS, FINDERS, GETTERS = 22, 3, 3  # pynetdicom associations held at once at the start
DCMTK_STORERS = 4  # storescu processes started when those begin work
PER_STORER = 20  # instances each storer sends
NEW_STUDIES = 4  # the storers all write into these few new studies (and 2 series each)
REF_INSTANCES = 12
QUERIES, RETRIEVES = 12, 3  # per finder, per getter
SAME_SENDERS, SAME_ROUNDS = 4, 30
SUCCESS = 0x0000
CURRENT = "dicom_node_associations_current"


def study_uid() -> str:
    """A new Study Instance UID short enough for ".N" series UIDs under it (64 at most)."""
    return f"{PREFIX}77.{uuid.uuid4().int % 10**18}"


@dataclass
class Node:
    process: NodeProcess
    metrics_port: int

    @property
    def port(self) -> int:
        return self.process.port

    def held(self) -> int:
        return int(value(scrape(self.metrics_port), CURRENT))

    def digest_of(self, uid: str) -> str:
        [(digest,)] = self.process.rows(
            "SELECT digest FROM instance WHERE sop_instance_uid = ?", uid)
        return str(digest)

    def file_of(self, uid: str) -> Path:
        digest = self.digest_of(uid)
        return self.process.storage / "objects" / digest[:2] / digest[2:4] / digest


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    dcmtk_tool("storescu")  # skip early when DCMTK is missing
    root = tmp_path_factory.mktemp("concurrency")
    metrics_port = free_port()
    process = make_node(root / "node", max_associations=MAX_ASSOCIATIONS,
                        metrics={"bind": "127.0.0.1", "port": metrics_port},
                        peers={rd.DEST_AE: {"host": "127.0.0.1", "port": free_port()}}).start()
    try:
        yield Node(process, metrics_port)
    finally:
        process.stop()


@dataclass
class Peak:
    """Samples the node's association gauge on a thread until stopped; keeps the highest."""

    node: Node
    highest: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Peak:
        self._thread = threading.Thread(target=self._run, name="gauge-sampler")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.highest = max(self.highest, self.node.held())
            self.samples += 1
            self._stop.wait(0.005)


def associate(port: int, calling: str, contexts: list[Any], roles: list[Any] | None = None,
              handlers: list[Any] | None = None) -> Association:
    ae = AE(ae_title=calling)
    for context in contexts:
        if isinstance(context, tuple):
            ae.add_requested_context(*context)
        else:
            ae.add_requested_context(context)
    # Generous for 32 associations on a small CI machine, short enough to fail in time.
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE", ext_neg=roles or [],
                         evt_handlers=handlers or [])
    assert assoc.is_established, f"{calling}: association rejected"
    no_delay(assoc)
    return assoc


def find_uids(assoc: Association, level: str, key: str, **match: str) -> set[str]:
    query = Dataset()
    query.QueryRetrieveLevel = level
    for keyword, wanted in match.items():
        setattr(query, keyword, wanted)
    setattr(query, key, "")
    found: set[str] = set()
    responses = reactor_paused(assoc).send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
    for status, identifier in responses:
        assert status and "Status" in status, "C-FIND: no response"
        if status.Status in (0xFF00, 0xFF01):
            found.add(str(getattr(identifier, key)))
        else:
            assert status.Status == SUCCESS, f"C-FIND failed: 0x{status.Status:04X}"
    return found


# --- (a) many associations at once -----------------------------------------------------------

def test_many_associations_store_find_and_get_at_once(node: Node, tmp_path: Path) -> None:
    started = time.monotonic()
    ref_study = study_uid()
    ref_files = {}
    for n in range(REF_INSTANCES):
        ds = make_instance(study=ref_study, series=f"{ref_study}.{n % 2 + 1}",
                           PatientID="CONC-REF", InstanceNumber=n)
        ref_files[str(ds.SOPInstanceUID)] = write_part10(ds, tmp_path / "ref" / f"{n}.dcm")
    rd.load(node.port, list(ref_files.values()))

    studies = [study_uid() for _ in range(NEW_STUDIES)]
    series = [f"{study}.{s}" for study in studies for s in (1, 2)]

    def new_instance(sender: int, n: int) -> Dataset:
        ds = make_instance(study=studies[sender % NEW_STUDIES],
                           series=series[sender % len(series)], PatientID="CONC-NEW",
                           InstanceNumber=n, rows=32)
        ds.file_meta = Dataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        return ds

    batches = [[new_instance(s, n) for n in range(PER_STORER)] for s in range(STORERS)]
    dcmtk_dirs = []
    for s in range(DCMTK_STORERS):
        folder = tmp_path / f"dcmtk-{s}"
        for n in range(PER_STORER):
            write_part10(new_instance(STORERS + s, n), folder / f"{n}.dcm")
        dcmtk_dirs.append(folder)

    workers = STORERS + FINDERS + GETTERS
    all_open = threading.Barrier(workers + 1, timeout=120)
    go = threading.Barrier(workers + 1, timeout=120)
    stored: list[Sent] = []
    finds: list[tuple[int, int]] = []  # (reference instances found, all found) per query
    gets: list[tuple[int, int, int, bool]] = []  # (status, completed, failed, bytes equal)

    def held(work: Callable[[Association], None], assoc: Association) -> None:
        try:
            all_open.wait()
            go.wait()
            work(assoc)
        finally:
            assoc.release()

    def storer(index: int) -> None:
        assoc = associate(node.port, f"STORE{index}", [(CT_IMAGE, [ExplicitVRLittleEndian])])

        def work(a: Association) -> None:
            for ds in batches[index]:
                status = reactor_paused(a).send_c_store(ds)
                stored.append(Sent(str(ds.SOPInstanceUID),
                                   int(status.Status) if status else None))
                if not a.is_established:  # no response in time: aborted; reported below
                    break
        held(work, assoc)

    def finder(index: int) -> None:
        assoc = associate(node.port, f"FIND{index}", [StudyRootQueryRetrieveInformationModelFind])

        def work(a: Association) -> None:
            for _ in range(QUERIES):
                found: set[str] = set()
                ref_series = find_uids(a, "SERIES", "SeriesInstanceUID",
                                       StudyInstanceUID=ref_study)
                # Fewer would be a lost Pending response (see reactor_paused).
                assert len(ref_series) == 2, f"C-FIND SERIES answered {ref_series}"
                for one in ref_series:
                    found |= find_uids(a, "IMAGE", "SOPInstanceUID",
                                       StudyInstanceUID=ref_study, SeriesInstanceUID=one)
                finds.append((len(found & set(ref_files)), len(found)))
                new = find_uids(a, "STUDY", "StudyInstanceUID", PatientID="CONC-NEW")
                assert new <= set(studies), new  # the new studies only, whatever has arrived
        held(work, assoc)

    def getter(index: int) -> None:
        received: dict[str, bytes] = {}

        def on_store(event: Any) -> int:
            received[str(event.request.AffectedSOPInstanceUID)] = \
                event.encoded_dataset(include_meta=False)
            return SUCCESS

        assoc = associate(node.port, f"GET{index}",
                          [StudyRootQueryRetrieveInformationModelGet,
                           (CT_IMAGE, [ExplicitVRLittleEndian])],
                          roles=[build_role(CT_IMAGE, scp_role=True)],
                          handlers=[(evt.EVT_C_STORE, on_store)])

        def work(a: Association) -> None:
            query = rd.identifier("STUDY", StudyInstanceUID=ref_study)
            for _ in range(RETRIEVES):
                received.clear()
                responses = reactor_paused(a).send_c_get(
                    query, StudyRootQueryRetrieveInformationModelGet)
                final = list(responses)[-1][0]
                same = set(received) == set(ref_files) and all(
                    received[u] == dataset_bytes_of(p) for u, p in ref_files.items())
                gets.append((int(final.Status),
                             int(final.get("NumberOfCompletedSuboperations", -1)),
                             int(final.get("NumberOfFailedSuboperations", -1)), same))
        held(work, assoc)

    jobs = ([lambda i=i: storer(i) for i in range(STORERS)]
            + [lambda i=i: finder(i) for i in range(FINDERS)]
            + [lambda i=i: getter(i) for i in range(GETTERS)])

    def run(job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException:
            all_open.abort()  # nobody waits for a worker that failed
            go.abort()
            raise

    with Peak(node) as peak, ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(run, job) for job in jobs]
        try:
            all_open.wait()
            held_at_start = node.held()  # every worker's association is open and idle now
            go.wait()
        except threading.BrokenBarrierError:
            for future in futures:  # the worker's own error says what went wrong
                if future.exception(timeout=300) is not None:
                    future.result()
            raise
        storescu = [subprocess.Popen(
            [str(dcmtk_tool("storescu")), "-aec", "DICOMNODE", "-aet", f"DCMTK{n}", "+sd",
             "127.0.0.1", str(node.port), str(folder)],
            env=dcmtk_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            for n, folder in enumerate(dcmtk_dirs)]
        for future in futures:
            future.result(timeout=300)
        outputs = [p.communicate(timeout=120)[0].decode(errors="replace") for p in storescu]
    seconds = time.monotonic() - started

    assert held_at_start == workers, f"the node held {held_at_start}, not {workers}"
    assert [p.returncode for p in storescu] == [0] * DCMTK_STORERS, outputs
    assert [s for s in stored if s.status != SUCCESS] == []
    assert len(stored) == STORERS * PER_STORER
    assert len(finds) == FINDERS * QUERIES
    assert [f for f in finds if f != (REF_INSTANCES, REF_INSTANCES)] == []
    assert gets == [(SUCCESS, REF_INSTANCES, 0, True)] * (GETTERS * RETRIEVES), gets
    samples = scrape(node.metrics_port)
    assert value(samples, "dicom_node_associations_rejected_total") == 0

    # Every instance sent is indexed once, under the right one of the few shared studies and
    # series, its file intact; storescu's too (its log lines say 0x0000 for each).
    sent = [ds for batch in batches for ds in batch]
    dcmtk_uids = {str(file_meta_of(p).MediaStorageSOPInstanceUID)
                  for folder in dcmtk_dirs for p in folder.iterdir()}
    log = node.process.log()
    for uid in dcmtk_uids:
        assert re.search(rf"{re.escape(uid)} status 0x0000 stored", log), uid
    rows = dict(node.process.rows(
        "SELECT i.sop_instance_uid, s.series_instance_uid FROM instance i "
        "JOIN series s ON s.id = i.series_id"))
    for ds in sent:
        assert rows[str(ds.SOPInstanceUID)] == str(ds.SeriesInstanceUID)
    assert set(rows) == set(ref_files) | {str(ds.SOPInstanceUID) for ds in sent} | dcmtk_uids
    placeholders = ",".join("?" * len(studies))
    assert node.process.rows(
        f"SELECT COUNT(*) FROM study WHERE study_instance_uid IN ({placeholders})",
        *studies) == [(NEW_STUDIES,)]
    assert node.process.rows(
        "SELECT COUNT(*) FROM series s JOIN study t ON t.id = s.study_id "
        f"WHERE t.study_instance_uid IN ({placeholders})", *studies) == [(len(series),)]
    assert node.process.rows(
        "SELECT COUNT(*) FROM patient WHERE patient_id = 'CONC-NEW'") == [(1,)]
    for uid in rows:
        assert sha256_file(node.file_of(uid)) == node.digest_of(uid)
    assert node.process.temporary_files() == []
    total = STORERS * PER_STORER + DCMTK_STORERS * PER_STORER
    print(f"\nconcurrency: {workers} pynetdicom associations held at once (node gauge "
          f"{held_at_start}), peak {peak.highest} with {DCMTK_STORERS} storescu "
          f"({peak.samples} samples), max_associations {MAX_ASSOCIATIONS}; {total} stores all "
          f"Success, {len(finds)} C-FIND pairs and {len(gets)} C-GETs exact, {seconds:.1f} s")


# --- (b) the same instance from several associations at the same moment ----------------------

def test_same_instance_at_the_same_moment_is_one_file_one_row(node: Node, tmp_path: Path) -> None:
    instances = [make_instance(rows=64, InstanceNumber=n) for n in range(SAME_ROUNDS)]
    for ds in instances:
        ds.file_meta = Dataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    uids = [str(ds.SOPInstanceUID) for ds in instances]
    files_before = set(node.process.stored_files())
    barrier = threading.Barrier(SAME_SENDERS, timeout=60)

    def sender(index: int) -> list[int | None]:
        statuses: list[int | None] = []
        assoc = associate(node.port, f"SAME{index}", [(CT_IMAGE, [ExplicitVRLittleEndian])])
        try:
            for ds in instances:
                reactor_paused(assoc)
                barrier.wait()  # every association sends this instance at the same moment
                status = assoc.send_c_store(ds)
                statuses.append(int(status.Status) if status else None)
        finally:
            assoc.release()
        return statuses

    with ThreadPoolExecutor(SAME_SENDERS) as pool:
        per_sender = [f.result(timeout=300)
                      for f in [pool.submit(sender, i) for i in range(SAME_SENDERS)]]

    log = node.process.log()
    for n, uid in enumerate(uids):
        assert [statuses[n] for statuses in per_sender] == [SUCCESS] * SAME_SENDERS, n
        [(digest,)] = node.process.rows(
            "SELECT digest FROM instance WHERE sop_instance_uid = ?", uid)
        stored = node.file_of(uid)
        assert sha256_file(stored) == digest
        assert dcmread(stored).SOPInstanceUID == uid
        outcomes = sorted(re.findall(rf"{re.escape(uid)} status 0x0000 (\w+)", log))
        assert outcomes == ["duplicate"] * (SAME_SENDERS - 1) + ["stored"], (n, outcomes)
    new_files = set(node.process.stored_files()) - files_before
    assert {p.name for p in new_files} == {node.digest_of(uid) for uid in uids}
    assert node.process.temporary_files() == []


# --- (c) a retrieve while the study keeps growing ---------------------------------------------

def test_retrieve_while_new_instances_of_the_study_arrive(node: Node, tmp_path: Path) -> None:
    study = study_uid()
    first = [write_part10(make_instance(study=study, series=f"{study}.1", rows=128,
                                        InstanceNumber=n), tmp_path / "first" / f"{n}.dcm")
             for n in range(40)]
    rd.load(node.port, first)
    acknowledged: list[str] = [str(file_meta_of(p).MediaStorageSOPInstanceUID)
                               for p in first]
    stop = threading.Event()

    def keep_arriving() -> int:
        sent = 0
        assoc = associate(node.port, "ARRIVING", [(CT_IMAGE, [ExplicitVRLittleEndian])])
        try:
            while not stop.is_set():
                ds = make_instance(study=study, series=f"{study}.{2 + sent % 2}", rows=128,
                                   InstanceNumber=100 + sent)
                ds.file_meta = Dataset()
                ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
                status = reactor_paused(assoc).send_c_store(ds)
                assert status and status.Status == SUCCESS, status
                acknowledged.append(str(ds.SOPInstanceUID))
                sent += 1
        finally:
            assoc.release()
        return sent

    dest_port = int(node.process.settings["peers"][rd.DEST_AE]["port"])
    query = rd.identifier("STUDY", StudyInstanceUID=study)
    windows: list[tuple[int, int]] = []  # acknowledged when each retrieve started and ended
    checked = 0
    with ThreadPoolExecutor(1) as pool:
        arriving = pool.submit(keep_arriving)
        try:
            assert poll_until(lambda: len(acknowledged) >= 45, 30), "instances not arriving"
            for attempt in range(3):
                with rd.storescp(tmp_path / f"moved-{attempt}", dest_port) as scp, \
                        ThreadPoolExecutor(2) as retrievers:
                    before = set(acknowledged)
                    count_before = len(acknowledged)
                    got = retrievers.submit(rd.get, node.port, "study", query,
                                            [(CT_IMAGE, [ExplicitVRLittleEndian])])
                    moved = retrievers.submit(rd.move, node.port, "study", query)
                    (get_responses, received), move_responses = got.result(), moved.result()
                    windows.append((count_before, len(acknowledged)))
                    # Held now (some may be stored but their Success not yet counted here).
                    arrived = {uid for (uid,) in node.process.rows(
                        "SELECT i.sop_instance_uid FROM instance i JOIN series s ON "
                        "s.id = i.series_id JOIN study t ON t.id = s.study_id "
                        "WHERE t.study_instance_uid = ?", study)}
                    checked += _check_retrieved(node, get_responses, {
                        u: r[0] for u, r in received.items()}, before, arrived)
                    checked += _check_retrieved(node, move_responses, {
                        u: dataset_bytes_of(p) for u, p in scp.received().items()},
                        before, arrived)
        finally:
            stop.set()
        sent_meanwhile = arriving.result(timeout=60)
    assert sent_meanwhile > 0
    assert any(end > start for start, end in windows), f"nothing arrived during a retrieve: " \
                                                       f"{windows}"
    for uid in acknowledged:  # everything that arrived is indexed and intact
        assert sha256_file(node.file_of(uid)) == node.digest_of(uid)
    print(f"\nretrieve while arriving: {checked} instances retrieved by 3 C-GET and 3 C-MOVE "
          f"while {sent_meanwhile} new instances arrived; acknowledged during each: "
          f"{[end - start for start, end in windows]}")


def _check_retrieved(node: Node, responses: rd.Responses, received: dict[str, bytes],
                     before: set[str], arrived: set[str]) -> int:
    """Success with no failed or warning sub-operation; at least what was held when it began,
    nothing the study does not hold; each dataset as stored."""
    completed, failed, warning = responses.counts()
    assert (responses.status, failed, warning) == (SUCCESS, 0, 0), responses.final
    assert completed == len(received)
    assert before <= set(received) <= arrived, (len(before), len(received), len(arrived))
    for uid, data in received.items():
        assert data == dataset_bytes_of(node.file_of(uid)), uid
    return len(received)
