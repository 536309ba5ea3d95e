"""Take one received instance from encoded bytes to a durable file and an index row.

The order is what makes a Success trustworthy: parse the header (reject bad input before
touching disk), write the file durably, then commit the row.  If the row cannot be committed
the new file is removed again, so a failure leaves nothing behind.  Instances with the same SOP
Instance UID are serialised within the process, so two copies arriving at once end as one file
and one row.
"""

from __future__ import annotations

import logging
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from node.config import DuplicatePolicy
from node.dicom.header import InstanceHeader, read_header
from node.dicom.part10 import file_meta_bytes
from node.errors import DuplicateRejected, InvalidDataset, NodeError
from node.index.writer import IndexWriter, InstanceExists, Source
from node.store import Store, digest_of

log = logging.getLogger(__name__)

_LOCK_STRIPES = 64


class Outcome(StrEnum):
    """What happened to an instance that was accepted."""

    STORED = "stored"
    DUPLICATE = "duplicate"  # same UID, same content: nothing new written
    KEPT_EXISTING = "kept-existing"  # same UID, other content, policy keep
    REPLACED = "replaced"  # same UID, other content, policy replace


@dataclass(frozen=True)
class Received:
    """An instance as it came off the network: the command's UIDs and the encoded dataset."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    dataset: bytes  # encoded in transfer_syntax, without File Meta Information
    source: Source


class Ingestor:
    """The single way instances enter the archive (C-STORE, import and pull all use it)."""

    def __init__(self, store: Store, index: IndexWriter, duplicates: DuplicatePolicy,
                 on_stored: Callable[[int], None] | None = None) -> None:
        self.store = store
        self.index = index
        self.duplicates = duplicates
        # Told the size of each new file kept (the retention policy watches the store grow).
        self.on_stored = on_stored
        self._locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]

    def receive(self, item: Received) -> Outcome:
        """Keep ``item`` durably and index it; raises a NodeError subclass when it cannot."""
        header = read_header(item.dataset, item.transfer_syntax)
        # PS3.4 B.2.3: the dataset's SOP UIDs must be those of the C-STORE request.
        if header.sop_class_uid != item.sop_class_uid:
            raise InvalidDataset("SOP Class UID in dataset differs from the command")
        if header.sop_instance_uid != item.sop_instance_uid:
            raise InvalidDataset("SOP Instance UID in dataset differs from the command")
        parts = [
            file_meta_bytes(item.sop_class_uid, item.sop_instance_uid, item.transfer_syntax),
            item.dataset,
        ]
        digest = digest_of(parts)
        stripe = zlib.crc32(header.sop_instance_uid.encode()) % _LOCK_STRIPES
        with self._locks[stripe]:
            return self._keep(header, parts, digest, item)

    def _keep(self, header: InstanceHeader, parts: list[bytes], digest: str,
              item: Received) -> Outcome:
        existing = self.index.find(header.sop_instance_uid)
        if existing is not None:
            if existing.digest == digest:
                if not self.store.exists(digest):  # row without file: heal it
                    log.warning("re-received instance whose file was missing; restored it")
                    self.store.put(parts, digest)
                return Outcome.DUPLICATE
            if self.duplicates is DuplicatePolicy.KEEP:
                return Outcome.KEPT_EXISTING
            if self.duplicates is DuplicatePolicy.REJECT:
                raise DuplicateRejected("SOP Instance UID already held with other content")

        stored = self.store.put(parts, digest)
        try:
            if existing is not None:
                return self._replace(header, digest, stored.size, item)
            try:
                self.index.add(header, digest, stored.size, item.transfer_syntax, item.source)
                if not stored.created and not self.store.exists(digest):
                    # The file was there, but a deletion of an earlier copy of this instance
                    # took it away before our row was committed (Store.remove_unreferenced).
                    self.store.put(parts, digest)
            except InstanceExists:
                # Another process indexed this UID between our lookup and our insert.
                outcome = self._keep(header, parts, digest, item)
                if outcome is Outcome.KEPT_EXISTING and stored.created:
                    self._discard(digest)
                return outcome
        except BaseException:
            if stored.created:
                self._discard(digest)
            raise
        if stored.created and self.on_stored is not None:
            self.on_stored(stored.size)
        return Outcome.STORED

    def _replace(self, header: InstanceHeader, digest: str, size: int,
                 item: Received) -> Outcome:
        old = self.index.replace(header, digest, size, item.transfer_syntax, item.source)
        if old is not None and old != digest:
            self.store.remove_unreferenced(old, self.index.is_referenced)
        return Outcome.REPLACED

    def _discard(self, digest: str) -> None:
        """Remove a file written for a failed ingest, unless a row points at it after all."""
        try:
            self.store.remove_unreferenced(digest, self.index.is_referenced)
        except (OSError, NodeError):  # must not mask the original error; the sweep gets it later
            log.exception("could not remove file of a failed ingest; start-up sweep will")
