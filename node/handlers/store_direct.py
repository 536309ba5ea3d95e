"""C-STORE requests read and answered on the association with ``struct``, not through pydicom.

pynetdicom decodes every request's command set through a pydicom Dataset on the DUL thread,
and its Storage service class answers by building a response primitive (every UID validated
again), triggering EVT_C_STORE and encoding the response command set through pydicom's general
writer: together about as much CPU per instance as the node's whole store-and-index path.

``StoreService`` is a ``DirectService`` (node.handlers.direct): it hands each C-STORE request
to ``answer_store``, the same handler body pynetdicom's path uses, and sends the C-STORE-RSP
command set written with ``struct`` (node.scu.messages ``store_response``).  On an association
that sends C-STOREs it also puts a ``_StoreRequestReader`` in front of pynetdicom's DIMSE
decoder: a message whose command set is a plain C-STORE-RQ (PS3.7 Table 9.3-1, every element
as expected, conformant UIDs) is read with ``struct`` and queued as the same C_STORE primitive
pynetdicom would have made; anything else, and any message pynetdicom has begun, stays
pynetdicom's.  Both rely on pynetdicom 3.0 internals (``DIMSEServiceProvider.receive_primitive``,
``message``, ``msg_queue``), which is why pynetdicom is pinned to 3.0.x.

A C-STORE-RQ the reader completes is answered on the DUL thread that read it when nothing else
is being served on the association (``_StoreRequestReader._serve_here``): no hand-over to the
association's reactor thread and back, about a quarter less CPU per small instance.

The reader is put in front of every association when it opens (``StoreService.connected``),
because it also bounds what a peer can make the node hold: a message whose data set grows
past ``max_instance_size`` is not buffered further.  Its remaining fragments are read and
dropped; a C-STORE-RQ is then answered 0xA700 (out of resources) without being stored, and
the association goes on.  Any other message that large (a C-FIND identifier, say) aborts the
association, as does a command set beyond ``MAX_COMMAND_SET``.
"""

from __future__ import annotations

import functools
import logging
import re
import struct
from io import BytesIO
from typing import Any, cast

from pydicom.uid import UID
from pynetdicom import _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from node.dimse.status import OUT_OF_RESOURCES, PROCESSING_FAILURE
from node.handlers.association import AssociationLog
from node.handlers.direct import SERVING
from node.handlers.store import StoreAnswer, answer_store
from node.ingest import Ingestor
from node.metrics import NO_METRICS, Recorder
from node.scu.messages import store_response, transmit

log = logging.getLogger(__name__)

_ELEMENT = struct.Struct("<HHI")  # a command element: implicit VR little endian (PS3.7 6.3.1)
_US = struct.Struct("<H")
_C_STORE_RQ = 0x0001
_NO_DATASET = 0x0101  # Command Data Set Type (0000,0800): no data set follows
# PS3.8 9.3.5.1 / Annex E.2: the message control header of each PDV.
_COMMAND, _LAST = 0x01, 0x02
# The elements a C-STORE-RQ may carry (PS3.7 Table 9.3-1) and the group length (0000,0000).
_REQUIRED = frozenset({0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000})
_ALLOWED = _REQUIRED | {0x0000, 0x1030, 0x1031}
# PS3.5 9.1: digits and dots, no empty component, no leading zero, at most 64 characters.  A
# UID outside this (pynetdicom warns about some, refuses others) is left to pynetdicom.
_CONFORMANT_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_MAX_UID = 64
# A command set holds a few short elements (PS3.7 9.3, 10.3); one this large is an attack.
MAX_COMMAND_SET = 1024 * 1024


class OversizedStore(C_STORE):
    """A C-STORE-RQ whose data set grew past the limit and was dropped while it arrived."""

    received = 0  # data set bytes the peer sent



@functools.lru_cache(maxsize=512)  # bounded: a peer may name any SOP class it likes
def _is_storage_class(uid: str) -> bool:
    """True when pynetdicom would serve a C-STORE of ``uid`` with its Storage service class."""
    return uid_to_service_class(uid) is StorageServiceClass


