"""Which stored instances a retrieve identifier names: one SQL statement through the index.

``reserve`` also leases the studies for the time of the retrieve (node.index.leases), before it
reads their instances, so that no deletion removes a file the retrieve is about to send.  The
result lists, per instance, what the sub-operations need and nothing more: SOP Class and
Instance UIDs, the transfer syntax the file is stored in, and where the file is.  Instances come
study by study, series by series, in Instance Number order, so a receiver sees each series whole.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from peewee import Database, PeeweeException
from pydicom.dataset import Dataset

from node.errors import IndexUnavailable
from node.index.leases import Leases
from node.index.models import Instance, Patient, Series, Study
from node.query.keys import KEYS, UNIQUE_KEYS, Level, Root
from node.retrieve.request import RetrieveRequest, parse_retrieve
from node.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredInstance:
    """One instance to send: what it is, how it is encoded, where its file is."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    path: Path
    size: int  # bytes of the file, as indexed


class RetrievePlanner:
    """Turns retrieve identifiers into the stored instances they name."""

    def __init__(self, db: Database, store: Store) -> None:
        self.db = db
        self.store = store
        self.leases = Leases(db)

    @contextmanager
    def reserve(self, identifier: Dataset, root: Root,
                limit: int | None = None) -> Iterator[list[StoredInstance]]:
        """``plan``, with the studies leased until the block ends (the retrieve is done).

        Raises as ``plan``; a lease that cannot be given back is logged and left to expire.
        """
        request = parse_retrieve(identifier, root)
        try:
            studies = cast(Iterable[tuple[int]],
                           _matching(Study.select(Study.id).distinct(), request).tuples())
            study_ids = [int(study) for (study,) in studies]
        except PeeweeException as exc:
            raise IndexUnavailable(f"cannot read the index: {exc}") from exc
        lease_ids = self.leases.take(study_ids)
        try:
            yield self._plan(request, limit, study_ids) if study_ids else []
        finally:
            try:
                self.leases.give_back(lease_ids)
            except IndexUnavailable as exc:
                log.warning("%s; they expire by themselves", exc)

    def plan(self, identifier: Dataset, root: Root,
             limit: int | None = None) -> list[StoredInstance]:
        """The instances ``identifier`` names in the ``root`` model, at most ``limit`` of them.

        Raises InvalidRetrieve when the identifier breaks the model's rules, IndexUnavailable
        when the index cannot be read.
        """
        return self._plan(parse_retrieve(identifier, root), limit)

    def _plan(self, request: RetrieveRequest, limit: int | None,
              study_ids: list[int] | None = None) -> list[StoredInstance]:
        query: Any = _matching(
            Instance.select(Instance.sop_class_uid, Instance.sop_instance_uid,
                            Instance.transfer_syntax_uid, Instance.digest, Instance.size)
            .join(Series)
            .join(Study), request)
        if study_ids is not None:  # those leased: a study deleted since is not among them
            query = query.where(Study.id.in_(study_ids))
        query = query.order_by(Study.id, Series.id, Instance.instance_number, Instance.id)
        if limit is not None:
            query = query.limit(limit)
        try:
            rows: list[tuple[str, str, str, str, int]] = list(query.tuples())
        except PeeweeException as exc:
            raise IndexUnavailable(f"cannot read the index: {exc}") from exc
        return [
            StoredInstance(sop_class, sop_instance, syntax, self.store.path_of(digest), int(size))
            for sop_class, sop_instance, syntax, digest, size in rows
        ]


def _matching(query: Any, request: RetrieveRequest) -> Any:
    """``query`` (from Study, or joined up to Study) restricted to what ``request`` names."""
    if Level.PATIENT in request.keys:
        query = query.join(Patient, on=(Study.patient == Patient.id))
    if query.model is Study and (Level.SERIES in request.keys or Level.IMAGE in request.keys):
        query = query.join(Series, on=(Series.study == Study.id))
        if Level.IMAGE in request.keys:
            query = query.join(Instance, on=(Instance.series == Series.id))
    for level, values in request.keys.items():
        column = KEYS[UNIQUE_KEYS[level]].column
        query = query.where(column == values[0] if len(values) == 1 else column.in_(values))
    return query
