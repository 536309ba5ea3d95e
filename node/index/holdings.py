"""Which of a list of SOP Instance UIDs the index holds, in a bounded number of statements.

A pull compares what a remote PACS lists with what the node already has, before fetching and
again after (to verify what arrived). The lists can hold tens of thousands of UIDs, so they are
looked up in chunks: one SELECT per ``CHUNK`` UIDs, each with a bounded number of parameters
(SQLite allows 999 in old builds, 32,766 since 3.32).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import cast

from peewee import Database

from node.index.models import Instance

CHUNK = 500


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Holdings:
    """Read-only lookups of held instances by SOP Instance UID."""

    def __init__(self, db: Database, chunk: int = CHUNK) -> None:
        self.db = db
        self.chunk = chunk

    def sizes(self, sop_instance_uids: Iterable[str]) -> dict[str, int]:
        """{SOP Instance UID: stored file size in bytes} for each of the UIDs the index holds.

        Runs one SELECT per ``chunk`` distinct UIDs (none for an empty list).
        """
        wanted = list(dict.fromkeys(sop_instance_uids))  # distinct, in order
        held: dict[str, int] = {}
        for chunk in _chunks(wanted, self.chunk):
            query = (
                Instance.select(Instance.sop_instance_uid, Instance.size)
                .where(Instance.sop_instance_uid.in_(list(chunk)))
                .tuples()
            )
            rows = cast(Iterable[tuple[str, int]], query.execute(self.db))
            held.update((str(uid), int(size)) for uid, size in rows)
        return held

