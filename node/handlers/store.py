"""C-STORE SCP (PS3.4 B.2): hand the encoded dataset to the ingest path, answer its outcome.

``answer_store`` is the handler proper: it builds the ``Received`` item, calls the ingest path
once, turns the outcome or the exception into a status, counts it for the association's log
line and writes the C-STORE's own INFO line.  Two edges call it: ``StoreService``
(node.handlers.store_direct), which takes C-STORE requests off the association and writes the
response itself, and ``handle_store``, pynetdicom's EVT_C_STORE handler, for any request the
direct service leaves to the library.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import cast

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event

from node.dimse.status import (
    OUT_OF_RESOURCES,
    SUCCESS,
    status_dataset,
    store_failure,
)
from node.errors import NodeError
from node.handlers.association import AssociationLog
from node.index.writer import Source
from node.ingest import Ingestor, Received
from node.metrics import NO_METRICS, Recorder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreAnswer:
    """The status a C-STORE is answered with, and its Error Comment (0000,0902) if any."""

    status: int
    comment: str | None = None


def answer_store(ingestor: Ingestor, associations: AssociationLog, assoc: Association,
                 sop_class: str, sop_instance: str, transfer_syntax: str,
                 dataset: bytes, metrics: Recorder = NO_METRICS) -> StoreAnswer:
    """Ingest one received instance; the status (PS3.4 B.2.3) the sender is to get."""
    started = time.perf_counter()
    peer = assoc.requestor
    item = Received(
        sop_class_uid=sop_class,
        sop_instance_uid=sop_instance,
        transfer_syntax=transfer_syntax,
        dataset=dataset,
        source=Source(peer.ae_title, peer.address),
    )
    comment: str | None = None
    outcome = "failed"
    try:
        outcome = ingestor.receive(item).value
        status = SUCCESS
    except NodeError as exc:
        status = store_failure(exc)
        comment = str(exc)
    except OSError as exc:  # an I/O error in the store: the sender may retry later
        log.error("C-STORE %s: store I/O error: %s", sop_instance, exc)
        status, comment = OUT_OF_RESOURCES, "storage I/O error"
    associations.count_store(assoc, status == SUCCESS)
    elapsed = time.perf_counter() - started
    metrics.stored(status, len(dataset), elapsed)
    level = logging.INFO if status == SUCCESS else logging.WARNING
    if log.isEnabledFor(level):
        log.log(
            level, "C-STORE %s %s status 0x%04X %s%s %.1f ms",
            sop_class_name(sop_class), sop_instance, status, outcome,
            f" ({comment})" if comment else "", elapsed * 1000,
        )
    return StoreAnswer(status, comment)


def handle_store(event: Event, ingestor: Ingestor, associations: AssociationLog,
                 metrics: Recorder = NO_METRICS) -> Dataset | int:
    """pynetdicom's EVT_C_STORE handler: the same answer, as the library wants it."""
    request = cast(C_STORE, event.request)
    answer = answer_store(
        ingestor, associations, event.assoc,
        str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID),
        str(event.context.transfer_syntax), event.encoded_dataset(include_meta=False), metrics,
    )
    # A bare status code is enough for success and spares building a dataset per instance.
    return status_dataset(answer.status, answer.comment) if answer.comment else answer.status


@functools.lru_cache(maxsize=256)  # bounded: a peer may send any UID it likes
def sop_class_name(uid: str) -> str:
    """The SOP class keyword for the log line (``CTImageStorage``), or the UID itself."""
    return UID(uid).keyword or uid
