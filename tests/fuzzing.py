"""A deterministic, seeded mutation fuzzer for a running node, over raw sockets.

Each case starts from a valid byte stream (``SEEDS``: an A-ASSOCIATE-RQ, then DIMSE messages
such as C-ECHO, C-STORE with a data set, C-FIND with an identifier, then A-RELEASE-RQ),
mutates it (``mutate``: inside the command set or data set before framing, or the framed PDUs:
bit flips, truncation, corrupted length fields, duplicated PDUs or items, huge declared
lengths, random PDU types, foreign protocols) and sends it on its own connection, then half-
closes and reads until the node closes.  Case ``i`` of seed ``s`` is always the same bytes
(``random.Random(f"{s}:{i}")``), so a failure is replayed with ``scripts/fuzz.py --case i``.

``run_campaign`` runs cases on a few connections in parallel while sampling the node's RSS;
``check_node`` then proves the node still serves: C-ECHO, a C-STORE and a C-FIND that finds it.
Used by tests/test_fuzz.py (a bounded run) and scripts/fuzz.py (as long as you like).
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore

from tests import pdus
from tests.conftest import echo, poll_until
from tests.dicomdata import PREFIX, make_instance, reactor_paused, send_datasets

MiB = 1024 * 1024


@dataclass(frozen=True)
class Message:
    context_id: int
    command: bytes
    dataset: bytes | None = None


@dataclass(frozen=True)
class Seed:
    """A valid conversation: the A-ASSOCIATE-RQ, then messages, then A-RELEASE-RQ."""

    name: str
    associate: bytes
    messages: tuple[Message, ...] = ()


def _uid(n: int) -> str:
    return f"{PREFIX}77.{n}"


def _deep_sequence(depth: int) -> bytes:
    """SOP UIDs, then (0008,1115) nested ``depth`` items deep, undefined lengths (PS3.5 7.5)."""
    head = pdus.dataset_bytes(_instance(9, rows=2, keep_pixels=False))
    open_sq = struct.pack("<HHL", 0x0008, 0x1115, 0xFFFFFFFF)
    open_item = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    close_item = struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
    close_sq = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    # Group 0008 elements must come before the UIDs in group 0020 to be in order; the
    # nesting goes first, the (already ordered) instance after it.
    return (open_sq + open_item) * depth + (close_item + close_sq) * depth + head


def _instance(n: int, rows: int = 16, keep_pixels: bool = True) -> Dataset:
    ds = make_instance(sop_instance=_uid(n), study=_uid(1000 + n), series=_uid(2000 + n),
                       rows=rows)
    if not keep_pixels:
        del ds.PixelData
    return ds


def _query() -> bytes:
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = ""
    q.PatientName = "Test*"
    q.StudyDate = "20200101-"
    return pdus.dataset_bytes(q)


def seeds() -> list[Seed]:
    rq = pdus.associate_rq()
    ctx = pdus.DEFAULT_CONTEXTS
    store = pdus.store_rq
    return [
        Seed("associate", rq),
        Seed("echo", rq, (Message(pdus.ECHO_CX, pdus.echo_rq(1)),)),
        Seed("store", rq, (Message(pdus.STORE_CX, store(_uid(1), 1),
                                   pdus.dataset_bytes(_instance(1))),)),
        Seed("store-large", rq, (Message(pdus.STORE_CX, store(_uid(2), 1),
                                         pdus.dataset_bytes(_instance(2, rows=190))),)),
        Seed("find", rq, (Message(pdus.FIND_CX, pdus.find_rq(1), _query()),)),
        Seed("mixed", rq, (Message(pdus.ECHO_CX, pdus.echo_rq(1)),
                           Message(pdus.STORE_CX, store(_uid(3), 2),
                                   pdus.dataset_bytes(_instance(3))),
                           Message(pdus.FIND_CX, pdus.find_rq(3), _query()))),
        Seed("deep-sequence", rq, (Message(pdus.STORE_CX, store(_uid(9), 1),
                                           _deep_sequence(3000)),)),
        Seed("duplicate-contexts", pdus.associate_rq(contexts=ctx * 60),
             (Message(pdus.ECHO_CX, pdus.echo_rq(1)),)),
        Seed("too-many-contexts", pdus.associate_rq(
            contexts=tuple((i % 256 | 1, pdus.VERIFICATION) for i in range(300))),
             (Message(pdus.ECHO_CX, pdus.echo_rq(1)),)),
    ]


# --- mutations -----------------------------------------------------------------------------

Stream = list[bytes]


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    """A command set or data set with one damage: the parsers' side of the boundary."""
    if not data:
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    b = bytearray(data)
    choice = rng.randrange(6)
    if choice == 0:  # bit flips
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif choice == 1:  # truncated
        del b[rng.randrange(len(b)):]
    elif choice == 2 and len(b) >= 4:  # a value length (or anything 4 bytes wide) corrupted
        at = rng.randrange(0, len(b) - 3)
        struct.pack_into("<L", b, at, rng.choice([0xFFFFFFFF, 0x7FFFFFFF, rng.getrandbits(32),
                                                  rng.randrange(1, 1 << 16)]))
    elif choice == 3 and len(b) >= 2:  # a 16-bit field (explicit VR length, US value)
        at = rng.randrange(0, len(b) - 1)
        struct.pack_into("<H", b, at, rng.getrandbits(16))
    elif choice == 4:  # a slice repeated
        start = rng.randrange(len(b))
        piece = b[start:start + rng.randint(1, 200)]
        b[start:start] = piece * rng.randint(1, 20)
    else:  # random bytes in the middle
        at = rng.randrange(len(b) + 1)
        b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
    return bytes(b)


