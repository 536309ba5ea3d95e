"""Answer a FindRequest from the index: one SQL statement, rows streamed into identifiers.

Whatever the number of matches, a query runs one SELECT: computed attributes (counts, Modalities
in Study, SOP Classes in Study) are correlated sub-selects served by the foreign-key indexes,
never Python loops over instances.  Keys the index does not hold are read from one stored file
of each matching entity (PS3.4 C.2.2.1.3: any attribute the SCP holds may be returned).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from peewee import SQL, ColumnBase, Database, NodeList, Select, SqliteDatabase, fn
from pydicom import dcmread
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import BaseTag

from node.errors import NodeError
from node.index.models import Instance, Patient, Series, Study
from node.query.keys import COMPUTED, KEYS, NODE_KEYS, Key, Level, Match, Root
from node.query.matching import condition, date_time_condition
from node.query.request import FindRequest, Returned
from node.store import Store

log = logging.getLogger(__name__)

# A response identifier: its elements by tag, as a pydicom Dataset holds them (``Dataset(it)``
# wraps it without copying).  Index values are RawDataElements already encoded; values read
# from a stored file are pydicom's DataElements.  No Dataset per match: building one costs
# more than the rest of the match.
Identifier = dict[BaseTag, RawDataElement | DataElement]

RESPONSE_CHARACTER_SET = "ISO_IR 192"  # responses are UTF-8 (PS3.5 6.1.2.3)
_MODELS = {Level.PATIENT: Patient, Level.STUDY: Study, Level.SERIES: Series,
           Level.IMAGE: Instance}
_FILE_DIGEST = "__digest"


class TooManyMatches(NodeError):
    """More matches than the configured maximum; the answer so far is incomplete."""


class Finder:
    """Runs C-FIND requests against the index (and the store, for unindexed keys)."""

    def __init__(self, db: Database, store: Store, ae_title: str, fold_names: bool = True,
                 max_matches: int = 0) -> None:
        self.db = db
        self.store = store
        self.ae_title = ae_title
        self.fold_names = fold_names
        self.max_matches = max_matches

    def find(self, request: FindRequest) -> Iterator[Identifier]:
        """Yield one response identifier per matching entity, as the rows are read."""
        query, columns = self.select(request)
        from_file = [r for r in request.returned if _answered_from_file(r, request.level)]
        for count, row in enumerate(query.tuples().iterator(), start=1):
            if self.max_matches and count > self.max_matches:
                raise TooManyMatches(f"more than {self.max_matches} matches; refine the query")
            values = dict(zip(columns, row, strict=True))
            yield self._identifier(request, values, from_file)

    def select(self, request: FindRequest) -> tuple[Select, list[str]]:
        """The SELECT for ``request`` and the names of its columns, in order."""
        level = request.level
        model = _MODELS[level]
        selected: dict[str, Any] = {}  # columns and sub-selects
        for returned in request.returned:
            key = KEYS.get(returned.keyword)
            if key is not None and key.level <= level:
                selected[returned.keyword] = key.column
            elif _computed_at(returned.keyword, request) == level:
                selected[returned.keyword] = self._computed(returned.keyword)
        if any(_answered_from_file(r, level) for r in request.returned):
            selected[_FILE_DIGEST] = _representative_digest(level)
        if not selected:
            selected["__id"] = model.id
        query = model.select(*(node.alias(f"c{i}") for i, node in enumerate(selected.values())))
        for parent in (Series, Study, Patient)[3 - level:]:
            query = query.join(parent)
        where = self._conditions(request)
        if where is not None:
            query = query.where(where)
        return query, list(selected)

    def _conditions(self, request: FindRequest) -> ColumnBase | None:
        conditions = dict(request.conditions)
        parts: list[ColumnBase] = []
        date, time = conditions.get("StudyDate", ""), conditions.get("StudyTime", "")
        if request.combined_date_time and "-" in date and "-" in time:
            # One date-time range (PS3.4 C.2.2.2.5.2), as the SCU negotiated (C.5.1.1.2).
            parts.append(date_time_condition(KEYS["StudyDate"], KEYS["StudyTime"], date, time))
            del conditions["StudyDate"], conditions["StudyTime"]
        modalities = conditions.pop("ModalitiesInStudy", None)
        if modalities is not None:
            parts.append(self._modality_in_study(modalities))
        for keyword, value in conditions.items():
            parts.append(condition(KEYS[keyword], value, self.fold_names))
        if not parts:
            return None
        where = parts[0]
        for part in parts[1:]:
            where = where & part
        return where

    def _modality_in_study(self, value: str) -> ColumnBase:
        """A study matches when any of its series' modalities matches (PS3.4 C.6.2.1.2)."""
        series = Series.alias("mis")
        modality = Key("Modality", Level.SERIES, series.modality, Match.TEXT)
        match = condition(modality, value, self.fold_names)
        # An IN over the series' modality index lets the database start from the matching
        # series and look their studies up by key, instead of testing every study.
        return Study.id.in_(series.select(series.study).where(match))

    def _computed(self, keyword: str) -> Any:
        """Correlated sub-select for a computed attribute of the current row."""
        series, instance, study = Series.alias("cs"), Instance.alias("ci"), Study.alias("cst")
        count_instances = fn.COUNT(instance.id)
        if keyword == "NumberOfStudyRelatedSeries":
            return series.select(fn.COUNT(series.id)).where(series.study == Study.id)
        if keyword == "NumberOfStudyRelatedInstances":
            return (instance.select(count_instances).join(series)
                    .where(series.study == Study.id))
        if keyword == "NumberOfSeriesRelatedInstances":
            return instance.select(count_instances).where(instance.series == Series.id)
        if keyword == "NumberOfPatientRelatedStudies":
            return study.select(fn.COUNT(study.id)).where(study.patient == Patient.id)
        if keyword == "NumberOfPatientRelatedSeries":
            return (series.select(fn.COUNT(series.id)).join(study)
                    .where(study.patient == Patient.id))
        if keyword == "NumberOfPatientRelatedInstances":
            return (instance.select(count_instances).join(series).join(study)
                    .where(study.patient == Patient.id))
        if keyword == "ModalitiesInStudy":
            return series.select(self._distinct_list(series.modality)).where(
                series.study == Study.id)
        if keyword == "SOPClassesInStudy":
            return (instance.select(self._distinct_list(instance.sop_class_uid)).join(series)
                    .where(series.study == Study.id))
        raise AssertionError(keyword)

    def _distinct_list(self, column: Any) -> ColumnBase:
        """Distinct values joined by ',' (neither CS nor UI values contain a comma)."""
        if isinstance(self.db, SqliteDatabase):
            return NodeList((SQL("group_concat(DISTINCT"), column, SQL(")")), glue=" ")
        return NodeList((SQL("string_agg(DISTINCT"), column, SQL(", ',')")), glue=" ")

    def _identifier(self, request: FindRequest, values: dict[str, Any],
                    from_file: list[Returned]) -> Identifier:
        level = _LEVELS[request.level]
        identifier: Identifier = {_CHARSET.tag: _CHARSET, level.tag: level}
        stored = self._read_file(values.get(_FILE_DIGEST), from_file) if from_file else None
        for returned in request.returned:
            if stored is not None and returned.tag in stored:
                identifier[returned.tag] = stored[returned.tag]
                continue
            identifier[returned.tag] = _encoded(returned, self._value(returned, values))
        return identifier

    def _value(self, returned: Returned, values: dict[str, Any]) -> Any:
        keyword = returned.keyword
        if keyword == "RetrieveAETitle":
            return self.ae_title
        if keyword == "InstanceAvailability":
            return "ONLINE"
        value = values.get(keyword)
        if value is None or value == "":
            return None  # zero length: the node has no value (PS3.4 C.4.1.1.3.2)
        if keyword in ("ModalitiesInStudy", "SOPClassesInStudy"):
            return sorted(str(value).split(","))
        key = KEYS.get(keyword)
        if isinstance(value, int) or (key is not None and key.match is Match.NUMBER):
            return str(value)
        return value

    def _read_file(self, digest: str | None, wanted: list[Returned]) -> Dataset | None:
        if not digest:
            return None
        try:
            return dcmread(self.store.path_of(digest), stop_before_pixels=True,
                           specific_tags=[r.tag for r in wanted])
        except (OSError, InvalidDicomError) as exc:
            log.warning("could not read stored file %s for C-FIND: %s", digest, exc)
            return None


