"""C-FIND SCP (PS3.4 C.4.1): parse the identifier, stream the matches, honour C-CANCEL."""

from __future__ import annotations

import logging
import struct
import time
from io import BytesIO
from typing import Any, cast

from pydicom.charset import convert_encodings
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.dsutils import decode, encode
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext

from node.dimse.status import (
    CANCELLED,
    IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
    OUT_OF_RESOURCES,
    PENDING,
    PENDING_WARNING,
    SUCCESS,
    UNABLE_TO_PROCESS,
)
from node.errors import NodeError, OutOfResources
from node.metrics import NO_METRICS, Recorder
from node.query.engine import RESPONSE_CHARACTER_SET, Finder, TooManyMatches
from node.query.keys import Root
from node.query.request import InvalidQuery, parse_request
from node.scu.messages import find_response, send_message

log = logging.getLogger(__name__)

_ROOTS = {
    "1.2.840.10008.5.1.4.1.2.1.1": Root.PATIENT,  # Patient Root Q/R Information Model - FIND
    "1.2.840.10008.5.1.4.1.2.2.1": Root.STUDY,  # Study Root Q/R Information Model - FIND
}

_UTF8 = convert_encodings([RESPONSE_CHARACTER_SET])  # what the engine encodes values in


class FindService:
    """Answers C-FIND requests on the query contexts (a ``DirectService``, node.handlers.direct).

    pynetdicom's own C-FIND service class builds and encodes two pydicom datasets per match
    (the command set and the identifier), which costs more than finding the match.  The node
    writes each response directly: the command set with struct, the identifier from the
    engine's pre-encoded elements.
    """

    def __init__(self, finder: Finder, metrics: Recorder = NO_METRICS) -> None:
        self.finder = finder
        self.metrics = metrics

    def serve(self, assoc: Association, msg: Any, context: PresentationContext) -> bool:
        if not isinstance(msg, C_FIND):
            return False
        root = _ROOTS.get(str(context.abstract_syntax))
        if root is None:
            return False
        _Query(assoc, msg, context, root).answer(self.finder, self.metrics)
        return True


class _Query:
    """One C-FIND request being answered on the requester's association."""

    def __init__(self, assoc: Association, request: C_FIND, context: PresentationContext,
                 root: Root) -> None:
        self.assoc = assoc
        self.root = root
        self.message_id = int(request.MessageID or 0)
        self.sop_class = str(request.AffectedSOPClassUID)
        self.context_id = cast(int, context.context_id)
        self.syntax = context.transfer_syntax[0]
        self.encoded = cast(BytesIO, request.Identifier)

    def answer(self, finder: Finder, metrics: Recorder) -> None:
        started = time.perf_counter()
        matches = 0
        status, comment, level = SUCCESS, "", "?"
        try:
            identifier = self._identifier()
            level = str(identifier.get("QueryRetrieveLevel", "?"))
            request = parse_request(identifier, self.root, _combined_date_time(
                self.assoc, self.sop_class))
            # PS3.4 C.4.1.1.4: 0xFF01 when a key's value was not used for matching.
            pending = PENDING_WARNING if request.unmatched else PENDING
            for match in finder.find(request):
                # PS3.4 C.4.1.3.1: C-CANCEL ends the query (pynetdicom files it by Message ID).
                if self.assoc.dimse.cancel_req.pop(self.message_id, None) is not None:
                    status = CANCELLED
                    break
                if not self.assoc.is_established:
                    return  # the requester aborted: nobody to answer
                self._send(pending, encode_identifier(match, self.syntax))
                matches += 1
        except UndecodableIdentifier as exc:
            status, comment = UNABLE_TO_PROCESS, f"identifier cannot be decoded: {exc}"
        except InvalidQuery as exc:
            status, comment = IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, str(exc)
        except (TooManyMatches, OutOfResources) as exc:
            status, comment = OUT_OF_RESOURCES, str(exc)
        except NodeError as exc:
            status, comment = UNABLE_TO_PROCESS, str(exc)
        if self.assoc.is_established:
            self._send(status, comment=comment)
        elapsed = time.perf_counter() - started
        metrics.operation("C-FIND", status, elapsed)
        log.log(logging.INFO if status in (SUCCESS, CANCELLED) else logging.WARNING,
                "C-FIND %s root %s: %d matches, status 0x%04X%s, %.1f ms", level,
                self.root.value, matches, status, f" ({comment})" if comment else "",
                elapsed * 1000)

    def _identifier(self) -> Dataset:
        try:
            return decode(self.encoded, bool(self.syntax.is_implicit_VR),
                          bool(self.syntax.is_little_endian), bool(self.syntax.is_deflated))
        except (ValueError, TypeError, EOFError, KeyError, struct.error) as exc:
            raise UndecodableIdentifier(str(exc)) from exc

    def _send(self, status: int, identifier: bytes | None = None, comment: str = "") -> None:
        # One response per PDU: PDVs of several messages in one P-DATA-TF PDU are legal, but
        # pynetdicom 3.0 (and so many SCUs built on it) drops all after the first message.
        # Queued for the DUL thread, which writes every PDU of the association in order.
        command = find_response(self.message_id, self.sop_class, status, comment,
                                identifier is not None)
        send_message(self.assoc, self.context_id, command, identifier)