class StoreService:
    """Serves C-STORE (PS3.4 B.2.3) on the associations it is attached to."""

    def __init__(self, ingestor: Ingestor, associations: AssociationLog,
                 metrics: Recorder = NO_METRICS, max_instance_size: int = 2 * 1024**3) -> None:
        self.ingestor = ingestor
        self.associations = associations
        self.metrics = metrics
        self.max_instance_size = max_instance_size

    def connected(self, event: evt.Event) -> None:
        """EVT_CONN_OPEN: read this association's messages through the size-bounding reader."""
        _StoreRequestReader.attach(event.assoc, self.max_instance_size)

    def serve(self, assoc: Association, msg: Any, context: PresentationContext) -> bool:
        """A ``DirectService`` (node.handlers.direct): take storage C-STORE requests."""
        if isinstance(msg, OversizedStore):  # never the library's: its data set is gone
            self._refuse(assoc, msg, context)
            return True
        if not isinstance(msg, C_STORE):
            return False
        sop_class = str(msg.AffectedSOPClassUID)
        dataset = msg.DataSet
        # pynetdicom maps a class through SOP Class Common Extended Negotiation first (its
        # Association._serve_request); the node negotiates none, but should a peer's be
        # accepted, the library's own path decides.  A dataset pynetdicom streamed to a
        # temporary file (its STORE_RECV_CHUNKED_DATASET option) is the library's too.
        if (not _is_storage_class(sop_class) or assoc.acceptor.accepted_common_extended
                or not isinstance(dataset, BytesIO)):
            return False
        sop_instance = str(msg.AffectedSOPInstanceUID)
        _StoreRequestReader.attach(assoc, self.max_instance_size)  # (done when it opened)
        try:
            answer = answer_store(
                self.ingestor, self.associations, assoc, sop_class, sop_instance,
                str(context.transfer_syntax[0]), dataset.getvalue(), self.metrics,
            )
        except Exception:  # a bug: log it and answer, as pynetdicom does for its handlers
            log.exception("C-STORE handler failed")
            answer = StoreAnswer(PROCESSING_FAILURE, "internal error")
        self._answer(assoc, msg, context, answer)
        return True

    def _refuse(self, assoc: Association, msg: OversizedStore, context: PresentationContext
                ) -> None:
        """Answer a C-STORE whose data set was larger than allowed (PS3.4 B.2.3: 0xA7xx)."""
        peer = assoc.requestor
        log.warning("C-STORE %s from %s (%s:%s) refused: data set of %d bytes or more, over "
                    "max_instance_size %d", msg.AffectedSOPInstanceUID,
                    str(peer.ae_title).strip(), peer.address, peer.port, msg.received,
                    self.max_instance_size)
        self.associations.count_store(assoc, False)
        self.metrics.stored(OUT_OF_RESOURCES, msg.received, 0.0)
        self._answer(assoc, msg, context, StoreAnswer(
            OUT_OF_RESOURCES, f"instance larger than {self.max_instance_size} bytes"))

    @staticmethod
    def _answer(assoc: Association, msg: C_STORE, context: PresentationContext,
                answer: StoreAnswer) -> None:
        # An association aborted meanwhile has no one to answer (as pynetdicom's SCP).
        if assoc.is_established:
            # The UIDs are echoed (PS3.7 9.3.1.2); pynetdicom's decoder lets a request with
            # non-ASCII bytes in them through, which the response's UI cannot carry.
            command = store_response(int(msg.MessageID or 0), _ascii(msg.AffectedSOPClassUID),
                                     _ascii(msg.AffectedSOPInstanceUID), answer.status,
                                     answer.comment or "")
            # Written at once when the DUL allows it (on the DUL thread that read the request,
            # that spares pynetdicom's encoding of the PDU and a turn of the DUL's loop).
            transmit(assoc, cast(int, context.context_id), command)


