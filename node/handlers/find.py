"""C-FIND SCP (PS3.4 C.4.1): parse the identifier, stream the matches, honour C-CANCEL."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from pydicom.charset import convert_encodings
from pydicom.dataset import Dataset
from pynetdicom.events import Event

from node.dimse.status import (
    CANCELLED,
    IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
    OUT_OF_RESOURCES,
    PENDING,
    PENDING_WARNING,
    SUCCESS,
    UNABLE_TO_PROCESS,
    status_dataset,
)
from node.errors import NodeError, OutOfResources
from node.query.engine import RESPONSE_CHARACTER_SET, Finder, TooManyMatches
from node.query.keys import Root
from node.query.request import InvalidQuery, parse_request

log = logging.getLogger(__name__)

_ROOTS = {
    "1.2.840.10008.5.1.4.1.2.1.1": Root.PATIENT,  # Patient Root Q/R Information Model - FIND
    "1.2.840.10008.5.1.4.1.2.2.1": Root.STUDY,  # Study Root Q/R Information Model - FIND
}

FindResponse = tuple[int | Dataset, Dataset | None]
_UTF8 = convert_encodings([RESPONSE_CHARACTER_SET])  # what the engine encodes values in


def handle_find(event: Event, finder: Finder) -> Iterator[FindResponse]:
    started = time.perf_counter()
    root = _ROOTS[str(event.request.AffectedSOPClassUID)]
    matches = 0
    final: int | Dataset = SUCCESS
    syntax = event.context.transfer_syntax
    implicit, little_endian = bool(syntax.is_implicit_VR), bool(syntax.is_little_endian)
    try:
        request = parse_request(event.identifier, root, _combined_date_time(event))
        # PS3.4 C.4.1.1.4: 0xFF01 when a key's value was not used for matching.
        pending = PENDING_WARNING if request.unmatched else PENDING
        for identifier in finder.find(request):
            if event.is_cancelled:  # PS3.4 C.4.1.3.1: C-CANCEL ends the query
                final = CANCELLED
                break
            matches += 1
            # Declare the identifier already in the context's encoding, so that pydicom
            # writes the engine's pre-encoded elements as they are instead of decoding them.
            identifier.set_original_encoding(implicit, little_endian, _UTF8)
            yield pending, identifier
    except InvalidQuery as exc:
        final = status_dataset(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, str(exc))
    except (TooManyMatches, OutOfResources) as exc:
        final = status_dataset(OUT_OF_RESOURCES, str(exc))
    except NodeError as exc:
        final = status_dataset(UNABLE_TO_PROCESS, str(exc))
    code = final if isinstance(final, int) else int(final.Status)
    log.info("C-FIND %s root %s: %d matches, status 0x%04X, %.1f ms",
             str(event.identifier.get("QueryRetrieveLevel", "?")), root.value, matches, code,
             (time.perf_counter() - started) * 1000)
    yield final, None


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


def _combined_date_time(event: Event) -> bool:
    """True when this association negotiated Combined Date-Time Matching for this model."""
    model = str(event.request.AffectedSOPClassUID)
    info = {str(k): v for k, v in event.assoc.acceptor.sop_class_extended.items()}.get(model, b"")
    return len(info) > _COMBINED_DATE_TIME and info[_COMBINED_DATE_TIME] == 1
