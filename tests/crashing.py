"""kill -9 during parallel ingest: senders that record every Success, one seeded crash round, and
the check that nothing acknowledged was lost.

Shared by tests/test_crash.py (a few rounds in CI) and scripts/crash.py (as many as asked).  A
round starts ``associations`` senders, each storing new instances of random size (some span
several PDUs, so a kill lands mid-transfer too) on its own association and recording the SOP
Instance UID of every one answered Success; after a seeded number of acknowledgements and a
seeded pause of a few ms, the node is killed with SIGKILL and started again.  Then every
instance ever acknowledged must be indexed, its file present with the SHA-256 it is named by,
and readable by pydicom; no temporary file may survive the start-up, and every stored file must
have its row (the start-up sweep quarantines files whose rows were never committed).
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field

from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.presentation import build_context

from tests.conftest import NodeProcess, poll_until
from tests.dicomdata import (
    CT_IMAGE,
    encoded_as,
    make_instance,
    no_delay,
    reactor_paused,
    sha256_file,
)

# Rows of the instances sent: 512 B to 512 KiB of pixel data; the largest take several PDUs.
ROWS = (16, 64, 64, 128, 256, 512)
INGEST_TIMEOUT = 60.0  # seconds a round may take to collect its acknowledgements
# pynetdicom waits out the whole DIMSE timeout for a response that a killed node will never
# send (the closed connection does not wake the waiting sender): keep it short.  The node
# answers in milliseconds; a slow answer only means one instance not counted as acknowledged.
DIMSE_TIMEOUT = 3.0


@dataclass
class Senders:
    """What the senders of one round saw: acknowledged UIDs, refusals, and their errors."""

    acknowledged: list[str] = field(default_factory=list)  # list.append is atomic
    refused: list[tuple[str, int]] = field(default_factory=list)  # (UID, non-Success status)
    errors: list[BaseException] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)


def ingest_until_stopped(port: int, senders: Senders, rng: random.Random,
                         calling: str = "CRASHSCU") -> None:
    """Send new instances on one association until told to stop or the node dies."""
    ae = AE(ae_title=calling)
    ae.requested_contexts = [build_context(CT_IMAGE)]
    ae.acse_timeout = ae.network_timeout = 10
    ae.dimse_timeout = DIMSE_TIMEOUT
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    if not assoc.is_established:
        senders.errors.append(RuntimeError("association not established"))
        return
    no_delay(assoc)
    try:
        while not senders.stop.is_set() and assoc.is_established:
            ds = encoded_as(make_instance(rows=rng.choice(ROWS)))
            status = reactor_paused(assoc).send_c_store(ds)
            if status and "Status" in status:
                if status.Status == 0:
                    senders.acknowledged.append(str(ds.SOPInstanceUID))
                else:
                    senders.refused.append((str(ds.SOPInstanceUID), int(status.Status)))
            # No status: the node vanished mid-request; the instance counts as not sent.
    except (RuntimeError, OSError) as exc:  # the node vanished under us: expected
        senders.errors.append(exc)
    finally:
        if assoc.is_established:
            assoc.abort()


@dataclass(frozen=True)
class Round:
    """One kill -9 round: how many instances it acknowledged, when it killed, how long."""

    number: int
    acknowledged: int
    kill_after: int  # acknowledgements awaited before the kill
    seconds: float
    restart_seconds: float


def crash_round(node: NodeProcess, number: int, rng: random.Random, associations: int,
                acknowledged: list[str], kill_after: tuple[int, int] = (20, 120)) -> Round:
    """Ingest on ``associations`` associations, kill -9 the node at a seeded moment, start it
    again; the round's acknowledged UIDs are appended to ``acknowledged``."""
    started = time.monotonic()
    senders = Senders()
    threads = [
        threading.Thread(target=ingest_until_stopped,
                         args=(node.port, senders, random.Random(rng.random())),
                         name=f"crash-sender-{n}")
        for n in range(associations)
    ]
    for thread in threads:
        thread.start()
    target = rng.randint(*kill_after)
    try:
        if not poll_until(lambda: len(senders.acknowledged) >= target or not
                          any(t.is_alive() for t in threads), INGEST_TIMEOUT):
            raise AssertionError(f"round {number}: fewer than {target} acknowledged in "
                                 f"{INGEST_TIMEOUT} s")
        # A moment within the next few ms, so that the kill finds writes at every stage.
        threading.Event().wait(rng.uniform(0, 0.02))
        node.kill()  # SIGKILL while the associations are mid-transfer
    finally:
        senders.stop.set()
        for thread in threads:
            thread.join(30)
    if senders.refused:
        raise AssertionError(f"round {number}: node refused instances before the kill: "
                             f"{senders.refused[:5]}")
    if len(senders.acknowledged) < target:
        raise AssertionError(f"round {number}: senders stopped early: {senders.errors[:3]}")
    acknowledged.extend(senders.acknowledged)
    killed = time.monotonic()
    node.start()
    return Round(number, len(senders.acknowledged), target, time.monotonic() - started,
                 time.monotonic() - killed)


def verify_acknowledged(node: NodeProcess, acknowledged: list[str]) -> int:
    """Every acknowledged instance indexed, intact and readable; no temporary file; every stored
    file has its row.  Returns how many instances were verified (AssertionError otherwise)."""
    if not node.on_postgresql:  # (PostgreSQL's own crash recovery is not ours to check)
        assert node.rows("PRAGMA integrity_check") == [("ok",)]
    indexed = dict(node.rows("SELECT sop_instance_uid, digest FROM instance"))
    lost = [uid for uid in acknowledged if uid not in indexed]
    assert not lost, f"{len(lost)} acknowledged instances lost from the index, e.g. {lost[:3]}"
    for uid in acknowledged:
        digest = indexed[uid]
        path = node.storage / "objects" / digest[:2] / digest[2:4] / digest
        assert path.is_file(), f"acknowledged {uid} lost from the store"
        assert sha256_file(path) == digest, f"acknowledged {uid}: file does not match its hash"
        ds = dcmread(path)
        assert ds.SOPInstanceUID == uid
        assert len(ds.PixelData) == ds.Rows * ds.Columns * 2, f"{uid}: pixel data cut short"
    assert node.temporary_files() == [], "temporary files survived the start-up"
    assert {p.name for p in node.stored_files()} == set(indexed.values()), \
        "stored files and index rows differ after the start-up sweep"
    return len(acknowledged)
