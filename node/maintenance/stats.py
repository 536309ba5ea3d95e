"""``dicom-node stats``: what the archive holds, from the index and from the disk.

Counts per level of the model, the store's size as the index records it and as the disk holds
it (a walk of ``objects/``: the two differ when files lack rows or rows lack files, which
``verify`` explains), the files in quarantine, the modalities holding the most instances, and
when the first and the last instance were received.  Nothing that names a patient.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from peewee import Database

from node.index.maintenance import (
    ModalityCount,
    indexed_bytes,
    level_counts,
    modality_counts,
    received_range,
)
from node.store import Store

TOP_MODALITIES = 10


@dataclass(frozen=True)
class DiskUsage:
    files: int
    bytes: int


@dataclass(frozen=True)
class Stats:
    counts: dict[str, int]  # patients, studies, series, instances
    indexed_bytes: int
    disk: DiskUsage | None  # None when the walk was skipped
    quarantine: DiskUsage
    modalities: list[ModalityCount]
    first_received: datetime | None  # UTC
    last_received: datetime | None


def usage(folder: str) -> DiskUsage:
    """Regular files and their bytes anywhere under ``folder`` (0, 0 when it is absent)."""
    files = size = 0
    if not os.path.isdir(folder):
        return DiskUsage(0, 0)
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                stat = os.lstat(os.path.join(root, name))
            except FileNotFoundError:  # removed while we walk (a replace, a failed ingest)
                continue
            files += 1
            size += stat.st_size
    return DiskUsage(files, size)


def collect(db: Database, store: Store, top: int = TOP_MODALITIES,
            disk: bool = True) -> Stats:
    first, last = received_range(db)
    return Stats(
        counts=level_counts(db),
        indexed_bytes=indexed_bytes(db),
        disk=usage(str(store.objects)) if disk else None,
        quarantine=usage(str(store.quarantined)),
        modalities=modality_counts(db, top),
        first_received=first,
        last_received=last,
    )


def as_json(stats: Stats) -> dict[str, Any]:
    """The figures as plain JSON values (times in ISO 8601, UTC)."""
    def when(value: datetime | None) -> str | None:
        return None if value is None else value.isoformat() + "Z"

    return {
        **stats.counts,
        "indexed_bytes": stats.indexed_bytes,
        "disk_files": None if stats.disk is None else stats.disk.files,
        "disk_bytes": None if stats.disk is None else stats.disk.bytes,
        "quarantine_files": stats.quarantine.files,
        "quarantine_bytes": stats.quarantine.bytes,
        "modalities": [
            {"modality": m.modality, "studies": m.studies, "series": m.series,
             "instances": m.instances}
            for m in stats.modalities
        ],
        "first_received": when(stats.first_received),
        "last_received": when(stats.last_received),
    }


def human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit} ({size:,} B)"
        value /= 1024
    raise AssertionError("unreachable")


def text_lines(stats: Stats) -> list[str]:
    """The figures for a terminal: one aligned line each, then the modalities as a table."""
    def when(value: datetime | None) -> str:
        return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%S UTC")

    disk = ("(not walked)" if stats.disk is None
            else f"{human_bytes(stats.disk.bytes)} in {stats.disk.files:,} files")
    pairs = [
        *((level, f"{count:,}") for level, count in stats.counts.items()),
        ("indexed size", human_bytes(stats.indexed_bytes)),
        ("on disk", disk),
        ("quarantine", f"{human_bytes(stats.quarantine.bytes)} in "
                       f"{stats.quarantine.files:,} files"),
        ("first received", when(stats.first_received)),
        ("last received", when(stats.last_received)),
    ]
    width = max(len(name) for name, _ in pairs)
    lines = [f"{name:<{width}}  {value}" for name, value in pairs]
    if stats.modalities:
        header = ("modality", "studies", "series", "instances")
        rows = [(m.modality or "(none)", f"{m.studies:,}", f"{m.series:,}", f"{m.instances:,}")
                for m in stats.modalities]
        widths = [max(len(r[i]) for r in (header, *rows)) for i in range(4)]
        lines.append("")
        for row in (header, *rows):
            cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:],
                                                                              strict=True)]
            lines.append("  ".join(cells).rstrip())
    return lines
