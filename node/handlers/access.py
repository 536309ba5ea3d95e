"""The access rules (node.access) at the edge: A-ASSOCIATE-RJ for callers, 0x0124 for requests.

``AccessGate.attach`` runs on every connection before its A-ASSOCIATE-RQ is negotiated and
puts the node's admission in front of pynetdicom's: a caller refused by the rules gets
A-ASSOCIATE-RJ rejected-permanent, service-user, "calling AE title not recognised" (PS3.8
9.3.4, Table 9-21: reason 3); one over its own association limit gets rejected-transient,
service-provider (presentation), "local limit exceeded" (reason 2), as pynetdicom answers the
node-wide limit.  ``AccessGate.serve`` is a DirectService (node.handlers.direct), offered each
request first: a service the caller may not use is answered Refused: Not Authorized (0x0124,
PS3.7 C.5) without being performed.  Both log the caller's AE title and address at WARNING.
Relies on pynetdicom 3.0's ACSE internals (``_negotiate_as_acceptor``, ``send_reject``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_ECHO, C_FIND, C_GET, C_MOVE, C_STORE
from pynetdicom.presentation import PresentationContext

from node.access import admit, may
from node.config import NodeConfig, Service
from node.dimse.status import NOT_AUTHORIZED
from node.metrics import NO_METRICS, Recorder
from node.scu.messages import (
    C_ECHO_RSP,
    C_FIND_RSP,
    C_GET_RSP,
    C_MOVE_RSP,
    C_STORE_RSP,
    refusal,
    send_message,
)

log = logging.getLogger(__name__)

# PS3.8 Table 9-21: (result, source, reason) of an A-ASSOCIATE-RJ.
REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # permanent; service-user; calling AE not recognised
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)  # transient; service-provider (presentation); limit

_SERVICES: dict[type, tuple[Service, int]] = {
    C_ECHO: (Service.ECHO, C_ECHO_RSP),
    C_STORE: (Service.STORE, C_STORE_RSP),
    C_FIND: (Service.FIND, C_FIND_RSP),
    C_GET: (Service.GET, C_GET_RSP),
    C_MOVE: (Service.MOVE, C_MOVE_RSP),
}


def _calling(assoc: Association) -> str:
    return str(assoc.requestor.ae_title).strip()


class AccessGate:
    """Applies the access rules of the config in force (asked for each decision)."""

    def __init__(self, config: Callable[[], NodeConfig], metrics: Recorder = NO_METRICS) -> None:
        self.config = config
        self.metrics = metrics

    def attach(self, assoc: Association) -> None:
        """Put the admission rules in front of this association's negotiation."""
        acse = assoc.acse
        library = acse._negotiate_as_acceptor

        def negotiate() -> None:
            request = acse.requestor.primitive
            if request is None:  # cannot be: the A-ASSOCIATE-RQ is why negotiation runs
                library()
                return
            calling = str(request.calling_ae_title).strip()
            address = str(assoc.requestor.address)
            same = sum(1 for other in assoc.ae.active_associations
                       if other is not assoc and other.is_acceptor
                       and other.is_established and _calling(other) == calling)
            admission = admit(self.config(), calling, address, same)
            if admission.accepted:
                library()
                return
            log.warning("association from %s at %s rejected: %s", calling or "?", address,
                        admission.reason)
            acse.requestor.ae_title = request.calling_ae_title
            acse.send_reject(*(REJECT_LOCAL_LIMIT if admission.transient
                               else REJECT_CALLING_AE))
            evt.trigger(assoc, evt.EVT_REJECTED, {})
            assoc.kill()

        acse._negotiate_as_acceptor = negotiate  # type: ignore[method-assign]

    def serve(self, assoc: Association, msg: Any, context: PresentationContext) -> bool:
        """A DirectService: answer 0x0124 to a request the caller may not make."""
        kind = _SERVICES.get(type(msg))
        if kind is None:
            return False
        service, response = kind
        calling, address = _calling(assoc), str(assoc.requestor.address)
        if may(self.config(), calling, address, service):
            return False
        log.warning("%s from %s at %s refused: not allowed (0x%04X)", service.value.upper(),
                    calling or "?", address, NOT_AUTHORIZED)
        command = refusal(
            response, int(msg.MessageID or 0), str(msg.AffectedSOPClassUID), NOT_AUTHORIZED,
            f"{calling} may not use {service.value}",
            sop_instance=str(msg.AffectedSOPInstanceUID) if service is Service.STORE else None)
        send_message(assoc, int(context.context_id or 0), command)
        self.metrics.operation(f"C-{service.value.upper()}", NOT_AUTHORIZED)
        return True
