"""The DIMSE messages of a retrieve, encoded directly and handed to pynetdicom's DUL as P-DATA.

A command set is always Implicit VR Little Endian (PS3.7 6.3.1) and the messages a retrieve
sends have a fixed layout: C-STORE-RQ (PS3.7 9.3.1.1), C-MOVE-RSP (9.3.4.2) and C-GET-RSP
(9.3.3.2).  pynetdicom builds each through a pydicom Dataset and its general writer, which costs
more CPU than everything else a sub-operation does, so these are written here with ``struct``.

Fragments follow PS3.8 9.3.5.1 and Annex E: each PDV carries one control byte (bit 0 command,
bit 1 last fragment) and fits the peer's maximum PDU length; several PDVs share one P-DATA-TF
PDU when they fit, so a small instance travels in one PDU with its command.
"""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path

from pynetdicom.association import Association
from pynetdicom.pdu_primitives import P_DATA

from node.retrieve.plan import StoredInstance
from node.retrieve.stored import HEADER_SIZE, dataset_offset

C_STORE_RQ = 0x0001
C_GET_RSP = 0x8010
C_MOVE_RSP = 0x8021
_DATASET_PRESENT = 0x0000  # PS3.7 9.3: any value but 0x0101 says a data set follows
_NO_DATASET = 0x0101
_PDV_OVERHEAD = 6  # item length (4), context ID (1), message control header (1)
_COMMAND, _LAST = 0x01, 0x02
# PDUs queued for the DUL before the sender waits for it to catch up: bounds the memory a large
# file takes while it is sent (pynetdicom queues a whole message at once).
_MAX_QUEUED_PDUS = 32
_DRAIN_POLL = 0.0005


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _uid(element: int, value: str) -> bytes:
    data = value.encode("ascii")
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


def retrieve_response(command_field: int, message_id: int, sop_class: str, status: int,
                      counts: tuple[int | None, int, int, int], comment: str = "",
                      identifier: bool = False) -> bytes:
    """A C-MOVE-RSP or C-GET-RSP command set (PS3.7 Tables 9.3-10, 9.3-8).

    ``counts`` are the Remaining (None: left out), Completed, Failed and Warning sub-operations.
    """
    remaining, completed, failed, warning = counts
    elements = [
        _uid(0x0002, sop_class),
        _us(0x0100, command_field),
        _us(0x0120, message_id),
        _us(0x0800, _DATASET_PRESENT if identifier else _NO_DATASET),
        _us(0x0900, status),
    ]
    if comment:
        elements.append(_text(0x0902, comment[:64]))  # Error Comment is LO
    if remaining is not None:
        elements.append(_us(0x1020, remaining))
    elements += [_us(0x1021, completed), _us(0x1022, failed), _us(0x1023, warning)]
    return _command(*elements)


def _fragment_room(assoc: Association) -> int | None:
    """The most data bytes one PDV may carry to this peer (None: no limit)."""
    limit = int(assoc.dimse.maximum_pdu_size or 0)  # PS3.8 D.1: 0 means no maximum
    return limit - _PDV_OVERHEAD if limit else None


def _pdvs(context_id: int, data: bytes, command: bool, room: int | None) -> list[tuple[int, bytes]]:
    kind = _COMMAND if command else 0
    if room is None or len(data) <= room:
        return [(context_id, bytes([kind | _LAST]) + data)]
    pieces = [data[i:i + room] for i in range(0, len(data), room)]
    return [(context_id, bytes([kind | (_LAST if n == len(pieces) - 1 else 0)]) + piece)
            for n, piece in enumerate(pieces)]


def _send_pdvs(assoc: Association, pdvs: list[tuple[int, bytes]], room: int | None) -> None:
    """Hand ``pdvs`` to the DUL, as many per P-DATA-TF PDU as fit the peer's maximum."""
    pdu = P_DATA()
    size = 0
    for pdv in pdvs:
        item = len(pdv[1]) + _PDV_OVERHEAD - 1
        if pdu.presentation_data_value_list and room is not None and (
            size + item > room + _PDV_OVERHEAD
        ):
            _queue(assoc, pdu)
            pdu, size = P_DATA(), 0
        pdu.presentation_data_value_list.append(pdv)
        size += item
    if pdu.presentation_data_value_list:
        _queue(assoc, pdu)


def _queue(assoc: Association, pdu: P_DATA) -> None:
    dul = assoc.dul
    if dul.to_provider_queue.qsize() >= _MAX_QUEUED_PDUS:
        wait = threading.Event()  # never set: a bounded pause while the DUL sends
        while dul.to_provider_queue.qsize() >= _MAX_QUEUED_PDUS and assoc.is_established:
            wait.wait(_DRAIN_POLL)
    dul.send_pdu(pdu)


def send_message(assoc: Association, context_id: int, command: bytes,
                 dataset: bytes | None = None) -> None:
    """Send one DIMSE message: its command set and, when given, its encoded data set."""
    room = _fragment_room(assoc)
    pdvs = _pdvs(context_id, command, True, room)
    if dataset is not None:
        pdvs += _pdvs(context_id, dataset, False, room)
    _send_pdvs(assoc, pdvs, room)


def send_stored_file(assoc: Association, context_id: int, command: bytes, path: Path) -> None:
    """Send a C-STORE-RQ whose data set is the one stored at ``path``, read as it is.

    Raises OSError when the file cannot be read, NotPart10 when it has no File Meta group
    length to find the data set by.
    """
    room = _fragment_room(assoc)
    with path.open("rb") as f:
        offset = dataset_offset(f.read(HEADER_SIZE))
        length = os.fstat(f.fileno()).st_size - offset
        f.seek(offset)
        if room is None or length <= room:
            send_message(assoc, context_id, command, f.read())
            return
        _send_pdvs(assoc, _pdvs(context_id, command, True, room), room)
        sent = 0
        try:
            while sent < length:
                piece = f.read(min(room, length - sent))
                if not piece:
                    raise OSError(0, "stored file shrank while it was sent")
                sent += len(piece)
                _queue(assoc, _single(context_id, piece, last=sent >= length))
        except OSError:
            assoc.abort()  # the peer holds part of a message that can never be completed
            raise


def _single(context_id: int, piece: bytes, last: bool) -> P_DATA:
    pdu = P_DATA()
    pdu.presentation_data_value_list.append((context_id, bytes([_LAST if last else 0]) + piece))
    return pdu


C_FIND_RSP = 0x8020


def find_response(message_id: int, sop_class: str, status: int, comment: str = "",
                  identifier: bool = False) -> bytes:
    """A C-FIND-RSP command set (PS3.7 Table 9.3-3); Pending ones carry an identifier."""
    elements = [
        _uid(0x0002, sop_class),
        _us(0x0100, C_FIND_RSP),
        _us(0x0120, message_id),
        _us(0x0800, _DATASET_PRESENT if identifier else _NO_DATASET),
        _us(0x0900, status),
    ]
    if comment:
        elements.append(_text(0x0902, comment[:64]))  # Error Comment is LO
    return _command(*elements)
