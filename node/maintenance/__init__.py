"""Maintenance of an archive from the command line: import, verify, reindex and stats.

Domain code only (no pynetdicom, no DIMSE statuses): each module takes the parts it needs (store,
index, ingest path) and reports what it did; ``node.cli`` prints the reports.  Instances enter
the archive only through ``node.ingest.Ingestor`` (import, and verify's repair of orphan files),
except ``reindex``, which rebuilds a database from the files already held.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """How long work shows its progress (``node.cli_progress.ProgressBar`` fits)."""

    def start(self, total: int) -> None: ...

    def update(self, done: int, failed: int) -> None: ...

    def finish(self) -> None: ...


class NoProgress:
    """Progress shown nowhere (not on a terminal, or in tests)."""

    def start(self, total: int) -> None:
        pass

    def update(self, done: int, failed: int) -> None:
        pass

    def finish(self) -> None:
        pass
