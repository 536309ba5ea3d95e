"""Named DIMSE status codes (PS3.4 Annex B/C, PS3.7 Annex C) and the status dataset builder."""

from __future__ import annotations

from pydicom.dataset import Dataset

SUCCESS = 0x0000
# C-STORE (PS3.4 B.2.3)
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
# C-FIND (PS3.4 C.4.1.1.4)
PENDING = 0xFF00
CANCELLED = 0xFE00
IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
UNABLE_TO_PROCESS = 0xC000
# PS3.7 C.4 general status: the SOP Instance is already held (used with policy "reject").
DUPLICATE_SOP_INSTANCE = 0x0111

_ERROR_COMMENT_MAX = 64  # (0000,0902) is LO


def status_dataset(status: int, comment: str | None = None) -> Dataset:
    """A response status, with an Error Comment (0000,0902) when there is something to say."""
    ds = Dataset()
    ds.Status = status
    if comment:
        ds.ErrorComment = comment[:_ERROR_COMMENT_MAX]
    return ds
