"""Make pynetdicom's polling loops respond to a busy peer at once and stay cheap while it idles.

pynetdicom's DUL thread sleeps ``_run_loop_delay`` (1 ms) whenever a poll finds nothing to do,
so every DIMSE message waits up to a millisecond before it is read or its response is sent.
On one association that caps a C-STORE SCP at about 350 instances/s whatever the handler does.
Polling faster all the time would burn CPU on idle associations, so the delay adapts: short
for a moment after the last data from the peer, the library's default after that.

A ``ResponsiveDUL`` also lets the node's own retrieve code skip the DUL thread on its hot path
(``node.scu.messages``): ``send_now`` writes whole P-DATA-TF PDUs on the socket from the calling
thread, in order with whatever was queued before, and ``socket_lent`` keeps the DUL from reading
while the caller reads one expected response itself.  Each hand-over between the caller and the
DUL thread costs a wake-up and a GIL switch, and a C-STORE sub-operation has two of them.

Its reads of the socket go through ``node.pdu_guard``, which refuses a PDU longer than
negotiated before reading its body.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.fsm import StateMachine
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT, A_RELEASE, P_DATA

from node.pdu_guard import read_pdu

log = logging.getLogger(__name__)

BUSY_DELAY = 0.0001
IDLE_DELAY = 0.001  # pynetdicom's own default
BUSY_WINDOW = 0.05  # seconds after the last received data during which the peer counts as busy
# An association reactor's longest wait between checks when nothing wakes it (pynetdicom's tick
# is 1 ms): a DIMSE message, a release or abort request, the connection's end, a pause and a
# kill wake it (ResponsiveAssociation); the tick only bounds how late it sees the network
# timeout or a dead DUL thread.  Each tick is a wake-up that takes the GIL: at 1 ms, four busy
# associations spent a fifth of the node's CPU on them.
REACTOR_TICK = 0.05
KILL_POLL = 0.0002  # Association.kill: first wait for the DUL to end, doubled up to the next
IDLE_KILL_POLL = 0.01  # (pynetdicom's fixed one)
DRAIN_POLL = 0.0001  # send_now: seconds between looks at whether the DUL's queue is written


class ResponsiveDUL(DULServiceProvider):
    """A DUL whose poll interval depends on how recently data went either way, and which can
    let the caller write PDUs and read a response itself (see the module docstring)."""

    _last_sent = 0.0  # time.monotonic() of the last PDU the association handed over to send
    _last_read = 0.0  # time.monotonic() of the last PDU the DUL itself read
    # Set by make_responsive (the class is swapped on a DUL that exists already):
    _reading: threading.Lock  # held while the DUL reads the socket, and to lend it
    # Held while one whole PDU is written, by the DUL or by send_now (reentrant: an EVT_PDU_SENT
    # handler, run under it on the DUL thread, may queue another PDU).
    _writing: threading.RLock
    _unsent = 0  # PDUs handed to the DUL and not written yet (under _writing)
    _lent = False  # a caller reads the socket (socket_lent)

    @property
    def _run_loop_delay(self) -> float:
        if self._lent:
            return IDLE_DELAY  # the caller reads the socket; the DUL has nothing to hurry for
        now = time.monotonic()
        if now - self._last_read < BUSY_WINDOW:
            return BUSY_DELAY
        # A stream of responses (C-FIND matches, C-GET sub-operations) receives nothing for a
        # while: each PDU queued for sending would otherwise wait for the idle tick.
        if now - self._last_sent < BUSY_WINDOW:
            return BUSY_DELAY
        return IDLE_DELAY

    @_run_loop_delay.setter
    def _run_loop_delay(self, value: float) -> None:
        """pynetdicom's constructor assigns the fixed default; the property decides instead."""

    def send_pdu(self, primitive: Any) -> None:
        self._last_sent = time.monotonic()
        if isinstance(primitive, P_DATA):
            with self._writing:
                self._unsent += 1
        super().send_pdu(primitive)

    def _send(self, pdu: Any) -> None:
        with self._writing:
            if isinstance(pdu, P_DATA_TF):  # only DT-1/AR-7 send these, from send_pdu's queue
                self._unsent -= 1
            super()._send(pdu)

    def _is_transport_event(self) -> bool:
        # While a caller holds the socket (socket_lent) the DUL does not read it: to the DUL's
        # loop that is a look that found no data.  Once the association leaves data transfer
        # (an abort, from any thread) the DUL reads again, to see the connection through.
        if not self.event_queue.empty():
            # pynetdicom handles one event per loop, after its read: the event of a PDU read
            # before the connection's own (Evt5) was handled is still queued, and the next
            # read could block on what follows an invalid PDU.  Events first, then the next PDU.
            return False
        with self._reading:
            if self._lent and self.state_machine.current_state == "Sta6":
                return False
            if super()._is_transport_event():  # (pynetdicom then restarts the idle timer)
                self._last_read = time.monotonic()
                return True
            return False

    def _read_pdu_data(self) -> None:
        # pynetdicom's read, refusing a PDU longer than its type allows before reading its
        # body (node.pdu_guard); called with _reading held, from _is_transport_event.
        read_pdu(self)

    def _plain_socket(self) -> socket.socket | None:
        """The connection's socket while it carries P-DATA (PS3.8 9.2 state Sta6), else None.

        TLS sockets are left to the DUL alone: an SSL object is not to be read and written
        from two threads at once.
        """
        transport = self.socket
        raw = getattr(transport, "socket", None)
        if type(raw) is not socket.socket or self.state_machine.current_state != "Sta6":
            return None
        return raw

    def send_now(self, data: bytes | bytearray | memoryview) -> bool:
        """Write ``data`` (whole encoded P-DATA-TF PDUs) from the calling thread; False when
        the DUL must send them instead (not in data transfer, TLS).

        PDUs queued through ``send_pdu`` before are written first, so messages keep their
        order (PS3.8 9.3.5: a message's fragments are not interleaved with another's).  Raises
        OSError when the write fails (the DUL finds the broken connection on its next read).
        """
        if self._unsent > 0:
            if threading.current_thread() is self:
                return False  # (the DUL itself, answering a C-STORE: it writes them in turn)
            wait = threading.Event()  # never set: a bounded pause while the DUL writes
            while self._unsent > 0 and self._plain_socket() is not None:
                wait.wait(DRAIN_POLL)
        with self._writing:
            raw = self._plain_socket()
            if raw is None:
                return False
            raw.sendall(data)
            return True

    @contextmanager
    def socket_lent(self) -> Iterator[socket.socket | None]:
        """The socket, which the DUL does not read until the block ends; None when the next
        PDU is the DUL's to read (a message half received, a PDU read but not yet handled,
        not in data transfer, TLS).  The caller takes off it only what it fully understands.
        """
        lent = None
        with self._reading:  # waits while the DUL reads a PDU
            raw = self._plain_socket()
            if raw is not None and not self._lent and self.assoc.dimse.message is None and (
                self._recv_pdu.empty() and self.event_queue.empty()
            ):
                self._lent, lent = True, raw
        if lent is None:
            yield None
            return
        try:
            yield lent
        finally:
            self._lent = False

    def received(self) -> None:
        """A caller read a PDU from a lent socket: the peer is alive (network idle timer)."""
        self._idle_timer.restart()


