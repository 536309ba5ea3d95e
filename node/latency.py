"""Make pynetdicom's polling loops respond to a busy peer at once and stay cheap while it idles.

pynetdicom's DUL thread sleeps ``_run_loop_delay`` (1 ms) whenever a poll finds nothing to do,
so every DIMSE message waits up to a millisecond before it is read or its response is sent.
On one association that caps a C-STORE SCP at about 350 instances/s whatever the handler does.
Polling faster all the time would burn CPU on idle associations, so the delay adapts: short
for a moment after the last data from the peer, the library's default after that.
"""

from __future__ import annotations

import logging
import time
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider

log = logging.getLogger(__name__)

BUSY_DELAY = 0.0001
IDLE_DELAY = 0.001  # pynetdicom's own default
BUSY_WINDOW = 0.05  # seconds after the last received data during which the peer counts as busy
REACTOR_TICK = 0.001  # the acceptor reactor's longest wait between checks (pynetdicom's tick)


class ResponsiveDUL(DULServiceProvider):
    """A DUL whose poll interval depends on how recently data went either way."""

    _last_sent = 0.0  # time.monotonic() of the last PDU the association handed over to send

    @property
    def _run_loop_delay(self) -> float:
        # The idle timer restarts on every received PDU (pynetdicom DULServiceProvider.run).
        started = self._idle_timer._start_time
        if started is not None and time.time() - started < BUSY_WINDOW:
            return BUSY_DELAY
        # A stream of responses (C-FIND matches, C-GET sub-operations) receives nothing for a
        # while: each PDU queued for sending would otherwise wait for the idle tick.
        if time.monotonic() - self._last_sent < BUSY_WINDOW:
            return BUSY_DELAY
        return IDLE_DELAY

    @_run_loop_delay.setter
    def _run_loop_delay(self, value: float) -> None:
        """pynetdicom's constructor assigns the fixed default; the property decides instead."""

    def send_pdu(self, primitive: Any) -> None:
        self._last_sent = time.monotonic()
        super().send_pdu(primitive)


def make_responsive(dul: DULServiceProvider) -> None:
    """Switch an association's DUL (before it starts serving) to the adaptive poll interval."""
    if type(dul) is DULServiceProvider:
        dul.__class__ = ResponsiveDUL


class ResponsiveAssociation(Association):
    """An acceptor whose reactor wakes when a DIMSE message arrives, not on the next 1 ms tick.

    pynetdicom's acceptor reactor sleeps 1 ms before every look at its message queue, so each
    request waits for the tick even when it is already there: on one association that is most
    of a millisecond per C-STORE.  This is ``Association._run_reactor`` of pynetdicom 3.0 with
    that sleep replaced by a wait on the queue (still bounded by the same 1 ms, so release,
    abort and timeout checks run as often as before); every other step is unchanged.
    """

    def _run_reactor(self) -> None:
        self._is_paused = False
        messages = self.dimse.msg_queue
        while not self._kill:
            with messages.not_empty:  # wake as soon as the DUL queues a whole message
                if not messages.queue:  # (the condition holds the queue lock already)
                    messages.not_empty.wait(REACTOR_TICK)

            # The rest is pynetdicom's loop as it stands (see its comments there).
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, cast(int, context_id))

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                log.error("network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


def make_association_responsive(assoc: Association) -> None:
    """Switch an acceptor (before its reactor starts) to the message-driven reactor."""
    if type(assoc) is Association:
        assoc.__class__ = ResponsiveAssociation
    make_responsive(assoc.dul)