def _frame(seed: Seed, rng: random.Random, inner: bool) -> Stream:
    """The seed as PDUs; with ``inner``, one command set or data set damaged first."""
    messages = list(seed.messages)
    if inner and messages:
        i = rng.randrange(len(messages))
        m = messages[i]
        if m.dataset is not None and rng.random() < 0.7:
            messages[i] = Message(m.context_id, m.command, _mutate_bytes(rng, m.dataset))
        else:
            messages[i] = Message(m.context_id, _mutate_bytes(rng, m.command), m.dataset)
    stream = [seed.associate]
    for m in messages:
        fragment = rng.choice([512, 4000, 16000])
        stream += pdus.message(m.context_id, m.command, m.dataset, fragment=fragment)
    stream.append(pdus.release_rq())
    return stream


def _pick(rng: random.Random, stream: Stream) -> int:
    """A PDU of the stream to damage (one with at least a header, when there is one)."""
    whole = [i for i, chunk in enumerate(stream) if len(chunk) >= 6]
    return rng.choice(whole) if whole else 0


def _flip(rng: random.Random, stream: Stream, max_pdu: int) -> Stream:
    i = _pick(rng, stream)
    b = bytearray(stream[i])
    if not b:
        return stream
    for _ in range(rng.randint(1, 8)):
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    stream[i] = bytes(b)
    return stream


def _truncate(rng: random.Random, stream: Stream, max_pdu: int) -> Stream:
    whole = b"".join(stream)
    return [whole[:rng.randrange(len(whole))]] if whole else stream


def _pdu_length(rng: random.Random, stream: Stream, max_pdu: int) -> Stream:
    i = _pick(rng, stream)
    b = bytearray(stream[i])
    if len(b) < 6:
        return stream
    declared = len(b) - 6
    struct.pack_into(">L", b, 2, rng.choice([
        max(0, declared + rng.randint(-16, 16)), 0, rng.getrandbits(32), 0xFFFFFFFF,
        max_pdu + 1, max_pdu + rng.randint(1, 4096), declared * 2]))
    stream[i] = bytes(b)
    return stream


def _inner_length(rng: random.Random, stream: Stream, max_pdu: int) -> Stream:
    """An item, sub-item or PDV length field (or whatever is at that offset) corrupted."""
    i = _pick(rng, stream)
    b = bytearray(stream[i])
    if len(b) < 12:
        return stream
    at = rng.randrange(6, len(b) - 3)
    if b[0] == pdus.P_DATA_TF and rng.random() < 0.5:
        at = 6  # the first PDV's item length
    if rng.random() < 0.5:
        struct.pack_into(">L", b, at, rng.choice([0, 1, 0xFFFFFFFF, rng.getrandbits(32)]))
    else:
        struct.pack_into(">H", b, at, rng.choice([0, 1, 0xFFFF, rng.getrandbits(16)]))
    stream[i] = bytes(b)
    return stream


def _duplicate(rng: random.Random, stream: Stream, max_pdu: int) -> Stream:
    i = _pick(rng, stream)
    stream[i:i + 1] = [stream[i]] * rng.randint(2, 40)
    return stream


