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
"""

from __future__ import annotations

import functools
import logging
import re
import struct
from io import BytesIO
from typing import Any, cast

from pynetdicom import _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from node.dimse.status import PROCESSING_FAILURE
from node.handlers.association import AssociationLog
from node.handlers.store import StoreAnswer, answer_store
from node.ingest import Ingestor
from node.scu.messages import send_message, store_response

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


@functools.lru_cache(maxsize=512)  # bounded: a peer may name any SOP class it likes
def _is_storage_class(uid: str) -> bool:
    """True when pynetdicom would serve a C-STORE of ``uid`` with its Storage service class."""
    return uid_to_service_class(uid) is StorageServiceClass


class StoreService:
    """Serves C-STORE (PS3.4 B.2.3) on the associations it is attached to."""

    def __init__(self, ingestor: Ingestor, associations: AssociationLog) -> None:
        self.ingestor = ingestor
        self.associations = associations

    def serve(self, assoc: Association, msg: Any, context: PresentationContext) -> bool:
        """A ``DirectService`` (node.handlers.direct): take storage C-STORE requests."""
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
        _StoreRequestReader.attach(assoc)  # this association sends C-STOREs: read them directly
        try:
            answer = answer_store(
                self.ingestor, self.associations, assoc, sop_class, sop_instance,
                str(context.transfer_syntax[0]), dataset.getvalue(),
            )
        except Exception:  # a bug: log it and answer, as pynetdicom does for its handlers
            log.exception("C-STORE handler failed")
            answer = StoreAnswer(PROCESSING_FAILURE, "internal error")
        # An association aborted meanwhile has no one to answer (as pynetdicom's SCP).
        if assoc.is_established:
            command = store_response(int(msg.MessageID or 0), sop_class, sop_instance,
                                     answer.status, answer.comment or "")
            send_message(assoc, cast(int, context.context_id), command)
        return True


class _StoreRequestReader:
    """Reads the C-STORE-RQ messages of one association; pynetdicom reads everything else.

    Runs on the association's DUL thread, in place of ``DIMSEServiceProvider.receive_primitive``
    (PS3.8 Annex E: a message is its command fragments, then its data set fragments, on one
    presentation context, never interleaved with another message's).
    """

    def __init__(self, dimse: DIMSEServiceProvider) -> None:
        self.dimse = dimse
        self.library = dimse.receive_primitive
        self.request: C_STORE | None = None  # the message being received, if it is ours
        self.context_id = 0
        self.fragments: list[bytes] = []

    @classmethod
    def attach(cls, assoc: Association) -> None:
        """Read this association's C-STORE requests from now on (once per association).

        Not when pynetdicom is to stream data sets to files, or when something listens to
        each decoded message (the node's DEBUG trace binds EVT_DIMSE_RECV).
        """
        dimse = assoc.dimse
        reader = getattr(dimse.receive_primitive, "__self__", None)
        if isinstance(reader, cls) or _config.STORE_RECV_CHUNKED_DATASET or assoc.get_handlers(
                evt.EVT_DIMSE_RECV):
            return
        dimse.receive_primitive = cls(dimse).receive  # type: ignore[method-assign]

    def receive(self, primitive: P_DATA) -> None:
        """Take one P-DATA primitive (any number of PDVs) from the DUL."""
        pdvs = list(primitive.presentation_data_value_list)
        if self.request is None:
            request = self._start(pdvs)
            if request is None:
                self.library(primitive)
                return
            self.request, self.context_id = request, pdvs[0][0]
            del pdvs[0]
        for index, (context_id, data) in enumerate(pdvs):
            if context_id != self.context_id or not data or data[0] & _COMMAND:
                self._invalid()
                return
            self.fragments.append(data[1:])
            if data[0] & _LAST:
                self._complete()
                if index + 1 < len(pdvs):  # the next message begins in the same PDU
                    rest = P_DATA()
                    rest.presentation_data_value_list.extend(pdvs[index + 1:])
                    self.receive(rest)
                return

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
        request.DataSet = BytesIO(b"".join(self.fragments))
        request._context_id = self.context_id
        self.request, self.fragments = None, []
        self.dimse.msg_queue.put((self.context_id, request))

    def _invalid(self) -> None:
        """A fragment out of place: what pynetdicom does with a message it cannot decode."""
        log.error("Received an invalid DIMSE message (C-STORE-RQ fragments out of order)")
        self.request, self.fragments = None, []
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
    request.AffectedSOPClassUID = sop_class
    request.AffectedSOPInstanceUID = sop_instance
    request.Priority = priority
    if 0x1030 in fields or 0x1031 in fields:  # PS3.7 9.1.1.1.9: set by a C-MOVE's sender
        originator = fields.get(0x1030, b"")
        originator_id = _number(fields, 0x1031)
        if not originator.isascii() or (0x1031 in fields and originator_id is None):
            return None
        request.MoveOriginatorApplicationEntityTitle = originator.decode().strip(" \0") or None
        request.MoveOriginatorMessageID = originator_id
    return request


def _number(fields: dict[int, bytes], element: int) -> int | None:
    value = fields.get(element)
    return _US.unpack(value)[0] if value is not None and len(value) == 2 else None


def _uid(value: bytes) -> str | None:
    if not value.isascii():
        return None
    text = value.decode().rstrip("\0 ")
    return text if len(text) <= _MAX_UID and _CONFORMANT_UID.fullmatch(text) else None
