"""One INFO line per association: who called, from where, how it ended and what it stored."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.events import Event

from node.metrics import NO_METRICS, Recorder

log = logging.getLogger("node.association")


@dataclass
class _Record:
    started: float = field(default_factory=time.monotonic)
    outcome: str = "closed"
    accepted: bool = False  # an abort may come before the A-ASSOCIATE-AC, or instead of it
    stored: int = 0
    failed: int = 0


class AssociationLog:
    """Tracks each association from connection to close, logs it once and counts it."""

    def __init__(self, metrics: Recorder = NO_METRICS) -> None:
        self.metrics = metrics
        self._records: dict[int, _Record] = {}
        self._lock = threading.Lock()

    def _record(self, assoc: Association) -> _Record:
        with self._lock:
            return self._records.setdefault(id(assoc), _Record())

    def count_store(self, assoc: Association, ok: bool) -> None:
        record = self._record(assoc)
        if ok:
            record.stored += 1
        else:
            record.failed += 1

    def on_event(self, event: Event) -> None:
        record = self._record(event.assoc)
        if event.event is evt.EVT_REJECTED:
            record.outcome = "rejected"
            self.metrics.association_rejected()
        elif event.event is evt.EVT_ACCEPTED:
            record.outcome, record.accepted = "accepted", True
            self.metrics.association_accepted()
        elif event.event is evt.EVT_RELEASED:
            record.outcome = "released"
        elif event.event is evt.EVT_ABORTED:
            record.outcome = "aborted"
        elif event.event is evt.EVT_CONN_CLOSE:
            with self._lock:
                self._records.pop(id(event.assoc), None)
            if record.accepted:
                self.metrics.association_ended(aborted=record.outcome == "aborted")
            peer = event.assoc.requestor
            log.info(
                "association from %s at %s:%s %s: %d stored, %d failed, %.2f s",
                peer.ae_title or "?", peer.address, peer.port, record.outcome,
                record.stored, record.failed, time.monotonic() - record.started,
            )

    def handlers(self) -> list[tuple[evt.EventType, object]]:
        return [
            (e, self.on_event)
            for e in (evt.EVT_ACCEPTED, evt.EVT_REJECTED, evt.EVT_RELEASED, evt.EVT_ABORTED,
                      evt.EVT_CONN_CLOSE)
        ]