# The events a local primitive raises (PS3.8 9.2 Table 9-10): none is valid in Sta13.
_LOCAL_EVENTS = frozenset({"Evt1", "Evt7", "Evt8", "Evt9", "Evt11", "Evt14", "Evt15"})


class _GuardedStateMachine(StateMachine):
    """pynetdicom's state machine, with two ends made safe.

    - An association over before it began (Sta2, the A-ASSOCIATE-RQ awaited, left for
      anything but Sta3: connection closed, invalid PDU, A-ABORT, a request the DUL rejects
      itself) wakes the acceptor's thread.  pynetdicom's waits ``acse_timeout`` for the
      request whatever happened (Association.run), counting against ``max_associations``
      meanwhile: a peer opening and dropping connections could keep the node full.  ``None``
      is what that wait returns when it times out, and the thread then ends as for one.
    - In Sta13 (association over, waiting for the connection to close) Table 9-10 has no event
      for a local primitive.  One queued just before, e.g. the A-ASSOCIATE-AC racing an invalid
      PDU that aborted the association, makes pynetdicom raise InvalidEventError, which ends
      the DUL thread without closing the connection: it is dropped.
    """

    def do_action(self, event: str) -> None:
        before = self.current_state
        if before == "Sta13" and event in _LOCAL_EVENTS:
            with contextlib.suppress(queue.Empty):  # (nothing to drop when already taken)
                self.dul.to_provider_queue.get_nowait()  # the primitive it was raised for
            return
        super().do_action(event)
        if before == "Sta2" and self.current_state != "Sta2" and self.current_state != "Sta3" \
                and self.dul.assoc.is_acceptor:
            self.dul.to_user_queue.put(None)


