"""The schema's history: numbered steps, each a real DDL change, applied in order in one
transaction at start-up. schema.sql is the readable whole of the current version (a test
checks that the steps build exactly that).

A database the worker exported from D1 and loaded into SQLite has the chats table and
version 0: step 1 leaves its table alone (IF NOT EXISTS) and carries on from there.
"""

from __future__ import annotations

import aiosqlite

SCHEMA_VERSION = 9

# MIGRATIONS[n]: the statements that take a database from version n - 1 to version n.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        # The worker's D1 table, column for column.
        """
        CREATE TABLE IF NOT EXISTS chats (
          chat_id TEXT PRIMARY KEY,
          app TEXT NOT NULL,
          model TEXT NOT NULL,
          prompt_tokens INTEGER DEFAULT 0,
          completion_tokens INTEGER DEFAULT 0,
          estimated_cost REAL DEFAULT 0,
          created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
          updated_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP
        )
        """,
        "CREATE INDEX IF NOT EXISTS idx_chats_app_updated_at ON chats(app, updated_at DESC)",
    ),
    2: (
        """
        CREATE TABLE completions (
          id INTEGER PRIMARY KEY,
          started_at TEXT NOT NULL,
          app TEXT,
          model TEXT NOT NULL,
          payer TEXT NOT NULL CHECK (payer IN ('server', 'app', 'user')),
          prompt_tokens INTEGER,
          completion_tokens INTEGER,
          cost REAL,
          status INTEGER NOT NULL,
          outcome TEXT NOT NULL,
          duration_ms INTEGER NOT NULL,
          client_left INTEGER NOT NULL DEFAULT 0
        )
        """,
        "CREATE INDEX idx_completions_started_at ON completions(started_at)",
        "CREATE INDEX idx_completions_app_started_at ON completions(app, started_at)",
    ),
    3: (
        "CREATE TABLE settings (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
        """
        CREATE TABLE blocks (
          client_hash TEXT PRIMARY KEY,
          blocked_at TEXT NOT NULL,
          blocked_until TEXT NOT NULL
        )
        """,
    ),
    4: ("ALTER TABLE chats ADD COLUMN pending TEXT",),
    5: ("ALTER TABLE chats ADD COLUMN messages_bytes INTEGER",),
    6: (
        "ALTER TABLE completions ADD COLUMN client_hash TEXT",
        "ALTER TABLE completions ADD COLUMN generation_id TEXT",
        "ALTER TABLE completions ADD COLUMN cost_source TEXT",
        "ALTER TABLE completions ADD COLUMN cost_owed_until TEXT",
        "ALTER TABLE completions ADD COLUMN cost_next_lookup TEXT",
        "CREATE INDEX idx_completions_client_started_at ON completions(client_hash, started_at)",
        """
        CREATE INDEX idx_completions_cost_next_lookup ON completions(cost_next_lookup)
        WHERE cost_next_lookup IS NOT NULL
        """,
        """
        CREATE TABLE prices (
          model TEXT PRIMARY KEY,
          prompt REAL NOT NULL,
          completion REAL NOT NULL,
          fetched_at TEXT NOT NULL
        )
        """,
    ),
    # Copy-on-write chats: each write's messages under a revision of its own.
    7: (
        "ALTER TABLE chats ADD COLUMN blob_rev TEXT",
        """
        CREATE TABLE chat_writes (
          rev TEXT PRIMARY KEY,
          chat_id TEXT NOT NULL,
          started_at REAL NOT NULL
        )
        """,
        "CREATE INDEX idx_chat_writes_started_at ON chat_writes(started_at)",
        """
        CREATE TABLE chat_garbage (
          chat_id TEXT NOT NULL,
          rev TEXT NOT NULL,
          since REAL NOT NULL,
          PRIMARY KEY (chat_id, rev)
        )
        """,
        "CREATE INDEX idx_chat_garbage_since ON chat_garbage(since)",
    ),
    # The ledger row of a completion names its budget reservation on a shared database
    # (PostgreSQL's step 4): a row swept at its estimate is replaced by the real one.
    8: (
        "ALTER TABLE completions ADD COLUMN reservation_id INTEGER",
        "CREATE UNIQUE INDEX idx_completions_reservation ON completions(reservation_id)",
    ),
    # The total of all chats' messages, changed by triggers in the transaction of every
    # row change, whoever makes it (the total storage cap is checked in the commit).
    9: (
        "CREATE TABLE chat_bytes (shard INTEGER PRIMARY KEY, bytes INTEGER NOT NULL)",
        "INSERT INTO chat_bytes (shard, bytes) VALUES (0, 0)",
        """
        CREATE TRIGGER chat_bytes_of_insert AFTER INSERT ON chats
        WHEN NEW.messages_bytes IS NOT NULL
        BEGIN
          UPDATE chat_bytes SET bytes = bytes + NEW.messages_bytes WHERE shard = 0;
        END
        """,
        """
        CREATE TRIGGER chat_bytes_of_update AFTER UPDATE OF messages_bytes ON chats
        WHEN NEW.messages_bytes IS NOT OLD.messages_bytes
        BEGIN
          UPDATE chat_bytes
          SET bytes = bytes + COALESCE(NEW.messages_bytes, 0) - COALESCE(OLD.messages_bytes, 0)
          WHERE shard = 0;
        END
        """,
        """
        CREATE TRIGGER chat_bytes_of_delete AFTER DELETE ON chats
        WHEN OLD.messages_bytes IS NOT NULL
        BEGIN
          UPDATE chat_bytes SET bytes = bytes - OLD.messages_bytes WHERE shard = 0;
        END
        """,
        "UPDATE chat_bytes SET bytes = (SELECT COALESCE(SUM(messages_bytes), 0) FROM chats)",
    ),
}
assert sorted(MIGRATIONS) == list(range(1, SCHEMA_VERSION + 1))


class SchemaTooNew(Exception):
    """The database was made by a newer qp-server."""


async def schema_version(conn: aiosqlite.Connection) -> int:
    ((version,),) = await conn.execute_fetchall("PRAGMA user_version")
    return int(version)


async def migrate(conn: aiosqlite.Connection) -> int:
    """Bring the database to SCHEMA_VERSION in one transaction; answers the version it had.
    A database already there is not written to (a start on a full disk needs no room)."""
    current = await schema_version(conn)
    if current > SCHEMA_VERSION:
        raise SchemaTooNew(
            f"schema version {current} is newer than this server's ({SCHEMA_VERSION})"
        )
    if current == SCHEMA_VERSION:
        return current
    await conn.execute("BEGIN IMMEDIATE")
    try:
        for version in range(current + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[version]:
                await conn.execute(statement)
        await conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        await conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            await conn.execute("ROLLBACK")
        raise
    return current
