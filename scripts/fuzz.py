#!/usr/bin/env python3
"""Fuzz a node with mutated PDUs and data sets (tests/fuzzing.py), for longer than CI does.

Starts its own node (max_pdu 16 KiB, max_instance_size 64 KiB, in a temporary folder) unless
--port and --pid name a running one, runs --cases cases from --seed on --workers parallel
connections, then checks that the node is alive, its memory stayed bounded, and it still
answers C-ECHO, stores and finds.  Exit 0 when all holds, 1 otherwise.

    .venv/bin/python scripts/fuzz.py --cases 100000 --seed 7
    .venv/bin/python scripts/fuzz.py --seed 7 --case 4711      # replay one case, verbosely
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.conftest import NodeProcess, make_node
from tests.fuzzing import (
    MiB,
    case_stream,
    check_node,
    run_campaign,
    send_case,
    settled_threads,
)

MAX_PDU = 16384
RSS_GROWTH_LIMIT = 200 * MiB  # peak over start: the node holds at most a few PDUs per connection


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--first", type=int, default=0, help="index of the first case")
    parser.add_argument("--case", type=int, help="run only this case and show its bytes")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds a case may take before it counts as a hang")
    parser.add_argument("--port", type=int, help="fuzz a running node (with --pid)")
    parser.add_argument("--pid", type=int, help="that node's process id, for its RSS")
    parser.add_argument("--max-pdu", type=int, default=MAX_PDU,
                        help="the node's max_pdu (its mutations aim just above it)")
    args = parser.parse_args()

    node: NodeProcess | None = None
    with tempfile.TemporaryDirectory(prefix="dicom-fuzz-") as tmp:
        if args.port is None:
            node = make_node(Path(tmp) / "node", max_pdu=args.max_pdu,
                             max_instance_size="64 KiB").start()
            assert node.process is not None
            port, pid = node.port, node.process.pid
        elif args.pid is None:
            parser.error("--port needs --pid")
        else:
            port, pid = args.port, args.pid
        try:
            if args.case is not None:
                what, stream = case_stream(args.seed, args.case, args.max_pdu)
                print(f"case {args.case}: {what}")
                for chunk in stream:
                    print(f"  {len(chunk):6d} bytes: {chunk[:48].hex()}")
                print("outcome:", send_case(port, stream, args.timeout))
                return 0
            report = run_campaign(port, pid, args.cases, args.seed, args.max_pdu,
                                  workers=args.workers, timeout=args.timeout, first=args.first)
            print(report.summary())
            failures = []
            if node is not None and node.process is not None and node.process.poll() is not None:
                failures.append(f"the node exited with {node.process.returncode}")
            if report.slow:
                failures.append(f"{len(report.slow)} cases timed out")
            if report.rss_peak - report.rss_start > RSS_GROWTH_LIMIT:
                failures.append("RSS grew by more than the limit")
            # Every connection ends with its case: no association may stay behind.
            left = settled_threads(pid, report.threads_start, 10.0) - report.threads_start
            if left > 0:
                failures.append(f"{left} threads (associations) still running 10 s after")
            if not failures:
                check_node(port)
                print("after the run: C-ECHO, C-STORE and C-FIND all answered")
            for failure in failures:
                print("FAILED:", failure)
            if node is not None and failures:
                print(f"node log: {node.log_path} (kept: the folder is deleted on exit)")
                print(node.log()[-4000:])
            return 1 if failures else 0
        finally:
            if node is not None and node.process is not None and node.process.poll() is None:
                node.stop()


if __name__ == "__main__":
    sys.exit(main())
