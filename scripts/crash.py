#!/usr/bin/env python3
"""kill -9 a node during parallel ingest, round after round, and check that nothing it answered
Success for was lost (tests/crashing.py), for longer than CI does.

Starts its own node (``python -m node serve``, in a temporary folder, or --workdir), then for
each round: --associations senders store new instances, the node is killed with SIGKILL after a
seeded number of acknowledgements, started again, and every instance acknowledged so far is
checked (indexed, file present with its SHA-256, readable by pydicom; no temporary file left;
every file has its row).  Prints one line per round and a summary line; exit 0 when nothing
was lost, 1 otherwise.

    .venv/bin/python scripts/crash.py --rounds 50 --seed 7
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.conftest import NodeProcess, make_node
from tests.crashing import crash_round, verify_acknowledged


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--associations", type=int, default=8,
                        help="parallel ingest associations (at most the node's 16)")
    parser.add_argument("--kill-after", type=int, nargs=2, default=(20, 300),
                        metavar=("MIN", "MAX"),
                        help="acknowledgements awaited before the kill, drawn in this range")
    parser.add_argument("--workdir", type=Path,
                        help="keep the node's folder here (default: a temporary one)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dicom-crash-") as tmp:
        node = make_node(args.workdir or Path(tmp) / "node").start()
        try:
            return run(node, args)
        finally:
            if node.process is not None and node.process.poll() is None:
                node.stop()


def run(node: NodeProcess, args: argparse.Namespace) -> int:
    started = time.monotonic()
    rng = random.Random(args.seed)
    acknowledged: list[str] = []
    rounds = verified = 0
    try:
        for number in range(1, args.rounds + 1):
            crashed = crash_round(node, number, rng, args.associations, acknowledged,
                                  (args.kill_after[0], args.kill_after[1]))
            verified = verify_acknowledged(node, acknowledged)
            rounds = number
            print(f"round {number}: {crashed.acknowledged} acknowledged, killed after "
                  f"{crashed.kill_after}, restarted in {crashed.restart_seconds:.2f} s; "
                  f"{verified} verified", flush=True)
    except AssertionError as exc:
        print(f"crash: FAILED in round {rounds + 1} (seed {args.seed}): {exc}", flush=True)
        print(f"crash: node folder {node.workdir} (kept only with --workdir)")
        return 1
    print(f"crash: {rounds} kill -9 rounds survived, {len(acknowledged)} instances acknowledged, "
          f"{verified} verified, 0 lost, {time.monotonic() - started:.1f} s (seed {args.seed}, "
          f"{args.associations} associations)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
