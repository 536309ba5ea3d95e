"""The DIMSE messages of a retrieve, encoded and decoded directly, sent past pynetdicom's DIMSE.

A command set is always Implicit VR Little Endian (PS3.7 6.3.1) and the messages a retrieve
exchanges have a fixed layout: C-STORE-RQ (PS3.7 9.3.1.1) and its response (9.3.1.2),
C-MOVE-RSP (9.3.4.2) and C-GET-RSP (9.3.3.2).  pynetdicom builds and reads each through a
pydicom Dataset, which costs more CPU than everything else a sub-operation does, so these are
written and read here with ``struct``.

Fragments follow PS3.8 9.3.5.1 and Annex E: each PDV carries one control byte (bit 0 command,
bit 1 last fragment) and fits the peer's maximum PDU length; several PDVs share one P-DATA-TF
PDU when they fit, so a small instance travels in one PDU with its command.  ``send_message``
hands the PDUs to the DUL thread; ``transmit`` and ``send_stored_file`` write them from the
calling thread when the DUL allows it (node.latency ``ResponsiveDUL.send_now``), and
``await_store_response`` reads a C-STORE-RSP off the socket itself when the next PDU is exactly
that; anything else is left to pynetdicom.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import FileIO
from pathlib import Path
from typing import cast

from pynetdicom.association import Association
from pynetdicom.pdu_primitives import P_DATA

from node.errors import NodeError
from node.latency import ResponsiveDUL
from node.retrieve.plan import StoredInstance
from node.retrieve.stored import HEADER_SIZE, dataset_offset

C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_GET_RSP = 0x8010
C_MOVE_RSP = 0x8021
C_FIND_RSP = 0x8020
C_ECHO_RSP = 0x8030
_DATASET_PRESENT = 0x0000  # PS3.7 9.3: any value but 0x0101 says a data set follows
_NO_DATASET = 0x0101
_PDV_OVERHEAD = 6  # item length (4), context ID (1), message control header (1)
_COMMAND, _LAST = 0x01, 0x02
# PDUs queued for the DUL before the sender waits for it to catch up: bounds the memory a large
# file takes while it is sent (pynetdicom queues a whole message at once).
_MAX_QUEUED_PDUS = 32
_DRAIN_POLL = 0.0005
# PS3.8 9.3.1 and 9.3.5: PDU type, reserved, PDU length; PDV item length, context ID, control.
_PDU_HEADER = struct.Struct(">BBI")
_PDV_HEADER = struct.Struct(">IBB")
_P_DATA_TF = 0x04
_ELEMENT = struct.Struct("<HHI")  # implicit VR little endian: group, element, value length
# A C-STORE-RSP is a few hundred bytes; a larger PDU is left to pynetdicom to read.
_MAX_RESPONSE_PDU = 0x4000
_RESPONSE_SLICE = 0.05  # seconds between looks at whether the association still stands
_PEEK_POLL = 0.0001  # seconds between looks while a PDU is arriving in pieces


class ConnectionLost(NodeError):
    """The association's connection failed while a message was written on it."""


@dataclass(frozen=True)
class StoreResponse:
    """What a C-STORE-RSP says (PS3.7 Table 9.3-2)."""

    responded_to: int | None  # Message ID Being Responded To
    status: int | None
    comment: str = ""


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _uid(element: int, value: str) -> bytes:
    # A response echoes the request's UIDs (PS3.7 9.3); a peer's non-ASCII bytes there are no
    # UID, but the response must still go out: they become '?' rather than kill the thread.
    data = value.encode("ascii", "replace")
    return _element(element, data + b"\x00" if len(data) % 2 else data)  # PS3.5 6.2: UI pad


def _text(element: int, value: str) -> bytes:
    data = value.encode("ascii", "replace")
    return _element(element, data + b" " if len(data) % 2 else data)


def _us(element: int, value: int) -> bytes:
    return _element(element, struct.pack("<H", value))


