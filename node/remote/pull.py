"""Pull studies from a remote PACS onto this node: select, plan against the index, fetch, verify.

1. **Select.** One C-FIND at STUDY level (Study Root) with the user's selectors. A remote that
   ignores a key it does not support answers more than was asked (DCMTK's dcmqrscp ignores
   Modalities in Study, for one), so every answer is checked again here against the values it
   returns, and Modalities in Study against the modalities of the study's series.
2. **Plan.** For each study, C-FIND at SERIES and then IMAGE level lists the SOP Instance UIDs
   the remote holds; the index says which of them the node already holds. What is missing is
   fetched as a whole study when nothing is held, as whole series where a series is missing
   entirely, else as lists of SOP Instance UIDs (PS3.4 C.4.2.2.1 allows a list of UIDs at the
   level retrieved). A pull that was interrupted therefore resumes without fetching twice.
3. **Fetch and verify.** Each request goes to the remote by C-MOVE (to the node's own AE title)
   or C-GET, through the ``Retriever`` the caller hands in. What the remote reports as completed
   is not proof: afterwards the index must hold every expected instance, and whatever it does
   not hold counts as failed.

No pynetdicom and no status codes here: the network side comes in as functions (``Finder``,
``Retriever``, a listener factory) and its failures as ``node.remote.errors`` exceptions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from pydicom.dataset import Dataset

from node.errors import StartupError
from node.remote.errors import (
    DestinationUnavailable,
    MoveDestinationUnknown,
    PeerUnavailable,
    RemoteError,
    RetrieveFailed,
)
from node.remote.query import Query, build_query
from node.remote.selection import UID_PATTERN, Selection, text_of, values_of

log = logging.getLogger(__name__)
T = TypeVar("T")

# At most this many UIDs in one request's list: a UI element's length is a 16-bit field in
# explicit VR (PS3.5 7.1.2), so at 65 bytes a UID about 1,000 would be the hard limit; remote
# implementations tend to choke well before that.
UID_LIST_CHUNK = 200
# Seconds the temporary C-MOVE listener gives associations still open when it stops. Little is
# needed: a C-MOVE's final response comes only after every C-STORE sub-operation was answered.
LISTENER_GRACE = 5.0


# --- The plan -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteSeries:
    """One series as the remote lists it."""

    uid: str
    modality: str
    instances: dict[str, str]  # SOP Instance UID -> SOP Class UID ("" when not returned)


@dataclass(frozen=True)
class FetchRequest:
    """One C-MOVE or C-GET: its level, unique keys, and the instances it should bring."""

    level: str  # STUDY, SERIES or IMAGE
    study_uid: str
    series_uids: tuple[str, ...] = ()  # one at IMAGE level, a list at SERIES level
    sop_instance_uids: tuple[str, ...] = ()  # IMAGE level only
    expected: tuple[str, ...] = ()
    sop_classes: frozenset[str] = frozenset()  # of the expected instances, where known

    def identifier(self) -> Dataset:
        """The Study Root retrieve identifier (PS3.4 C.4.2.2.1, C.6.2.1): the level and the
        unique keys down to it, a single value above and a list of UIDs at the level."""
        ds = Dataset()
        ds.QueryRetrieveLevel = self.level
        ds.StudyInstanceUID = self.study_uid
        if self.level in ("SERIES", "IMAGE"):
            ds.SeriesInstanceUID = list(self.series_uids)
        if self.level == "IMAGE":
            ds.SOPInstanceUID = list(self.sop_instance_uids)
        return ds

    def describe(self) -> str:
        if self.level == "STUDY":
            return "whole study"
        if self.level == "SERIES":
            return f"{len(self.series_uids)} whole series"
        return f"{len(self.sop_instance_uids)} instances of a series"


@dataclass
class StudyPlan:
    """One selected study: what the remote lists, what the node holds, what to fetch."""

    uid: str
    date: str
    accession: str
    series: list[RemoteSeries]
    held: set[str] = field(default_factory=set)
    # SOP Classes in Study (0008,0062) as the remote computes it: what a C-GET must offer
    # when the IMAGE level did not say (SOP Class UID is an optional key there).
    sop_classes: frozenset[str] = frozenset()

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(sorted({s.modality for s in self.series if s.modality}))

    @property
    def instances(self) -> int:
        return sum(len(s.instances) for s in self.series)

    @property
    def missing(self) -> int:
        return self.instances - len(self.held)

    def requests(self, chunk: int = UID_LIST_CHUNK) -> list[FetchRequest]:
        """What to ask the remote for: the whole study when nothing is held, else the wholly
        missing series and, for partly held series, the missing instances, in chunks."""
        every = {uid: cls for s in self.series for uid, cls in s.instances.items()}
        missing = [uid for uid in every if uid not in self.held]
        if not missing:
            return []

        def classes(uids: Iterable[str]) -> frozenset[str]:
            return frozenset(every[uid] for uid in uids if every[uid]) or self.sop_classes

        if not self.held & every.keys():
            return [FetchRequest("STUDY", self.uid, expected=tuple(missing),
                                 sop_classes=classes(missing))]
        requests: list[FetchRequest] = []
        whole = [s for s in self.series if s.instances and not self.held & s.instances.keys()]
        whole_uids = {s.uid for s in whole}
        for group in _chunked(whole, chunk):
            expected = tuple(uid for s in group for uid in s.instances)
            requests.append(FetchRequest(
                "SERIES", self.uid, series_uids=tuple(s.uid for s in group), expected=expected,
                sop_classes=classes(expected)))
        for series in self.series:
            if series.uid in whole_uids:
                continue
            wanted = [uid for uid in series.instances if uid not in self.held]
            for uids in _chunked(wanted, chunk):
                requests.append(FetchRequest(
                    "IMAGE", self.uid, series_uids=(series.uid,), sop_instance_uids=tuple(uids),
                    expected=tuple(uids), sop_classes=classes(uids)))
        return requests


def _chunked(items: list[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass
class Plan:
    """The selected studies, and how many answers were dropped as not fitting the selection."""

    studies: list[StudyPlan]
    dropped: int = 0

    @property
    def instances(self) -> int:
        return sum(s.instances for s in self.studies)

    @property
    def held(self) -> int:
        return sum(len(s.held) for s in self.studies)

    @property
    def missing(self) -> int:
        return sum(s.missing for s in self.studies)


# --- What the caller hands in -------------------------------------------------------------------

Finder = Callable[[Query], Iterable[Dataset]]


@dataclass(frozen=True)
class SubOperations:
    """Counts of a C-MOVE/C-GET's sub-operations (PS3.4 C.4.2.1.5, C.4.3.1.4)."""

    remaining: int = 0
    completed: int = 0
    failed: int = 0
    warning: int = 0

    @property
    def done(self) -> int:
        return self.completed + self.failed + self.warning


