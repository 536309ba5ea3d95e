"""Open an association to a peer AE and say exactly why when none comes about.

Every client of the node (find, echo, move, get, the sub-operations of a C-MOVE) opens its
associations here, so a refused connection, an A-ASSOCIATE-RJ, an abort and a peer that accepts
none of the presentation contexts are reported the same way everywhere.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.presentation import PresentationContext

from node.config import Peer
from node.remote.errors import InvalidQuery, PeerUnavailable, ServiceNotSupported
from node.tls import HandshakeFailed, handshake

log = logging.getLogger(__name__)

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 6.2: AE, no backslash/controls


def where(peer: Peer) -> str:
    """``PACS at 10.0.0.5:104``: how messages name a peer."""
    return f"{peer.ae_title} at {peer.host}:{peer.port}"


def check_calling_ae(calling_ae: str) -> str:
    """The calling AE title, stripped; raises InvalidQuery when it is not a valid AE title."""
    if not _AE_TITLE.match(calling_ae) or not calling_ae.strip():
        raise InvalidQuery(f"calling AE title {calling_ae!r}: 1-16 printable characters, no '\\'")
    return calling_ae.strip()


@dataclass
class _Negotiation:
    """What the transport saw while the association was negotiated."""

    connected: bool = False
    rejection: A_ASSOCIATE_RJ | None = None
    tls_failure: HandshakeFailed | None = None  # why the TLS handshake failed


def open_association(
    peer: Peer,
    calling_ae: str,
    contexts: Sequence[PresentationContext],
    timeout: float,
    service: str,
    ext_neg: Sequence[Any] | None = None,
    evt_handlers: Sequence[Any] = (),
    max_pdu: int | None = None,
    tls: ssl.SSLContext | None = None,
) -> Association:
    """An established association to ``peer`` proposing ``contexts``.

    ``service`` names what the association is for, in messages ("C-FIND in the Study Root
    Query/Retrieve information model"). ``ext_neg`` carries extended negotiation items such as
    SCP/SCU Role Selection (PS3.7 D.3.3.4), needed by C-GET. ``tls`` (node.tls.client_context)
    is the context for a peer configured with ``tls: true`` (PS3.15 B.9); the peer's host is
    given as its server name. Raises PeerUnavailable (cannot connect, TLS refused, rejected,
    aborted) or ServiceNotSupported (no context accepted).
    """
    if peer.tls and tls is None:
        raise PeerUnavailable(f"{where(peer)} is to be called over TLS (tls: true), but this "
                              "node has no tls settings")
    ae = AE(ae_title=check_calling_ae(calling_ae))
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    if max_pdu is not None:
        ae.maximum_pdu_size = max_pdu
    ae.requested_contexts = list(contexts)
    seen = _Negotiation()

    def on_connect(event: Event) -> None:
        seen.connected = True
        sock = event.assoc.dul.socket.socket if event.assoc.dul.socket is not None else None
        if isinstance(sock, ssl.SSLSocket):
            # The context left it to us (node.tls): bounded, and its failure said as such.
            try:
                handshake(sock, timeout)
            except HandshakeFailed as exc:
                seen.tls_failure = exc
                # pynetdicom's A-ASSOCIATE-RQ then fails at once (a write error ends it).
                with contextlib.suppress(OSError):  # the peer may have closed it already
                    sock.shutdown(socket.SHUT_RDWR)

    def on_pdu(event: Event) -> None:
        if isinstance(event.pdu, A_ASSOCIATE_RJ):
            seen.rejection = event.pdu

    # The rejection is taken from the PDU itself: when a peer rejects and closes at once,
    # pynetdicom 3.0 may find the socket closed before it reads the queued rejection, and
    # then reports an abort (acse.py: "if not socket._is_connected: abort").
    assoc = ae.associate(
        peer.host, peer.port, ae_title=peer.ae_title, ext_neg=list(ext_neg or []) or None,
        tls_args=(tls, peer.host) if peer.tls and tls is not None else None,
        evt_handlers=[(evt.EVT_CONN_OPEN, on_connect), (evt.EVT_PDU_RECV, on_pdu),
                      *evt_handlers],
    )
    assoc.unbind(evt.EVT_PDU_RECV, on_pdu)  # only the negotiation's PDUs matter
    if assoc.is_established:
        socket_ = assoc.dul.socket.socket if assoc.dul.socket is not None else None
        if socket_ is not None:
            # Nagle's algorithm would hold each small PDU for the peer's delayed ACK (~40 ms).
            socket_.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        log.debug("association to %s established", where(peer))
        return assoc
    name = where(peer)
    if seen.tls_failure is not None:
        raise PeerUnavailable(f"TLS with {name} failed: {seen.tls_failure}")
    if seen.rejection is not None:  # PS3.8 9.3.4: result, source and reason
        rejection = seen.rejection
        raise PeerUnavailable(
            f"{name} rejected the association ({rejection.result_str}, "
            f"{rejection.source_str}: {rejection.reason_str})"
        )
    if assoc.rejected_contexts and not assoc.accepted_contexts:
        raise ServiceNotSupported(
            f"{name} does not offer {service} (presentation context not accepted)"
        )
    if not seen.connected:
        raise PeerUnavailable(
            f"cannot connect to {name} (connection refused, host unreachable or no answer "
            f"within {timeout:g} s)"
        )
    # TLS 1.3: a peer refusing the node's certificate says so after the handshake.
    refused = " (over TLS: it may have refused this node's certificate)" if peer.tls else ""
    raise PeerUnavailable(
        f"{name} accepted the connection but aborted the association or did not answer "
        f"it within {timeout:g} s{refused}"
    )


def close(assoc: Association, finished: bool) -> None:
    """Release an association whose exchange finished; abort one broken off midway."""
    if assoc.is_established:
        if finished:
            assoc.release()
        else:
            assoc.abort()
