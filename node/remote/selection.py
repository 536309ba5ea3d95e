"""What to pull: the user's selectors, checked, turned into a STUDY-level query, and re-checked.

A remote that ignores a key it does not support answers more than was asked (DCMTK's dcmqrscp
ignores Modalities in Study, for one), so ``Selection.mismatch`` checks every answer again
against the values it returns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from pydicom.dataset import Dataset

from node.remote.errors import InvalidQuery

UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_DATE_RANGE = re.compile(r"^(\d{8})?(-(\d{8})?)?$")
_EXACT_FORBIDDEN = set("*?\\")  # PS3.4 C.2.2.2.4 wildcards, and the value separator


# --- What to pull -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """The user's selectors; empty means "not given". ``everything`` must be said explicitly."""

    patient_id: str = ""
    study_uids: tuple[str, ...] = ()
    accession: str = ""
    modality: str = ""
    date: str = ""  # YYYYMMDD, or a range: YYYYMMDD-YYYYMMDD, YYYYMMDD-, -YYYYMMDD
    everything: bool = False

    def check(self) -> Selection:
        """This selection, normalised; raises InvalidQuery naming what is wrong."""
        given = any((self.patient_id, self.study_uids, self.accession, self.modality, self.date))
        if not given and not self.everything:
            raise InvalidQuery(
                "pull needs at least one selector (--patient-id, --study, --accession, "
                "--modality, --date), or --all to pull every study the peer has"
            )
        if given and self.everything:
            raise InvalidQuery("--all cannot be combined with selectors")
        for name, value in (("--patient-id", self.patient_id), ("--accession", self.accession),
                            ("--modality", self.modality)):
            if value and (_EXACT_FORBIDDEN & set(value) or value != value.strip()):
                raise InvalidQuery(f"{name} {value!r}: give one exact value, no wildcards")
        for uid in self.study_uids:
            if len(uid) > 64 or not UID_PATTERN.match(uid):
                raise InvalidQuery(f"--study {uid!r} is not a UID (digits and dots, <= 64)")
        if self.date:
            _date_bounds(self.date)
        return Selection(self.patient_id, tuple(dict.fromkeys(self.study_uids)), self.accession,
                         self.modality.upper(), self.date, self.everything)

    def study_keys(self) -> dict[str, str]:
        """C-FIND STUDY-level keys: the selectors as matching keys (PS3.4 C.2.2.2), plus the
        optional SOP Classes in Study, which a C-GET offers where the IMAGE level does not
        return SOP Class UIDs."""
        keys = {"SOPClassesInStudy": ""}
        if self.patient_id:
            keys["PatientID"] = self.patient_id
        if self.study_uids:
            keys["StudyInstanceUID"] = "\\".join(self.study_uids)  # list of UIDs, C.2.2.2.2
        if self.accession:
            keys["AccessionNumber"] = self.accession
        if self.modality:
            keys["ModalitiesInStudy"] = self.modality
        if self.date:
            keys["StudyDate"] = self.date  # range matching, C.2.2.2.5
        return keys

    def mismatch(self, study: Dataset) -> str:
        """Why a STUDY-level answer does not fit the selection ("" when it fits, as far as the
        values it returns show)."""
        uid = text_of(study, "StudyInstanceUID")
        if not uid or len(uid) > 64 or not UID_PATTERN.match(uid):
            return "no valid Study Instance UID"
        if self.study_uids and uid not in self.study_uids:
            return "other Study Instance UID"
        for keyword, wanted in (("PatientID", self.patient_id),
                                ("AccessionNumber", self.accession)):
            value = text_of(study, keyword)
            if wanted and value and value != wanted:
                return f"other {keyword}"
        date = text_of(study, "StudyDate")
        if self.date and date:
            low, high = _date_bounds(self.date)
            if not low <= date <= high:
                return "StudyDate out of range"
        modalities = values_of(study, "ModalitiesInStudy")
        if self.modality and modalities and self.modality not in modalities:
            return "other ModalitiesInStudy"
        return ""


def _date_bounds(text: str) -> tuple[str, str]:
    """The inclusive (low, high) YYYYMMDD bounds of a date or date range; InvalidQuery if bad."""
    match = _DATE_RANGE.match(text)
    if not match or not (match[1] or match[3]):
        raise InvalidQuery(f"--date {text!r}: use YYYYMMDD, YYYYMMDD-YYYYMMDD, YYYYMMDD- "
                           "or -YYYYMMDD")
    low = match[1] or "00000000"
    high = match[3] or ("99999999" if match[2] else low)
    for value in (match[1], match[3]):
        if value:
            try:
                datetime.strptime(value, "%Y%m%d")
            except ValueError:
                raise InvalidQuery(f"--date {text!r}: {value} is not a date") from None
    if low > high:
        raise InvalidQuery(f"--date {text!r}: the range ends before it starts")
    return low, high


def text_of(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def values_of(ds: Dataset, keyword: str) -> tuple[str, ...]:
    value = ds.get(keyword)
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split("\\") if v.strip())
    return tuple(str(v).strip() for v in value if str(v).strip())
