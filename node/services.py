"""The parts every handler and command is handed: config, store, index, ingest, retrieve, deletion.

Built once from the config by ``open_services``; nothing else in the node reads global state.
The config is held in a ``LiveConfig`` that a reload (SIGHUP) may swap; the parts built here
take only keys that cannot change while the node runs (node.config.LIVE_KEYS).
"""

from __future__ import annotations

from dataclasses import dataclass

from peewee import Database, PeeweeException

from node.config import NodeConfig, Retention
from node.config_reload import LiveConfig
from node.deletion import Deleter
from node.errors import StartupError
from node.index.database import connect, ensure_schema
from node.index.writer import IndexWriter
from node.ingest import Ingestor
from node.query.engine import Finder
from node.retention import RetentionEnforcer
from node.retrieve.plan import RetrievePlanner
from node.store import Store


@dataclass(frozen=True)
class Services:
    live: LiveConfig
    db: Database
    store: Store
    index: IndexWriter
    ingestor: Ingestor
    finder: Finder
    planner: RetrievePlanner
    deleter: Deleter
    retention: RetentionEnforcer  # its thread runs only in serve (node.server)

    @property
    def config(self) -> NodeConfig:
        """The configuration in force now (it may be replaced by a reload)."""
        return self.live.current

    def release_connection(self) -> None:
        """Give this thread's pooled database connection back to the pool.

        A pooled connection (PostgreSQL) belongs to the thread that took it until that thread
        closes it, and pynetdicom runs every association in a new thread: without this, each
        association would keep one until the pool ran dry.  SQLite's connection is the
        thread's own and stays open (reopening it costs its pragmas).
        """
        if self._pooled and not self.db.is_closed():
            self.db.close()

    @property
    def _pooled(self) -> bool:
        return hasattr(self.db, "close_all")

    def close(self) -> None:
        self.store.close()
        self.index.close()
        if not self.db.is_closed():
            self.db.close()
        if hasattr(self.db, "close_all"):  # a pooled database keeps idle connections
            self.db.close_all()


def open_services(config: NodeConfig) -> Services:
    """Open the store and the index (creating both if new) and wire the ingest path."""
    store = Store(config.storage, config.min_free_space, config.store_sync)
    try:
        store.open()
    except OSError as exc:
        raise StartupError(f"store {config.storage} is not usable: {exc.strerror or exc}") from exc
    db = connect(
        config.database, max_connections=config.max_associations, timeout=config.database_timeout
    )
    try:
        db.connect(reuse_if_open=True)
        ensure_schema(db)
    except PeeweeException as exc:
        store.close()
        raise StartupError(f"cannot open index {config.database.describe()}: {exc}") from exc
    index = IndexWriter(db, retries=config.database_retries, shared=True)
    live = LiveConfig(config)
    deleter = Deleter(db, store)

    def retention_policy() -> Retention:
        return live.current.retention  # live: a reload applies to the next pass

    retention = RetentionEnforcer(db, deleter, retention_policy)
    return Services(
        live=live,
        db=db,
        store=store,
        index=index,
        ingestor=Ingestor(store, index, config.duplicates, on_stored=retention.grew),
        finder=Finder(db, store, config.ae_title, fold_names=config.names_case_insensitive,
                      max_matches=config.find_max_matches),
        planner=RetrievePlanner(db, store),
        deleter=deleter,
        retention=retention,
    )