class _StoreRequestReader:
    """Reads the C-STORE-RQ messages of one association; pynetdicom reads everything else.

    Runs on the association's DUL thread, in place of ``DIMSEServiceProvider.receive_primitive``
    (PS3.8 Annex E: a message is its command fragments, then its data set fragments, on one
    presentation context, never interleaved with another message's).  Every message, its own
    or pynetdicom's, is counted against ``limit`` as it arrives (see the module docstring).
    """

    def __init__(self, dimse: DIMSEServiceProvider, limit: int, direct: bool) -> None:
        self.dimse = dimse
        self.library = dimse.receive_primitive
        self.limit = limit  # largest data set a message may bring, bytes
        self.direct = direct  # take plain C-STORE-RQs off pynetdicom (else only count)
        self.request: C_STORE | None = None  # the message being received, if it is ours
        self.context_id = 0
        self.fragments: list[bytes] = []
        self.size = 0  # data set bytes of the message being received (ours or pynetdicom's)
        self.command_size = 0  # command set bytes of pynetdicom's message being received
        self.dropping = False  # our message grew past the limit: its fragments are dropped

    @classmethod
    def attach(cls, assoc: Association, limit: int) -> None:
        """Read this association's messages from now on (once per association).

        C-STORE requests stay pynetdicom's when it is to stream data sets to files, or when
        something listens to each decoded message (the node's DEBUG trace binds
        EVT_DIMSE_RECV); their size is bounded all the same.
        """
        dimse = assoc.dimse
        if isinstance(getattr(dimse.receive_primitive, "__self__", None), cls):
            return
        direct = not (_config.STORE_RECV_CHUNKED_DATASET
                      or assoc.get_handlers(evt.EVT_DIMSE_RECV))
        dimse.receive_primitive = cls(dimse, limit, direct).receive  # type: ignore[method-assign]

    def receive(self, primitive: P_DATA) -> None:
        """Take one P-DATA primitive (any number of PDVs) from the DUL."""
        pdvs = list(primitive.presentation_data_value_list)
        if self.request is None:
            request = self._start(pdvs) if self.direct else None
            if request is None:
                self._to_library(pdvs)
                return
            self.request, self.context_id = request, pdvs[0][0]
            del pdvs[0]
        self._take(pdvs)

    def _take(self, pdvs: list[tuple[int, bytes]]) -> None:
        """Data set fragments of our request (the rest of the primitive may start another)."""
        for index, (context_id, data) in enumerate(pdvs):
            if context_id != self.context_id or not data or data[0] & _COMMAND:
                self._invalid()
                return
            self.size += len(data) - 1
            if self.size > self.limit:
                self.dropping, self.fragments = True, []  # read on, keep nothing
            elif not self.dropping:
                self.fragments.append(data[1:])
            if data[0] & _LAST:
                self._complete()
                self._rest(pdvs, index)
                return

    def _rest(self, pdvs: list[tuple[int, bytes]], index: int) -> None:
        if index + 1 < len(pdvs):  # the next message begins in the same PDU
            rest = P_DATA()
            rest.presentation_data_value_list.extend(pdvs[index + 1:])
            self.receive(rest)

    def _to_library(self, pdvs: list[tuple[int, bytes]]) -> None:
        """pynetdicom's message: handed over one fragment at a time, each counted first."""
        for index, (context_id, data) in enumerate(pdvs):
            is_data = bool(data) and not data[0] & _COMMAND
            if is_data:
                self.size += len(data) - 1
            else:
                self.command_size += len(data)
            if self.size > self.limit or self.command_size > MAX_COMMAND_SET:
                if is_data and self._take_over():
                    if data[0] & _LAST:
                        self._complete()
                        self._rest(pdvs, index)
                    else:
                        self._take(pdvs[index + 1:])
                    return
                self._too_large()
                return
            single = P_DATA()
            single.presentation_data_value_list.append((context_id, data))
            try:
                self.library(single)
            # pynetdicom decodes a command set only once it is whole, and lets what its decoder
            # raises on a hostile one (AttributeError, TypeError, KeyError...) end the DUL
            # thread without closing the connection: what it does with other undecodable
            # messages (Evt19) is done instead.
            except Exception as exc:  # noqa: BLE001
                log.error("Received an invalid DIMSE message: %s: %s", type(exc).__name__, exc)
                self.dimse.message = None
                self.size = self.command_size = 0
                self.dimse.dul.event_queue.put("Evt19")
                return
            if self.dimse.message is None:  # it completed (or gave up on) the message
                self.size = self.command_size = 0
                self._rest(pdvs, index)
                return

    def _take_over(self) -> bool:
        """Make pynetdicom's C-STORE-RQ in progress ours, to drop the rest of its data set."""
        message = self.dimse.message
        command = getattr(message, "command_set", None)
        if message is None or command is None or command.get("CommandField") != _C_STORE_RQ:
            return False
        request = C_STORE()
        try:
            request.MessageID = command.MessageID
            request.AffectedSOPClassUID = command.AffectedSOPClassUID
            request.AffectedSOPInstanceUID = command.AffectedSOPInstanceUID
            request.Priority = command.Priority
        except (TypeError, ValueError, AttributeError):  # no answerable request: abort
            return False
        self.dimse.message = None  # pynetdicom forgets it, and what it held of it
        self.request, self.context_id = request, int(message.context_id or 0)
        self.dropping, self.fragments, self.command_size = True, [], 0
        return True

    def _too_large(self) -> None:
        """A message other than a C-STORE-RQ beyond the limits: abort the association."""
        peer = self.dimse.assoc.requestor
        log.warning("aborting the association with %s:%s: a DIMSE message beyond %d bytes "
                    "(max_instance_size) or a command set beyond %d bytes", peer.address,
                    peer.port, self.limit, MAX_COMMAND_SET)
        self.dimse.message = None
        self.size = self.command_size = 0
        self.dimse.dul.event_queue.put("Evt19")  # PS3.8 9.2 Evt19 -> AA-8: A-ABORT

    def _start(self, pdvs: list[tuple[int, bytes]]) -> C_STORE | None:
        """The request a message starts, when it is a C-STORE-RQ this reader may take."""
        if self.dimse.message is not None or not pdvs:
            return None  # pynetdicom is in the middle of a message: it finishes it
        data = pdvs[0][1]
        if not data or (data[0] & _COMMAND == 0) or (data[0] & _LAST == 0):
            return None  # not a whole command set in one fragment
        return _store_request(data, 1)

    def _complete(self) -> None:
        request = cast(C_STORE, self.request)
        if self.dropping:
            request.__class__ = OversizedStore
            cast(OversizedStore, request).received = self.size
            request.DataSet = BytesIO()
        else:
            request.DataSet = BytesIO(b"".join(self.fragments))
        request._context_id = self.context_id
        self.request, self.fragments, self.size, self.dropping = None, [], 0, False
        if not self._serve_here(request):
            self.dimse.msg_queue.put((self.context_id, request))

    def _serve_here(self, request: C_STORE) -> bool:
        """Answer ``request`` on this thread, the DUL's, when the association is otherwise idle.

        Handing each request to the association's reactor thread and its response back to
        the DUL thread costs two thread wake-ups and GIL hand-overs per instance: about a
        quarter of the node's CPU per small instance.  Without asynchronous operations
        (PS3.7 10.3.3, not negotiated) the peer waits for this response before it sends
        anything else, so the DUL has nothing to read meanwhile.  Left to the reactor when it
        is serving a request or has one queued (a peer that does not wait), or when the
        association has no DirectRouter.  An abort while serving here must not block: a
        blocking one waits for this very thread to close the connection.
        """
        assoc = self.dimse.assoc
        if getattr(assoc, SERVING, True) or not self.dimse.msg_queue.empty():
            return False
        blocking = assoc.abort
        assoc.abort = assoc._abort_nonblocking  # type: ignore[method-assign]
        try:
            assoc._serve_request(request, self.context_id)
        finally:
            assoc.abort = blocking  # type: ignore[method-assign]
        return True

    def _invalid(self) -> None:
        """A fragment out of place: what pynetdicom does with a message it cannot decode."""
        log.error("Received an invalid DIMSE message (C-STORE-RQ fragments out of order)")
        self.request, self.fragments, self.size, self.dropping = None, [], 0, False
        self.dimse.dul.event_queue.put("Evt19")  # PS3.8 9.2 Evt19: abort the association


