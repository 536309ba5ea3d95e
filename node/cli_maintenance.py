"""The maintenance subcommands: ``import``, ``verify``, ``reindex``, ``stats``, ``delete``
and ``migrate``.

Each reads its arguments, opens what it needs, runs the domain code of ``node.maintenance`` with a
progress bar when stderr is a terminal, prints the summary on stdout (reasons on stderr) and
returns the exit code (0 when all is well, 1 when problems remain; ``node.cli`` answers 2 for a
BadRequest and turns NodeError/OSError into one line).  Registered in ``node.cli.COMMANDS``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from node.config import NodeConfig
from node.errors import NodeError
from node.logs import setup_logging
from node.maintenance import Progress
from node.remote.errors import BadRequest

EXIT_OK = 0  # as node.cli
EXIT_FAILURE = 1


def _progress() -> Progress | None:
    """A progress bar on a terminal; nothing elsewhere (the summary says it all)."""
    from node.cli_progress import ProgressBar

    return ProgressBar(sys.stderr) if sys.stderr.isatty() else None


@contextmanager
def _index_errors(config: NodeConfig) -> Iterator[None]:
    """A database error in a maintenance command ends as one line, like any other failure."""
    from peewee import PeeweeException

    try:
        yield
    except PeeweeException as exc:
        raise NodeError(f"index {config.database.describe()}: {exc}") from exc


def run_import(config: NodeConfig, args: argparse.Namespace) -> int:
    from node.dicom.contexts import STORAGE_TRANSFER_SYNTAXES
    from node.maintenance.importer import Importer
    from node.services import open_services

    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        raise BadRequest(f"no such file or folder: {', '.join(missing)}")
    setup_logging(config.log_level)
    services = open_services(config)
    try:
        with _index_errors(config):
            importer = Importer(services.ingestor, STORAGE_TRANSFER_SYNTAXES, args.workers)
            summary = importer.run(args.paths, _progress())
    finally:
        services.close()
    print(f"import: {summary.line()}")
    for reason, count in summary.errors.most_common():
        print(f"dicom-node: {count} failed: {reason}", file=sys.stderr)
    if summary.stopped:
        print(f"dicom-node: import stopped early: {summary.stopped}", file=sys.stderr)
    return EXIT_OK if summary.ok else EXIT_FAILURE


def run_verify(config: NodeConfig, args: argparse.Namespace) -> int:
    from node.maintenance.verify import Verifier
    from node.services import open_services

    setup_logging(config.log_level)
    services = open_services(config)
    try:
        with _index_errors(config):
            verifier = Verifier(services.db, services.store, services.ingestor, args.repair)
            report = verifier.run(_progress())
    finally:
        services.close()
    print(f"verify: {report.line()}")
    if not report.ok:
        hint = "" if args.repair else " (--repair fixes them)"
        print(f"dicom-node: {report.unrepaired} problems not repaired{hint}", file=sys.stderr)
    return EXIT_OK if report.ok else EXIT_FAILURE


def run_reindex(config: NodeConfig, args: argparse.Namespace) -> int:
    from node.maintenance.reindex import reindex
    from node.store import Store

    if not (config.storage / "objects").is_dir():
        raise NodeError(f"no store at {config.storage} (no objects/ folder): nothing to "
                        "reindex from")
    setup_logging(config.log_level)
    store = Store(config.storage)
    store.open()
    try:
        with _index_errors(config):
            report = reindex(config, store, _progress())
    finally:
        store.close()
    print(report.line())
    for reason, count in report.errors.most_common():
        print(f"dicom-node: {count} files moved to quarantine: {reason}", file=sys.stderr)
    return EXIT_OK if report.ok else EXIT_FAILURE


def run_stats(config: NodeConfig, args: argparse.Namespace) -> int:
    from node.maintenance.stats import as_json, collect, text_lines
    from node.services import open_services

    setup_logging(config.log_level)
    services = open_services(config)
    try:
        with _index_errors(config):
            stats = collect(services.db, services.store, top=args.top, disk=not args.no_disk)
    finally:
        services.close()
    if args.json:
        print(json.dumps(as_json(stats), indent=2))
    else:
        print("\n".join(text_lines(stats)))
    return EXIT_OK


def run_migrate(config: NodeConfig, args: argparse.Namespace) -> int:
    from node.config import ConfigError, parse_database_url
    from node.maintenance.migrate import migrate
    from node.store import Store

    try:
        target = parse_database_url(args.to, Path.cwd())
    except ConfigError as exc:
        raise BadRequest(f"--to: {exc}") from exc
    if not (config.storage / "objects").is_dir():
        raise NodeError(f"no store at {config.storage} (no objects/ folder): nothing to migrate")
    setup_logging(config.log_level)
    store = Store(config.storage)
    store.open()
    try:
        with _index_errors(config):
            report = migrate(config, store, target, _progress())
    finally:
        store.close()
    print(report.line())
    print(f"next: set `database: {args.to}` in {config.source or 'the config'} and start "
          "the node")
    return EXIT_OK


def run_delete(config: NodeConfig, args: argparse.Namespace) -> int:
    from node.index.deletion import Level
    from node.services import open_services

    named = [(level, values) for level, values in (
        (Level.PATIENT, args.patient), (Level.STUDY, args.study), (Level.SERIES, args.series),
        (Level.INSTANCE, args.instance)) if values]
    if len(named) != 1:
        raise BadRequest("name what to delete with one of --patient, --study, --series or "
                         "--instance (each may be repeated)")
    if args.issuer is not None and named[0][0] is not Level.PATIENT:
        raise BadRequest("--issuer goes with --patient")
    level, values = named[0]
    setup_logging(config.log_level)
    services = open_services(config)
    try:
        with _index_errors(config):
            studies = services.deleter.studies(level, values, args.issuer)
            if not studies:
                print(f"dicom-node: no {level.value} held matches", file=sys.stderr)
                return EXIT_FAILURE
            if args.dry_run:
                print(f"delete --dry-run: {len(studies)} studies hold what was named:")
                for _, uid in studies:
                    print(f"  {uid}")
                return EXIT_OK
            progress = _progress()
            if progress is not None:
                progress.start(len(studies))
            try:
                report = services.deleter.delete(
                    level, values, args.issuer, reason="deleted by dicom-node delete",
                    progress=None if progress is None
                    else lambda done, _total: progress.update(done, 0))
            finally:
                if progress is not None:
                    progress.finish()
    finally:
        services.close()
    print(f"delete: {report.line()}")
    for uid in report.leased:
        print(f"dicom-node: study {uid} not deleted: a retrieve is sending it; run again later",
              file=sys.stderr)
    return EXIT_OK if report.ok else EXIT_FAILURE


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 0 < value <= 64:
        raise argparse.ArgumentTypeError(f"must be 1 to 64, got {text!r}")
    return value


IMPORT_EPILOG = """\
Each file goes through the same path as a C-STORE: the SOP Class/Instance UIDs and transfer
syntax come from its File Meta, its dataset is kept byte for byte, and the `duplicates` policy
applies. Files without File Meta are read when they start like a little endian dataset (their
UIDs then come from the dataset). DICOMDIR and non-DICOM files are skipped and counted. Safe
while `serve` runs. Exit 0 when no file failed, 1 otherwise, 2 for a path that does not exist.
"""

VERIFY_EPILOG = """\
Checks every indexed file is present and hashes to its name (SHA-256), and every file in the
store has an index row. With --repair: rows whose file is missing are dropped, corrupt files
are moved to <storage>/quarantine/ and their rows dropped, files without a row are indexed
again through the ingest path (or quarantined when they cannot be). Each repair is logged with
its SOP Instance UID. Safe while `serve` runs. Exit 0 when nothing is wrong (or all was
repaired), 1 otherwise.
"""

REINDEX_EPILOG = """\
Rebuilds the whole index from the files in the store, e.g. after the database was lost. Stop
`serve` first: reindex refuses to run while another process has the store open. SQLite: a new
database is built beside the old one and renamed over it at the end; PostgreSQL: the tables
are emptied and filled in one transaction. The sender's AE title and the arrival time are not
in the files: instances are recorded as received from "reindex" at their file's modification
time. Files that cannot be indexed are moved to <storage>/quarantine/. Exit 1 when any was.
"""


def import_arguments(command: argparse.ArgumentParser) -> None:
    command.formatter_class = argparse.RawDescriptionHelpFormatter
    command.epilog = IMPORT_EPILOG
    command.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                         help="DICOM files, or folders searched recursively")
    command.add_argument(
        "--workers", type=_positive_int, default=4, metavar="N",
        help="files ingested at once (default: 4)",
    )


def verify_arguments(command: argparse.ArgumentParser) -> None:
    command.formatter_class = argparse.RawDescriptionHelpFormatter
    command.epilog = VERIFY_EPILOG
    command.add_argument("--repair", action="store_true",
                         help="fix what is found (see below), and say what was done")


def reindex_arguments(command: argparse.ArgumentParser) -> None:
    command.formatter_class = argparse.RawDescriptionHelpFormatter
    command.epilog = REINDEX_EPILOG


def stats_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--json", action="store_true", help="print the figures as JSON")
    command.add_argument("--top", type=_positive_int, default=10, metavar="N",
                         help="modalities listed (default: 10)")
    command.add_argument("--no-disk", action="store_true",
                         help="skip the walk of the store that measures its size on disk")


DELETE_EPILOG = """\
Deletes whole patients or studies, or series or single instances, from the index and the
store: each study's rows in one transaction, then its files. Series, studies and patients left
without instances go with them. A study that a C-MOVE or C-GET is sending (from any node sharing
the index) is left and named; run the command again later. Safe while `serve` runs. Each
deleted study is logged by its UID. There is no undo: back up first (README, Operations).
Exit 0 when everything named was deleted, 1 when nothing matched or a study was left, 2 for
bad arguments.
"""


def delete_arguments(command: argparse.ArgumentParser) -> None:
    command.formatter_class = argparse.RawDescriptionHelpFormatter
    command.epilog = DELETE_EPILOG
    what = command.add_argument_group("what to delete (one kind, repeatable)")
    what.add_argument("--patient", action="append", default=[], metavar="ID",
                      help="every study of the patient with this Patient ID")
    what.add_argument("--issuer", metavar="ISSUER",
                      help="with --patient: only that Issuer of Patient ID (default: any)")
    what.add_argument("--study", action="append", default=[], metavar="UID",
                      help="the study with this Study Instance UID")
    what.add_argument("--series", action="append", default=[], metavar="UID",
                      help="the series with this Series Instance UID")
    what.add_argument("--instance", action="append", default=[], metavar="UID",
                      help="the instance with this SOP Instance UID")
    command.add_argument("--dry-run", action="store_true",
                         help="list the studies concerned, delete nothing")


MIGRATE_EPILOG = """\
Copies the index (patients, studies, series, instances, with their ids) from the database in
the config into an empty PostgreSQL database, in one transaction, and checks the row counts.
The store is not touched. Stop `serve` first: migrate refuses while another process has the
store open. Then set `database:` to the new URL and start the node. A target that holds index
rows already is refused. Exit 0 when all rows were copied.
"""


def migrate_arguments(command: argparse.ArgumentParser) -> None:
    command.formatter_class = argparse.RawDescriptionHelpFormatter
    command.epilog = MIGRATE_EPILOG
    command.add_argument("--to", required=True, metavar="URL",
                         help="the new index: postgresql://user:password@host:port/dbname")
