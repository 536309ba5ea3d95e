"""Open the index database named by the config, bind the tables to it, create or check the schema.

SQLite runs in WAL mode with ``synchronous=FULL`` so a committed row survives power loss (a
C-STORE Success promises that); writers take the lock up front (``BEGIN IMMEDIATE``) so two
associations never deadlock upgrading a read lock.  PostgreSQL goes through a connection pool.
"""

from __future__ import annotations

import logging
from urllib.parse import unquote, urlsplit

from peewee import Database, SqliteDatabase

from node.config import DatabaseURL
from node.index.models import SCHEMA_VERSION, TABLES, SchemaInfo

log = logging.getLogger(__name__)

SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    "synchronous": "full",
    "foreign_keys": 1,
    "cache_size": -32_000,  # KiB of page cache per connection
    # PS3.4 C.2.2.2: matching is case-sensitive (except person names, which use their own
    # case-folded column); SQLite's LIKE would otherwise ignore ASCII case.
    "case_sensitive_like": 1,
}


class SchemaMismatch(Exception):
    """The database holds a schema this version of the node cannot use."""


def connect(url: DatabaseURL, max_connections: int = 16, timeout: float = 10.0) -> Database:
    """A peewee Database for ``url`` (not yet connected), with the index tables bound to it."""
    db: Database
    if url.scheme == "sqlite":
        assert url.path is not None
        url.path.parent.mkdir(parents=True, exist_ok=True)
        pragmas = {**SQLITE_PRAGMAS, "busy_timeout": int(timeout * 1000)}
        db = SqliteDatabase(
            str(url.path), pragmas=pragmas, timeout=timeout, lock_type="IMMEDIATE"
        )
    else:
        from playhouse.pool import PooledPostgresqlDatabase

        parts = urlsplit(url.url)
        db = PooledPostgresqlDatabase(
            parts.path.lstrip("/"),
            host=parts.hostname or None,
            port=parts.port or None,
            user=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            # One per association, plus the threads of serve that use the index on their
            # own: retention, the shared sweep and the metrics endpoint.
            max_connections=max_connections + 3,
            stale_timeout=300,
            timeout=timeout,  # seconds to wait for a free pooled connection
            connect_timeout=max(1, int(timeout)),
        )
    db.bind(TABLES)
    return db


# Schema versions this node upgrades from, and what each upgrade adds.  Every upgrade so far
# only adds tables, which create_tables(safe=True) makes; the version row records it.
UPGRADES = {1: "retrieve_lease table"}


def ensure_schema(db: Database) -> None:
    """Create the tables on a new database, upgrade an older schema, refuse a newer one."""
    with db.atomic():
        row = SchemaInfo.select().first() if db.table_exists(SchemaInfo._meta.table_name) \
            else None
        if row is not None and row.version > SCHEMA_VERSION:
            raise SchemaMismatch(
                f"index schema version {row.version} is newer than this node's "
                f"({SCHEMA_VERSION}): upgrade the node, or use another database"
            )
        if row is not None and row.version < SCHEMA_VERSION and row.version not in UPGRADES:
            raise SchemaMismatch(
                f"index schema version {row.version} cannot be upgraded by this node"
            )
        db.create_tables(TABLES, safe=True)
        if row is None:
            SchemaInfo.create(version=SCHEMA_VERSION)
        elif row.version < SCHEMA_VERSION:
            log.info("index schema upgraded from version %d to %d (%s)", row.version,
                     SCHEMA_VERSION, ", ".join(UPGRADES[v] for v in range(row.version,
                                                                          SCHEMA_VERSION)))
            SchemaInfo.update(version=SCHEMA_VERSION).execute()
