#!/usr/bin/env python3
"""Ingest benchmark: C-STORE throughput of DICOM servers on this machine, side by side.

Targets (``--targets``, comma separated, in the order given):

``node``
    this repository's node, ``python -m node serve -c CONFIG`` run from the repository root;
``orthanc``
    a private Orthanc instance (``/usr/sbin/Orthanc``) with its own JSON configuration, ports
    and storage; a packaged Orthanc service, if one runs, is left alone;
``storescp``
    DCMTK ``storescp`` writing plain files with no index: the floor of what ingest can cost.
    It serves one association at a time, so its 4-association figure is sequential.
``baseline``
    the node again, started from the repository given by ``--baseline`` (say a checkout of
    an earlier commit), to compare two versions of the node in one machine state.

Each target goes through three runs, each against a freshly started server with an empty
storage directory of its own (so a run never meets the instances of the one before); the runs'
storage is deleted only when the benchmark ends, because on ext4 without a journal (this
machine's disk) files created within ~30 s of many deletions cost the kernel a scan past every
recently deleted inode.  For the same reason, start a benchmark half a minute after the last
one ended:

``1-assoc``  the small corpus sent by one ``storescu`` association;
``4-assoc``  the small corpus, pre-split in four folders, sent by four ``storescu`` at once;
``large``    the 512x512 corpus sent by one association (MB/s and instances/s).

Times are wall clock from starting the ``storescu`` processes until the last one exits, so
they include storescu's start-up and its scan of the input files (the same for every target).
After each run the stored instances are counted (files for node and storescp, plus the rows
of the node's SQLite index; ``GET /statistics`` for Orthanc) and the peak RSS (VmHWM) of the
server and its children is read from ``/proc`` before the server is stopped.  The CPU time of
the server, of storescu and of everything else during each run is recorded too: when other
processes used the CPUs meanwhile, a ``# noise:`` line names the runs concerned.
``--repeat K`` runs everything K times and the table shows medians (the JSON keeps each run);
the repeats take turns (every target once, then every target again), so a machine that gets
busier meanwhile weighs on all targets alike.  Wall-clock rates on a shared machine move with
its load; the server's CPU time per instance (``CPU ms/inst``) moves much less and shows where
a change saved work.

The corpus is generated once with pydicom and cached in ``--corpus`` (regenerated when the
requested sizes change).  Every DCMTK tool is called by full path with ``TCP_NODELAY=1``:
Debian's DCMTK leaves Nagle's algorithm on otherwise.  Orthanc talks DICOM through the same
libdcmtk, so it gets ``TCP_NODELAY=1`` too (without it, every C-STORE waits ~40 ms for a
delayed ACK and Orthanc ingests ~22 instances/s); ``--orthanc-nagle`` turns that off.

Example::

    python benchmarks/ingest.py --targets node,orthanc,storescp --json /tmp/ingest.json

Exit status: 0 when every run succeeded and every instance sent was stored, 1 otherwise,
2 for bad arguments or a missing tool.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common import (
    CT_IMAGE_STORAGE,
    ECHOSCU,
    HOST,
    MR_IMAGE_STORAGE,
    ORTHANC,
    REPO,
    STORESCP,
    STORESCU,
    BenchError,
    NodeServer,
    OrthancServer,
    Server,
    StorescpServer,
    busy_seconds,
    children_cpu_seconds,
    count_files,
    interrupts_stop_children,
    render_table,
    send,
    write_instance,
)
from common import (
    machine_info as common_machine_info,
)

CORPUS_VERSION = 1  # bump when the generated files change, so stale caches are rebuilt
SMALL_SPLIT = 4
SMALL_STUDIES = 50  # the small corpus is ~50 studies x 2 series (one CT, one MR)
LARGE_STUDIES = 5
ALL_TARGETS = ("node", "orthanc", "storescp", "baseline")
NOISE = 0.1  # other processes using more than this share of one CPU during a run: say so
RUNS = ("1-assoc", "4-assoc", "large")


# --------------------------------------------------------------------------------------------
# corpus


@dataclass(frozen=True)
class Corpus:
    """The cached input files."""

    root: Path
    small: int
    large: int
    small_bytes: int
    large_bytes: int

    @property
    def small_dir(self) -> Path:
        return self.root / "small"

    @property
    def small_parts(self) -> list[Path]:
        return [self.small_dir / str(k) for k in range(SMALL_SPLIT)]

    @property
    def large_dir(self) -> Path:
        return self.root / "large"


def generate_small(target: Path, count: int) -> int:
    """``count`` 64x64 CT/MR instances (alternating) in ``target/0..3``; return total bytes."""
    from pydicom.uid import generate_uid

    parts = [target / str(k) for k in range(SMALL_SPLIT)]
    for part in parts:
        part.mkdir(parents=True)
    studies = [generate_uid() for _ in range(SMALL_STUDIES)]
    series = {(s, m): generate_uid() for s in range(SMALL_STUDIES) for m in ("CT", "MR")}
    total = 0
    for i in range(count):
        modality = "CT" if i % 2 == 0 else "MR"
        study = (i // 2) % SMALL_STUDIES
        total += write_instance(
            parts[i % SMALL_SPLIT] / f"IMG{i:06d}.dcm",
            sop_class=CT_IMAGE_STORAGE if modality == "CT" else MR_IMAGE_STORAGE,
            modality=modality,
            patient=study // 2 + 1,  # two studies per patient
            study_uid=studies[study],
            study_index=study,
            series_uid=series[(study, modality)],
            series_number=1 if modality == "CT" else 2,
            instance_number=i // (2 * SMALL_STUDIES) + 1,
            size=64,
        )
    return total


def generate_large(target: Path, count: int) -> int:
    """``count`` 512x512 CT instances in ``target``; return total bytes."""
    from pydicom.uid import generate_uid

    target.mkdir(parents=True)
    studies = [(generate_uid(), generate_uid()) for _ in range(LARGE_STUDIES)]
    total = 0
    for i in range(count):
        study = i % LARGE_STUDIES
        study_uid, series_uid = studies[study]
        total += write_instance(
            target / f"CT{i:06d}.dcm",
            sop_class=CT_IMAGE_STORAGE,
            modality="CT",
            patient=1000 + study,
            study_uid=study_uid,
            study_index=SMALL_STUDIES + study,
            series_uid=series_uid,
            series_number=1,
            instance_number=i // LARGE_STUDIES + 1,
            size=512,
        )
    return total


def ensure_corpus(root: Path, small: int, large: int) -> Corpus:
    """Reuse the corpus cached in ``root`` if it has the requested sizes, else build it.

    Only ``root/small``, ``root/large`` and ``root/manifest.json`` are ever removed.
    """
    manifest_path = root / "manifest.json"
    wanted = {"version": CORPUS_VERSION, "small": small, "large": large}
    with contextlib.suppress(OSError, ValueError):
        manifest = json.loads(manifest_path.read_text())
        if {k: manifest.get(k) for k in wanted} == wanted:
            corpus = Corpus(root, small, large, manifest["small_bytes"], manifest["large_bytes"])
            if count_files(corpus.small_dir) == small and count_files(corpus.large_dir) == large:
                print(f"corpus: reusing {root} ({small} small, {large} large)", file=sys.stderr)
                return corpus
    try:
        import pydicom  # noqa: F401  (fail early with a clear message)
    except ImportError as exc:
        raise BenchError(f"generating the corpus needs pydicom: {exc}") from exc
    root.mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)
    for sub in ("small", "large"):
        shutil.rmtree(root / sub, ignore_errors=True)
    print(f"corpus: generating {small} small + {large} large in {root} ...", file=sys.stderr)
    started = time.perf_counter()
    small_bytes = generate_small(root / "small", small)
    large_bytes = generate_large(root / "large", large)
    elapsed = time.perf_counter() - started
    print(f"corpus: done in {elapsed:.1f} s", file=sys.stderr)
    manifest_path.write_text(
        json.dumps({**wanted, "small_bytes": small_bytes, "large_bytes": large_bytes}, indent=2)
    )
    return Corpus(root, small, large, small_bytes, large_bytes)


# --------------------------------------------------------------------------------------------
# runs


@dataclass
class RunResult:
    """One run: a fresh server, one corpus sent by one or more storescu."""

    run: str
    repeat: int
    associations: int
    sent: int
    bytes: int
    seconds: float | None = None
    stored: int | None = None
    peak_rss_mb: float | None = None
    server_cpu_s: float | None = None  # CPU the server used while the corpus was sent
    client_cpu_s: float | None = None  # CPU the storescu processes used
    other_cpu_s: float | None = None  # CPU used by everything else meanwhile: noise
    detail: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.stored == self.sent

    @property
    def inst_per_s(self) -> float | None:
        return self.sent / self.seconds if self.seconds and self.error is None else None

    @property
    def mb_per_s(self) -> float | None:
        if not self.seconds or self.error is not None:
            return None
        return self.bytes / 1_000_000 / self.seconds

    @property
    def cpu_ms_per_instance(self) -> float | None:
        """The server's CPU time per instance sent (all its threads, user + system)."""
        if self.server_cpu_s is None or self.error is not None or not self.sent:
            return None
        return self.server_cpu_s * 1000 / self.sent