def _drop_or_swap(rng: random.Random, stream: Stream, max_pdu: int) -> Stream:
    i, j = _pick(rng, stream), _pick(rng, stream)
    if rng.random() < 0.5:
        del stream[i]
    else:
        stream[i], stream[j] = stream[j], stream[i]
    return stream or [b""]


def _huge(rng: random.Random, stream: Stream, max_pdu: int) -> Stream:
    """A PDU declaring far more than it carries or than allowed; nothing after it."""
    i = _pick(rng, stream)
    kind = stream[i][0] if stream[i] and rng.random() < 0.7 else rng.randint(1, 7)
    length = rng.choice([0xFFFFFFFF, 0x80000000, 1 << 30, 64 * MiB + 1, max_pdu + 1])
    body = stream[i][6:6 + rng.randint(0, 2000)]
    return [*stream[:i], struct.pack(">BBL", kind, 0, length) + body]


def _random_type(rng: random.Random, stream: Stream, max_pdu: int) -> Stream:
    i = _pick(rng, stream)
    if stream[i] and rng.random() < 0.5:
        b = bytearray(stream[i])
        b[0] = rng.randrange(256)
        stream[i] = bytes(b)
    else:
        body = bytes(rng.randrange(256) for _ in range(rng.randint(0, 300)))
        stream.insert(i, pdus.pdu(rng.randrange(256), body))
    return stream


def _foreign(rng: random.Random, stream: Stream, max_pdu: int) -> Stream:
    """Another protocol on the DICOM port: HTTP, a TLS ClientHello, noise."""
    return [rng.choice([
        b"GET / HTTP/1.1\r\nHost: node\r\n\r\n",
        bytes.fromhex("16030100a5010000a10303") + bytes(rng.randrange(256) for _ in range(160)),
        bytes(rng.randrange(256) for _ in range(rng.randint(1, 4000))),
    ])]


OUTER: list[Callable[[random.Random, Stream, int], Stream]] = [
    _flip, _truncate, _pdu_length, _inner_length, _duplicate, _drop_or_swap, _huge,
    _random_type, _foreign,
]


def case_stream(seed_value: int, index: int, max_pdu: int,
                all_seeds: list[Seed] | None = None) -> tuple[str, Stream]:
    """The bytes of case ``index`` (its seed's name and what was done, and the PDUs)."""
    rng = random.Random(f"{seed_value}:{index}")
    seed = rng.choice(all_seeds if all_seeds is not None else seeds())
    inner = rng.random() < 0.4
    stream = _frame(seed, rng, inner)
    done = [seed.name + ("/inner" if inner else "")]
    for _ in range(0 if inner and rng.random() < 0.5 else rng.randint(1, 3)):
        mutation = rng.choice(OUTER)
        stream = mutation(rng, stream, max_pdu)
        done.append(mutation.__name__.strip("_"))
    return "+".join(done), stream


# --- running -------------------------------------------------------------------------------

def send_case(port: int, stream: Stream, timeout: float) -> str:
    """Send one case on a new connection, half-close, read until the node closes.

    The outcome: ``closed`` (the node closed after answering or aborting), ``reset``, or
    ``timeout`` (the node neither answered nor closed: a hang, to be looked at).
    """
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except OSError as exc:
        return f"connect-failed:{type(exc).__name__}"
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            rest = stream
            if _whole_pdu(stream[0]) and len(stream) > 1:
                # Like a real requestor, wait for the answer to the first PDU: anything sent
                # before the A-ASSOCIATE-AC is unexpected (PS3.8 9.2, Sta3) and never gets
                # further than the association's start.
                sock.sendall(stream[0])
                rest = stream[1:] if _answer(sock, timeout) == pdus.A_ASSOCIATE_AC else []
            for chunk in rest:
                sock.sendall(chunk)
            sock.shutdown(socket.SHUT_WR)
        except TimeoutError:
            return "timeout"
        except OSError:
            pass  # the node closed first (aborted): read what it said
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if not sock.recv(65536):
                    return "closed"
            except TimeoutError:
                return "timeout"
            except OSError:
                return "reset"
        return "timeout"


def _whole_pdu(chunk: bytes) -> bool:
    return len(chunk) >= 6 and struct.unpack_from(">L", chunk, 2)[0] == len(chunk) - 6


