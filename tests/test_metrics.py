"""The Prometheus endpoint (issue 5): a real ``dicom-node serve`` scraped over HTTP.

The node is sent C-ECHOs, C-STOREs (one refused), a C-FIND, a C-GET, a C-MOVE to an unknown
destination and an association for another AE title; the counters, bytes and store gauges read
from ``/metrics`` must match what was sent and what the index holds.  Without a ``metrics``
section the node listens on its DICOM port only; a metrics port already taken stops start-up
with one line.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from peewee import OperationalError
from prometheus_client.parser import text_string_to_metric_families
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from node import __version__
from node.metrics import StoreTotals
from tests import retrievedata as rd
from tests.conftest import REPO, NodeProcess, echo, free_port, poll_until
from tests.dicomdata import (
    CT_IMAGE,
    PREFIX,
    dataset_bytes_of,
    make_instance,
    reactor_paused,
    send_files,
    write_part10,
    write_raw_part10,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """GET /metrics and parse it as Prometheus does: {(sample name, labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"{name}{labels} not exported: {sorted(k[0] for k in samples)}"
    return samples[key]


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process ``pid`` listens on (its socket inodes in /proc/net/tcp*)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except FileNotFoundError:  # closed while we look
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: TCP_LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.fixture
def metered(node_factory: Any) -> Iterator[tuple[NodeProcess, int]]:
    port = free_port()
    node = node_factory(metrics={"bind": "127.0.0.1", "port": port}).start()
    yield node, port
    assert node.stop() == 0


def _find(port: int, study: str) -> int:
    ae = AE(ae_title="FINDER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study
    try:
        responses = list(reactor_paused(assoc).send_c_find(
            query, StudyRootQueryRetrieveInformationModelFind))
    finally:
        assoc.release()
    return int(responses[-1][0].Status)


def test_metrics_count_what_the_node_did(metered: tuple[NodeProcess, int],
                                          tmp_path: Path) -> None:
    node, port = metered
    assert listening_ports(node.process.pid) == {node.port, port}  # type: ignore[union-attr]
    study = f"{PREFIX}77"
    files = [write_part10(make_instance(study=study, series=f"{PREFIX}77.1", InstanceNumber=n),
                          tmp_path / f"{n}.dcm") for n in (1, 2, 3)]
    # The command names another SOP Instance than the data set: 0xA900 (PS3.4 B.2.3).
    refused = write_raw_part10(tmp_path / "refused.dcm", CT_IMAGE, f"{PREFIX}77.999",
                               dataset_bytes_of(files[0]))
    statuses = [sent.status for sent in send_files(node.port, [*files, refused])]
    assert statuses == [0x0000, 0x0000, 0x0000, 0xA900]
    assert echo(node.port) and echo(node.port)
    assert _find(node.port, study) == 0x0000
    got, received = rd.get(node.port, "study", rd.identifier("STUDY", StudyInstanceUID=study),
                           [(CT_IMAGE, rd.UNCOMPRESSED)])
    assert got.status == 0x0000 and len(received) == 3
    moved = rd.move(node.port, "study", rd.identifier("STUDY", StudyInstanceUID=study),
                    destination="NOWHERE")
    assert moved.status == 0xA801
    stranger = AE(ae_title="TESTSCU")
    stranger.add_requested_context(Verification)
    assert not stranger.associate("127.0.0.1", node.port, ae_title="SOMEONEELSE").is_established

    samples: Samples = {}

    def all_closed() -> bool:
        nonlocal samples
        samples = scrape(port)
        return value(samples, "dicom_node_associations_current") == 0

    assert poll_until(all_closed, 10), samples
    # The node's start-up check (one C-ECHO), the stores, two C-ECHOs, C-FIND, C-GET, C-MOVE.
    assert value(samples, "dicom_node_associations_total") == 7
    assert value(samples, "dicom_node_associations_rejected_total") == 1
    assert value(samples, "dicom_node_associations_aborted_total") == 0
    operations = {(dict(labels)["service"], dict(labels)["status"], dict(labels)["result"]): v
                  for (name, labels), v in samples.items()
                  if name == "dicom_node_operations_total"}
    assert operations == {
        ("C-ECHO", "0x0000", "success"): 3,
        ("C-STORE", "0x0000", "success"): 3,
        ("C-STORE", "0xA900", "failure"): 1,
        ("C-FIND", "0x0000", "success"): 1,
        ("C-GET", "0x0000", "success"): 1,
        ("C-MOVE", "0xA801", "failure"): 1,
    }
    for service, count in (("C-STORE", 4), ("C-FIND", 1), ("C-GET", 1), ("C-MOVE", 1)):
        assert value(samples, "dicom_node_operation_duration_seconds_count",
                     service=service) == count
        assert value(samples, "dicom_node_operation_duration_seconds_sum", service=service) > 0
        assert value(samples, "dicom_node_operation_duration_seconds_bucket", service=service,
                     le="+Inf") == count

    # Received: the data sets as sent (the node keeps them byte for byte after its File Meta).
    assert value(samples, "dicom_node_received_instances_total") == 3
    assert value(samples, "dicom_node_received_bytes_total") == sum(
        len(dataset_bytes_of(f)) for f in files)
    # The store: what the index holds, and the files on disk.
    [(count, size)] = node.rows("SELECT COUNT(*), SUM(size) FROM instance")
    stored = node.stored_files()
    assert (count, size) == (3, sum(p.stat().st_size for p in stored)) and len(stored) == 3
    assert value(samples, "dicom_node_store_instances") == 3
    assert value(samples, "dicom_node_store_bytes") == size
    # Sent: the C-GET sent the three stored files as they are.
    assert value(samples, "dicom_node_sent_instances_total", service="C-GET") == 3
    assert value(samples, "dicom_node_sent_bytes_total", service="C-GET") == size
    assert value(samples, "dicom_node_sent_instances_total", service="C-MOVE") == 0
    assert value(samples, "dicom_node_sub_operations_failed_total", service="C-GET") == 0
    assert value(samples, "dicom_node_build_info", version=__version__,
                 ae_title="DICOMNODE") == 1

    # An association held open is counted as current until it closes.
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        assert poll_until(
            lambda: value(scrape(port), "dicom_node_associations_current") == 1, 10)
    finally:
        assoc.release()
    assert poll_until(lambda: value(scrape(port), "dicom_node_associations_current") == 0, 10)


def test_no_endpoint_without_metrics(node: NodeProcess) -> None:
    assert node.process is not None
    assert listening_ports(node.process.pid) == {node.port}
    assert "metrics on http" not in node.log()


def test_metrics_port_taken_fails_start_in_one_line(node_factory: Any) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        node = node_factory(metrics={"bind": "127.0.0.1", "port": taken}, log_level="error")
        node.write_config()
        run = subprocess.run([sys.executable, "-m", "node", "serve", "-c", str(node.config_path)],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert lines == [f"dicom-node: cannot serve metrics on 127.0.0.1:{taken}: "
                     "Address already in use"], run.stderr
    # The DICOM listener it had opened is closed again: the port can be bound.
    with socket.socket() as again:
        again.bind(("127.0.0.1", node.port))


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_store_totals_read_the_index_at_most_every_max_age() -> None:
    """A scrape storm reads the index once per max_age; a failed read leaves the gauges out."""
    reads: list[float] = []
    answers: list[tuple[int, int] | Exception] = [(2, 500), OperationalError("locked"), (3, 700)]
    clock = _Clock()

    def read() -> tuple[int, int]:
        reads.append(clock.now)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    totals = StoreTotals(read, max_age=15.0, clock=clock)
    assert [m.samples for m in totals.describe()] == [[], []] and reads == []

    def exported() -> dict[str, float]:
        return {s.name: s.value for m in totals.collect() for s in m.samples}

    for _ in range(100):
        assert exported() == {"dicom_node_store_instances": 2, "dicom_node_store_bytes": 500}
    clock.now += 14.9
    assert exported()["dicom_node_store_bytes"] == 500 and len(reads) == 1
    clock.now += 0.1
    assert exported() == {} and exported() == {}  # the index failed: left out, not retried
    clock.now += 15.0
    assert exported() == {"dicom_node_store_instances": 3, "dicom_node_store_bytes": 700}
    assert reads == [1000.0, 1015.0, 1030.0]
