"""kill -9 during parallel ingest, again and again: no instance answered Success is ever lost.

CI runs a few seeded rounds (tests/crashing.py); ``scripts/crash.py --rounds N`` runs more.
"""

from __future__ import annotations

import random
import time
from typing import Any

from tests.conftest import NodeProcess
from tests.crashing import crash_round, verify_acknowledged

ROUNDS = 4
ASSOCIATIONS = 6
SEED = 20260601


def test_kill_9_during_parallel_ingest_loses_nothing_acknowledged(node_factory: Any) -> None:
    started = time.monotonic()
    node: NodeProcess = node_factory().start()
    rng = random.Random(SEED)
    acknowledged: list[str] = []
    for number in range(1, ROUNDS + 1):
        crashed = crash_round(node, number, rng, ASSOCIATIONS, acknowledged)
        verified = verify_acknowledged(node, acknowledged)
        assert verified == len(acknowledged) >= crashed.acknowledged > 0
        print(f"round {number}: killed after {crashed.acknowledged} acknowledged "
              f"({crashed.kill_after} awaited), restart {crashed.restart_seconds:.2f} s; "
              f"{verified} acknowledged instances verified")
    sweeps = [line for line in node.log().splitlines() if "start-up sweep" in line]
    assert len(sweeps) == ROUNDS + 1, sweeps
    assert not any("another process" in line for line in sweeps), sweeps
    print("\n".join(sweeps))
    print(f"crash: {ROUNDS} kill -9 rounds, {len(acknowledged)} acknowledged instances, "
          f"0 lost, {time.monotonic() - started:.1f} s")