def make_responsive(dul: DULServiceProvider) -> None:
    """Switch an association's DUL (before it starts serving) to the adaptive poll interval."""
    if type(dul) is DULServiceProvider:
        responsive = cast(ResponsiveDUL, dul)  # its locks first: the DUL may be running
        responsive._reading = threading.Lock()
        responsive._writing = threading.RLock()
        responsive._last_read = time.monotonic()  # a new connection: its first PDU is coming
        if type(dul.state_machine) is StateMachine:
            dul.state_machine.__class__ = _GuardedStateMachine
        dul.__class__ = ResponsiveDUL


# What the DUL hands the association during data transfer (PS3.8 9.2: A-RELEASE indication,
# A-ABORT and A-P-ABORT indications); the reactor takes each off the queue.  (A requestor's
# own release confirmation arrives while its reactor is paused: release() paused it.)
_NEWS = (A_RELEASE, A_ABORT, A_P_ABORT)


class _WakingQueue(queue.Queue):  # type: ignore[type-arg]
    """The DUL's queue of primitives for the association (``to_user_queue``), which also wakes
    the association's reactor: a release or abort request, or the end of the connection (an
    A-P-ABORT), arrives there, not in the DIMSE message queue the reactor waits on."""

    reactor_wake: threading.Condition  # the DIMSE message queue's not_empty

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        with self.reactor_wake:
            self.reactor_wake.notify()


class _WakingEvent(threading.Event):
    """The reactor's checkpoint (``_reactor_checkpoint``), whose clearing wakes the reactor: a
    thread that wants the association to itself (pynetdicom's release and send_c_* methods,
    node.scu.send ``pause_reactor``) clears it and waits until the reactor stops there."""

    reactor_wake: threading.Condition

    def clear(self) -> None:
        super().clear()
        with self.reactor_wake:
            self.reactor_wake.notify()


class ResponsiveAssociation(Association):
    """An association (the node's acceptors, and its own client associations: node.scu.send)
    whose reactor wakes when there is work for it, not on a 1 ms tick.

    pynetdicom's acceptor reactor sleeps 1 ms before every look at its queues, so each request
    waits for the tick even when it is already there (on one association, most of a millisecond
    per C-STORE), and every association wakes a thousand times a second, busy or idle.  This is
    ``Association._run_reactor`` of pynetdicom 3.0 with that sleep replaced by a wait on the
    DIMSE message queue's condition, which a DIMSE message and anything the DUL hands the
    association (_WakingQueue) signal, bounded by REACTOR_TICK; every other step is unchanged.
    """

    def _run_reactor(self) -> None:
        self._is_paused = False
        messages = self.dimse.msg_queue
        while not self._kill:
            with messages.not_empty:  # wake as soon as the DUL queues a whole message
                # (The condition holds the message queue's lock already.)  A release or abort
                # queued while this thread was busy is handled now, not after a tick.
                # So is a pause or a kill asked for meanwhile (_WakingEvent, kill).
                if not (messages.queue or isinstance(self.dul.peek_next_pdu(), _NEWS)
                        or self._kill or not self._reactor_checkpoint.is_set()):
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

    def kill(self) -> None:
        """pynetdicom's ``Association.kill``, with the reactor woken at once, and a wait for the
        DUL thread that starts short: pynetdicom's sleeps 10 ms whenever the DUL has not yet
        reached Sta1, as after a release, whose confirmation wakes the releasing thread before
        the DUL's own transition ends: most of a short C-MOVE's time went there."""
        self._reactor_checkpoint.set()  # (a paused reactor runs on, to its exit)
        self._kill = True
        self.is_established = False
        self._is_paused = True
        with self.dimse.msg_queue.not_empty:
            self.dimse.msg_queue.not_empty.notify()
        pause, wait = threading.Event(), KILL_POLL  # (never set: a bounded pause)
        while self.dul.is_alive() and not self.dul.stop_dul():
            pause.wait(wait)
            wait = min(2 * wait, IDLE_KILL_POLL)


def make_association_responsive(assoc: Association) -> None:
    """Switch an association (before its reactor starts: an acceptor's at EVT_CONN_OPEN, a
    requestor's while it connects) to the reactor that waits for work."""
    if type(assoc) is Association:
        wake = assoc.dimse.msg_queue.not_empty
        to_user = assoc.dul.to_user_queue
        if type(to_user) is queue.Queue:  # (empty still: the A-ASSOCIATE-RQ is read later)
            to_user.__class__ = _WakingQueue
            cast(_WakingQueue, to_user).reactor_wake = wake
        checkpoint = assoc._reactor_checkpoint
        if type(checkpoint) is threading.Event:
            checkpoint.__class__ = _WakingEvent
            cast(_WakingEvent, checkpoint).reactor_wake = wake
        assoc.__class__ = ResponsiveAssociation  # (last: its loop relies on the two above)
    make_responsive(assoc.dul)