class Retriever(Protocol):
    """Sends one request by C-MOVE or C-GET, reporting pending counts; raises RemoteError."""

    def __call__(self, request: FetchRequest,
                 on_progress: Callable[[SubOperations], None]) -> SubOperations: ...


class HeldLookup(Protocol):
    def sizes(self, sop_instance_uids: Iterable[str]) -> dict[str, int]: ...


class Progress(Protocol):
    """What the user sees while a pull runs."""

    def listing(self, done: int, total: int) -> None: ...  # before listing study done + 1
    def start(self, total: int) -> None: ...  # fetching begins: total instances to fetch
    def update(self, done: int, failed: int) -> None: ...
    def finish(self) -> None: ...  # listing or fetching ended: clear what is drawn


class Listener(Protocol):
    def stop(self, grace: float) -> None: ...


# --- Planning ------------------------------------------------------------------------------------


def plan_pull(selection: Selection, find: Finder, holdings: HeldLookup,
              progress: Progress) -> Plan:
    """Select the studies on the remote and list what each holds against the index.

    Raises PeerUnavailable / QueryFailed (node.remote.errors) when the remote cannot be queried.
    """
    selection = selection.check()
    answers: dict[str, Dataset] = {}
    dropped = 0
    for study in find(build_query("STUDY", selection.study_keys(), "study")):
        reason = selection.mismatch(study)
        if reason:
            log.debug("dropping a C-FIND answer: %s", reason)
            dropped += 1
            continue
        answers.setdefault(text_of(study, "StudyInstanceUID"), study)

    studies: list[StudyPlan] = []
    for n, (uid, study) in enumerate(answers.items()):
        progress.listing(n, len(answers))
        series = _list_series(uid, find)
        if selection.modality and selection.modality not in {s.modality for s in series}:
            dropped += 1  # the remote ignored Modalities in Study, or computes it otherwise
            continue
        every = [sop for s in series for sop in s.instances]
        held = set(holdings.sizes(every))
        studies.append(StudyPlan(
            uid, text_of(study, "StudyDate"), text_of(study, "AccessionNumber"), series, held,
            frozenset(values_of(study, "SOPClassesInStudy"))))
    progress.finish()
    return Plan(studies, dropped)