def make_server(target: str, workdir: Path, args: argparse.Namespace) -> Server:
    """A fresh server of kind ``target`` in ``workdir``, as the arguments ask."""
    if target == "node":
        return NodeServer(workdir, args.ready_timeout, python=args.python, repo=args.repo)
    if target == "baseline":
        return NodeServer(workdir, args.ready_timeout, python=args.python, repo=args.baseline)
    if target == "orthanc":
        return OrthancServer(workdir, args.ready_timeout, nagle=args.orthanc_nagle)
    return StorescpServer(workdir, args.ready_timeout)


@dataclass
class TargetResult:
    target: str
    repeats: int
    runs: list[RunResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return len(self.runs) == len(RUNS) * self.repeats and all(r.ok for r in self.runs)

    def median(self, name: str, value: Callable[[RunResult], float | None]) -> float | None:
        """Median of ``value`` over the successful repeats of run ``name``."""
        values = [v for r in self.runs if r.run == name and r.ok and (v := value(r)) is not None]
        return statistics.median(values) if values else None


def measure(
    target: str, run: str, repeat: int, corpus: Corpus, workroot: Path, args: argparse.Namespace
) -> RunResult:
    if run == "large":
        folders, sent, size = [corpus.large_dir], corpus.large, corpus.large_bytes
    elif run == "4-assoc":
        folders, sent, size = corpus.small_parts, corpus.small, corpus.small_bytes
    else:
        folders, sent, size = [corpus.small_dir], corpus.small, corpus.small_bytes
    result = RunResult(run, repeat, associations=len(folders), sent=sent, bytes=size)
    workdir = workroot / target / f"{run}-{repeat}"
    server = make_server(target, workdir, args)
    try:
        server.start()
        server0, client0, busy0 = server.cpu_seconds(), children_cpu_seconds(), busy_seconds()
        result.seconds, problems = send(server.aet, server.port, folders, args.timeout)
        server1, client1, busy1 = server.cpu_seconds(), children_cpu_seconds(), busy_seconds()
        if not server.alive():
            problems.append(f"{target} died during the run\n{server.log_tail()}")
        else:
            result.peak_rss_mb = server.peak_rss_mb()
            if server0 is not None and server1 is not None and busy0 and busy1:
                server_cpu, client_cpu = server1 - server0, client1 - client0
                result.server_cpu_s = round(server_cpu, 2)
                result.client_cpu_s = round(client_cpu, 2)
                result.other_cpu_s = round(max(0.0, busy1 - busy0 - server_cpu - client_cpu), 2)
            result.stored, result.detail = server.count()
        if problems:
            result.error = "\n".join(problems)
        elif result.stored != sent:
            result.error = f"sent {sent} instances, {result.stored} stored"
        elif isinstance(result.detail.get("indexed"), int) and result.detail["indexed"] != sent:
            result.error = f"sent {sent} instances, {result.detail['indexed']} in the index"
    except BenchError as exc:
        result.error = str(exc)
    finally:
        server.stop()
        # The run's storage stays until the whole benchmark ends (main deletes the work root):
        # on ext4 without a journal, a file created within ~30 s of many deletions costs a
        # scan past every recently deleted inode (the kernel's find_inode_bit and
        # recently_deleted), which took about a third of the node's CPU per instance when the
        # previous run's 10,500 files had just been deleted.
    return result


# --------------------------------------------------------------------------------------------
# report


def machine_info(args: argparse.Namespace, targets: Sequence[str]) -> dict[str, Any]:
    return common_machine_info(args.python, orthanc="orthanc" in targets, node="node" in targets)


def _fmt(value: float | None, digits: int = 0) -> str:
    return "FAIL" if value is None else f"{value:,.{digits}f}"


def table(results: Sequence[TargetResult]) -> str:
    header = (
        "target",
        "1-assoc inst/s",
        "4-assoc inst/s",
        "512x512 MB/s",
        "512x512 inst/s",
        "CPU ms/inst 1/4/512",
        "peak RSS MB",
        "stored/sent",
    )
    rows: list[tuple[str, ...]] = [header]
    for result in results:
        rss = [r.peak_rss_mb for r in result.runs if r.peak_rss_mb is not None]
        stored = sum(r.stored or 0 for r in result.runs)
        sent = sum(r.sent for r in result.runs)
        mark = "" if result.ok else " !"
        rows.append(
            (
                result.target,
                _fmt(result.median("1-assoc", lambda r: r.inst_per_s)),
                _fmt(result.median("4-assoc", lambda r: r.inst_per_s)),
                _fmt(result.median("large", lambda r: r.mb_per_s), 1),
                _fmt(result.median("large", lambda r: r.inst_per_s), 1),
                "/".join(_fmt(result.median(run, lambda r: r.cpu_ms_per_instance), 1)
                         for run in RUNS),
                _fmt(max(rss) if rss else None, 1),
                f"{stored}/{sent}{mark}",
            )
        )
    return render_table(rows)


# --------------------------------------------------------------------------------------------
# main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure C-STORE ingest of the node, Orthanc and DCMTK storescp.",
        epilog="Each target runs three times (1-assoc, 4-assoc, large), each time freshly "
        "started on an empty storage directory. Run from anywhere; the node is started from "
        "the repository root.",
    )
    parser.add_argument(
        "--targets",
        default=",".join(ALL_TARGETS),
        help=f"comma-separated targets, in order (default: {','.join(ALL_TARGETS)})",
    )
    parser.add_argument(
        "--corpus",
        type=Path,
        default=Path("/tmp/dicomnode-bench-corpus"),
        help="where the generated corpus is cached (default: %(default)s)",
    )
    parser.add_argument(
        "--small",
        type=int,
        default=5000,
        metavar="N",
        help="small 64x64 CT/MR instances (default: %(default)s)",
    )
    parser.add_argument(
        "--large",
        type=int,
        default=500,
        metavar="M",
        help="512x512 CT instances (default: %(default)s)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()),
        help="parent of the temporary directory holding the servers' storage "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the servers' storage, configs and logs instead of deleting them",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="K",
        help="run every measurement K times; the table shows medians (default: %(default)s)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also save results as JSON")
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="interpreter that runs `-m node serve` (default: %(default)s)",
    )
    parser.add_argument(
        "--repo",
        type=Path,
        default=REPO,
        help="repository root the node is started from (default: %(default)s)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="REPO",
        help="repository root of another version of the node, run as target 'baseline' "
        "(added to --targets when not named there)",
    )
    parser.add_argument(
        "--orthanc-nagle",
        action="store_true",
        help="start Orthanc without TCP_NODELAY=1 (as a packaged service runs; ~40 ms per "
        "C-STORE lost to delayed ACKs)",
    )
    parser.add_argument(
        "--ready-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds a server has to answer C-ECHO after start (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=1800.0,
        metavar="S",
        help="seconds one run's storescu may take (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if args.baseline is not None and "baseline" not in targets:
        targets.insert(targets.index("node") + 1 if "node" in targets else 0, "baseline")
    unknown = sorted(set(targets) - set(ALL_TARGETS))
    if unknown or not targets:
        parser.error(
            f"--targets: unknown {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(ALL_TARGETS)}"
        )
    if args.small < SMALL_SPLIT or args.large < 1 or args.repeat < 1:
        parser.error(f"--small must be at least {SMALL_SPLIT}, --large and --repeat at least 1")
    args.target_list = list(dict.fromkeys(targets))
    needed = [STORESCU, ECHOSCU]
    needed += [STORESCP] if "storescp" in targets else []
    needed += [ORTHANC] if "orthanc" in targets else []
    missing = [tool for tool in needed if not os.access(tool, os.X_OK)]
    if missing:
        parser.error(f"missing tool(s): {', '.join(missing)}")
    if "node" in targets and not (args.repo / "node" / "__main__.py").is_file():
        parser.error(f"--repo {args.repo}: no node/__main__.py there")
    if "baseline" in targets and (
        args.baseline is None or not (args.baseline / "node" / "__main__.py").is_file()
    ):
        parser.error("target baseline needs --baseline REPO, a repository with node/__main__.py")
    return args



def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    targets: list[str] = args.target_list
    results: list[TargetResult] = []
    workroot: Path | None = None
    with interrupts_stop_children():
        try:
            corpus = ensure_corpus(args.corpus, args.small, args.large)
            info = machine_info(args, targets)
            args.workdir.mkdir(parents=True, exist_ok=True)
            workroot = Path(tempfile.mkdtemp(prefix="dicomnode-bench-", dir=args.workdir))
            results = [TargetResult(target, args.repeat) for target in targets]
            for repeat in range(1, args.repeat + 1):  # the repeats take turns (module docstring)
                for result in results:
                    for run in RUNS:
                        label = f"{result.target}: {run}" + (
                            f" #{repeat}" if args.repeat > 1 else "")
                        print(f"{label} ...", file=sys.stderr, end="", flush=True)
                        outcome = measure(result.target, run, repeat, corpus, workroot, args)
                        result.runs.append(outcome)
                        print(" " + _progress(outcome), file=sys.stderr, flush=True)
        except KeyboardInterrupt:
            print("\ninterrupted; servers stopped", file=sys.stderr)
            return 130
        except BenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            if workroot is not None and not args.keep:
                shutil.rmtree(workroot, ignore_errors=True)

    print(
        f"# ingest benchmark  nproc={info['nproc']}  cpu={info['cpu']}  "
        f"mem={info['mem_total_mb']} MB  kernel={info['kernel']}  python={info['python']}"
    )
    busy = info["cpu_busy_at_start"]
    if busy is not None and busy > 0.15:
        print(f"# warning: CPUs were {busy:.0%} busy before the start; figures may be low")
    versions = [f"dcmtk={info['dcmtk']}"]
    versions += [f"orthanc={info['orthanc']}"] if info["orthanc"] else []
    versions += [f"node={info['node']}"] if info["node"] else []
    versions += [f"baseline={args.baseline}"] if "baseline" in targets else []
    versions += [f"pydicom={info['pydicom']}"] if info.get("pydicom") else []
    print(f"# {'  '.join(versions)}")
    print(
        f"# corpus: {corpus.small} x 64x64 ({corpus.small_bytes / 1e6:.1f} MB), "
        f"{corpus.large} x 512x512 ({corpus.large_bytes / 1e6:.1f} MB); storescu over "
        f"{HOST}; fresh server + empty storage per run"
    )
    nodelay = ", ".join(
        ["storescu", "echoscu"]
        + (["storescp"] if "storescp" in targets else [])
        + (["Orthanc"] if "orthanc" in targets and not args.orthanc_nagle else [])
    )
    print(f"# TCP_NODELAY=1 for {nodelay} (Debian's libdcmtk leaves Nagle on otherwise)")
    print(table(results))
    failures = [(t.target, r) for t in results for r in t.runs if not r.ok]
    for failed_target, failed in failures:
        print(f"! {failed_target} {failed.run} #{failed.repeat}: {failed.error or 'failed'}")
    noisy = [
        f"{t.target} {r.run} #{r.repeat} ({r.other_cpu_s:.1f} CPU-s in {r.seconds:.1f} s)"
        for t in results
        for r in t.runs
        if r.other_cpu_s is not None and r.seconds and r.other_cpu_s > NOISE * r.seconds
    ]
    if noisy:
        print(f"# noise: other processes used CPU during {'; '.join(noisy)}")
    if "storescp" in targets:
        print("# storescp serves one association at a time: its 4-assoc figure is sequential")

    if args.json:
        payload = {
            "machine": info,
            "corpus": {
                "path": str(corpus.root),
                "small": corpus.small,
                "small_bytes": corpus.small_bytes,
                "large": corpus.large,
                "large_bytes": corpus.large_bytes,
            },
            "results": [
                {
                    "target": t.target,
                    "ok": t.ok,
                    "runs": [
                        {
                            **asdict(r),
                            "inst_per_s": r.inst_per_s,
                            "mb_per_s": r.mb_per_s,
                            "cpu_ms_per_instance": r.cpu_ms_per_instance,
                            "ok": r.ok,
                        }
                        for r in t.runs
                    ],
                }
                for t in results
            ],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 1 if failures else 0


def _progress(run: RunResult) -> str:
    if run.error is not None:
        return "FAILED"
    rate = f"{run.inst_per_s:,.0f} inst/s" if run.inst_per_s else "?"
    if run.run == "large" and run.mb_per_s:
        rate += f", {run.mb_per_s:,.1f} MB/s"
    cpu = ""
    if run.server_cpu_s is not None:
        cpu = (
            f", CPU-s server {run.server_cpu_s:.1f} storescu {run.client_cpu_s:.1f} "
            f"other {run.other_cpu_s:.1f}"
        )
    return f"{run.seconds:.2f} s, {rate}, stored {run.stored}/{run.sent}{cpu}"


if __name__ == "__main__":
    sys.exit(main())
