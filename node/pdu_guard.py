"""Judge each PDU a peer sends by its declared length before reading its body (PS3.8 9.3).

pynetdicom 3.0's DUL (``DULServiceProvider._read_pdu_data``) reads the 6-byte PDU header and
then whatever length that header declares, up to 4 GiB, before it decodes anything: a peer
that declares 2 GiB and sends it makes the node hold the PDU two or three times over.
``read_pdu`` is that same read with a guard between header and body: a PDU longer than its
type allows is refused unread (``refuse``: A-ABORT, connection closed, a WARNING naming the
peer).  The limits (``length_limit``):

- A-ASSOCIATE-RQ/-AC: ``ASSOCIATE_MAX``.  PS3.8 sets no maximum; a request proposing the full
  128 presentation contexts with every transfer syntax, plus a User Identity sub-item (up to
  two 64 KiB fields, PS3.7 D.3.3.7), stays well under it.  DCMTK refuses larger ones too
  (``dcmAssociatePDUSizeLimit``, default 1 MB).
- A-ASSOCIATE-RJ, A-RELEASE-RQ/-RP, A-ABORT: 4 bytes, their fixed length (PS3.8 9.3.4-9.3.8).
- P-DATA-TF: the Maximum Length the node itself announced (PS3.8 D.1: it bounds the variable
  field, i.e. the declared length, which excludes the 6-byte header); when that is 0
  ("unlimited"), ``UNLIMITED_PDU_CEILING``.  Before the association is established a P-DATA-TF
  is an unexpected PDU (PS3.8 9.2 table 9-10, Sta2/Sta3/Sta5), refused unread whatever its
  length.

Once the association is over (Sta13, waiting for the connection to close) nothing more is
read: the connection is closed.  Everything else is pynetdicom's, unchanged: unknown PDU
types (refused before any body is read), short reads (transport closed), decoding and the
state machine's events.
"""

from __future__ import annotations

import logging
import socket
import struct
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, cast

from pynetdicom.pdu import A_ABORT_RQ

if TYPE_CHECKING:
    from pynetdicom.association import Association, ServiceUser
    from pynetdicom.dul import DULServiceProvider
    from pynetdicom.pdu_primitives import A_ASSOCIATE
    from pynetdicom.transport import AssociationSocket

log = logging.getLogger(__name__)

ASSOCIATE_MAX = 1024 * 1024
# With max_pdu 0 a peer may send a whole message as one PDU, and pynetdicom holds a PDU in
# memory two or three times while decoding it: 64 MiB keeps one connection below ~200 MB
# while taking any single PDU a real sender builds (DCMTK's own ceiling for its max PDU is
# 128 KiB; pynetdicom's default 16 KiB).  Sites with larger instances keep max_pdu non-zero,
# so that senders fragment them.
UNLIMITED_PDU_CEILING = 64 * 1024 * 1024
FIXED_LENGTH = 4
READ_CHUNK = 256 * 1024  # bytes asked of the socket at once while reading a PDU's body

_HEADER = struct.Struct(">BBL")  # PDU type, reserved, length of the variable field (PS3.8 9.3.1)
_A_ASSOCIATE_RQ, _A_ASSOCIATE_AC, _P_DATA_TF = 0x01, 0x02, 0x04
_KNOWN_TYPES = frozenset(range(0x01, 0x08))
_NAMES = {0x01: "A-ASSOCIATE-RQ", 0x02: "A-ASSOCIATE-AC", 0x03: "A-ASSOCIATE-RJ",
          0x04: "P-DATA-TF", 0x05: "A-RELEASE-RQ", 0x06: "A-RELEASE-RP", 0x07: "A-ABORT"}
# PS3.8 9.2 Table 9-10: the states in which a P-DATA-TF may arrive (data transfer, release,
# and Sta13, where whatever still arrives is read and ignored).
_DATA_STATES = frozenset({"Sta6", "Sta7", "Sta8", "Sta9", "Sta10", "Sta11", "Sta12", "Sta13"})
# PS3.8 9.3.8: A-ABORT source 2 (service provider), reasons 2 and 6.
_PROVIDER = 0x02
UNEXPECTED_PDU = 0x02
INVALID_PARAMETER_VALUE = 0x06


def length_limit(pdu_type: int, local_max_pdu: int, state: str) -> int | None:
    """The longest variable field a PDU of ``pdu_type`` may declare; None when such a PDU
    cannot be expected in ``state`` at all (a P-DATA-TF before data transfer)."""
    if pdu_type in (_A_ASSOCIATE_RQ, _A_ASSOCIATE_AC):
        return ASSOCIATE_MAX
    if pdu_type == _P_DATA_TF:
        if state not in _DATA_STATES:
            return None
        return local_max_pdu if local_max_pdu > 0 else UNLIMITED_PDU_CEILING
    return FIXED_LENGTH


def _local(assoc: Association) -> ServiceUser:
    return assoc.acceptor if assoc.is_acceptor else assoc.requestor


def _peer(assoc: Association) -> str:
    remote = assoc.requestor if assoc.is_acceptor else assoc.acceptor
    info = remote.address_info
    return f"{info.address}:{info.port}" if info is not None else "unknown peer"


# What a PDU header that is no PDU most often is: another protocol on the DICOM port.  A TLS
# record starts 0x16 0x03 (handshake, version 3.x: a DICOM TLS client on the plain port).
_PROTOCOL_SIGN = 2
_OTHER_PROTOCOLS = {
    b"\x16\x03": " (a TLS handshake: a DICOM TLS client on the plain port? see tls.port)",
    **{method[:_PROTOCOL_SIGN]: " (HTTP on the DICOM port?)"
       for method in (b"GET", b"POST", b"PUT", b"HEAD", b"OPTIONS", b"DELETE")},
}