def _answer(sock: socket.socket, timeout: float) -> int | None:
    """The type of the PDU the node answers with (read whole), None when it closes."""
    header = bytearray()
    while len(header) < 6:
        chunk = sock.recv(6 - len(header))
        if not chunk:
            return None
        header += chunk
    remaining = struct.unpack_from(">L", header, 2)[0]
    while remaining > 0:
        chunk = sock.recv(min(remaining, 65536))
        if not chunk:
            return None
        remaining -= len(chunk)
    return header[0]


def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} for {pid}")


def rss_of(pid: int) -> int:
    """Resident memory of process ``pid``, bytes (/proc/PID/status VmRSS)."""
    return _status(pid, "VmRSS") * 1024


def threads_of(pid: int) -> int:
    """Threads of process ``pid``: two per association being served (/proc/PID/status)."""
    return _status(pid, "Threads")


def settled_threads(pid: int, at_most: int, timeout: float) -> int:
    """Poll until ``pid`` runs at most ``at_most`` threads (its associations have ended), or
    ``timeout`` seconds pass; the last count."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    count = threads_of(pid)
    while count > at_most and time.monotonic() < deadline:
        pause.wait(0.05)
        count = threads_of(pid)
    return count


@dataclass
class Report:
    cases: int = 0
    seconds: float = 0.0
    rss_start: int = 0
    rss_peak: int = 0
    rss_end: int = 0
    threads_start: int = 0
    threads_peak: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    slow: list[tuple[int, str]] = field(default_factory=list)  # (case, what) that timed out

    @property
    def rate(self) -> float:
        return self.cases / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        return (f"{self.cases} cases in {self.seconds:.1f} s ({self.rate:.0f} cases/s); RSS "
                f"{self.rss_start / MiB:.0f} MiB at start, peak {self.rss_peak / MiB:.0f}, end "
                f"{self.rss_end / MiB:.0f}; threads {self.threads_start} at start, peak "
                f"{self.threads_peak}; outcomes {dict(self.outcomes)}"
                + (f"; timed out: {self.slow[:10]}" if self.slow else ""))


def run_campaign(port: int, pid: int, cases: int, seed_value: int, max_pdu: int,
                 workers: int = 4, timeout: float = 10.0, first: int = 0) -> Report:
    """Run cases ``first .. first+cases-1`` against the node at ``port`` (process ``pid``)."""
    report = Report(rss_start=rss_of(pid), threads_start=threads_of(pid))
    report.rss_peak, report.threads_peak = report.rss_start, report.threads_start
    all_seeds = seeds()
    lock = threading.Lock()
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            try:
                value, threads = rss_of(pid), threads_of(pid)
            except (OSError, RuntimeError):
                return  # the process is gone: the checks after the run say so
            report.rss_peak = max(report.rss_peak, value)
            report.threads_peak = max(report.threads_peak, threads)

    def one(index: int) -> None:
        what, stream = case_stream(seed_value, index, max_pdu, all_seeds)
        outcome = send_case(port, stream, timeout)
        with lock:
            report.outcomes[outcome] += 1
            report.cases += 1
            if outcome == "timeout":
                report.slow.append((index, what))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(one, range(first, first + cases)))
    finally:
        report.seconds = time.monotonic() - started
        done.set()
        sampler.join()
    report.rss_end = rss_of(pid)
    report.rss_peak = max(report.rss_peak, report.rss_end)
    return report


def _find_study(port: int, study: str) -> list[str]:
    ae = AE(ae_title="FUZZCHECK")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established, "C-FIND association rejected"
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study
    found: list[str] = []
    try:
        for status, identifier in reactor_paused(assoc).send_c_find(
                query, StudyRootQueryRetrieveInformationModelFind):
            if status and status.Status in (0xFF00, 0xFF01) and identifier is not None:
                found.append(str(identifier.StudyInstanceUID))
    finally:
        assoc.release()
    return found


def check_node(port: int, echo_deadline: float = 30.0) -> str:
    """After a run: the node answers C-ECHO (polled: aborted connections may still hold
    association slots for a moment), stores an instance and finds it.  Returns its UID."""
    if not poll_until(lambda: echo(port), echo_deadline, interval=0.1):
        raise AssertionError(f"no C-ECHO answer within {echo_deadline} s")
    ds = make_instance()
    sent = send_datasets(port, [ds])
    assert [s.status for s in sent] == [0x0000], sent
    study = str(ds.StudyInstanceUID)
    found = _find_study(port, study)
    assert found == [study], found
    return study