def _command(*elements: bytes) -> bytes:
    body = b"".join(elements)
    # (0000,0000) Command Group Length, UL: the bytes of the elements that follow.
    return _element(0x0000, struct.pack("<I", len(body))) + body


def store_request(instance: StoredInstance, message_id: int, priority: int,
                  originator_ae: str = "", originator_id: int | None = None) -> bytes:
    """A C-STORE-RQ command set (PS3.7 Table 9.3-1), Move Originator included for a C-MOVE."""
    elements = [
        _uid(0x0002, instance.sop_class_uid),
        _us(0x0100, C_STORE_RQ),
        _us(0x0110, message_id),
        _us(0x0700, priority),
        _us(0x0800, _DATASET_PRESENT),
        _uid(0x1000, instance.sop_instance_uid),
    ]
    if originator_ae and originator_id is not None:
        elements += [_text(0x1030, originator_ae), _us(0x1031, originator_id)]
    return _command(*elements)


def _response(command_field: int, message_id: int, sop_class: str, status: int,
              comment: str, dataset: bool) -> list[bytes]:
    """The elements every response command set starts with (PS3.7 9.3), in tag order."""
    elements = [
        _uid(0x0002, sop_class),
        _us(0x0100, command_field),
        _us(0x0120, message_id),
        _us(0x0800, _DATASET_PRESENT if dataset else _NO_DATASET),
        _us(0x0900, status),
    ]
    if comment:
        elements.append(_text(0x0902, comment[:64]))  # Error Comment is LO
    return elements


def retrieve_response(command_field: int, message_id: int, sop_class: str, status: int,
                      counts: tuple[int | None, int, int, int], comment: str = "",
                      identifier: bool = False) -> bytes:
    """A C-MOVE-RSP or C-GET-RSP command set (PS3.7 Tables 9.3-10, 9.3-8).

    ``counts`` are the Remaining (None: left out), Completed, Failed and Warning sub-operations.
    """
    remaining, completed, failed, warning = counts
    elements = _response(command_field, message_id, sop_class, status, comment, identifier)
    if remaining is not None:
        elements.append(_us(0x1020, remaining))
    elements += [_us(0x1021, completed), _us(0x1022, failed), _us(0x1023, warning)]
    return _command(*elements)


def _fragment_room(assoc: Association) -> int | None:
    """The most data bytes one PDV may carry to this peer (None: no limit)."""
    limit = int(assoc.dimse.maximum_pdu_size or 0)  # PS3.8 D.1: 0 means no maximum
    return limit - _PDV_OVERHEAD if limit else None


# One P-DATA-TF PDU's PDVs: (message control header, fragment), all on one context.
_PDU = list[tuple[int, bytes | memoryview]]


def _pdus(command: bytes, dataset: bytes | memoryview | None, room: int | None) -> list[_PDU]:
    """A message's fragments (PS3.8 E.2), as many per PDU as fit the peer's maximum PDU length
    (``room`` data bytes and one PDV header)."""
    pdus: list[_PDU] = [[]]
    size = 0
    for data, kind in ((command, _COMMAND), (dataset, 0)):
        if data is None:
            continue
        view = memoryview(data)
        step = max(1, len(view) if room is None or len(view) <= room else room)
        for start in range(0, max(len(view), 1), step):
            piece = view[start:start + step]
            item = len(piece) + _PDV_OVERHEAD
            if pdus[-1] and room is not None and size + item > room + _PDV_OVERHEAD:
                pdus.append([])
                size = 0
            pdus[-1].append((kind | (_LAST if start + step >= len(view) else 0), piece))
            size += item
    return pdus


def _encoded(context_id: int, pdus: list[_PDU]) -> bytes:
    """``pdus`` as P-DATA-TF PDUs on the wire (PS3.8 9.3.5)."""
    parts: list[bytes | memoryview] = []
    for pdu in pdus:
        parts.append(_PDU_HEADER.pack(_P_DATA_TF, 0,
                                      sum(len(piece) + _PDV_OVERHEAD for _, piece in pdu)))
        for control, piece in pdu:
            parts += [_PDV_HEADER.pack(len(piece) + 2, context_id, control), piece]
    return b"".join(parts)


