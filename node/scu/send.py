"""C-STORE sub-operations of a C-MOVE or C-GET: the node sends stored instances to a peer.

``proposed_contexts`` says what to propose for a set of instances (their stored syntaxes, plus an
uncompressed fallback); ``move_destination`` opens the association of a C-MOVE to its
destination; ``Sender.send`` performs one sub-operation on an association and reports a
domain-level ``Sent`` (completed, warning, failed, and why).

Files are sent as stored, never decoded: the dataset bytes go from the file into P-DATA PDUs.
``Association.send_c_store`` is not used.  Streaming a file needs pynetdicom's process-wide
``STORE_SEND_CHUNKED_DATASET`` switch, it parses every file's File Meta with pydicom, encodes
each command set through pydicom's dataset writer (twice, for the group length), and pauses and
resumes the association's reactor around every message: together most of the CPU, and up to a
millisecond of waiting, per instance.  Here the fixed command layouts are encoded and the
C-STORE-RSP decoded directly (``node.scu.messages``): the request is written on the socket and
its response read off it by the thread running the sub-operations, without a hand-over to the
DUL thread either way, and a small instance travels in one PDU with its command.  The reactor of
a C-MOVE association is paused once for all sub-operations (the reactor of a C-GET association
is the very thread running them).
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

from pydicom.uid import UID
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext, build_context

from node.config import Peer
from node.dicom.contexts import UNCOMPRESSED_TRANSFER_SYNTAXES
from node.dimse.status import SUCCESS, describe_status, is_warning
from node.latency import make_association_responsive
from node.retrieve.plan import StoredInstance
from node.retrieve.stored import CannotReencode, NotPart10, can_reencode, reencoded
from node.scu.association import close, open_association, where
from node.scu.messages import (
    ConnectionLost,
    Prepared,
    StoreResponse,
    await_store_response,
    prepare_stored,
    response_socket,
    send_prepared,
    send_stored_file,
    store_request,
    transmit,
)

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: odd presentation context IDs 1-255
_PAUSE_POLL = 0.0001  # seconds between looks at whether the reactor has paused


class Result(StrEnum):
    """How a C-STORE sub-operation ended (PS3.4 C.4.2.3.1)."""

    COMPLETED = "completed"
    WARNING = "warning"
    FAILED = "failed"


@dataclass(frozen=True)
class Sent:
    """The outcome of one sub-operation, and why when it did not complete."""

    result: Result
    detail: str = ""


@dataclass(frozen=True)
class Outgoing:
    """How the node opens the association to a C-MOVE destination."""

    calling_ae: str
    timeout: float
    max_pdu: int
    tls: ssl.SSLContext | None = None  # for destinations with tls: true (node.tls)


def proposed_contexts(instances: Iterable[StoredInstance]) -> list[PresentationContext]:
    """Presentation contexts for sending ``instances``.

    One context per SOP class and stored transfer syntax, so the receiver accepts or refuses
    each syntax on its own (one context listing several would let it pick one for all), plus one
    per SOP class with the uncompressed syntaxes the stored ones can be re-encoded in.  Beyond
    128 contexts, one per SOP class with all its syntaxes; classes beyond 128 get none and their
    sub-operations fail.
    """
    stored: dict[str, dict[str, None]] = {}  # SOP class -> stored syntaxes, in first-seen order
    for instance in instances:
        stored.setdefault(instance.sop_class_uid, {})[instance.transfer_syntax_uid] = None
    per_syntax: list[PresentationContext] = []
    per_class: list[PresentationContext] = []
    for sop_class, syntaxes in stored.items():
        fallback = [ts for ts in UNCOMPRESSED_TRANSFER_SYNTAXES if ts not in syntaxes]
        if not any(can_reencode(ts) for ts in syntaxes):
            fallback = []
        per_syntax += [build_context(sop_class, [ts]) for ts in syntaxes]
        if fallback:
            per_syntax.append(build_context(sop_class, fallback))
        per_class.append(build_context(sop_class, [*syntaxes, *fallback]))
    if len(per_syntax) <= MAX_CONTEXTS:
        return per_syntax
    if len(per_class) > MAX_CONTEXTS:
        log.warning("%d SOP classes to send, more than %d presentation contexts: the "
                    "instances of the others will fail", len(per_class), MAX_CONTEXTS)
    return per_class[:MAX_CONTEXTS]


class Sender:
    """Sends stored instances by C-STORE on one established association, one at a time.

    ``originator`` is the AE title and Message ID of the C-MOVE being served (PS3.7 9.1.1.1:
    Move Originator), None for a C-GET.  Message IDs count up from ``first_message_id``.
    """

    def __init__(self, assoc: Association, peer: str, priority: int, first_message_id: int,
                 originator: tuple[str, int] | None = None) -> None:
        self.assoc = assoc
        self.peer = peer
        self.priority = priority
        self.originator = originator
        self._next_id = first_message_id
        # The next request, read and encoded while the peer answers the one before.
        self._ahead: tuple[StoredInstance, int, Prepared] | None = None
        # The node's accepted contexts in the SCU role (as the C-STORE sender), by SOP class.
        self._exact: dict[tuple[str, str], int] = {}
        self._uncompressed: dict[str, tuple[int, str]] = {}
        for cx in assoc.accepted_contexts:
            if not cx.as_scu or cx.context_id is None:
                continue
            sop_class, syntax = str(cx.abstract_syntax), str(cx.transfer_syntax[0])
            self._exact.setdefault((sop_class, syntax), cx.context_id)
            if syntax in UNCOMPRESSED_TRANSFER_SYNTAXES:
                known = self._uncompressed.get(sop_class)
                # Explicit VR keeps VRs that implicit encoding would lose (e.g. of private tags).
                if known is None or syntax == UNCOMPRESSED_TRANSFER_SYNTAXES[0]:
                    self._uncompressed[sop_class] = (cx.context_id, syntax)

    def send(self, instance: StoredInstance, upcoming: StoredInstance | None = None) -> Sent:
        """One C-STORE sub-operation for ``instance``; never raises for a failed transfer.

        The request for a small file of the ``upcoming`` instance is read and encoded while the
        peer answers this one: after the answer only its write is left to do.
        """
        if not self.assoc.is_established:
            return Sent(Result.FAILED, f"the association to {self.peer} has ended")
        message_id = self._next_id
        self._next_id = self._next_id % 0xFFFF + 1  # Message ID is US; 0 is avoided
        # The socket is taken before the request goes: its answer must not reach the DUL first.
        with response_socket(self.assoc) as sock:
            failed = self._request(instance, message_id)
            if failed is not None:
                return failed
            self._prepare(upcoming)
            response, timed_out = None, False
            if sock is not None:
                try:
                    response = await_store_response(self.assoc, sock, self.assoc.dimse_timeout)
                except TimeoutError:
                    timed_out = True
        if timed_out:
            return self._no_response()
        return self._response(message_id, response)

    def _request(self, instance: StoredInstance, message_id: int) -> Sent | None:
        """Send the C-STORE-RQ; None once sent, else how the sub-operation failed."""
        ahead, self._ahead = self._ahead, None
        exact = self._exact.get((instance.sop_class_uid, instance.transfer_syntax_uid))
        try:
            if ahead is not None and ahead[:2] == (instance, message_id):
                send_prepared(self.assoc, ahead[2])
                return None
            command = self._command(instance, message_id)
            if exact is not None:  # as stored, byte for byte from the file
                send_stored_file(self.assoc, exact, command, instance.path)
                return None
            fallback = self._uncompressed.get(instance.sop_class_uid)
            if not can_reencode(instance.transfer_syntax_uid):
                return Sent(Result.FAILED, f"{self.peer} did not accept "
                            f"{_name(instance.transfer_syntax_uid)}, and it cannot be "
                            "decoded here (no pixel data decoder available)")
            if fallback is None:
                # PS3.4 C.4.2.3.1 / C.4.3.3.1: no appropriate context is a failed sub-op.
                return Sent(Result.FAILED, f"{self.peer} accepted no presentation context "
                            f"for {_name(instance.sop_class_uid)} in "
                            f"{_name(instance.transfer_syntax_uid)} or uncompressed")
            context_id, syntax = fallback
            dataset = reencoded(instance.path, instance.transfer_syntax_uid, syntax)
            transmit(self.assoc, context_id, command, dataset)
            return None
        except ConnectionLost as exc:
            return Sent(Result.FAILED, f"the association to {self.peer} failed: {exc}")
        except OSError as exc:
            return Sent(Result.FAILED, f"stored file missing or unreadable: {exc.strerror}")
        except (CannotReencode, NotPart10) as exc:
            return Sent(Result.FAILED, str(exc))

    def _command(self, instance: StoredInstance, message_id: int) -> bytes:
        originator = self.originator or ("", None)
        return store_request(instance, message_id, self.priority, *originator)

    def _prepare(self, instance: StoredInstance | None) -> None:
        """Read and encode the request for ``instance`` when it goes as stored, in one PDU."""
        exact = None if instance is None else self._exact.get(
            (instance.sop_class_uid, instance.transfer_syntax_uid))
        if instance is None or exact is None:
            return
        message_id = self._next_id
        try:
            prepared = prepare_stored(self.assoc, exact, self._command(instance, message_id),
                                      instance.path)
        except (OSError, NotPart10):
            return  # read again in its turn, and reported then if it fails again
        if prepared is not None:
            self._ahead = (instance, message_id, prepared)

    def _response(self, message_id: int, response: StoreResponse | None) -> Sent:
        """How the sub-operation ended, from the response read directly (``response``), else
        from the one pynetdicom decodes."""
        if response is None:  # the next PDU is pynetdicom's to read: take what it decodes
            _, message = self.assoc.dimse.get_msg(block=True)
            if message is None:  # aborted, connection closed, or no answer within the timeout
                return self._no_response()
            if not isinstance(message, C_STORE):
                return Sent(Result.FAILED, f"{self.peer} answered with an unexpected message")
            response = StoreResponse(message.MessageIDBeingRespondedTo, message.Status,
                                     str(message.ErrorComment or ""))
        if response.responded_to != message_id:
            return Sent(Result.FAILED, f"{self.peer} answered with an unexpected message")
        status = response.status
        if status is None:
            return Sent(Result.FAILED, f"{self.peer} sent a C-STORE response without status")
        comment = f": {response.comment}" if response.comment else ""
        if status == SUCCESS:
            return Sent(Result.COMPLETED)
        if is_warning(status):
            return Sent(Result.WARNING, f"{describe_status(status)}{comment}")
        return Sent(Result.FAILED, f"{self.peer} answered {describe_status(status)}{comment}")

    def _no_response(self) -> Sent:
        if self.assoc.is_established:
            # A late answer would be taken for the next request's (pynetdicom does the same:
            # Association._handle_no_response aborts).
            self.assoc.abort()
        return Sent(Result.FAILED, f"no C-STORE response from {self.peer}")


def _name(uid: str) -> str:
    return UID(uid).name or uid


@contextmanager
def move_destination(peer: Peer, outgoing: Outgoing, instances: Sequence[StoredInstance],
                     priority: int, originator: tuple[str, int]) -> Iterator[Sender]:
    """A Sender on a new association to ``peer`` (PS3.4 C.4.2.3.1), released when done.

    Raises PeerUnavailable when no association comes about, ServiceNotSupported when the peer
    accepts none of the contexts.
    """
    assoc = open_association(
        peer, outgoing.calling_ae, proposed_contexts(instances), outgoing.timeout,
        service="the Storage service for the C-MOVE", max_pdu=outgoing.max_pdu, tls=outgoing.tls,
        evt_handlers=[(evt.EVT_CONN_OPEN, _responsive)],
    )
    finished = False
    try:
        with reactor_paused(assoc):
            yield Sender(assoc, where(peer), priority, 1, originator)
        finished = True
    finally:
        close(assoc, finished)


def _responsive(event: Event) -> None:
    """Poll the connection as the node's server associations do (node.latency)."""
    make_association_responsive(event.assoc)


