#!/usr/bin/env python3
"""Several nodes, one archive: ingest with one node on SQLite, one on PostgreSQL and two on
PostgreSQL sharing one port and one store; and C-FIND on a large index, SQLite vs PostgreSQL.

**Ingest** (always): the small corpus of ``benchmarks/ingest.py`` (64x64 CT/MR, pre-split in
four folders) is sent by four DCMTK ``storescu`` at once, against each setup in turn:

``sqlite-1``  one node, its index in SQLite (the default);
``sqlite-2``  two nodes, ``reuse_port: true`` on the same port, the same store and its one
              SQLite file (WAL: one writer at a time, across processes on one host);
``pg-1``      one node, its index in a new PostgreSQL database;
``pg-2``      two nodes, ``reuse_port: true`` on the same port, the same PostgreSQL database
              and the same store directory: the kernel spreads the four associations over
              both processes (SO_REUSEPORT hashes each connection's addresses and ports, so
              the split of four is not always two and two: the table gives each node's CPU
              seconds, which show how it fell).

Every run starts fresh nodes on an empty store and a new database, and checks that every
instance sent has its file and its row.  ``--repeat K`` runs each setup K times, taking turns;
the table shows each run and the median.  Times are wall clock from starting the storescu
processes until the last exits.

**C-FIND** (``--find N``): ``benchmarks/find.py`` fills (or reuses) its SQLite index of N
instances, ``dicom-node migrate`` copies it into a new PostgreSQL database, and find.py's
queries are run against a node on each index in turn, one association, one warm-up and
``--find-repeat`` timed runs each.  PostgreSQL is queried twice: as migrated, and after an
``ANALYZE`` (the planner's statistics, which autovacuum gathers on its own some time after a
bulk load).  The table gives the node's own time (median, from its log) for each.  Then two
clients (processes) run the queries at once on the analyzed index, both through one node and
one through each of two nodes sharing it: the round trip of each query and the wall time.

Example::

    python benchmarks/nodes.py --repeat 2 --find 1000000

Needs DCMTK, psycopg2 and a PostgreSQL server that lets the user of ``--postgres`` create
databases (each run's database is dropped afterwards).  Exit status 0 when every run stored
everything sent and every query gave the expected answers, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import find as findbench
from common import (
    HOST,
    REPO,
    BenchError,
    NodeServer,
    busy_seconds,
    count_files,
    free_port,
    interrupts_stop_children,
    render_table,
    send,
)
from common import machine_info as common_machine_info
from ingest import ensure_corpus

SETUPS = ("sqlite-1", "sqlite-2", "pg-1", "pg-2")
POSTGRES = "postgresql://postgres@127.0.0.1:5432"


# --------------------------------------------------------------------------------------------
# PostgreSQL databases


def _admin(server: str) -> Any:
    import psycopg2

    conn = psycopg2.connect(f"{server}/postgres", connect_timeout=5)
    conn.autocommit = True
    return conn


@contextlib.contextmanager
def new_database(server: str, keep: bool = False) -> Iterator[str]:
    """A new, empty database on ``server`` (its URL), dropped afterwards unless ``keep``."""
    name = f"dicomnode_bench_{uuid.uuid4().hex[:12]}"
    admin = _admin(server)
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        yield f"{server}/{name}"
    finally:
        if not keep:
            with admin.cursor() as cursor:
                cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def indexed(database: str | None, storage: Path) -> int:
    """Instance rows in the index (PostgreSQL URL, or the store's SQLite file)."""
    if database is not None:
        import psycopg2

        with contextlib.closing(psycopg2.connect(database)) as conn, conn.cursor() as cursor:
            cursor.execute("SELECT COUNT(*) FROM instance")
            return int(cursor.fetchone()[0])
    with contextlib.closing(sqlite3.connect(f"file:{storage / 'index.sqlite'}?mode=ro",
                                            uri=True)) as db:
        return int(db.execute("SELECT COUNT(*) FROM instance").fetchone()[0])


# --------------------------------------------------------------------------------------------
# nodes


def listeners(port: int) -> int:
    """Sockets listening on TCP ``port`` (IPv4), from /proc/net/tcp."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
            count += 1
    return count


class Node(NodeServer):
    """A node with ``database`` and ``reuse_port`` set; ready once it answers C-ECHO and the
    port has ``expected_listeners`` sockets (with a shared port, another node may answer)."""

    def __init__(self, workdir: Path, *, python: str, storage: Path, port: int,
                 database: str | None, reuse_port: bool, expected_listeners: int,
                 log_level: str = "WARNING", ready_timeout: float = 60.0) -> None:
        super().__init__(workdir, ready_timeout, python=python, storage=storage,
                         log_level=log_level)
        self.port = port
        self.database = database
        self.reuse_port = reuse_port
        self.expected_listeners = expected_listeners

    def command(self) -> tuple[list[str], Path | None, dict[str, str] | None]:
        command = super().command()
        extra = f"reuse_port: {'true' if self.reuse_port else 'false'}\n"
        if self.database is not None:
            extra += f"database: {json.dumps(self.database)}\n"
        with self.config_path.open("a") as config:
            config.write(extra)
        return command

    def ready(self) -> bool:
        return listeners(self.port) >= self.expected_listeners and super().ready()


# --------------------------------------------------------------------------------------------
# ingest


@dataclass
class IngestRun:
    setup: str
    repeat: int
    sent: int
    seconds: float | None = None
    files: int | None = None
    rows: int | None = None
    server_cpu_s: float | None = None
    other_cpu_s: float | None = None
    split: list[float] = field(default_factory=list)  # CPU seconds of each node
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def rate(self) -> float | None:
        return self.sent / self.seconds if self.ok and self.seconds else None


def ingest_run(setup: str, repeat: int, folders: Sequence[Path], sent: int, workroot: Path,
               args: argparse.Namespace) -> IngestRun:
    run = IngestRun(setup, repeat, sent)
    workdir = workroot / f"{setup}-{repeat}"
    storage = workdir / "storage"
    port = free_port()
    nodes: list[Node] = []
    with contextlib.ExitStack() as stack:
        database = (None if setup.startswith("sqlite")
                    else stack.enter_context(new_database(args.postgres)))
        count = int(setup.rsplit("-", 1)[1])
        try:
            for n in range(count):
                node = Node(workdir / f"node{n}", python=args.python, storage=storage,
                            port=port, database=database, reuse_port=count > 1,
                            expected_listeners=n + 1)
                nodes.append(node)
                node.start()
            cpu0 = [node.cpu_seconds() or 0.0 for node in nodes]
            busy0 = busy_seconds()
            client0 = _children_cpu()
            run.seconds, problems = send("DICOMNODE", port, folders, args.timeout)
            busy1, client1 = busy_seconds(), _children_cpu()
            cpu1 = [node.cpu_seconds() or 0.0 for node in nodes]
            run.server_cpu_s = round(sum(cpu1) - sum(cpu0), 2)
            if busy0 is not None and busy1 is not None:
                run.other_cpu_s = round(max(0.0, busy1 - busy0 - run.server_cpu_s
                                            - (client1 - client0)), 2)
            if not all(node.alive() for node in nodes):
                problems.append("a node died during the run")
            run.files = count_files(storage / "objects")
            run.rows = indexed(database, storage)
            if count > 1:
                run.split = [round(b - a, 1) for a, b in zip(cpu0, cpu1, strict=True)]
            if run.files != sent or run.rows != sent:
                problems.append(f"sent {sent}: {run.files} files, {run.rows} rows")
            if problems:
                run.error = "; ".join(problems)
        except BenchError as exc:
            run.error = str(exc)
        finally:
            for node in nodes:
                node.stop()
            if not args.keep:
                shutil.rmtree(workdir, ignore_errors=True)
    return run


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def ingest_table(runs: Sequence[IngestRun], repeats: int) -> str:
    header = ["setup", *[f"run {k} inst/s" for k in range(1, repeats + 1)], "median inst/s",
              "node CPU ms/inst", "CPU-s per node"]
    rows = [header]
    for setup in SETUPS:
        mine = [r for r in runs if r.setup == setup]
        if not mine:
            continue
        rates = [r.rate for r in mine]
        good = [v for v in rates if v is not None]
        cpu = [r.server_cpu_s * 1000 / r.sent for r in mine if r.ok and r.server_cpu_s]
        splits = "  ".join("+".join(f"{v:.1f}" for v in r.split)
                           for r in mine if r.split) or "-"
        rows.append([setup, *[f"{v:,.0f}" if v is not None else "FAILED" for v in rates],
                     f"{statistics.median(good):,.0f}" if good else "-",
                     f"{statistics.median(cpu):.2f}" if cpu else "-", splits])
    return render_table(rows)


# --------------------------------------------------------------------------------------------
# C-FIND, SQLite vs PostgreSQL


class FindNode(findbench.Node):
    """find.py's node (INFO log: its own time per C-FIND), optionally on PostgreSQL."""

    def __init__(self, storage: Path, workdir: Path, python: str, ready_timeout: float,
                 database: str | None) -> None:
        super().__init__(storage, workdir, python, ready_timeout)
        self.database = database

    def command(self) -> tuple[list[str], Path | None, dict[str, str] | None]:
        command = super().command()
        if self.database is not None:
            with self.config_path.open("a") as config:
                config.write(f"database: {json.dumps(self.database)}\n")
        return command


def migrate(storage: Path, database: str, python: str) -> float:
    """Copy the SQLite index of ``storage`` into ``database``; the seconds it took."""
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "migrate.yaml"
        config.write_text(f"storage: {json.dumps(str(storage))}\n")
        started = time.perf_counter()
        done = subprocess.run([python, "-m", "node", "migrate", "-c", str(config),
                               "--to", database], cwd=REPO, capture_output=True, text=True,
                              check=False)
        if done.returncode != 0:
            raise BenchError(f"migrate failed: {done.stderr.strip()}")
        return time.perf_counter() - started


ANALYZED = "PostgreSQL analyzed"
# (column, index): None is the SQLite file, "pg" the migrated PostgreSQL database.
FIND_SETUPS = (("SQLite", None), ("PostgreSQL", "pg"), (ANALYZED, "pg"))


def analyze(database: str) -> float:
    """ANALYZE the database (planner statistics); the seconds it took."""
    import psycopg2

    with contextlib.closing(psycopg2.connect(database)) as conn:
        conn.autocommit = True
        with conn.cursor() as cursor:
            started = time.perf_counter()
            cursor.execute("ANALYZE")
            return time.perf_counter() - started


def find_runs(args: argparse.Namespace) -> tuple[str, bool]:
    """Both indexes queried; the report's lines and whether every answer was right."""
    storage: Path = args.find_db or Path(f"/tmp/dicomnode-find-bench/{args.find}/storage")
    filled = findbench.cached_fill(storage, args.find)
    if filled is None:
        filled = findbench.fill(storage, args.find)
    queries = findbench.build_queries(storage / "index.sqlite", filled.patients)
    lines = [f"# C-FIND: {filled.instances:,} instances, {filled.studies:,} studies, "
             f"{filled.patients:,} patients; 1 warm-up + {args.find_repeat} timed runs per "
             "query; node's own time (median, from its log), ms"]
    medians: dict[str, dict[str, float | None]] = {}
    counts: dict[str, int | None] = {}
    ok = True
    with new_database(args.postgres) as database:
        seconds = migrate(storage, database, args.python)
        lines.append(f"# PostgreSQL index: `dicom-node migrate` copied it in {seconds:.0f} s; "
                     "queried as migrated, then again after ANALYZE (which autovacuum runs "
                     "on its own some time after a bulk load)")
        for name, url in FIND_SETUPS:
            print(f"find: {name} ...", file=sys.stderr, flush=True)
            if name == ANALYZED:
                seconds = analyze(database)
                lines.append(f"# ANALYZE took {seconds:.1f} s")
            url = None if url is None else database
            workdir = Path(tempfile.mkdtemp(prefix="dicomnode-nodes-find-"))
            node = FindNode(storage, workdir, args.python, 180.0, url)
            try:
                node.start()
                assert node.proc is not None
                _, results = findbench.measure(node.port, node.proc.pid, queries,
                                               args.find_repeat, node.log_path)
            finally:
                node.stop()
                shutil.rmtree(workdir, ignore_errors=True)
            for r in results:
                own = statistics.median(r.node_own_ms) if r.node_own_ms else None
                medians.setdefault(r.name, {})[name] = own
                counts[r.name] = r.matches
                if r.error or r.problems:
                    ok = False
                    lines.append(f"! {name} {r.name}: {r.error or '; '.join(r.problems)}")
        concurrent, concurrent_ok = concurrent_find_runs(args, storage, database, queries)
        ok = ok and concurrent_ok
    rows = [["query", "matches", *[f"{name} ms" for name, _ in FIND_SETUPS]]]
    for query in queries:
        got = medians.get(query.name, {})
        rows.append([query.name, str(counts.get(query.name, "-")),
                     *[f"{v:.1f}" if (v := got.get(k)) is not None else "-"
                       for k, _ in FIND_SETUPS]])
    return "\n".join([*lines, render_table(rows), *concurrent]), ok


# (column, nodes): two clients query at once, both through one node or one through each.
CONCURRENT_SETUPS = (("1 node", 1), ("2 nodes", 2))


def _client(port: int, pid: int, queries: Sequence[findbench.Query], repeat: int,
            log: Path) -> list[findbench.QueryResult]:
    return findbench.measure(port, pid, queries, repeat, log)[1]


def concurrent_find_runs(args: argparse.Namespace, storage: Path, database: str,
                         queries: Sequence[findbench.Query]) -> tuple[list[str], bool]:
    """Two clients run the query set at once against the analyzed PostgreSQL index: both on one
    node, then each on its own node of two sharing the index and the store.

    Each client is its own process (so the clients do not share a GIL); the figures are each
    query's round trip at the client (median over both clients' timed runs: with two clients
    on one node) and the wall time of the whole, and the node's own time of each query
    (median over both clients, from the nodes' logs, told apart by their match counts).
    """
    import multiprocessing

    lines = [f"# C-FIND, two clients at once (each its own process, the query set with 1 "
             f"warm-up + {args.find_repeat} runs per query), PostgreSQL analyzed: through one "
             "node, then one client through each of two nodes on the same index and store; "
             "\"own\": the node's own time (its log), the other the round trip at the "
             "client; medians over both clients, ms"]
    medians: dict[str, dict[str, float | None]] = {}
    ok = True
    for name, count in CONCURRENT_SETUPS:
        print(f"find: two clients, {name} ...", file=sys.stderr, flush=True)
        nodes: list[FindNode] = []
        workdirs: list[Path] = []
        try:
            for _ in range(count):
                workdirs.append(Path(tempfile.mkdtemp(prefix="dicomnode-nodes-find-")))
                nodes.append(FindNode(storage, workdirs[-1], args.python, 180.0, database))
                nodes[-1].start()
            targets = [nodes[0], nodes[-1]]
            jobs = []
            for node in targets:
                assert node.proc is not None
                jobs.append((node.port, node.proc.pid, queries, args.find_repeat,
                             node.log_path))
            started = time.perf_counter()
            with multiprocessing.get_context("fork").Pool(2) as pool:
                answers = pool.starmap(_client, jobs)
                pool.close()  # workers end on their own (the pool's exit would SIGTERM them)
                pool.join()
            wall = time.perf_counter() - started
            logged = [t for node in nodes for t in _logged_finds(node.log_path)]
        finally:
            for node in nodes:
                node.stop()
            for workdir in workdirs:
                shutil.rmtree(workdir, ignore_errors=True)
        lines.append(f"# {name}: both clients done in {wall:.1f} s")
        for results in answers:
            for r in results:
                if r.error or r.problems:
                    ok = False
                    lines.append(f"! two clients, {name}, {r.name}: "
                                 f"{r.error or '; '.join(r.problems)}")
        for query in queries:
            samples = [v for results in answers for r in results if r.name == query.name
                       for v in r.samples_ms]
            own = [ms for matches, ms in logged if matches == len(query.expected)]
            medians.setdefault(query.name, {})[name] = (statistics.median(samples)
                                                        if samples else None)
            medians[query.name][f"{name} own"] = statistics.median(own) if own else None
    columns = [key for name, _ in CONCURRENT_SETUPS for key in (f"{name} own", name)]
    rows = [["query", *[f"{key} ms" for key in columns]]]
    for query in queries:
        got = medians.get(query.name, {})
        rows.append([query.name, *[f"{v:.1f}" if (v := got.get(k)) is not None else "-"
                                   for k in columns]])
    return [*lines, render_table(rows)], ok


_FIND_LINE = re.compile(r"C-FIND \w+ root \w+: (\d+) matches, status 0x0000.*, ([0-9.]+) ms$")


def _logged_finds(log: Path) -> list[tuple[int, float]]:
    """(matches, node's own ms) of each successful C-FIND in a node's log.  The queries'
    match counts differ, so they tell the queries apart when two clients share one node."""
    return [(int(m[1]), float(m[2])) for line in log.read_text(errors="replace").splitlines()
            if (m := _FIND_LINE.search(line))]


# --------------------------------------------------------------------------------------------
# main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Ingest with one node on SQLite, one on PostgreSQL and two on PostgreSQL "
        "behind one port; optionally C-FIND on a large index, SQLite vs PostgreSQL.")
    parser.add_argument("--corpus", type=Path, default=Path("/tmp/dicomnode-nodes-corpus"),
                        help="where the generated corpus is cached (default: %(default)s)")
    parser.add_argument("--small", type=int, default=2000, metavar="N",
                        help="64x64 instances sent by four storescu (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=2, metavar="K",
                        help="runs of each setup, taking turns; 0: C-FIND only "
                        "(default: %(default)s)")
    parser.add_argument("--setups", default=",".join(SETUPS),
                        help="comma-separated, of %(default)s")
    parser.add_argument("--postgres", default=POSTGRES,
                        help="PostgreSQL server URL without database (default: %(default)s)")
    parser.add_argument("--find", type=int, default=0, metavar="N",
                        help="also C-FIND on an index of N instances (0: skip; default)")
    parser.add_argument("--find-db", type=Path, metavar="PATH",
                        help="find.py's store to fill or reuse (default: its own cache)")
    parser.add_argument("--find-repeat", type=int, default=10, metavar="R",
                        help="timed runs of each query (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds one ingest run may take (default: %(default)s)")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter that runs `-m node` (default: %(default)s)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the nodes' stores, configs and logs")
    args = parser.parse_args(argv)
    args.setup_list = [s.strip() for s in args.setups.split(",") if s.strip()]
    unknown = [s for s in args.setup_list if s not in SETUPS]
    if unknown:
        parser.error(f"unknown setups: {', '.join(unknown)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    info = common_machine_info(args.python, orthanc=False, node=True)
    runs: list[IngestRun] = []
    report = ""
    find_ok = True
    with interrupts_stop_children():
        workroot = Path(tempfile.mkdtemp(prefix="dicomnode-nodes-"))
        try:
            corpus = ensure_corpus(args.corpus, args.small, 0)
            for repeat in range(1, args.repeat + 1):
                for setup in args.setup_list:
                    print(f"{setup} #{repeat} ...", file=sys.stderr, end="", flush=True)
                    run = ingest_run(setup, repeat, corpus.small_parts, corpus.small,
                                     workroot, args)
                    runs.append(run)
                    shown = (f"{run.seconds:.2f} s, {run.rate:,.0f} inst/s" if run.rate
                             else f"FAILED: {run.error}")
                    print(" " + shown, file=sys.stderr, flush=True)
            if args.find:
                report, find_ok = find_runs(args)
        except KeyboardInterrupt:
            print("\ninterrupted; nodes stopped", file=sys.stderr)
            return 130
        except BenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            if not args.keep:
                shutil.rmtree(workroot, ignore_errors=True)

    print(f"# nodes benchmark  nproc={info['nproc']}  cpu={info['cpu']}  "
          f"python={info['python']}  dcmtk={info['dcmtk']}  node={info['node']}")
    busy = info["cpu_busy_at_start"]
    if busy is not None and busy > 0.15:
        print(f"# warning: CPUs were {busy:.0%} busy before the start; figures may be low")
    if runs:
        print(f"# ingest: {args.small} x 64x64 CT/MR sent by 4 storescu at once over {HOST}; "
              "fresh nodes, empty store and new database per run")
        print(ingest_table(runs, args.repeat))
    for run in runs:
        if run.error:
            print(f"! {run.setup} #{run.repeat}: {run.error}")
        elif run.other_cpu_s and run.seconds and run.other_cpu_s > 0.1 * run.seconds:
            print(f"# noise: {run.setup} #{run.repeat}: other processes used "
                  f"{run.other_cpu_s:.1f} CPU-s in {run.seconds:.1f} s"
                  + (" (PostgreSQL's own among them)" if run.setup.startswith("pg") else ""))
    if report:
        print(report)
    return 0 if all(r.ok for r in runs) and find_ok else 1


if __name__ == "__main__":
    sys.exit(main())
