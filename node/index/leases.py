"""Retrieve leases: the studies a C-MOVE or C-GET is sending, which deletion must leave alone.

A retrieve takes a lease on its studies *before* it reads which instances to send, and gives it
back when it ends.  A deletion (``node.index.deletion``) removes, in one transaction, only
studies that hold no live lease.  With SQLite every write transaction runs alone, so either the
lease is committed first (the deletion sees it and skips the study) or the deletion is (the
retrieve then finds no instances of the study to send); a retrieve never plans a file that a
deletion is about to remove.  PostgreSQL gets the same order from the row lock the lease takes
on its study (``SELECT … FOR SHARE`` against the deletion's ``FOR UPDATE``).

Leases are rows, not memory, so that ``dicom-node delete`` in another process and other nodes
sharing the database see them.  A process that dies holding one leaves it until ``expires_at``:
it only delays deletion of that study.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from peewee import Database, PeeweeException, SqliteDatabase, fn

from node.errors import IndexUnavailable
from node.index.models import RetrieveLease, Study

# Longer than any one retrieve runs (at most 65535 sub-operations, PS3.7 9.3.3.2); a lease
# left by a crash keeps its study from deletion this long.
LEASE_TTL = timedelta(hours=6)


def now() -> datetime:
    """The index's clock: naive UTC, as the ``received_at`` columns."""
    return datetime.now(UTC).replace(tzinfo=None)


def holder_name() -> str:
    """Who holds a lease, for an administrator looking at the table: host and process."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Leases:
    """Takes and gives back retrieve leases in one index database."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._sqlite = isinstance(db, SqliteDatabase)

    @contextmanager
    def _not_synced(self) -> Iterator[None]:
        """SQLite: commit without waiting for the disk.  A lease need not survive a power
        loss (its retrieve does not either), and in WAL mode such a commit is still atomic;
        the next synchronous commit of the connection's database makes it durable anyway."""
        if not self._sqlite:
            yield
            return
        self.db.execute_sql("PRAGMA synchronous = NORMAL")  # type: ignore[no-untyped-call]
        try:
            yield
        finally:
            self.db.execute_sql("PRAGMA synchronous = FULL")  # type: ignore[no-untyped-call]

    def take(self, study_ids: Sequence[int]) -> list[int]:
        """Lease the studies (those that still exist); returns the lease ids to give back."""
        if not study_ids:
            return []
        expires = now() + LEASE_TTL
        holder = holder_name()
        try:
            with self._not_synced(), self.db.atomic():
                existing = Study.select(Study.id).where(Study.id.in_(list(study_ids)))
                if not self._sqlite:
                    existing = existing.for_update("FOR SHARE")  # type: ignore[arg-type]
                rows = cast(Iterable[tuple[int]], existing.tuples())
                ids = [int(study) for (study,) in rows]
                return [
                    int(RetrieveLease.insert(study=study, holder=holder,
                                             expires_at=expires).execute())
                    for study in ids
                ]
        except PeeweeException as exc:
            raise IndexUnavailable(f"cannot lease studies for a retrieve: {exc}") from exc

    def give_back(self, lease_ids: Sequence[int]) -> None:
        """End the leases.  A failure is left to expiry (raised for the caller to log)."""
        if not lease_ids:
            return
        try:
            with self._not_synced(), self.db.atomic():
                RetrieveLease.delete().where(RetrieveLease.id.in_(list(lease_ids))).execute()
        except PeeweeException as exc:
            raise IndexUnavailable(f"cannot end retrieve leases: {exc}") from exc


def leased(study_column: Any) -> Any:
    """An SQL condition true when the study in ``study_column`` has a lease not yet expired."""
    return fn.EXISTS(
        RetrieveLease.select(RetrieveLease.id).where(
            (RetrieveLease.study == study_column) & (RetrieveLease.expires_at > now())
        )
    )


def drop_expired(db: Database) -> int:
    """Delete leases past their expiry (left by processes that died); returns how many."""
    return int(RetrieveLease.delete().where(RetrieveLease.expires_at <= now()).execute(db))
