"""C-STORE SCP (PS3.4 B.2): hand the encoded dataset to the ingest path, answer its outcome."""

from __future__ import annotations

import logging
import time
from typing import cast

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event

from node.dimse.status import (
    OUT_OF_RESOURCES,
    SUCCESS,
    status_dataset,
    store_failure,
)
from node.errors import (
    NodeError,
)
from node.handlers.association import AssociationLog
from node.index.writer import Source
from node.ingest import Ingestor, Received

log = logging.getLogger(__name__)

def handle_store(event: Event, ingestor: Ingestor, associations: AssociationLog) -> Dataset | int:
    started = time.perf_counter()
    request = cast(C_STORE, event.request)
    sop_class = str(request.AffectedSOPClassUID)
    sop_instance = str(request.AffectedSOPInstanceUID)
    peer = event.assoc.requestor
    item = Received(
        sop_class_uid=sop_class,
        sop_instance_uid=sop_instance,
        transfer_syntax=str(event.context.transfer_syntax),
        dataset=event.encoded_dataset(include_meta=False),
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
    associations.count_store(event.assoc, status == SUCCESS)
    log.log(
        logging.INFO if status == SUCCESS else logging.WARNING,
        "C-STORE %s %s status 0x%04X %s%s %.1f ms",
        _sop_class_name(sop_class), sop_instance, status, outcome,
        f" ({comment})" if comment else "", (time.perf_counter() - started) * 1000,
    )
    # A bare status code is enough for success and spares building a dataset per instance.
    return status_dataset(status, comment) if comment else status


def _sop_class_name(uid: str) -> str:
    return UID(uid).keyword or uid
