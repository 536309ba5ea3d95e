"""C-ECHO SCU (PS3.4 A.4): is a peer AE there, and how long does it take to answer?

``echo`` opens one association, sends one C-ECHO and releases; it returns how long the
association took to establish and how long the C-ECHO round trip took.
"""

from __future__ import annotations

import logging
import ssl
import time
from dataclasses import dataclass

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.config import Peer
from node.dimse.status import SUCCESS, describe_status
from node.remote.errors import EchoFailed
from node.scu.association import check_calling_ae, close, open_association, where

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EchoTimes:
    """Seconds taken to establish the association and for the C-ECHO request/response."""

    association: float
    round_trip: float


def echo(peer: Peer, calling_ae: str, timeout: float = 30,
         tls: ssl.SSLContext | None = None) -> EchoTimes:
    """C-ECHO ``peer`` once (over TLS with ``tls`` when it has ``tls: true``); raises
    PeerUnavailable (no association), ServiceNotSupported (Verification not accepted) or
    EchoFailed (no answer, or not Success)."""
    calling_ae = check_calling_ae(calling_ae)
    started = time.perf_counter()
    # PS3.7 A.4: the Verification SOP Class in the default transfer syntax (implicit VR
    # little endian), which every AE must accept, and explicit VR little endian.
    context = build_context(Verification, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
    assoc = open_association(peer, calling_ae, [context], timeout,
                             service="C-ECHO (Verification)", tls=tls)
    established = time.perf_counter()
    finished = False
    try:
        status = assoc.send_c_echo()
        answered = time.perf_counter()
        if "Status" not in status:  # pynetdicom's sign of an abort or a DIMSE timeout
            raise EchoFailed(
                f"{where(peer)} aborted the association or did not answer the C-ECHO within "
                f"{timeout:g} s"
            )
        finished = True
        code = int(status.Status)
        if code != SUCCESS:  # PS3.7 9.3.5.2: a C-ECHO response shall be Success
            raise EchoFailed(f"{where(peer)} answered the C-ECHO with status "
                             f"{describe_status(code)}")
    finally:
        close(assoc, finished)
    times = EchoTimes(established - started, answered - established)
    log.debug("C-ECHO %s: association %.1f ms, round trip %.1f ms", where(peer),
              times.association * 1000, times.round_trip * 1000)
    return times

