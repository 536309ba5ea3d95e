"""The trust boundary's size limits, against a real node process over raw sockets.

A PDU is judged by its declared length before its body is read (node.pdu_guard): longer than
negotiated (or than an A-ASSOCIATE-RQ can need) and the node aborts the association at once,
without holding any of it.  A C-STORE whose data set passes ``max_instance_size`` is refused
0xA700 with nothing kept, and the association goes on (node.handlers.store_direct).
"""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid

from tests import pdus
from tests.conftest import NodeProcess, dcmtk_env, dcmtk_tool, echo, poll_until
from tests.dicomdata import PREFIX, make_instance, send_datasets, write_part10

MiB = 1024 * 1024
OUT_OF_RESOURCES = 0xA700
PROVIDER = 2
UNEXPECTED_PDU, INVALID_PARAMETER = 2, 6


def rss(node: NodeProcess) -> int:
    """The node process's resident memory, bytes (/proc/PID/status VmRSS)."""
    assert node.process is not None
    for line in Path(f"/proc/{node.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def stream(conn: pdus.RawAssociation, total: int) -> int:
    """Send up to ``total`` junk bytes; how many went before the node shut the connection."""
    sent, chunk = 0, bytes(MiB)
    conn.sock.settimeout(5)
    try:
        while sent < total:
            sent += conn.sock.send(chunk)
    except (OSError, TimeoutError):
        pass
    return sent


@pytest.fixture
def small_node(node_factory: Any) -> NodeProcess:
    node: NodeProcess = node_factory(max_pdu=16384, max_instance_size="64 KiB").start()
    return node


def test_pdu_declaring_2_gib_after_association_is_refused_unread(node: NodeProcess) -> None:
    with pdus.RawAssociation(node.port) as conn:
        conn.associate()
        before = rss(node)
        conn.send(struct.pack(">BBL", pdus.P_DATA_TF, 0, 2 * 1024**3))
        answer = conn.read()
        assert answer is not None and answer.abort_reason == (PROVIDER, INVALID_PARAMETER)
        # What the peer goes on sending is not read: the node has closed the connection.
        assert stream(conn, 64 * MiB) < 64 * MiB
        assert conn.closed_within(5)
    assert rss(node) - before < 8 * MiB
    log = node.wait_for_log("refused a PDU from 127.0.0.1")
    assert "P-DATA-TF declaring 2147483648 bytes more than the 262144 allowed" in log
    assert echo(node.port)


def test_associate_rq_declaring_a_huge_length_is_refused(node: NodeProcess) -> None:
    with pdus.RawAssociation(node.port) as conn:
        conn.send(struct.pack(">BBL", pdus.A_ASSOCIATE_RQ, 0, 0xFFFFFFFF))
        answer = conn.read()
        assert answer is not None and answer.abort_reason == (PROVIDER, INVALID_PARAMETER)
        assert conn.closed_within(5)
    assert "A-ASSOCIATE-RQ declaring 4294967295 bytes" in node.wait_for_log("refused a PDU")
    assert echo(node.port)


def test_a_large_but_plausible_associate_rq_is_read(node: NodeProcess) -> None:
    """128 contexts (the most PS3.8 allows) are far below the A-ASSOCIATE-RQ limit."""
    contexts = tuple((2 * i + 1, pdus.VERIFICATION if i == 0 else f"1.2.3.{i}")
                     for i in range(128))
    with pdus.RawAssociation(node.port) as conn:
        conn.associate(contexts=contexts)
        conn.send(*pdus.message(1, pdus.echo_rq(7)))
        answer = conn.read()
        assert answer is not None and answer.status == 0x0000


def test_fixed_length_pdu_declaring_more_is_refused(node: NodeProcess) -> None:
    with pdus.RawAssociation(node.port) as conn:
        conn.associate()
        conn.send(struct.pack(">BBL", pdus.A_RELEASE_RQ, 0, 100 * MiB))
        answer = conn.read()
        assert answer is not None and answer.abort_reason == (PROVIDER, INVALID_PARAMETER)
        assert conn.closed_within(5)
    assert echo(node.port)


def test_p_data_before_association_is_unexpected(node: NodeProcess) -> None:
    with pdus.RawAssociation(node.port) as conn:
        conn.send(pdus.p_data((1, pdus.COMMAND | pdus.LAST, pdus.echo_rq())))
        answer = conn.read()
        assert answer is not None and answer.abort_reason == (PROVIDER, UNEXPECTED_PDU)
        assert conn.closed_within(5)
    assert echo(node.port)


def _store_with_first_pdu_of(conn: pdus.RawAssociation, length: int) -> pdus.Pdu | None:
    """A C-STORE whose first data set P-DATA-TF declares exactly ``length`` bytes."""
    uid = generate_uid(PREFIX)
    data = pdus.dataset_bytes(make_instance(sop_instance=uid, rows=128))
    first = length - 6  # one PDV: 4-byte length, context ID, control header, then the data
    conn.send(pdus.p_data((pdus.STORE_CX, pdus.COMMAND | pdus.LAST, pdus.store_rq(uid))))
    conn.send(pdus.p_data((pdus.STORE_CX, 0, data[:first])))
    rest = [data[i:i + 8000] for i in range(first, len(data), 8000)]
    try:
        for index, chunk in enumerate(rest):
            conn.send(pdus.p_data((pdus.STORE_CX, pdus.LAST if index == len(rest) - 1 else 0,
                                   chunk)))
    except (BrokenPipeError, ConnectionResetError):
        pass  # the node refused the first PDU and closed: what it answered is read below
    return conn.read()


def test_p_data_of_exactly_max_pdu_is_read(small_node: NodeProcess) -> None:
    with pdus.RawAssociation(small_node.port) as conn:
        conn.associate()
        answer = _store_with_first_pdu_of(conn, 16384)
        assert answer is not None and answer.status == 0x0000
    assert len(small_node.stored_files()) == 1


def test_p_data_one_byte_over_max_pdu_aborts(small_node: NodeProcess) -> None:
    with pdus.RawAssociation(small_node.port) as conn:
        conn.associate()
        answer = _store_with_first_pdu_of(conn, 16385)
        # The A-ABORT, unless the node's close (with bytes of ours unread: a TCP reset) reached
        # this socket first and took it along; the log line below says why either way.
        assert answer is None or answer.abort_reason == (PROVIDER, INVALID_PARAMETER)
        assert answer is None or conn.closed_within(5)
    assert "P-DATA-TF declaring 16385 bytes more than the 16384 allowed" in \
        small_node.wait_for_log("refused a PDU")
    assert small_node.stored_files() == []
    assert echo(small_node.port)


def test_instance_over_max_instance_size_is_refused_and_the_association_goes_on(
        small_node: NodeProcess) -> None:
    big = make_instance(rows=256)  # 128 KiB of pixel data
    small = make_instance()
    results = send_datasets(small_node.port, [big, small, make_instance()])
    assert [r.status for r in results] == [OUT_OF_RESOURCES, 0x0000, 0x0000]
    assert "larger than 65536 bytes" in results[0].comment
    assert len(small_node.stored_files()) == 2
    assert small_node.temporary_files() == []
    stored = {row[0] for row in small_node.rows("SELECT sop_instance_uid FROM instance")}
    assert str(big.SOPInstanceUID) not in stored
    assert str(small.SOPInstanceUID) in stored
    log = small_node.wait_for_log("over max_instance_size 65536")
    assert "127.0.0.1" in log


def test_oversized_store_on_pynetdicoms_path_is_refused_too(small_node: NodeProcess) -> None:
    """A command set the direct reader leaves to pynetdicom (a UID component with a leading
    zero) is counted all the same, and taken over once it is too large."""
    uid = PREFIX + "0123.1"
    data = pdus.dataset_bytes(make_instance(sop_instance=uid, rows=256))
    with pdus.RawAssociation(small_node.port) as conn:
        conn.associate()
        conn.send(*pdus.message(pdus.STORE_CX, pdus.store_rq(uid, 1), data))
        answer = conn.read()
        assert answer is not None and answer.status == OUT_OF_RESOURCES
        small = make_instance()
        conn.send(*pdus.message(pdus.STORE_CX, pdus.store_rq(str(small.SOPInstanceUID), 2),
                                pdus.dataset_bytes(small)))
        answer = conn.read()
        assert answer is not None and answer.status == 0x0000
    assert len(small_node.stored_files()) == 1


def test_oversized_find_identifier_aborts(small_node: NodeProcess) -> None:
    with pdus.RawAssociation(small_node.port) as conn:
        conn.associate()
        identifier = pdus.dataset_bytes(make_instance(rows=256, QueryRetrieveLevel="STUDY"))
        try:
            conn.send(*pdus.message(pdus.FIND_CX, pdus.find_rq(), identifier))
            answer = conn.read()
        # The node aborts as soon as the message passes the limit, and may have closed the
        # connection before the rest of it was sent: then the A-ABORT can be lost to the
        # reset that unread bytes cause (the log below says why it ended).
        except (BrokenPipeError, ConnectionResetError):
            answer = None
        assert answer is None or answer.kind == pdus.A_ABORT, answer
    small_node.wait_for_log("a DIMSE message beyond 65536 bytes")
    assert echo(small_node.port)


def test_storescu_gets_a700_for_an_oversized_file(small_node: NodeProcess,
                                                 tmp_path: Path) -> None:
    storescu = dcmtk_tool("storescu")
    big = write_part10(make_instance(rows=256), tmp_path / "big.dcm")
    small_ds = make_instance()
    small = write_part10(small_ds, tmp_path / "small.dcm")
    run = subprocess.run(
        [str(storescu), "-v", "--no-halt", "-aec", "DICOMNODE", "127.0.0.1", str(small_node.port),
         str(big), str(small)],
        capture_output=True, text=True, env=dcmtk_env(), timeout=60)
    output = run.stdout + run.stderr
    assert "Refused: OutOfResources" in output, output
    assert poll_until(lambda: len(small_node.rows("SELECT 1 FROM instance")) == 1, 10)
    stored = small_node.rows("SELECT sop_instance_uid FROM instance")
    assert stored == [(str(small_ds.SOPInstanceUID),)]
    assert len(small_node.stored_files()) == 1