def read_pdu(dul: DULServiceProvider) -> None:
    """Read the next PDU off ``dul``'s socket, as ``DULServiceProvider._read_pdu_data`` does,
    refusing it unread when its declared length is beyond what its type allows."""
    transport = cast("AssociationSocket", dul.socket)
    if dul.state_machine.current_state == "Sta13":
        # The association is over, the connection waits to be closed (PS3.8 9.2: whatever
        # arrives now is ignored).  pynetdicom would read on as long as the peer sends, each
        # stray 6 bytes an "unknown PDU" logged and answered with another A-ABORT: close now.
        transport.close()
        return
    raw = transport.socket
    header = bytearray()
    try:
        if raw is not None:
            _recv_into(raw, header, _HEADER.size)
    except OSError as exc:
        _closed(dul, f"connection failed before a PDU header: {exc}")
        return
    if len(header) < _HEADER.size:
        _closed(dul, None)  # the peer closed the connection (between PDUs or within a header)
        return
    pdu_type, _, length = _HEADER.unpack(header)
    if pdu_type not in _KNOWN_TYPES:
        log.error("Unknown PDU type received '0x%02X' from %s%s", pdu_type, _peer(dul.assoc),
                  _OTHER_PROTOCOLS.get(bytes(header[:_PROTOCOL_SIGN]), ""))
        _invalid(dul)
        return
    state = dul.state_machine.current_state
    limit = length_limit(pdu_type, _local(dul.assoc).maximum_length or 0, state)
    if limit is None or length > limit:
        refuse(dul, pdu_type, length, limit)
        return
    pdu = header
    try:
        _recv_into(cast(socket.socket, raw), pdu, _HEADER.size + length)
    except OSError as exc:
        _closed(dul, f"connection failed within a PDU: {exc}")
        return
    if len(pdu) != _HEADER.size + length:
        _closed(dul, f"The received PDU is shorter than expected ({len(pdu)} of "
                     f"{_HEADER.size + length} bytes received)")
        return
    try:
        decoded, event = dul._decode_pdu(pdu)
        if pdu_type == _A_ASSOCIATE_RQ:
            # pynetdicom converts the request only in its state machine (AE-6), where a
            # value it refuses (an even presentation context ID...) ends the DUL thread; an
            # abstract syntax it refuses becomes None and ends the acceptor's thread in
            # negotiation, leaving the connection open with no one to answer it.
            request = cast("A_ASSOCIATE", decoded.to_primitive())
            contexts = request.presentation_context_definition_list
            if any(cx.abstract_syntax is None for cx in contexts):
                raise ValueError("a presentation context without a valid abstract syntax")
    # pynetdicom's READ_PDU_EXC_F: whatever its decoders raise on hostile bytes (struct.error,
    # ValueError, UnicodeDecodeError, KeyError...) makes the PDU an invalid one.
    except Exception as exc:  # noqa: BLE001
        log.error("Unable to decode the received PDU data: %s: %s", type(exc).__name__, exc)
        _invalid(dul)
        return
    dul.event_queue.put(event)
    dul._recv_pdu.put(decoded)


def _invalid(dul: DULServiceProvider) -> None:
    """An unrecognised or invalid PDU (PS3.8 9.2 Evt19: A-ABORT, AA-1/AA-8)."""
    dul.event_queue.put("Evt19")


def _recv_into(sock: socket.socket, buffer: bytearray, size: int) -> None:
    """Extend ``buffer`` from ``sock`` until it holds ``size`` bytes or the peer closes."""
    while len(buffer) < size:
        chunk = sock.recv(min(size - len(buffer), READ_CHUNK))
        if not chunk:
            return
        buffer += chunk


def _closed(dul: DULServiceProvider, error: str | None) -> None:
    """The transport connection ended (PS3.8 9.2 Evt17)."""
    if error is not None:
        log.error("%s", error)
    dul.event_queue.put("Evt17")


def refuse(dul: DULServiceProvider, pdu_type: int, length: int, limit: int | None) -> None:
    """Abort the association over a PDU whose body is not to be read, and close the connection.

    The A-ABORT names the service provider as source (PS3.8 9.3.8) with reason "unexpected
    PDU" or "invalid PDU parameter value"; closing the connection at once, rather than waiting
    in Sta13 for the peer to close it, keeps the rest of that PDU from being read as PDUs.
    """
    name = _NAMES.get(pdu_type, f"0x{pdu_type:02X}")
    if limit is None:
        reason, why = UNEXPECTED_PDU, "before the association was established"
    else:
        reason, why = INVALID_PARAMETER_VALUE, f"more than the {limit} allowed"
    log.warning("refused a PDU from %s: %s declaring %d bytes %s; association aborted",
                _peer(dul.assoc), name, length, why)
    abort = A_ABORT_RQ()
    abort.source = _PROVIDER
    abort.reason_diagnostic = reason
    transport = cast("AssociationSocket", dul.socket)
    raw = transport.socket
    # node.latency's DUL serialises whole PDUs on the socket: the abort must not split one.
    writing = cast(AbstractContextManager[object], getattr(dul, "_writing", None) or nullcontext())
    with writing:
        try:
            if raw is not None:
                raw.sendall(abort.encode())
        except OSError as exc:  # the peer is gone already: closing below is all that is left
            log.debug("A-ABORT to %s not sent: %s", _peer(dul.assoc), exc)
    transport.close()  # PS3.8 9.2 Evt17 for the state machine (AA-4 / AA-5 / AR-5)
