"""Named DIMSE status codes (PS3.4 Annex B/C, PS3.7 Annex C) and the status dataset builder.

Only the edge of the node deals in these: the service handlers (``node.handlers``) turn
domain exceptions into them, and the clients (``node.scu``) turn them back into exceptions.
"""

from __future__ import annotations

from pydicom.dataset import Dataset

from node.errors import (
    DuplicateRejected,
    InvalidDataset,
    NodeError,
    OutOfResources,
    UnreadableDataset,
)

SUCCESS = 0x0000
# PS3.7 C.3: 0x0001 and 0xBxxx are warnings.
WARNING = 0x0001
WARNING_FIRST, WARNING_LAST = 0xB000, 0xBFFF
# C-STORE (PS3.4 B.2.3)
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
# C-FIND (PS3.4 C.4.1.1.4)
PENDING = 0xFF00
PENDING_WARNING = 0xFF01  # a match; one or more optional keys were not supported
CANCELLED = 0xFE00
IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
UNABLE_TO_PROCESS = 0xC000
UNABLE_TO_PROCESS_FIRST, UNABLE_TO_PROCESS_LAST = 0xC000, 0xCFFF
# C-MOVE / C-GET (PS3.4 C.4.2.1.5, C.4.3.1.4)
OUT_OF_RESOURCES_MATCHES = 0xA701  # unable to calculate number of matches
OUT_OF_RESOURCES_SUB_OPERATIONS = 0xA702  # unable to perform sub-operations
MOVE_DESTINATION_UNKNOWN = 0xA801
SUB_OPERATIONS_COMPLETE_WITH_FAILURES = 0xB000
# PS3.7 C.4 general status: the SOP Instance is already held (used with policy "reject").
DUPLICATE_SOP_INSTANCE = 0x0111
SOP_CLASS_NOT_SUPPORTED = 0x0122
PROCESSING_FAILURE = 0x0110  # PS3.7 C.4: general failure
NOT_AUTHORIZED = 0x0124  # PS3.7 C.5.x: Refused: Not Authorized (any DIMSE service)

_ERROR_COMMENT_MAX = 64  # (0000,0902) is LO

_NAMES = {
    SUCCESS: "Success",
    CANCELLED: "Cancel",
    OUT_OF_RESOURCES: "Refused: Out of Resources",
    OUT_OF_RESOURCES_MATCHES: "Refused: Out of Resources - Unable to calculate number of matches",
    OUT_OF_RESOURCES_SUB_OPERATIONS:
        "Refused: Out of Resources - Unable to perform sub-operations",
    MOVE_DESTINATION_UNKNOWN: "Refused: Move Destination unknown",
    IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS: "Identifier Does Not Match SOP Class",
    SUB_OPERATIONS_COMPLETE_WITH_FAILURES: "Sub-operations Complete - One or more Failures",
    DUPLICATE_SOP_INSTANCE: "Duplicate SOP Instance",
    SOP_CLASS_NOT_SUPPORTED: "SOP Class not Supported",
}


def is_pending(status: int) -> bool:
    return status in (PENDING, PENDING_WARNING)


def is_warning(status: int) -> bool:
    return status == WARNING or WARNING_FIRST <= status <= WARNING_LAST


def describe_status(status: int) -> str:
    """``0xA900 (Identifier Does Not Match SOP Class)``: the code in hex and what it means."""
    name = _NAMES.get(status)
    if name is None and UNABLE_TO_PROCESS_FIRST <= status <= UNABLE_TO_PROCESS_LAST:
        name = "Unable to Process"
    return f"0x{status:04X}" + (f" ({name})" if name else "")


# How a C-STORE (or a C-GET sub-operation the node receives) answers an instance the ingest
# path refused (PS3.4 B.2.3).
_STORE_FAILURES: list[tuple[type[NodeError], int]] = [
    (UnreadableDataset, CANNOT_UNDERSTAND),
    (InvalidDataset, DATASET_DOES_NOT_MATCH_SOP_CLASS),
    (DuplicateRejected, DUPLICATE_SOP_INSTANCE),
    (OutOfResources, OUT_OF_RESOURCES),
]


def store_failure(exc: NodeError) -> int:
    """The C-STORE status for an instance the ingest path refused with ``exc``."""
    return next((code for kind, code in _STORE_FAILURES if isinstance(exc, kind)),
                PROCESSING_FAILURE)


def status_dataset(status: int, comment: str | None = None) -> Dataset:
    """A response status, with an Error Comment (0000,0902) when there is something to say."""
    ds = Dataset()
    ds.Status = status
    if comment:
        ds.ErrorComment = comment[:_ERROR_COMMENT_MAX]
    return ds