def _list_series(study_uid: str, find: Finder) -> list[RemoteSeries]:
    """The study's series and their instances, by C-FIND at SERIES then IMAGE level (the
    hierarchical model, PS3.4 C.4.1.2.1, needs the Series Instance UID for an IMAGE query)."""
    found: dict[str, str] = {}
    for answer in find(build_query("SERIES", {"StudyInstanceUID": study_uid}, "study")):
        uid = text_of(answer, "SeriesInstanceUID")
        if uid and UID_PATTERN.match(uid):
            found.setdefault(uid, text_of(answer, "Modality").upper())
    series: list[RemoteSeries] = []
    for uid, modality in found.items():
        keys = {"StudyInstanceUID": study_uid, "SeriesInstanceUID": uid}
        instances: dict[str, str] = {}
        for answer in find(build_query("IMAGE", keys, "study")):
            sop = text_of(answer, "SOPInstanceUID")
            if sop and UID_PATTERN.match(sop) and text_of(answer, "SeriesInstanceUID") in ("", uid):
                instances.setdefault(sop, text_of(answer, "SOPClassUID"))
        series.append(RemoteSeries(uid, modality, instances))
    return series


# --- Fetching ------------------------------------------------------------------------------------


@dataclass
class Summary:
    """What a pull did. ``errors``: each distinct error message and how often it occurred."""

    studies: int = 0
    instances: int = 0  # listed by the remote
    already_held: int = 0
    fetched: int = 0
    failed: int = 0
    bytes: int = 0
    seconds: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.failed == 0

    def line(self) -> str:
        rate = (f", {self.fetched / self.seconds:.1f} instances/s"
                if self.seconds > 0 and self.fetched else "")
        return (
            f"{self.studies} {'study' if self.studies == 1 else 'studies'}, "
            f"{self.instances} instance{'' if self.instances == 1 else 's'}: "
            f"{self.fetched} fetched, {self.already_held} already held, {self.failed} failed; "
            f"{self.bytes / 1e6:.2f} MB in {self.seconds:.1f} s{rate}"
        )


def fetch(plan: Plan, retrieve: Retriever, holdings: HeldLookup, progress: Progress,
          peer: str = "the peer", started: float | None = None,
          chunk: int = UID_LIST_CHUNK) -> Summary:
    """Fetch what the plan says is missing, verify it against the index, and sum up.

    A failure status on one request counts that request's missing instances as failed and
    the pull goes on; a remote that cannot be reached, does not offer the service or does not
    know the move destination stops the pull (every further request would fail alike), and
    what was not fetched counts as failed. ``peer`` names the remote in messages; ``started``:
    time.monotonic() when the pull began.
    """
    started = time.monotonic() if started is None else started
    summary = Summary(studies=len(plan.studies), instances=plan.instances,
                      already_held=plan.held)
    requests = [r for study in plan.studies for r in study.requests(chunk)]
    progress.start(sum(len(r.expected) for r in requests))
    done = 0
    stopped = False
    for request in requests:
        expected = len(request.expected)
        if stopped:
            summary.failed += expected
            done += expected
            continue

        def report(counts: SubOperations, base: int = done, cap: int = expected) -> None:
            progress.update(base + min(counts.done, cap), summary.failed + counts.failed)

        try:
            result = retrieve(request, report)
            if result.failed:  # a warning status such as 0xB000: the remote says why not here
                _count(summary.errors, f"{peer} could not send some instances (it reported "
                       "failed sub-operations; see its log)")
        except (MoveDestinationUnknown, PeerUnavailable) as exc:
            _count(summary.errors, str(exc))
            stopped = True
        except RetrieveFailed as exc:
            _count(summary.errors, str(exc))
        # Proof is what the index holds now, whatever the remote said (and also after a
        # failure: part of the request may have arrived).
        arrived = holdings.sizes(request.expected)
        summary.fetched += len(arrived)
        summary.bytes += sum(arrived.values())
        if len(arrived) < expected:
            log.debug("%s of study %s: %d of %d expected instances did not arrive",
                      request.describe(), request.study_uid, expected - len(arrived), expected)
        summary.failed += expected - len(arrived)
        done += expected
        progress.update(done, summary.failed)
    progress.finish()
    summary.seconds = time.monotonic() - started
    return summary


def _count(errors: dict[str, int], message: str) -> None:
    errors[message] = errors.get(message, 0) + 1


@contextmanager
def move_destination(listen: Callable[[], Listener], check_node: Callable[[], object],
                     ae_title: str) -> Iterator[bool]:
    """Make sure the node receives C-MOVE results while the block runs.

    When the node's port is free, ``listen()`` starts a temporary listener with the node's
    own store path, stopped on leaving (yields True). When the port is taken (StartupError),
    ``check_node()`` must show by C-ECHO that the node itself answers there, as a running
    ``dicom-node serve`` with the same configuration does (yields False); otherwise raises
    DestinationUnavailable.
    """
    try:
        listener = listen()
    except StartupError as exc:
        try:
            check_node()
        except RemoteError as echo_error:
            raise DestinationUnavailable(
                f"cannot receive C-MOVE results as {ae_title}: {exc}, and what holds that port "
                f"does not answer as {ae_title} ({echo_error})"
            ) from echo_error
        log.debug("port taken by a running node; it receives the C-MOVE results")
        yield False
        return
    try:
        yield True
    finally:
        listener.stop(LISTENER_GRACE)
