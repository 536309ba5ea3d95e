"""Delete instances from the index, a study at a time, never one a retrieve is sending.

Which rows go is decided and done in one transaction per study: the study is locked (on
PostgreSQL; SQLite's write transactions run alone), a live retrieve lease on it makes the whole
study stay (node.index.leases), and levels left without instances are removed with it, so a
C-FIND never answers an empty series, study or patient (PS3.4 C.6.1.1: each entity is reached
through the instances it holds).  The caller removes the files afterwards (``node.deletion``):
rows first, so that no row ever names a file that is gone.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, cast

from peewee import Database, SqliteDatabase

from node.index.leases import leased
from node.index.maintenance import prune
from node.index.models import Instance, Patient, Series, Study


class Level(StrEnum):
    """What a deletion names: whole patients, studies, series or single instances."""

    PATIENT = "patient"
    STUDY = "study"
    SERIES = "series"
    INSTANCE = "instance"


@dataclass(frozen=True)
class RemovedFile:
    digest: str
    size: int


@dataclass
class StudyRemoval:
    """What one transaction removed from one study (nothing when it was leased)."""

    study_uid: str
    leased: bool = False
    study_gone: bool = False  # the study row itself went (all its instances did)
    files: list[RemovedFile] = field(default_factory=list)


def study_ids_for(db: Database, level: Level, values: Sequence[str],
                  issuer: str | None = None) -> list[tuple[int, str]]:
    """(id, Study Instance UID) of the studies that hold what ``level``/``values`` name.

    ``values`` are Patient IDs (any issuer, unless ``issuer`` is given), Study, Series or SOP
    Instance UIDs.  Studies come oldest received first.
    """
    # received_at selected too: PostgreSQL orders a DISTINCT only by columns it returns.
    query: Any = Study.select(Study.id, Study.study_instance_uid, Study.received_at).distinct()
    if level is Level.PATIENT:
        query = query.join(Patient).where(Patient.patient_id.in_(list(values)))
        if issuer is not None:
            query = query.where(Patient.issuer_of_patient_id == issuer)
    elif level is Level.STUDY:
        query = query.where(Study.study_instance_uid.in_(list(values)))
    elif level is Level.SERIES:
        query = query.join(Series).where(Series.series_instance_uid.in_(list(values)))
    else:
        query = query.join(Series).join(Instance).where(
            Instance.sop_instance_uid.in_(list(values)))
    query = query.order_by(Study.received_at, Study.id)
    rows = cast(Iterable[tuple[int, str, Any]], query.tuples().execute(db))
    return [(int(study_id), str(uid)) for study_id, uid, _ in rows]


def remove_from_study(db: Database, study_id: int, level: Level,
                      values: Sequence[str]) -> StudyRemoval | None:
    """Remove from one study what ``level``/``values`` name (all of it for PATIENT/STUDY).

    One transaction.  None when the study no longer exists; ``leased`` when a retrieve holds
    it (nothing removed).  The files of the removed rows are listed for the caller to delete.
    """
    with db.atomic():
        lock: Any = Study.select(Study.id, Study.study_instance_uid).where(Study.id == study_id)
        if not isinstance(db, SqliteDatabase):
            # Waits for a retrieve taking its lease (FOR SHARE) to commit, and holds off one
            # that comes after, until this transaction ends (node.index.leases).
            lock = lock.for_update()
        found = cast(list[tuple[int, str]], list(lock.tuples().execute(db)))
        if not found:
            return None
        _, study_uid = found[0]
        removal = StudyRemoval(str(study_uid))
        if Study.select(Study.id).where((Study.id == study_id) & leased(Study.id)).exists(db):
            removal.leased = True
            return removal
        series_ids = Series.select(Series.id).where(Series.study == study_id)
        doomed: Any = Instance.select(Instance.id, Instance.digest, Instance.size,
                                      Instance.series).where(Instance.series.in_(series_ids))
        if level is Level.SERIES:
            doomed = doomed.join(Series).where(Series.series_instance_uid.in_(list(values)))
        elif level is Level.INSTANCE:
            doomed = doomed.where(Instance.sop_instance_uid.in_(list(values)))
        rows = cast(list[tuple[int, str, int, int]], list(doomed.tuples().execute(db)))
        removal.files = [RemovedFile(str(digest), int(size)) for _, digest, size, _ in rows]
        ids = [row_id for row_id, _, _, _ in rows]
        for start in range(0, len(ids), 500):  # bounded statement size on either database
            Instance.delete().where(Instance.id.in_(ids[start:start + 500])).execute(db)
        for series_id in sorted({int(series) for _, _, _, series in rows}):
            prune(db, series_id)
        removal.study_gone = not Study.select(Study.id).where(Study.id == study_id).exists(db)
    return removal
