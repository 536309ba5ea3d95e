"""The parts every handler and command is handed: config, store, index, ingest and retrieve.

Built once from the config by ``open_services``; nothing else in the node reads global state.
The config is held in a ``LiveConfig`` that a reload (SIGHUP) may swap; the parts built here
take only keys that cannot change while the node runs (node.config.LIVE_KEYS).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from peewee import Database, PeeweeException

from node.config import NodeConfig, Peer
from node.config_reload import LiveConfig
from node.errors import StartupError
from node.index.database import connect, ensure_schema
from node.index.writer import IndexWriter
from node.ingest import Ingestor
from node.query.engine import Finder
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

    @property
    def config(self) -> NodeConfig:
        """The configuration in force now (it may be replaced by a reload)."""
        return self.live.current

    def peers(self) -> Mapping[str, Peer]:
        """The peers as configured now, by AE title; ask again for each request (C-MOVE
        destinations), so that a configuration reloaded while the node runs applies."""
        return self.live.current.peers

    def close(self) -> None:
        self.store.close()
        if not self.db.is_closed():
            self.db.close()
        if hasattr(self.db, "close_all"):  # a pooled database keeps idle connections
            self.db.close_all()


def open_services(config: NodeConfig) -> Services:
    """Open the store and the index (creating both if new) and wire the ingest path."""
    store = Store(config.storage)
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
    index = IndexWriter(db, retries=config.database_retries)
    return Services(
        live=LiveConfig(config),
        db=db,
        store=store,
        index=index,
        ingestor=Ingestor(store, index, config.duplicates),
        finder=Finder(db, store, config.ae_title, fold_names=config.names_case_insensitive,
                      max_matches=config.find_max_matches),
        planner=RetrievePlanner(db, store),
    )
