"""Thousands of mutated PDUs and data sets at a running node, in well under a minute.

The cases are tests/fuzzing.py's (seeded, so a failure replays with ``scripts/fuzz.py --seed
S --case N``); scripts/fuzz.py runs the same campaign for as long as you like.  After the
run the node must be alive, have stayed within a memory bound, have no association left
behind, and still answer C-ECHO, store an instance and find it.
"""

from __future__ import annotations

import os
from typing import Any

from tests.conftest import NodeProcess
from tests.fuzzing import MiB, check_node, run_campaign, settled_threads

CASES = int(os.environ.get("DICOMNODE_FUZZ_CASES", "3000"))
SEED = int(os.environ.get("DICOMNODE_FUZZ_SEED", "20261129"))
MAX_PDU = 16384
RSS_GROWTH_LIMIT = 150 * MiB


def test_fuzzed_pdus_and_datasets_leave_the_node_serving(node_factory: Any) -> None:
    node: NodeProcess = node_factory(max_pdu=MAX_PDU, max_instance_size="64 KiB").start()
    assert node.process is not None
    pid = node.process.pid

    report = run_campaign(node.port, pid, CASES, SEED, MAX_PDU, workers=4, timeout=10.0)
    print(report.summary())  # cases/s and memory, for the CI log (pytest -s / -rA)

    assert node.process.poll() is None, f"node died:\n{node.log()[-4000:]}"
    assert report.cases == CASES
    assert not report.slow, f"cases without an answer or close: {report.slow}"
    assert report.rss_peak - report.rss_start < RSS_GROWTH_LIMIT, report.summary()
    # Every case's connection is over: no association may be left waiting for anything.
    assert settled_threads(pid, report.threads_start, 10.0) <= report.threads_start
    check_node(node.port)
    assert node.temporary_files() == []  # no partial file from a broken store
    assert "MemoryError" not in node.log()