def _queue(assoc: Association, context_id: int, pdus: list[_PDU]) -> None:
    """Hand ``pdus`` to the DUL thread, which encodes and sends them."""
    dul = assoc.dul
    on_dul = threading.current_thread() is dul  # (a C-STORE answered on the DUL's thread)
    for pdu in pdus:
        if not on_dul and dul.to_provider_queue.qsize() >= _MAX_QUEUED_PDUS:
            wait = threading.Event()  # never set: a bounded pause while the DUL sends
            while dul.to_provider_queue.qsize() >= _MAX_QUEUED_PDUS and assoc.is_established:
                wait.wait(_DRAIN_POLL)
        primitive = P_DATA()
        primitive.presentation_data_value_list.extend(  # (its setter wants lists, not tuples)
            (context_id, bytes([control]) + piece) for control, piece in pdu)
        dul.send_pdu(primitive)


def send_message(assoc: Association, context_id: int, command: bytes,
                 dataset: bytes | None = None) -> None:
    """Send one DIMSE message: its command set and, when given, its encoded data set."""
    _queue(assoc, context_id, _pdus(command, dataset, _fragment_room(assoc)))


def _write(assoc: Association, data: bytes | memoryview) -> bool:
    """Write whole PDUs from this thread; False when the DUL must send them instead."""
    dul = assoc.dul
    if not isinstance(dul, ResponsiveDUL):
        return False
    try:
        return dul.send_now(data)
    except OSError as exc:
        if assoc.is_established:
            assoc.abort()  # the peer may hold part of a PDU: the association cannot go on
        raise ConnectionLost(f"the connection failed while sending: {exc}") from exc


def transmit(assoc: Association, context_id: int, command: bytes,
             dataset: bytes | None = None) -> None:
    """``send_message``, written from the calling thread when the DUL allows it.

    Raises ConnectionLost when the connection fails during the write.
    """
    _transmit(assoc, context_id, _pdus(command, dataset, _fragment_room(assoc)))


def transmit_many(assoc: Association, context_id: int,
                  messages: list[tuple[bytes, bytes | None]]) -> None:
    """Several DIMSE messages (command set, data set or None), each in PDUs of its own, written
    in one go from the calling thread when the DUL allows it, else queued for it, in order.

    Raises ConnectionLost when the connection fails during the write.
    """
    room = _fragment_room(assoc)
    _transmit(assoc, context_id,
              [pdu for command, dataset in messages for pdu in _pdus(command, dataset, room)])


def _transmit(assoc: Association, context_id: int, pdus: list[_PDU]) -> bool:
    """Write ``pdus`` from this thread, else queue them for the DUL; True when written."""
    if _write(assoc, _encoded(context_id, pdus)):
        return True
    _queue(assoc, context_id, pdus)
    return False


def send_stored_file(assoc: Association, context_id: int, command: bytes, path: Path) -> None:
    """Send a C-STORE-RQ whose data set is the one stored at ``path``, read as it is.

    Raises OSError when the file cannot be read, NotPart10 when it has no File Meta group
    length to find the data set by, ConnectionLost when the connection fails meanwhile.
    """
    prepared = prepare_stored(assoc, context_id, command, path)
    if prepared is not None:
        send_prepared(assoc, prepared)
        return
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        offset = dataset_offset(f.read(HEADER_SIZE))
        f.seek(offset)
        # (a limit there is: without one, prepare_stored takes any file whole)
        _send_fragments(assoc, context_id, command, f, size - offset,
                        cast(int, _fragment_room(assoc)))


@dataclass(frozen=True)
class Prepared:
    """A C-STORE-RQ with a small stored file's data set, encoded before its turn."""

    context_id: int
    pdus: list[_PDU]
    encoded: bytes  # the same PDUs as written on the wire