class UndecodableIdentifier(NodeError):
    """The request's identifier is not a dataset in the context's transfer syntax."""


def encode_identifier(ds: Dataset, syntax: UID) -> bytes:
    """``ds`` in ``syntax``: the engine's raw elements as they are, others through pydicom."""
    if syntax.is_little_endian and not syntax.is_deflated:
        raw = _raw_little_endian(ds, bool(syntax.is_implicit_VR))
        if raw is not None:
            return raw
    ds.set_original_encoding(bool(syntax.is_implicit_VR), bool(syntax.is_little_endian), _UTF8)
    encoded = encode(ds, bool(syntax.is_implicit_VR), bool(syntax.is_little_endian),
                     bool(syntax.is_deflated))
    if encoded is None:
        raise NodeError("a match cannot be encoded")
    return encoded


def _raw_little_endian(ds: Dataset, implicit: bool) -> bytes | None:
    """PS3.5 7.1: each element as tag, (VR,) length and value; None when an element is not a
    pre-encoded text value (values read from a stored file go through pydicom)."""
    parts: list[bytes] = []
    for tag in sorted(ds.keys()):
        element = ds.get_item(tag)
        if not isinstance(element, RawDataElement) or element.VR is None:
            return None
        value, vr = cast(bytes, element.value), element.VR
        if implicit:
            parts.append(struct.pack("<HHI", tag.group, tag.element, len(value)))
        elif vr in EXPLICIT_VR_LENGTH_32:
            parts.append(struct.pack("<HH2s2xI", tag.group, tag.element, vr.encode(), len(value)))
        else:
            parts.append(struct.pack("<HH2sH", tag.group, tag.element, vr.encode(), len(value)))
        parts.append(value)
    return b"".join(parts)


# SOP Class Extended Negotiation for C-FIND (PS3.4 C.5.1.1.2, Table C.5-1): byte 1 relational
# queries, byte 2 combined date-time matching, byte 3 fuzzy person-name matching, byte 4
# timezone adjustment, then multi-frame and other options.  The node supports byte 2 only.
_COMBINED_DATE_TIME = 1  # index of byte 2


def negotiate_find_extensions(event: Event) -> dict[str, bytes]:
    """EVT_SOP_EXTENDED: accept Combined Date-Time Matching, decline every other option."""
    accepted: dict[str, bytes] = {}
    app_info: dict[str, bytes] = event.app_info  # type: ignore[attr-defined]
    for sop_class, info in app_info.items():
        if str(sop_class) not in _ROOTS or not info:
            continue  # not C-FIND: no extended negotiation item in the answer
        reply = bytearray(len(info))
        if len(info) > _COMBINED_DATE_TIME and info[_COMBINED_DATE_TIME] == 1:
            reply[_COMBINED_DATE_TIME] = 1
        accepted[str(sop_class)] = bytes(reply)
    return accepted


def _combined_date_time(assoc: Association, model: str) -> bool:
    """True when this association negotiated Combined Date-Time Matching for this model."""
    info = {str(k): v for k, v in assoc.acceptor.sop_class_extended.items()}.get(model, b"")
    return len(info) > _COMBINED_DATE_TIME and info[_COMBINED_DATE_TIME] == 1
