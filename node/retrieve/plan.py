"""Which stored instances a retrieve identifier names: one SQL statement through the index.

The result lists, per instance, what the sub-operations need and nothing more: SOP Class and
Instance UIDs, the transfer syntax the file is stored in, and where the file is.  Instances come
study by study, series by series, in Instance Number order, so a receiver sees each series whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peewee import Database, PeeweeException
from pydicom.dataset import Dataset

from node.errors import IndexUnavailable
from node.index.models import Instance, Patient, Series, Study
from node.query.keys import KEYS, UNIQUE_KEYS, Level, Root
from node.retrieve.request import parse_retrieve
from node.store import Store


@dataclass(frozen=True)
class StoredInstance:
    """One instance to send: what it is, how it is encoded, where its file is."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    path: Path


class RetrievePlanner:
    """Turns retrieve identifiers into the stored instances they name."""

    def __init__(self, db: Database, store: Store) -> None:
        self.db = db
        self.store = store

    def plan(self, identifier: Dataset, root: Root,
             limit: int | None = None) -> list[StoredInstance]:
        """The instances ``identifier`` names in the ``root`` model, at most ``limit`` of them.

        Raises InvalidRetrieve when the identifier breaks the model's rules, IndexUnavailable
        when the index cannot be read.
        """
        request = parse_retrieve(identifier, root)
        query: Any = (
            Instance.select(Instance.sop_class_uid, Instance.sop_instance_uid,
                            Instance.transfer_syntax_uid, Instance.digest)
            .join(Series)
            .join(Study)
        )
        if Level.PATIENT in request.keys:
            query = query.join(Patient)
        for level, values in request.keys.items():
            column = KEYS[UNIQUE_KEYS[level]].column
            query = query.where(column == values[0] if len(values) == 1 else column.in_(values))
        query = query.order_by(Study.id, Series.id, Instance.instance_number, Instance.id)
        if limit is not None:
            query = query.limit(limit)
        try:
            rows: list[tuple[str, str, str, str]] = list(query.tuples())
        except PeeweeException as exc:
            raise IndexUnavailable(f"cannot read the index: {exc}") from exc
        return [
            StoredInstance(sop_class, sop_instance, syntax, self.store.path_of(digest))
            for sop_class, sop_instance, syntax, digest in rows
        ]