def prepare_stored(assoc: Association, context_id: int, command: bytes,
                   path: Path) -> Prepared | None:
    """The C-STORE-RQ of the file at ``path``, read in one go and encoded, when its data set
    fits one PDV to the peer of ``assoc``; None for a larger file, which is read piece by piece
    as it is sent.  Raises OSError, NotPart10 (as ``send_stored_file``)."""
    room = _fragment_room(assoc)
    with open(path, "rb", buffering=0) as f:  # unbuffered: one read system call
        size = os.fstat(f.fileno()).st_size
        if room is not None and size - HEADER_SIZE > room:
            return None
        data = f.read(size)
    pdus = _pdus(command, memoryview(data)[dataset_offset(data[:HEADER_SIZE]):], room)
    return Prepared(context_id, pdus, _encoded(context_id, pdus))


def send_prepared(assoc: Association, prepared: Prepared) -> None:
    """Send a ``prepare_stored`` message.  Raises ConnectionLost (as ``send_stored_file``)."""
    if not _write(assoc, prepared.encoded):
        _queue(assoc, prepared.context_id, prepared.pdus)


def _send_fragments(assoc: Association, context_id: int, command: bytes, f: FileIO,
                    length: int, room: int) -> None:
    """The command, then the data set read from ``f`` one PDU at a time."""
    direct = _transmit(assoc, context_id, _pdus(command, None, room))
    header = _PDU_HEADER.size + _PDV_HEADER.size
    buffer = bytearray(header + room)
    view = memoryview(buffer)
    sent = 0
    try:
        while sent < length:
            count = f.readinto(view[header:header + min(room, length - sent)])
            if not count:
                raise OSError(0, "stored file shrank while it was sent")
            sent += count
            control = _LAST if sent >= length else 0
            if not direct:
                _queue(assoc, context_id, [[(control, bytes(view[header:header + count]))]])
                continue
            _PDU_HEADER.pack_into(buffer, 0, _P_DATA_TF, 0, count + _PDV_OVERHEAD)
            _PDV_HEADER.pack_into(buffer, _PDU_HEADER.size, count + 2, context_id, control)
            if not _write(assoc, view[:header + count]):
                raise ConnectionLost("the association stopped carrying data midway")
    except (OSError, ConnectionLost):
        if assoc.is_established:
            assoc.abort()  # the peer holds part of a message that can never be completed
        raise


@contextmanager
def response_socket(assoc: Association) -> Iterator[socket.socket | None]:
    """The association's socket, for ``await_store_response`` while the block runs; None when
    responses are pynetdicom's to read.  Taken before the request is sent: an answer must not
    reach the DUL thread first."""
    dul = assoc.dul
    if not isinstance(dul, ResponsiveDUL):
        yield None
        return
    with dul.socket_lent() as sock:
        yield sock


