"""PS3.4 C.2.2.2 attribute matching, turned into SQL conditions on the index columns.

Wildcards become LIKE patterns with ``%``, ``_`` and the escape character escaped, so they are
ordinary characters (a qrscp-style SQL injection of wildcards is impossible).  SQLite's LIKE is
made case-sensitive by the connection pragma ``case_sensitive_like``; person names compare
case-insensitively (when configured) through their case-folded column.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import reduce

from peewee import SQL, ColumnBase, Field, NodeList, Value, fn

from node.dicom.header import normalise_person_name
from node.query.keys import Key, Match
from node.query.request import InvalidQuery

ESCAPE = "\\"
_DATE = re.compile(r"^\d{8}$")
_TIME = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
# Sorts after every character a DA/TM/DT value holds: an upper bound "1200" then covers
# every time that starts with 12:00 (the bound's own precision).
_AFTER_ALL = "~"


def has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


def like_pattern(value: str) -> str:
    """A DICOM wildcard value as a LIKE pattern (PS3.4 C.2.2.2.4): '*' any run, '?' one."""
    escaped = (
        value.replace(ESCAPE, ESCAPE * 2).replace("%", ESCAPE + "%").replace("_", ESCAPE + "_")
    )
    return escaped.replace("*", "%").replace("?", "_")


def _like(column: Field, pattern: str) -> ColumnBase:
    # PS3.4 C.2.2.2.4 wildcards only; the escape makes '%' and '_' ordinary characters.
    return NodeList((column, SQL("LIKE"), Value(pattern), SQL(f"ESCAPE '{ESCAPE}'")))


def _any(conditions: Sequence[ColumnBase]) -> ColumnBase:
    return reduce(lambda a, b: a | b, conditions)


def _single_text(column: Field, value: str) -> ColumnBase:
    if has_wildcard(value):
        if value.strip("*") == "":
            return SQL("1 = 1")  # '*' alone matches everything, as universal matching does
        return _like(column, like_pattern(value))
    return column == value


def text_condition(key: Key, value: str, fold_names: bool) -> ColumnBase:
    """Single value, wildcard or multiple values (backslash-separated) on a text key."""
    column = key.column
    parts = value.split("\\")
    if key.match is Match.PERSON_NAME:
        # Indexed names carry no trailing empty components; neither may a literal query value.
        parts = [part if has_wildcard(part) else normalise_person_name(part) for part in parts]
        if fold_names and key.folded is not None:
            column, parts = key.folded, [part.casefold() for part in parts]
    return _any([_single_text(column, part) for part in parts])


def _check(pattern: re.Pattern[str], value: str, key: Key) -> str:
    if not pattern.match(value):
        raise InvalidQuery(f"{key.keyword} value is not a valid {key.match.value} or range")
    return value


def range_condition(key: Key, value: str) -> ColumnBase:
    """Single value or range 'a-b', 'a-', '-b' on DA/TM (PS3.4 C.2.2.2.5)."""
    pattern = _DATE if key.match is Match.DATE else _TIME
    if has_wildcard(value):
        raise InvalidQuery(f"{key.keyword} does not take wildcards")
    parts = []
    for single in value.split("\\"):
        if "-" not in single:
            parts.append(key.column == _check(pattern, single, key))
            continue
        low, high = single.split("-", 1)
        if not low and not high:
            raise InvalidQuery(f"{key.keyword} range has no bounds")
        bounds = []
        if low:
            bounds.append(key.column >= _check(pattern, low, key))
        if high:
            bounds.append(key.column <= _check(pattern, high, key) + _AFTER_ALL)
        # An empty stored value is no date: never inside a range.
        bounds.append(key.column != "")
        parts.append(reduce(lambda a, b: a & b, bounds))
    return _any(parts)


def date_time_condition(date: Key, time: Key, date_value: str, time_value: str) -> ColumnBase:
    """StudyDate and StudyTime ranges together are one date-time range (PS3.4 C.2.2.2.5.2)."""
    d_low, _, d_high = date_value.partition("-")
    t_low, _, t_high = time_value.partition("-")
    for value, pattern, key in ((d_low, _DATE, date), (d_high, _DATE, date),
                                (t_low, _TIME, time), (t_high, _TIME, time)):
        if value:
            _check(pattern, value, key)
    stamp = fn.COALESCE(date.column, "").concat(" ").concat(fn.COALESCE(time.column, ""))
    bounds: list[ColumnBase] = [date.column != ""]
    if d_low:
        bounds.append(stamp >= f"{d_low} {t_low}")
    if d_high:
        bounds.append(stamp <= f"{d_high} {t_high or ''}{_AFTER_ALL}")
    return reduce(lambda a, b: a & b, bounds)


def uid_condition(key: Key, value: str) -> ColumnBase:
    """Single UID or list of UIDs (PS3.4 C.2.2.2.2); wildcards are not allowed on UIDs."""
    if has_wildcard(value):
        raise InvalidQuery(f"{key.keyword} does not take wildcards")
    uids = [u.strip() for u in value.split("\\") if u.strip()]
    return key.column == uids[0] if len(uids) == 1 else key.column.in_(uids)


def number_condition(key: Key, value: str) -> ColumnBase:
    try:
        numbers = [int(v) for v in value.split("\\")]
    except ValueError as exc:
        raise InvalidQuery(f"{key.keyword} value is not a number") from exc
    return key.column.in_(numbers) if len(numbers) > 1 else key.column == numbers[0]


def condition(key: Key, value: str, fold_names: bool) -> ColumnBase:
    """The SQL condition for ``key`` matching ``value``."""
    if key.match in (Match.TEXT, Match.PERSON_NAME):
        return text_condition(key, value, fold_names)
    if key.match in (Match.DATE, Match.TIME):
        return range_condition(key, value)
    if key.match is Match.UID:
        return uid_condition(key, value)
    return number_condition(key, value)