T = TypeVar("T")


def paused_while(assoc: Association, send: Callable[[], Iterator[T]]) -> Iterator[T]:
    """Call ``send`` (a pynetdicom ``send_c_find``/``send_c_move``/``send_c_get``, which sends
    its request at once and returns the generator of its responses) with the requestor's
    reactor paused, and keep it paused until the last response (``reactor_paused``).

    The pause must hold before the request goes out: a response may arrive at once.  The
    returned iterator resumes the reactor when it ends or is closed; iterate it at once.
    """
    pause_reactor(assoc)
    try:
        responses = send()
    except BaseException:
        assoc._reactor_checkpoint.set()
        raise
    return _resuming(assoc, responses)


def _resuming(assoc: Association, responses: Iterator[T]) -> Iterator[T]:
    try:
        yield from responses
    finally:
        assoc._reactor_checkpoint.set()


@contextmanager
def reactor_paused(assoc: Association) -> Iterator[None]:
    """Keep the requestor's reactor from taking responses off the message queue.

    This is the pause pynetdicom's ``send_c_*`` make around each request (the reactor
    checkpoint), but taken and seen to hold *before* the request goes out, and held for the
    whole exchange; the reactor resumes afterwards to handle the release.  pynetdicom's own
    pause is set just before its reactor blocks, so a reactor past the checkpoint a moment
    earlier can take the first response and drop it as "unexpected" (pynetdicom issue #875):
    a lost C-FIND match, or a C-STORE/C-MOVE waiting out its DIMSE timeout.
    """
    pause_reactor(assoc)
    try:
        yield
    finally:
        assoc._reactor_checkpoint.set()


def pause_reactor(assoc: Association) -> None:
    """Clear the reactor's checkpoint and wait until the reactor is blocked on it.

    pynetdicom's ``_is_paused`` flag cannot tell that the reactor holds: it is True from just
    before the reactor's ``wait()`` until just after it returns, so a reactor already returning
    from a checkpoint that was still set shows True and then takes one more message.  Only a
    waiter on the checkpoint's condition, once it is cleared, is a reactor that will block.
    """
    checkpoint = assoc._reactor_checkpoint
    checkpoint.clear()
    wait = threading.Event()  # never set: a bounded pause between looks
    while not _has_waiter(checkpoint) and assoc.is_alive() and assoc.is_established:
        wait.wait(_PAUSE_POLL)


def _has_waiter(event: threading.Event) -> bool:
    """True when a thread is blocked in ``event.wait()`` (CPython's Event keeps its waiters
    in its condition)."""
    condition = event._cond  # type: ignore[attr-defined]
    with condition:
        return bool(condition._waiters)
