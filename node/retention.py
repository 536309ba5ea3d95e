"""The retention policy: delete the oldest studies while the store is over its limits.

Two limits (config ``retention``): the bytes of the indexed files (``max_store_size``; once over
it, studies go until the store is at LOW_WATERMARK of it, so that deletion runs now and then in
batches rather than at every new instance) and the age of a study (``max_age_days`` since its
first instance arrived).  Studies go oldest received first, whole, through ``node.deletion``:
protected patients (by Patient ID) and studies never, a study a retrieve holds not until the
retrieve ends.  "Received" rather than Study Date: the node is a cache of what was sent to it,
and a prior study from 2009 sent today is today's work.

``RetentionEnforcer`` runs in ``serve`` on its own thread: every ``check_interval`` seconds, and
at once when the instances stored since the last check may have taken the store over its limit
(``grew``, called by the ingest path).  The policy is read from the live config at each pass, so
a reload (SIGHUP) applies to the next one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, cast

from peewee import Database, PeeweeException, fn

from node.config import Retention
from node.deletion import Deleter, DeletionReport
from node.errors import NodeError
from node.index.leases import drop_expired, leased, now
from node.index.models import Instance, Patient, Study

log = logging.getLogger(__name__)

LOW_WATERMARK = 0.95  # of max_store_size: where a size-driven pass stops deleting
_PAGE = 100  # candidate studies read at a time


@dataclass
class RetentionPass:
    """What one pass found and did."""

    store_bytes: int = 0
    report: DeletionReport = field(default_factory=DeletionReport)
    over_limit: int = 0  # bytes still over max_store_size after the pass (kept: protected/leased)


class RetentionEnforcer:
    """Applies the retention policy to one archive."""

    def __init__(self, db: Database, deleter: Deleter, policy: Callable[[], Retention]) -> None:
        self.db = db
        self.deleter = deleter
        self.policy = policy
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._known_bytes = 0  # the store's size at the last pass, plus what arrived since
        self._lock = threading.Lock()

    def grew(self, size: int) -> None:
        """An instance of ``size`` bytes was stored: check now if that may break the limit."""
        limit = self.policy().max_store_size
        with self._lock:
            self._known_bytes += size
            over = bool(limit) and self._known_bytes > limit
        if over:
            self._wake.set()

    def run_once(self) -> RetentionPass:
        """One pass over both limits.  Raises IndexUnavailable when the index cannot be used."""
        policy = self.policy()
        result = RetentionPass()
        if not policy.enabled:
            return result
        try:
            drop_expired(self.db)
            if policy.max_age_days:
                cutoff = now() - timedelta(days=policy.max_age_days)
                for study_id in self._candidates(policy, received_before=cutoff):
                    if self._stop.is_set():
                        return result
                    self.deleter.delete_study(study_id, result.report,
                                              f"retention (older than {policy.max_age_days} d)")
            result.store_bytes = self._store_bytes()
            if policy.max_store_size and result.store_bytes > policy.max_store_size:
                target = int(policy.max_store_size * LOW_WATERMARK)
                for study_id in self._candidates(policy):
                    if result.store_bytes <= target or self._stop.is_set():
                        break
                    before = result.report.bytes
                    self.deleter.delete_study(study_id, result.report,
                                              "retention (store over its size limit)")
                    result.store_bytes -= result.report.bytes - before
                result.over_limit = max(0, result.store_bytes - policy.max_store_size)
        except PeeweeException as exc:
            raise NodeError(f"retention: cannot use the index: {exc}") from exc
        with self._lock:
            self._known_bytes = result.store_bytes
        if result.over_limit:
            log.warning("retention: the store is %.1f MB over its limit; what is left is "
                        "protected or being retrieved", result.over_limit / 1e6)
        return result

    def _store_bytes(self) -> int:
        return int(Instance.select(fn.COALESCE(fn.SUM(Instance.size), 0)).scalar(self.db))

    def _candidates(self, policy: Retention, received_before: Any = None) -> Iterator[int]:
        """Ids of unprotected, unleased studies, oldest received first, read a page at a time.

        Pages continue after the last (received_at, id) seen, so a study kept back (leased
        meanwhile) is not read again in the same pass.
        """
        after: tuple[Any, int] | None = None
        while True:
            query: Any = Study.select(Study.id, Study.received_at).join(Patient)
            if policy.protected_patients:
                query = query.where(Patient.patient_id.not_in(sorted(policy.protected_patients)))
            if policy.protected_studies:
                query = query.where(
                    Study.study_instance_uid.not_in(sorted(policy.protected_studies)))
            if received_before is not None:
                query = query.where(Study.received_at < received_before)
            if after is not None:
                query = query.where((Study.received_at > after[0])
                                    | ((Study.received_at == after[0]) & (Study.id > after[1])))
            query = query.where(~leased(Study.id))
            page = list(cast(Iterable[tuple[int, Any]],
                             query.order_by(Study.received_at, Study.id).limit(_PAGE)
                             .tuples().execute(self.db)))
            for study_id, _ in page:
                yield int(study_id)
            if len(page) < _PAGE:
                return
            after = (page[-1][1], int(page[-1][0]))

    # --- the thread in serve ------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="retention", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except NodeError as exc:  # the next pass tries again
                log.warning("%s", exc)
            self._wake.wait(self.policy().check_interval)
            self._wake.clear()
