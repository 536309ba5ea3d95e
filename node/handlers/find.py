"""C-FIND SCP (PS3.4 C.4.1): parse the identifier, stream the matches, honour C-CANCEL."""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Mapping
from io import BytesIO
from typing import Any, cast

from pydicom.charset import convert_encodings
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag
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
from node.query.engine import RESPONSE_CHARACTER_SET, Finder, Identifier, TooManyMatches
from node.query.keys import Root
from node.query.request import InvalidQuery, parse_request
from node.scu.messages import find_response, transmit_many

log = logging.getLogger(__name__)

# Pending responses written to the socket together (each still a message in PDUs of its own):
# one write per response made the system calls most of a long answer's cost.  The first match
# goes out at once; the others wait for company at most BATCH_DELAY, checked as matches come.
BATCH_RESPONSES = 16
BATCH_BYTES = 64 * 1024
BATCH_DELAY = 0.002  # seconds

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
        # pydicom's UID properties cost microseconds each: asked once, not once per match.
        self.implicit = bool(self.syntax.is_implicit_VR)
        self.raw = bool(self.syntax.is_little_endian) and not self.syntax.is_deflated
        self.batch: list[tuple[bytes, bytes | None]] = []  # pending responses not written yet
        self.batch_bytes = 0
        self.batch_since = 0.0  # time.perf_counter() when its first response was added
        self.written = 0  # pending responses written

    def answer(self, finder: Finder, metrics: Recorder) -> None:
        started = time.perf_counter()
        status, comment, level = SUCCESS, "", "?"
        try:
            identifier = self._identifier()
            level = str(identifier.get("QueryRetrieveLevel", "?"))
            request = parse_request(identifier, self.root, _combined_date_time(
                self.assoc, self.sop_class))
            # PS3.4 C.4.1.1.4: 0xFF01 when a key's value was not used for matching.
            pending = find_response(self.message_id, self.sop_class,
                                    PENDING_WARNING if request.unmatched else PENDING, "", True)
            for match in finder.find(request):
                # PS3.4 C.4.1.3.1: C-CANCEL ends the query (pynetdicom files it by Message ID).
                if self.assoc.dimse.cancel_req.pop(self.message_id, None) is not None:
                    status = CANCELLED
                    self.batch.clear()  # not sent yet: the requester asked for no more
                    break
                if not self.assoc.is_established:
                    return  # the requester aborted: nobody to answer
                self._pending(pending, self._encode(match))
        except UndecodableIdentifier as exc:
            status, comment = UNABLE_TO_PROCESS, f"identifier cannot be decoded: {exc}"
        except InvalidQuery as exc:
            status, comment = IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, str(exc)
        except (TooManyMatches, OutOfResources) as exc:
            status, comment = OUT_OF_RESOURCES, str(exc)
        except NodeError as exc:
            status, comment = UNABLE_TO_PROCESS, str(exc)
        if self.assoc.is_established:
            self._final(status, comment)
        matches = self.written
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

    def _encode(self, match: Identifier) -> bytes:
        if self.raw:
            raw = _raw_little_endian(match, self.implicit)
            if raw is not None:
                return raw
        return _through_pydicom(Dataset(match), self.syntax)

    def _pending(self, command: bytes, identifier: bytes) -> None:
        """A pending response (its command set, the same for every match) with its match,
        written now or with the next ones."""
        now = time.perf_counter()
        if not self.batch:
            self.batch_since = now
        self.batch.append((command, identifier))
        self.batch_bytes += len(identifier)
        if (self.written == 0 or len(self.batch) >= BATCH_RESPONSES
                or self.batch_bytes >= BATCH_BYTES or now - self.batch_since >= BATCH_DELAY):
            self._flush()

    def _final(self, status: int, comment: str) -> None:
        """The final response, written after every pending one still waiting."""
        self.batch.append((find_response(self.message_id, self.sop_class, status, comment,
                                         False), None))
        self._flush(final=True)

    def _flush(self, final: bool = False) -> None:
        # One response per PDU: PDVs of several messages in one P-DATA-TF PDU are legal, but
        # pynetdicom 3.0 (and so many SCUs built on it) drops all after the first message.
        # Written from this thread when the DUL allows it (after whatever it still has
        # queued), else queued for it: handing every response to the DUL thread, which
        # re-encodes it through pynetdicom, made that thread the bottleneck of a long answer.
        batch, self.batch, self.batch_bytes = self.batch, [], 0
        transmit_many(self.assoc, self.context_id, batch)
        self.written += len(batch) - (1 if final else 0)


class UndecodableIdentifier(NodeError):
    """The request's identifier is not a dataset in the context's transfer syntax."""


def _through_pydicom(ds: Dataset, syntax: UID) -> bytes:
    """``ds`` in ``syntax`` through pydicom: values read from a stored file, and the transfer
    syntaxes ``_raw_little_endian`` does not write (big endian, deflated)."""
    ds.set_original_encoding(bool(syntax.is_implicit_VR), bool(syntax.is_little_endian), _UTF8)
    encoded = encode(ds, bool(syntax.is_implicit_VR), bool(syntax.is_little_endian),
                     bool(syntax.is_deflated))
    if encoded is None:
        raise NodeError("a match cannot be encoded")
    return encoded


_IMPLICIT = struct.Struct("<HHI")
_EXPLICIT_32 = struct.Struct("<HH2s2xI")
_EXPLICIT_16 = struct.Struct("<HH2sH")


def _tag_order(item: tuple[int, Any]) -> int:
    return int(item[0])  # (pydicom's BaseTag compares in Python; an int in C)


def _raw_little_endian(elements: Mapping[BaseTag, Any], implicit: bool) -> bytes | None:
    """PS3.5 7.1: each element as tag, (VR,) length and value; None when an element is not a
    pre-encoded text value (values read from a stored file go through pydicom)."""
    parts: list[bytes] = []
    for tag, element in sorted(elements.items(), key=_tag_order):
        if not isinstance(element, RawDataElement) or element.VR is None:
            return None
        value, vr = cast(bytes, element.value), element.VR
        group, number = tag >> 16, tag & 0xFFFF
        if implicit:
            parts.append(_IMPLICIT.pack(group, number, len(value)))
        elif vr in EXPLICIT_VR_LENGTH_32:
            parts.append(_EXPLICIT_32.pack(group, number, vr.encode(), len(value)))
        else:
            parts.append(_EXPLICIT_16.pack(group, number, vr.encode(), len(value)))
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
