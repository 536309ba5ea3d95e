"""The hostile and broken inputs of ../shared/REFERENCE.md that other files do not name one by one.

Raw sockets where no DICOM tool can express the case.  After each, the node must still answer a
C-ECHO and have kept nothing of the broken input.  (Covered elsewhere: huge and over-negotiated
PDU lengths, P-DATA before association, oversized instances: test_limits.py; unknown and wrong
called AE titles, per-peer limits: test_access.py, test_store_basic.py; bad data sets:
test_rejections.py; disk full: test_resources.py, test_free_space.py; many mutations at once:
test_fuzz.py.)
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import pytest
from pydicom.uid import generate_uid

from node.dicom import header
from node.errors import UnreadableDataset
from tests import pdus
from tests.conftest import NodeProcess, echo, poll_until
from tests.dicomdata import PREFIX, make_instance


@pytest.fixture
def node(node_factory: Any) -> NodeProcess:
    started: NodeProcess = node_factory(acse_timeout=2, max_associations=4).start()
    return started


def still_serving(node: NodeProcess) -> None:
    assert poll_until(lambda: echo(node.port), 10), "the node stopped answering C-ECHO"
    assert node.process is not None and node.process.poll() is None
    assert node.temporary_files() == []


def test_a_silent_connection_is_closed_and_blocks_nobody(node: NodeProcess) -> None:
    with pdus.RawAssociation(node.port) as silent:
        assert echo(node.port)  # served while the silent one waits
        assert silent.closed_within(10)  # acse_timeout (2 s) for the A-ASSOCIATE-RQ
    still_serving(node)


@pytest.mark.parametrize(("garbage", "named"), [
    (b"GET / HTTP/1.1\r\nHost: pacs\r\n\r\n", "(HTTP on the DICOM port?)"),
    # The start of a TLS ClientHello (record type 0x16, TLS 1.0 record version).
    (bytes.fromhex("16030100c8010000c40303") + bytes(200),
     "(a TLS handshake: a DICOM TLS client on the plain port? see tls.port)"),
], ids=["http", "tls-client-hello"])
def test_another_protocol_on_the_dicom_port(node: NodeProcess, garbage: bytes,
                                            named: str) -> None:
    with pdus.RawAssociation(node.port) as conn:
        conn.send(garbage)
        assert conn.closed_within(10)
    still_serving(node)
    # The log says what it probably was, and from where.
    log = node.wait_for_log(named)
    assert f"Unknown PDU type received '0x{garbage[0]:02X}' from 127.0.0.1:" in log


def test_a_connection_closed_in_the_middle_of_a_pdu(node: NodeProcess) -> None:
    request = pdus.associate_rq()
    with pdus.RawAssociation(node.port) as conn:
        conn.send(request[: len(request) // 2])
    still_serving(node)


def test_a_connection_closed_in_the_middle_of_a_data_set(node: NodeProcess) -> None:
    ds = make_instance()
    dataset = pdus.dataset_bytes(ds)
    messages = pdus.message(pdus.STORE_CX, pdus.store_rq(str(ds.SOPInstanceUID)), dataset,
                            fragment=len(dataset) // 3)
    with pdus.RawAssociation(node.port) as conn:
        conn.associate()
        conn.send(*messages[:-1])  # the last fragment never comes
    still_serving(node)
    assert node.rows("SELECT id FROM instance WHERE sop_instance_uid = ?",
                     str(ds.SOPInstanceUID)) == []
    assert node.stored_files() == []


def test_fragments_that_never_say_last_are_bounded(node_factory: Any) -> None:
    node: NodeProcess = node_factory(max_instance_size="64 KiB").start()
    ds = make_instance()
    with pdus.RawAssociation(node.port) as conn:
        conn.associate()
        conn.send(pdus.p_data((pdus.STORE_CX, pdus.COMMAND | pdus.LAST,
                               pdus.store_rq(str(ds.SOPInstanceUID)))))
        for _ in range(40):  # 640 KiB of fragments, none of them the last
            conn.send(pdus.p_data((pdus.STORE_CX, 0, bytes(16000))))
        conn.send(pdus.p_data((pdus.STORE_CX, pdus.LAST, bytes(16))))
        answer = conn.read()
        assert answer is not None and answer.status == 0xA700
    still_serving(node)
    assert node.stored_files() == []


def test_a_pdv_longer_than_its_pdu(node: NodeProcess) -> None:
    command = pdus.echo_rq()
    # The PDV item says 1000 bytes; the PDU holds only the command (PS3.8 9.3.5.1).
    pdv = struct.pack(">LBB", 1000, pdus.ECHO_CX, pdus.COMMAND | pdus.LAST) + command
    with pdus.RawAssociation(node.port) as conn:
        conn.associate()
        conn.send(pdus.pdu(pdus.P_DATA_TF, pdv))
        answer = conn.read()
        assert answer is None or answer.kind == pdus.A_ABORT, answer
    still_serving(node)


def test_only_unsupported_abstract_syntaxes(node: NodeProcess) -> None:
    with pdus.RawAssociation(node.port) as conn:
        conn.send(pdus.associate_rq(contexts=((1, "1.2.3.4.5.6.7"),)))
        answer = conn.read()
        assert answer is not None
        if answer.kind == pdus.A_ASSOCIATE_AC:
            # PS3.8 9.3.3: items follow 68 bytes of fixed fields; a presentation context item
            # (0x21) has its result at offset 6: 3 = abstract syntax not supported.
            at, results = 68, []
            while at < len(answer.body):
                kind, length = answer.body[at], struct.unpack_from(">H", answer.body, at + 2)[0]
                if kind == 0x21:
                    results.append(answer.body[at + 6])
                at += 4 + length
            assert results == [3]
        else:
            assert answer.kind in (pdus.A_ASSOCIATE_RJ, pdus.A_ABORT)
    still_serving(node)


def test_a_request_on_a_context_that_was_not_accepted(node: NodeProcess) -> None:
    with pdus.RawAssociation(node.port) as conn:
        conn.associate(contexts=((pdus.ECHO_CX, pdus.VERIFICATION), (7, "1.2.3.4.5.6.7")))
        conn.send(pdus.p_data((7, pdus.COMMAND | pdus.LAST, pdus.echo_rq())))
        answer = conn.read()
        assert answer is None or answer.kind == pdus.A_ABORT, answer
    still_serving(node)


def test_beyond_the_association_limit(node: NodeProcess) -> None:
    held: list[pdus.RawAssociation] = []

    def one_more() -> bool:  # the readiness check's association may still be closing
        conn = pdus.RawAssociation(node.port)
        conn.send(pdus.associate_rq())
        answer = conn.read()
        if answer is not None and answer.kind == pdus.A_ASSOCIATE_AC:
            held.append(conn)
            return True
        conn.close()
        return False

    try:
        for _ in range(4):
            assert poll_until(one_more, 10, interval=0.05)
        with pdus.RawAssociation(node.port) as extra:
            extra.send(pdus.associate_rq())
            answer = extra.read()
            assert answer is not None and answer.kind == pdus.A_ASSOCIATE_RJ
            # PS3.8 Table 9-21: rejected-transient, service-provider (presentation), limit.
            assert tuple(answer.body[1:4]) == (2, 3, 2)
    finally:
        for conn in held:
            conn.close()
    still_serving(node)


def test_a_deflate_bomb_is_not_inflated_past_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(header, "MAX_INFLATED_BYTES", 1 << 20)
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = packer.compress(bytes(64 << 20)) + packer.flush()  # 64 MiB of zeros in ~64 KiB
    assert len(bomb) < 128 * 1024
    with pytest.raises(UnreadableDataset, match="beyond the size limit"):
        header.read_header(bomb, "1.2.840.10008.1.2.1.99")


def test_sequences_nested_too_deep_are_refused() -> None:
    item = b""
    for _ in range(200):  # (0008,1115) SQ of one item holding the next, undefined lengths
        item = (struct.pack("<HH", 0xFFFE, 0xE000) + b"\xff\xff\xff\xff"
                + struct.pack("<HH", 0x0008, 0x1115) + b"\xff\xff\xff\xff" + item
                + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
                + struct.pack("<HHL", 0xFFFE, 0xE00D, 0))
    data = struct.pack("<HH", 0x0008, 0x1115) + b"\xff\xff\xff\xff" + item + \
        struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    uid = generate_uid(PREFIX)
    data = struct.pack("<HHL", 0x0008, 0x0016, 26) + b"1.2.840.10008.5.1.4.1.1.2\x00" + \
        struct.pack("<HHL", 0x0008, 0x0018, len(uid) + len(uid) % 2) + \
        uid.encode() + b"\x00" * (len(uid) % 2) + data
    with pytest.raises(UnreadableDataset):
        header.read_header(data, "1.2.840.10008.1.2")