def await_store_response(assoc: Association, sock: socket.socket,
                         timeout: float | None) -> StoreResponse | None:
    """The C-STORE-RSP that comes next on ``assoc``, read off ``sock`` (``response_socket``).

    None when the next PDU is not exactly one complete C-STORE-RSP without a data set (another
    message, a fragment, A-RELEASE, A-ABORT, a closed or failed connection): nothing has been
    taken off the socket then, pynetdicom reads that PDU as usual once the socket is given
    back, and the caller takes the response from the DIMSE queue.  Raises TimeoutError when
    nothing arrives within ``timeout`` seconds.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    while assoc.is_established:  # else aborted meanwhile, by another thread
        wait = _RESPONSE_SLICE
        if deadline is not None:
            wait = min(wait, deadline - time.monotonic())
            if wait <= 0:
                raise TimeoutError("no C-STORE response in time")
        if not poller.poll(wait * 1000):
            continue
        try:
            pdu = _peek_pdu(sock)
        except OSError:
            return None  # the connection failed: pynetdicom's read finds out and says so
        if pdu is None:
            return None
        if not pdu:
            threading.Event().wait(_PEEK_POLL)  # a bounded pause while the PDU arrives
            continue
        response = _store_response(pdu)
        if response is not None:
            _consume(sock, len(pdu))
            dul = assoc.dul
            if isinstance(dul, ResponsiveDUL):  # (the one that lent the socket)
                dul.received()
        return response
    return None


def _peek_pdu(sock: socket.socket) -> bytes | None:
    """The next PDU, left in the receive buffer: b"" while it is still arriving, None when it
    is not one to read here (not P-DATA-TF, longer than a response, or end of connection)."""
    data = sock.recv(_PDU_HEADER.size + _MAX_RESPONSE_PDU, socket.MSG_PEEK)
    if len(data) < _PDU_HEADER.size:
        return b"" if data else None
    kind, _, length = _PDU_HEADER.unpack_from(data)
    if kind != _P_DATA_TF or length > _MAX_RESPONSE_PDU:
        return None
    whole = _PDU_HEADER.size + length
    return data[:whole] if len(data) >= whole else b""


def _consume(sock: socket.socket, count: int) -> None:
    """Take ``count`` bytes, already in the receive buffer, off the socket."""
    while count:
        count -= len(sock.recv(count))


def _store_response(pdu: bytes) -> StoreResponse | None:
    """The C-STORE-RSP that ``pdu`` (one P-DATA-TF) holds whole, else None.

    Every PDV must be a command fragment, the last one marked last (PS3.8 E.2); the command set
    (Implicit VR Little Endian, PS3.7 6.3.1) must say C-STORE-RSP without a data set.  Elements
    other than those read here (Affected SOP Class/Instance UID, Offending Element...) are
    skipped, as pynetdicom's caller does not look at them either.
    """
    command = bytearray()
    at, end = _PDU_HEADER.size, len(pdu)
    last = False
    while at < end:
        if last or end - at < _PDV_HEADER.size:
            return None
        length, _, control = _PDV_HEADER.unpack_from(pdu, at)
        if length < 2 or at + 4 + length > end or not control & _COMMAND:
            return None
        command += pdu[at + _PDV_HEADER.size:at + 4 + length]
        last = bool(control & _LAST)
        at += 4 + length
    if not last:
        return None
    values: dict[int, bytes] = {}
    at, end = 0, len(command)
    while at < end:
        if end - at < _ELEMENT.size:
            return None
        group, element, length = _ELEMENT.unpack_from(command, at)
        at += _ELEMENT.size
        if group != 0x0000 or at + length > end:
            return None
        values[element] = bytes(command[at:at + length])
        at += length
    us = {key: struct.unpack("<H", value)[0] for key, value in values.items()
          if key in (0x0100, 0x0120, 0x0800, 0x0900) and len(value) == 2}
    if us.get(0x0100) != C_STORE_RSP or us.get(0x0800) != _NO_DATASET:
        return None
    comment = values.get(0x0902, b"").decode("ascii", "replace").strip(" \x00")
    return StoreResponse(us.get(0x0120), us.get(0x0900), comment)


def find_response(message_id: int, sop_class: str, status: int, comment: str = "",
                  identifier: bool = False) -> bytes:
    """A C-FIND-RSP command set (PS3.7 Table 9.3-3); Pending ones carry an identifier."""
    return _command(*_response(C_FIND_RSP, message_id, sop_class, status, comment, identifier))


def store_response(message_id: int, sop_class: str, sop_instance: str, status: int,
                   comment: str = "") -> bytes:
    """A C-STORE-RSP command set (PS3.7 Table 9.3-2): no data set."""
    elements = _response(C_STORE_RSP, message_id, sop_class, status, comment, False)
    elements.append(_uid(0x1000, sop_instance))
    return _command(*elements)


def refusal(command_field: int, message_id: int, sop_class: str, status: int, comment: str,
            sop_instance: str | None = None) -> bytes:
    """A final response that refuses a request outright: status and Error Comment only (for
    a C-STORE-RSP also the Affected SOP Instance UID, PS3.7 Table 9.3-2)."""
    elements = _response(command_field, message_id, sop_class, status, comment, False)
    if sop_instance is not None:
        elements.append(_uid(0x1000, sop_instance))
    return _command(*elements)
