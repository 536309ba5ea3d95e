"""C-MOVE and C-GET SCU (PS3.4 C.4.2, C.4.3): ask a peer AE to send instances.

``move`` asks the peer to send what the identifier names to a destination AE (the node's own
title when pulling) over an association the peer opens. ``get`` asks it to send them back on
the same association: the node proposes the storage SOP classes with the SCP role (SCP/SCU Role
Selection, PS3.7 D.3.3.4) and hands each received instance to a ``receive`` function (the
node's ingest path), answering the C-STORE sub-operation with the status its outcome deserves.

Both report the Pending responses' sub-operation counts to a callback and turn the final status
into a ``SubOperations`` result (Success, or a Warning such as 0xB000 with failures counted) or a
``node.remote.errors`` exception (failure, cancel, an abort or silence).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import cast

from pydicom import uid
from pydicom.dataset import Dataset
from pynetdicom import StoragePresentationContexts, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
from pynetdicom.presentation import PresentationContext, build_context, build_role
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from node.config import Peer
from node.dicom.contexts import STORAGE_TRANSFER_SYNTAXES
from node.dimse.status import (
    MOVE_DESTINATION_UNKNOWN,
    OUT_OF_RESOURCES,
    SUCCESS,
    describe_status,
    is_pending,
    is_warning,
    status_dataset,
    store_failure,
)
from node.errors import (
    NodeError,
)
from node.index.writer import Source
from node.ingest import Received
from node.remote.errors import (
    MoveDestinationUnknown,
    RetrieveFailed,
    ServiceNotSupported,
)
from node.remote.pull import SubOperations
from node.scu.association import check_calling_ae, close, open_association, where
from node.scu.send import paused_while

log = logging.getLogger(__name__)

ProgressCallback = Callable[[SubOperations], None]

_MOVE_MODELS = {
    "patient": PatientRootQueryRetrieveInformationModelMove,
    "study": StudyRootQueryRetrieveInformationModelMove,
}
_GET_MODELS = {
    "patient": PatientRootQueryRetrieveInformationModelGet,
    "study": StudyRootQueryRetrieveInformationModelGet,
}
_COMMAND_SYNTAXES: list[str | uid.UID] = [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian]
_UNCOMPRESSED: list[str | uid.UID] = [
    uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian, uid.ExplicitVRBigEndian
]
# One context per other syntax: the peer then finds a context in the syntax it stores an
# instance in and sends it as stored, without decompressing it for us.
_OTHER_SYNTAXES = [ts for ts in STORAGE_TRANSFER_SYNTAXES if ts not in _UNCOMPRESSED]
# PS3.8 9.3.2.2: presentation context IDs are odd numbers 1-255, so at most 128 contexts.
MAX_CONTEXTS = 128


def move(
    peer: Peer,
    calling_ae: str,
    identifier: Dataset,
    destination: str,
    timeout: float = 30,
    on_progress: ProgressCallback | None = None,
    root: str = "study",
    tls: ssl.SSLContext | None = None,
) -> SubOperations:
    """C-MOVE what ``identifier`` names from ``peer`` to the AE titled ``destination``.

    Raises PeerUnavailable / ServiceNotSupported (no association or no C-MOVE),
    MoveDestinationUnknown (0xA801), RetrieveFailed (another failure or cancel status, an abort,
    or no answer within ``timeout`` seconds of waiting for one message).
    """
    model = _MOVE_MODELS[root]
    assoc = open_association(
        peer, check_calling_ae(calling_ae), [build_context(model, _COMMAND_SYNTAXES)], timeout,
        service=f"C-MOVE in the {root.capitalize()} Root Query/Retrieve information model",
        tls=tls,
    )
    finished = False
    try:
        try:
            responses: Iterator[tuple[Dataset, Dataset | None]] = paused_while(
                assoc, lambda: assoc.send_c_move(identifier, destination, model))
        except (ValueError, RuntimeError) as exc:  # identifier not encodable, association gone
            raise RetrieveFailed(f"cannot send the C-MOVE to {where(peer)}: {exc}") from exc
        final = _follow(peer, "C-MOVE", responses, on_progress, timeout)
        finished = True
    finally:
        close(assoc, finished)
    if final.status == MOVE_DESTINATION_UNKNOWN:
        raise MoveDestinationUnknown(
            f"{where(peer)} does not know the move destination {destination} "
            f"({describe_status(final.status)}): its administrator must add {destination} "
            "with this node's host and port", final.status, final.comment,
        )
    try:
        return final.result(peer, "C-MOVE")
    except RetrieveFailed as exc:
        if final.counts.completed or final.counts.warning:
            raise
        # Some archives (Orthanc) answer an unknown destination with 0xC000, not 0xA801.
        raise RetrieveFailed(f"{exc} (does {peer.ae_title} know {destination} as a move "
                             "destination?)", exc.status, exc.comment) from exc


def get(
    peer: Peer,
    calling_ae: str,
    identifier: Dataset,
    sop_classes: Iterable[str],
    receive: Callable[[Received], object],
    timeout: float = 30,
    on_progress: ProgressCallback | None = None,
    root: str = "study",
    tls: ssl.SSLContext | None = None,
) -> SubOperations:
    """C-GET what ``identifier`` names from ``peer``; each instance goes to ``receive``.

    ``sop_classes``: the storage SOP classes of the instances expected (empty: unknown, then
    the most common storage classes are offered). ``receive`` raises a NodeError (or OSError)
    when it cannot keep an instance; that sub-operation is then answered with a failure status.
    Raises as ``move`` does (except MoveDestinationUnknown).
    """
    model = _GET_MODELS[root]
    contexts, roles = get_contexts(model, sorted(set(sop_classes)))
    source = Source(peer.ae_title, peer.host)
    assoc = open_association(
        peer, check_calling_ae(calling_ae), contexts, timeout,
        service=f"C-GET in the {root.capitalize()} Root Query/Retrieve information model",
        ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, _on_store, [receive, source])],
        tls=tls,
    )
    finished = False
    try:
        if not any(cx.abstract_syntax == model for cx in assoc.accepted_contexts):
            raise ServiceNotSupported(
                f"{where(peer)} does not offer C-GET in the {root.capitalize()} Root "
                "Query/Retrieve information model (presentation context not accepted)"
            )
        try:
            responses = paused_while(assoc, lambda: assoc.send_c_get(identifier, model))
        except (ValueError, RuntimeError) as exc:
            raise RetrieveFailed(f"cannot send the C-GET to {where(peer)}: {exc}") from exc
        final = _follow(peer, "C-GET", responses, on_progress, timeout)
        finished = True
    finally:
        close(assoc, finished)
    return final.result(peer, "C-GET")


def get_contexts(
    model: str, sop_classes: Sequence[str]
) -> tuple[list[PresentationContext], list[SCP_SCU_RoleSelectionNegotiation]]:
    """Presentation contexts and role selection items for a C-GET receiving ``sop_classes``.

    One context for the C-GET itself; per storage class one context with the uncompressed
    syntaxes, then as many single-syntax contexts for the compressed syntaxes as the 128
    contexts of an association leave room for (PS3.8 9.3.2.2). Each storage class gets a role
    selection item proposing the SCP role for the node (PS3.7 D.3.3.4).
    """
    classes = list(sop_classes) or [str(cx.abstract_syntax) for cx in StoragePresentationContexts]
    room = MAX_CONTEXTS - 1
    if len(classes) > room:
        raise RetrieveFailed(
            f"a C-GET can receive at most {room} SOP classes on one association; "
            f"this one needs {len(classes)}"
        )
    extra = min(len(_OTHER_SYNTAXES), (room - len(classes)) // len(classes))
    contexts = [build_context(model, _COMMAND_SYNTAXES)]
    for sop_class in classes:
        contexts.append(build_context(sop_class, _UNCOMPRESSED))
        contexts.extend(build_context(sop_class, ts) for ts in _OTHER_SYNTAXES[:extra])
    roles = [build_role(sop_class, scp_role=True) for sop_class in classes]
    return contexts, roles


def _on_store(event: Event, receive: Callable[[Received], object],
              source: Source) -> Dataset | int:
    """A C-STORE sub-operation of our C-GET: the same ``Received`` the C-STORE SCP builds."""
    request = cast(C_STORE, event.request)
    item = Received(
        sop_class_uid=str(request.AffectedSOPClassUID),
        sop_instance_uid=str(request.AffectedSOPInstanceUID),
        transfer_syntax=str(event.context.transfer_syntax),
        dataset=event.encoded_dataset(include_meta=False),
        source=source,
    )
    try:
        receive(item)
    except NodeError as exc:
        status = store_failure(exc)  # answered as the node's C-STORE SCP would
        log.warning("C-GET sub-operation %s refused: %s", item.sop_instance_uid, exc)
        return status_dataset(status, str(exc))
    except OSError as exc:  # an I/O error in the store
        log.error("C-GET sub-operation %s: store I/O error: %s", item.sop_instance_uid, exc)
        return status_dataset(OUT_OF_RESOURCES, "storage I/O error")
    return SUCCESS


@dataclass(frozen=True)
class _Final:
    """The final response of a C-MOVE/C-GET."""

    status: int
    counts: SubOperations
    comment: str
    failed_uids: tuple[str, ...]

    def result(self, peer: Peer, operation: str) -> SubOperations:
        if self.status == SUCCESS:
            return self.counts
        if is_warning(self.status):  # PS3.4 C.4.2.1.5: 0xB000, some sub-operations failed
            log.debug("%s %s ended with %s; failed: %s", operation, where(peer),
                      describe_status(self.status), ", ".join(self.failed_uids) or "-")
            return self.counts
        raise RetrieveFailed(
            f"{where(peer)} answered the {operation} with status {describe_status(self.status)}"
            + (f": {self.comment}" if self.comment else ""),
            self.status, self.comment,
        )


def _counts(status: Dataset) -> SubOperations:
    def number(keyword: str) -> int:
        value = status.get(keyword)
        return int(value) if value is not None else 0

    return SubOperations(
        remaining=number("NumberOfRemainingSuboperations"),
        completed=number("NumberOfCompletedSuboperations"),
        failed=number("NumberOfFailedSuboperations"),
        warning=number("NumberOfWarningSuboperations"),
    )


def _follow(peer: Peer, operation: str, responses: Iterator[tuple[Dataset, Dataset | None]],
            on_progress: ProgressCallback | None, timeout: float) -> _Final:
    """Read the responses up to the final one; Pending counts go to ``on_progress``."""
    last = SubOperations()
    for status, identifier in responses:
        if "Status" not in status:  # pynetdicom's sign of an abort, a timeout or a bad message
            raise RetrieveFailed(
                f"{where(peer)} aborted the association or sent no valid answer to the "
                f"{operation} within {timeout:g} s (after {last.done} sub-operations)"
            )
        code = int(status.Status)
        counts = _counts(status)
        if is_pending(code):
            last = counts
            if on_progress is not None:
                on_progress(counts)
            continue
        failed: tuple[str, ...] = ()
        if identifier is not None and "FailedSOPInstanceUIDList" in identifier:
            value = identifier.FailedSOPInstanceUIDList
            values = [value] if isinstance(value, str) else list(value or [])
            failed = tuple(str(v) for v in values if v)
        comment = str(status.get("ErrorComment", "") or "").strip()
        return _Final(code, counts, comment, failed)
    raise RetrieveFailed(f"{where(peer)} ended the {operation} without a final response")
