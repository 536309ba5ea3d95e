"""What C-MOVE and C-GET share at the DIMSE edge: the exchange with the requester.

``RetrieveService`` takes C-MOVE and C-GET requests off an association (a ``DirectService``,
node.handlers.direct) before pynetdicom's own Query/Retrieve service class sees them, because
that class cannot serve them the way the node must: it sends only ``Dataset`` objects it
re-encodes (never a stored file as it is), opens the C-MOVE association itself, answers an
unreachable destination 0xA801 and puts empty UIDs in the Failed SOP Instance UID List
(pynetdicom 3.0 service_class.py ``_move_scp``/``_get_scp``).  The handlers in
``node.handlers.move`` and ``get`` run on the association's reactor thread, as pynetdicom's
would, and answer through a ``Retrieval``: Pending responses with the sub-operation counts,
C-CANCEL checks between sub-operations, the final status and one INFO log line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_GET, C_MOVE
from pynetdicom.dsutils import decode, encode
from pynetdicom.presentation import PresentationContext

from node.dimse.status import (
    CANCELLED,
    IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
    OUT_OF_RESOURCES_MATCHES,
    OUT_OF_RESOURCES_SUB_OPERATIONS,
    PENDING,
    SUB_OPERATIONS_COMPLETE_WITH_FAILURES,
    SUCCESS,
    UNABLE_TO_PROCESS,
)
from node.errors import OutOfResources
from node.metrics import NO_METRICS, Recorder
from node.query.keys import Root
from node.retrieve.plan import RetrievePlanner, StoredInstance
from node.retrieve.request import InvalidRetrieve
from node.scu.messages import (
    C_GET_RSP,
    C_MOVE_RSP,
    ConnectionLost,
    retrieve_response,
    transmit,
)
from node.scu.send import Result, Sent

log = logging.getLogger(__name__)

# PS3.4 C.6.1.3, C.6.2.3: the retrieve SOP classes the node serves, and their model.
MOVE_MODELS = {
    "1.2.840.10008.5.1.4.1.2.1.2": Root.PATIENT,  # Patient Root Q/R Information Model - MOVE
    "1.2.840.10008.5.1.4.1.2.2.2": Root.STUDY,  # Study Root Q/R Information Model - MOVE
}
GET_MODELS = {
    "1.2.840.10008.5.1.4.1.2.1.3": Root.PATIENT,  # Patient Root Q/R Information Model - GET
    "1.2.840.10008.5.1.4.1.2.2.3": Root.STUDY,  # Study Root Q/R Information Model - GET
}
# The sub-operation counts are US (PS3.7 9.3.3.2, 9.3.4.2): a retrieve of more cannot be told.
MAX_SUB_OPERATIONS = 0xFFFF
# (0008,0058) is UI: in an explicit VR identifier its value has a 2-byte length (PS3.5 7.1.2).
_MAX_EXPLICIT_VALUE = 0xFFFE
# Seconds between Pending responses (optional, PS3.4 C.4.2.3.1; see run_sub_operations).
PENDING_INTERVAL = 0.1


@dataclass
class Tally:
    """Sub-operation counts of one retrieve (PS3.4 C.4.2.1.6-9) and the UIDs that failed."""

    remaining: int
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)

    @classmethod
    def all_failed(cls, instances: list[StoredInstance]) -> Tally:
        return cls(0, failed=len(instances), failed_uids=[i.sop_instance_uid for i in instances])

    def count(self, instance: StoredInstance, sent: Sent) -> None:
        self.remaining -= 1
        if sent.result is Result.COMPLETED:
            self.completed += 1
        elif sent.result is Result.WARNING:
            self.warning += 1
        else:
            self.failed += 1
            self.failed_uids.append(instance.sop_instance_uid)


def final_status(tally: Tally, cancelled: bool) -> int:
    """The final status of a retrieve whose sub-operations ended as ``tally`` says.

    PS3.4 C.4.2.3.1 and C.4.3.3.1: Success if all sub-operations completed; Failure if all were
    unsuccessful, for which the node answers 0xA702 "Refused: Out of resources - Unable to
    perform sub-operations", the one failure of Tables C.4-2/C.4-3 whose related fields are the
    sub-operation counts (also when the destination cannot be reached: that is every
    sub-operation failing, not an unknown destination); Warning (0xB000) in every other case.
    """
    if cancelled:
        return CANCELLED
    if tally.failed == 0 and tally.warning == 0:
        return SUCCESS
    if tally.completed == 0 and tally.warning == 0:
        return OUT_OF_RESOURCES_SUB_OPERATIONS
    return SUB_OPERATIONS_COMPLETE_WITH_FAILURES


class Retrieval:
    """One C-MOVE or C-GET request being answered on the requester's association."""

    def __init__(self, assoc: Association, request: C_MOVE | C_GET,
                 context: PresentationContext, root: Root,
                 metrics: Recorder = NO_METRICS) -> None:
        self.assoc = assoc
        self.metrics = metrics
        self.request = request
        self.context = context
        self.root = root
        self.service = "C-MOVE" if isinstance(request, C_MOVE) else "C-GET"
        self.destination = ""  # C-MOVE: the Move Destination, for the log line
        self.started = time.perf_counter()
        self.finished = False
        self._identifier: Dataset | None = None

    @property
    def message_id(self) -> int:
        return int(self.request.MessageID or 0)

    @property
    def priority(self) -> int:
        return int(self.request.Priority or 0)

    @property
    def move_destination(self) -> str:
        """The C-MOVE's Move Destination AE title ('' for a C-GET)."""
        return str(getattr(self.request, "MoveDestination", None) or "").strip()

    @property
    def requester(self) -> str:
        return str(self.assoc.requestor.ae_title).strip()

    def identifier(self) -> Dataset:
        """The request's identifier, decoded in the context's transfer syntax."""
        if self._identifier is None:
            syntax = self.context.transfer_syntax[0]
            encoded = cast(BytesIO, self.request.Identifier)  # is_valid_request: present
            self._identifier = decode(encoded, syntax.is_implicit_VR, syntax.is_little_endian,
                                      syntax.is_deflated)
        return self._identifier

    def is_cancelled(self) -> bool:
        """True once a C-CANCEL for this request has arrived (pynetdicom keeps them apart)."""
        return self.assoc.dimse.cancel_req.pop(self.message_id, None) is not None

    @property
    def requester_present(self) -> bool:
        return bool(self.assoc.is_established)

    def pending(self, tally: Tally) -> None:
        """A Pending response with the counts so far (PS3.4 C.4.2.1.6-9; no identifier)."""
        self._send(PENDING, tally, remaining=True)

    def finish(self, status: int, tally: Tally | None = None, comment: str = "") -> None:
        """The final response, and the INFO line that says how the retrieve went."""
        tally = tally or Tally(0)
        self.finished = True
        if self.requester_present:
            self._send(status, tally, remaining=status == CANCELLED, comment=comment)
        elapsed = time.perf_counter() - self.started
        self.metrics.operation(self.service, status, elapsed)
        log.log(
            logging.INFO if status in (SUCCESS, CANCELLED) else logging.WARNING,
            "%s %s (%s root) from %s%s: %d completed, %d failed, %d warning, status 0x%04X%s, "
            "%.1f ms",
            self.service, self._level(), self.root.value, self.requester or "?",
            f" to {self.destination}" if self.destination else "", tally.completed,
            tally.failed, tally.warning, status, f" ({comment})" if comment else "",
            elapsed * 1000,
        )

    def _level(self) -> str:
        try:
            return str(self.identifier().get("QueryRetrieveLevel") or "?").strip()
        except (ValueError, TypeError, EOFError, KeyError):
            return "?"

    def _send(self, status: int, tally: Tally, remaining: bool, comment: str = "") -> None:
        # PS3.4 C.4.2.1.4.2: the Failed SOP Instance UID List goes with a final status when a
        # sub-operation failed; no data set at all otherwise (and never with Pending).
        identifier = None
        if status != PENDING and tally.failed_uids:
            identifier = self._failed_list(tally.failed_uids)
        command = retrieve_response(
            C_MOVE_RSP if self.service == "C-MOVE" else C_GET_RSP, self.message_id,
            str(self.request.AffectedSOPClassUID), status,
            # PS3.4 C.4.2.1.6: Remaining only while pending and (optionally) when cancelled.
            (tally.remaining if remaining else None, tally.completed, tally.failed,
             tally.warning),
            comment, identifier is not None,
        )
        try:
            transmit(self.assoc, cast(int, self.context.context_id), command, identifier)
        except ConnectionLost as exc:
            # The requester's connection broke: nothing more can reach it (PS3.4 C.4.2.3.1
            # Note 2); the sub-operations stop as the association ends.
            log.warning("%s response to %s not sent: %s", self.service,
                        self.requester or "?", exc)

    def _failed_list(self, uids: list[str]) -> bytes:
        syntax = self.context.transfer_syntax[0]
        if not syntax.is_implicit_VR:
            uids = _fitting(uids, _MAX_EXPLICIT_VALUE)
        ds = Dataset()
        ds.FailedSOPInstanceUIDList = uids
        encoded = encode(ds, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
        if encoded is None:
            raise ValueError("the Failed SOP Instance UID List cannot be encoded")
        return encoded


def _fitting(uids: list[str], limit: int) -> list[str]:
    """The first of ``uids`` whose backslash-joined value fits ``limit`` bytes."""
    size = 0
    for count, uid in enumerate(uids):
        size += len(uid) + (1 if count else 0)
        if size + size % 2 > limit:
            log.warning("Failed SOP Instance UID List cut to %d of %d UIDs to fit the "
                        "explicit VR encoding", count, len(uids))
            return uids[:count]
    return uids


@contextmanager
def matching_instances(retrieval: Retrieval,
                       planner: RetrievePlanner) -> Iterator[list[StoredInstance] | None]:
    """The instances the request names, their studies leased against deletion until the block
    ends; None once the request is answered already (refused, or nothing matches: Success
    with zero counts)."""
    with ExitStack() as leased:
        try:
            instances = leased.enter_context(planner.reserve(
                retrieval.identifier(), retrieval.root, limit=MAX_SUB_OPERATIONS + 1))
        except InvalidRetrieve as exc:
            retrieval.finish(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, comment=str(exc))
            instances = None
        except OutOfResources as exc:
            retrieval.finish(OUT_OF_RESOURCES_MATCHES, comment=str(exc))
            instances = None
        except (ValueError, TypeError, EOFError, KeyError) as exc:  # pydicom: undecodable
            retrieval.finish(UNABLE_TO_PROCESS, comment=f"identifier cannot be decoded: {exc}")
            instances = None
        if instances is not None and len(instances) > MAX_SUB_OPERATIONS:
            retrieval.finish(UNABLE_TO_PROCESS,
                             comment=f"more than {MAX_SUB_OPERATIONS} instances match")
            instances = None
        elif instances is not None and not instances:
            retrieval.finish(SUCCESS)  # nothing matches: complete, with zero counts
            instances = None
        yield instances


# Performs one sub-operation, told which instance comes next (None after the last).
SubOperation = Callable[[StoredInstance, StoredInstance | None], Sent]


def run_sub_operations(retrieval: Retrieval, instances: list[StoredInstance],
                       send: SubOperation) -> tuple[Tally, bool]:
    """Send ``instances`` one by one, with a Pending response now and then; (tally, cancelled).

    PS3.4 C.4.2.3.1 and C.4.3.3.1: "Optionally, the SCP may generate responses ... with status
    equal to Pending during the processing of the C-STORE sub-operations".  One after every
    sub-operation costs the requester, the node and the network about as much as a small
    sub-operation itself.  So one goes out after the first sub-operation (the requester learns
    that the retrieve runs, and can cancel it), then one whenever PENDING_INTERVAL has passed
    since the last: progress stays visible, and a requester's DIMSE timeout keeps being reset,
    during a long retrieve.  None after the last sub-operation: the final response follows.

    A C-CANCEL is honoured between sub-operations (PS3.4 C.4.2.3.1); when the requester's
    association ends, nothing more is sent (PS3.4 leaves the behaviour undefined).
    """
    tally = Tally(remaining=len(instances))
    last_pending: float | None = None
    for number, instance in enumerate(instances, 1):
        if retrieval.is_cancelled():
            return tally, True
        if not retrieval.requester_present:
            break
        sent = send(instance, instances[number] if number < len(instances) else None)
        tally.count(instance, sent)
        retrieval.metrics.sub_operation(retrieval.service, sent.result is not Result.FAILED,
                                        instance.size)
        if sent.result is not Result.COMPLETED:
            log.warning("%s sub-operation %s %s: %s", retrieval.service,
                        instance.sop_instance_uid, sent.result.value, sent.detail)
        now = time.perf_counter()
        if tally.remaining and retrieval.requester_present and (
            last_pending is None or now - last_pending >= PENDING_INTERVAL
        ):
            retrieval.pending(tally)
            last_pending = now
    return tally, False


Handler = Callable[[Retrieval], None]


class RetrieveService:
    """Serves C-MOVE and C-GET on the retrieve contexts of the associations it is attached to."""

    def __init__(self, move: Handler, get: Handler, metrics: Recorder = NO_METRICS) -> None:
        self.move = move
        self.get = get
        self.metrics = metrics

    def serve(self, assoc: Association, msg: Any, context: PresentationContext) -> bool:
        """A ``DirectService`` (node.handlers.direct): take C-MOVE and C-GET requests."""
        if not isinstance(msg, (C_MOVE, C_GET)):
            return False
        models = MOVE_MODELS if isinstance(msg, C_MOVE) else GET_MODELS
        root = models.get(str(context.abstract_syntax))
        if root is None:
            return False
        handler = self.move if isinstance(msg, C_MOVE) else self.get
        retrieval = Retrieval(assoc, msg, context, root, self.metrics)
        try:
            handler(retrieval)
        except Exception:  # a bug: log it and answer, as pynetdicom does for its handlers
            log.exception("%s handler failed", retrieval.service)
            if not retrieval.finished:
                retrieval.finish(UNABLE_TO_PROCESS, comment="internal error")
        return True