def _store_request(data: bytes, start: int) -> C_STORE | None:
    """The C-STORE-RQ primitive of the command set ``data[start:]``; None for anything else."""
    fields: dict[int, bytes] = {}
    pos, end = start, len(data)
    while pos < end:
        if pos + 8 > end:
            return None
        group, element, length = _ELEMENT.unpack_from(data, pos)
        pos += 8
        if group != 0x0000 or element not in _ALLOWED or pos + length > end:
            return None
        fields[element] = data[pos:pos + length]
        pos += length
    if not fields.keys() >= _REQUIRED:
        return None
    numbers = [_number(fields, element) for element in (0x0100, 0x0110, 0x0700, 0x0800)]
    command, message_id, priority, dataset_type = numbers
    sop_class, sop_instance = _uid(fields[0x0002]), _uid(fields[0x1000])
    if (command != _C_STORE_RQ or message_id is None or priority is None
            or dataset_type in (None, _NO_DATASET) or sop_class is None or sop_instance is None):
        return None
    request = C_STORE()
    request.MessageID = message_id
    # Checked above as pynetdicom's setters would (set_uid: UI value, conformant UID), so the
    # values go in directly: the setters' second validation costs ~8 µs per UID per instance.
    request._affected_sop_class_uid = UID(sop_class)
    request._affected_sop_instance_uid = UID(sop_instance)
    request.Priority = priority
    if 0x1030 in fields or 0x1031 in fields:  # PS3.7 9.1.1.1.9: set by a C-MOVE's sender
        originator = fields.get(0x1030, b"")
        originator_id = _number(fields, 0x1031)
        if not originator.isascii() or (0x1031 in fields and originator_id is None):
            return None
        request.MoveOriginatorApplicationEntityTitle = originator.decode().strip(" \0") or None
        request.MoveOriginatorMessageID = originator_id
    return request


def _ascii(uid: object) -> str:
    return str(uid).encode("ascii", "replace").decode("ascii")


def _number(fields: dict[int, bytes], element: int) -> int | None:
    value = fields.get(element)
    return _US.unpack(value)[0] if value is not None and len(value) == 2 else None


def _uid(value: bytes) -> str | None:
    if not value.isascii():
        return None
    text = value.decode().rstrip("\0 ")
    return text if len(text) <= _MAX_UID and _CONFORMANT_UID.fullmatch(text) else None
