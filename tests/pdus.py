"""Raw DICOM upper-layer bytes for tests that must send what no well-behaved library would.

Builds valid PDUs by hand (PS3.8 9.3): A-ASSOCIATE-RQ, P-DATA-TF with command sets (PS3.7
9.3, Implicit VR Little Endian) and data sets, A-RELEASE-RQ; and a ``RawAssociation`` that
sends any bytes on a plain socket and reads back whole PDUs.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pynetdicom.dsutils import encode

VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLEMENTATION_UID = "1.2.826.0.1.3680043.10.1234.99"

A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF = 0x01, 0x02, 0x03, 0x04
A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x05, 0x06, 0x07
COMMAND, LAST = 0x01, 0x02

# Presentation context IDs of ``associate_rq``'s default proposal.
ECHO_CX, STORE_CX, FIND_CX = 1, 3, 5
DEFAULT_CONTEXTS = ((ECHO_CX, VERIFICATION), (STORE_CX, CT_IMAGE), (FIND_CX, STUDY_ROOT_FIND))


def pdu(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBL", kind, 0, len(body)) + body


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def _ae(title: str) -> bytes:
    return title.encode("ascii").ljust(16)[:16]


def associate_rq(called: str = "DICOMNODE", calling: str = "FUZZSCU",
                 contexts: tuple[tuple[int, str], ...] = DEFAULT_CONTEXTS,
                 max_pdu: int = 16384) -> bytes:
    """An A-ASSOCIATE-RQ (PS3.8 9.3.2) proposing Implicit VR Little Endian for each context."""
    items = _item(0x10, APPLICATION_CONTEXT.encode())
    for context_id, abstract in contexts:
        items += _item(0x20, bytes([context_id, 0, 0, 0]) + _item(0x30, abstract.encode())
                       + _item(0x40, IMPLICIT_LE.encode()))
    user = _item(0x51, struct.pack(">L", max_pdu)) + _item(0x52, IMPLEMENTATION_UID.encode())
    items += _item(0x50, user)
    header = struct.pack(">HH", 1, 0) + _ae(called) + _ae(calling) + bytes(32)
    return pdu(A_ASSOCIATE_RQ, header + items)


def release_rq() -> bytes:
    return pdu(A_RELEASE_RQ, bytes(4))


def p_data(*pdvs: tuple[int, int, bytes]) -> bytes:
    """A P-DATA-TF of PDVs ``(context_id, control, data)`` (PS3.8 9.3.5, Annex E.2)."""
    body = b"".join(struct.pack(">LBB", len(data) + 2, cx, control) + data
                    for cx, control, data in pdvs)
    return pdu(P_DATA_TF, body)


def _element(element: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0"
    return struct.pack("<HHL", 0x0000, element, len(value)) + value


def command_set(fields: dict[int, bytes | int | str]) -> bytes:
    """A command set (PS3.7 6.3.1) with its group length; ints are US, strings UI/AE."""
    body = b""
    for element in sorted(fields):
        value = fields[element]
        raw = struct.pack("<H", value) if isinstance(value, int) else (
            value.encode() if isinstance(value, str) else value)
        body += _element(element, raw)
    return struct.pack("<HHLL", 0x0000, 0x0000, 4, len(body)) + body


def echo_rq(message_id: int = 1) -> bytes:
    return command_set({0x0002: VERIFICATION, 0x0100: 0x0030, 0x0110: message_id,
                        0x0800: 0x0101})


def store_rq(sop_instance: str, message_id: int = 1, sop_class: str = CT_IMAGE) -> bytes:
    return command_set({0x0002: sop_class, 0x0100: 0x0001, 0x0110: message_id,
                        0x0700: 0x0000, 0x0800: 0x0000, 0x1000: sop_instance})


def find_rq(message_id: int = 1) -> bytes:
    return command_set({0x0002: STUDY_ROOT_FIND, 0x0100: 0x0020, 0x0110: message_id,
                        0x0700: 0x0000, 0x0800: 0x0000})


def dataset_bytes(ds: Dataset) -> bytes:
    """``ds`` in Implicit VR Little Endian, as it goes on the wire."""
    data = encode(ds, True, True)
    assert data is not None
    return data


def message(context_id: int, command: bytes, dataset: bytes | None = None,
            fragment: int = 16000) -> list[bytes]:
    """The P-DATA-TF PDUs of one DIMSE message: command in one PDV, data set fragmented."""
    pdus = [p_data((context_id, COMMAND | LAST, command))]
    if dataset is not None:
        chunks = [dataset[i:i + fragment] for i in range(0, len(dataset), fragment)] or [b""]
        for index, chunk in enumerate(chunks):
            last = LAST if index == len(chunks) - 1 else 0
            pdus.append(p_data((context_id, last, chunk)))
    return pdus


@dataclass(frozen=True)
class Pdu:
    kind: int
    body: bytes

    @property
    def abort_reason(self) -> tuple[int, int]:
        """(source, reason) of an A-ABORT (PS3.8 9.3.8)."""
        assert self.kind == A_ABORT, f"not an A-ABORT: 0x{self.kind:02X}"
        return self.body[2], self.body[3]

    def command(self) -> dict[int, bytes]:
        """The command set elements of a P-DATA-TF holding one whole command."""
        assert self.kind == P_DATA_TF, f"not a P-DATA-TF: 0x{self.kind:02X}"
        data = b""
        at = 0
        while at < len(self.body):
            length, _, control = struct.unpack_from(">LBB", self.body, at)
            assert control & COMMAND
            data += self.body[at + 6:at + 4 + length]
            at += 4 + length
        fields: dict[int, bytes] = {}
        at = 0
        while at < len(data):
            _, element, length = struct.unpack_from("<HHL", data, at)
            fields[element] = data[at + 8:at + 8 + length]
            at += 8 + length
        return fields

    @property
    def status(self) -> int:
        return int(struct.unpack("<H", self.command()[0x0900])[0])


class RawAssociation:
    """A plain TCP connection to a node, speaking bytes."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def __enter__(self) -> RawAssociation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, *data: bytes) -> None:
        for chunk in data:
            self.sock.sendall(chunk)

    def associate(self, **kwargs: object) -> Pdu:
        self.send(associate_rq(**kwargs))  # type: ignore[arg-type]
        answer = self.read()
        assert answer is not None and answer.kind == A_ASSOCIATE_AC, answer
        return answer

    def read(self) -> Pdu | None:
        """The next whole PDU, or None when the node closed the connection."""
        header = self._exactly(6)
        if header is None:
            return None
        kind, _, length = struct.unpack(">BBL", header)
        body = self._exactly(length)
        return None if body is None else Pdu(kind, body)

    def closed_within(self, seconds: float) -> bool:
        """True when the node closes the connection (EOF or reset) within ``seconds``, reading
        and discarding whatever it still sends."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                if not self.sock.recv(65536):
                    return True
            except TimeoutError:
                return False
            except ConnectionError:
                return True
        return False

    def _exactly(self, size: int) -> bytes | None:
        data = bytearray()
        while len(data) < size:
            try:
                chunk = self.sock.recv(size - len(data))
            except ConnectionError:
                return None
            if not chunk:
                return None
            data += chunk
        return bytes(data)