def _encoded(returned: Returned, value: Any) -> RawDataElement:
    """An element already encoded in the response character set (UTF-8, PS3.5 6.1.2.3).

    Every value the index answers is text (IS numbers included), so its bytes are the same in
    every transfer syntax; pydicom writes a raw element as it is, which spares building and
    validating a DataElement per key per match (most of a response's cost otherwise).
    """
    if value is None:
        data = b""
    else:
        text = "\\".join(value) if isinstance(value, list) else str(value)
        data = text.encode("utf-8")
        if len(data) % 2:  # PS3.5 7.1.1: even length; UI pads with NUL, text with a space
            data += b"\0" if returned.vr == "UI" else b" "
    return RawDataElement(BaseTag(returned.tag), returned.vr, len(data), data, 0, False, True)


def _text_element(tag: int, vr: str, text: str) -> RawDataElement:
    data = (text + " " * (len(text) % 2)).encode("ascii")  # PS3.5 7.1.1: even length
    return RawDataElement(BaseTag(tag), vr, len(data), data, 0, False, True)


# Every match carries the response character set and its level, ready encoded.
_CHARSET = _text_element(0x00080005, "CS", RESPONSE_CHARACTER_SET)
_LEVELS = {level: _text_element(0x00080052, "CS", level.name) for level in Level}


def _computed_at(keyword: str, request: FindRequest) -> Level | None:
    """The level whose rows a computed key is answered on, for this request's root.

    The Study Root has no PATIENT level, so its STUDY level answers the patient's counts too
    (PS3.4 C.6.2.1.2, Table C.6-5); the query joins each study to its patient.
    """
    level = COMPUTED.get(keyword)
    if level is Level.PATIENT and request.root is Root.STUDY:
        return Level.STUDY
    return level


def _answered_from_file(returned: Returned, level: Level) -> bool:
    """True for keys the index does not hold (read from a stored file of the entity)."""
    keyword = returned.keyword
    return keyword not in KEYS and keyword not in COMPUTED and keyword not in NODE_KEYS


def _representative_digest(level: Level) -> Any:
    """The digest of one stored file of the row's entity, to read unindexed keys from."""
    if level is Level.IMAGE:
        return Instance.digest
    instance, series, study = Instance.alias("fi"), Series.alias("fs"), Study.alias("fst")
    if level is Level.SERIES:
        return instance.select(fn.MIN(instance.digest)).where(instance.series == Series.id)
    if level is Level.STUDY:
        return (instance.select(fn.MIN(instance.digest)).join(series)
                .where(series.study == Study.id))
    return (instance.select(fn.MIN(instance.digest)).join(series).join(study)
            .where(study.patient == Patient.id))
