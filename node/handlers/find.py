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
        request = parse_request(event.identifier, root)
        for identifier in finder.find(request):
            if event.is_cancelled:  # PS3.4 C.4.1.3.1: C-CANCEL ends the query
                final = CANCELLED
                break
            matches += 1
            # Declare the identifier already in the context's encoding, so that pydicom
            # writes the engine's pre-encoded elements as they are instead of decoding them.
            identifier.set_original_encoding(implicit, little_endian, _UTF8)
            yield PENDING, identifier
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
