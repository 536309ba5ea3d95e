"""Make pynetdicom's polling DUL loop responsive while a peer is busy and cheap while it idles.

pynetdicom's DUL thread sleeps ``_run_loop_delay`` (1 ms) whenever a poll finds nothing to do,
so every DIMSE message waits up to a millisecond before it is read or its response is sent.
On one association that caps a C-STORE SCP at about 350 instances/s whatever the handler does.
Polling faster all the time would burn CPU on idle associations, so the delay adapts: short
for a moment after the last data from the peer, the library's default after that.
"""

from __future__ import annotations

import time

from pynetdicom.dul import DULServiceProvider

BUSY_DELAY = 0.0001
IDLE_DELAY = 0.001  # pynetdicom's own default
BUSY_WINDOW = 0.05  # seconds after the last received data during which the peer counts as busy


class ResponsiveDUL(DULServiceProvider):
    """A DUL whose poll interval depends on how recently the peer sent data."""

    @property
    def _run_loop_delay(self) -> float:
        # The idle timer restarts on every received PDU (pynetdicom DULServiceProvider.run).
        started = self._idle_timer._start_time
        if started is not None and time.time() - started < BUSY_WINDOW:
            return BUSY_DELAY
        return IDLE_DELAY

    @_run_loop_delay.setter
    def _run_loop_delay(self, value: float) -> None:
        """pynetdicom's constructor assigns the fixed default; the property decides instead."""


def make_responsive(dul: DULServiceProvider) -> None:
    """Switch an association's DUL (before it starts serving) to the adaptive poll interval."""
    if type(dul) is DULServiceProvider:
        dul.__class__ = ResponsiveDUL
