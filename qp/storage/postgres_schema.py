"""The PostgreSQL schema: the same tables as schema.sql (SQLite), in PostgreSQL's types,
as numbered steps applied in one transaction under an advisory lock, so processes starting
together never race (the second waits, then finds the schema current).

Types: timestamps stay ISO 8601 UTC text, as in SQLite, so the features' comparisons and
orderings by text are the same on both; a chat's token counts are NUMERIC (a client's
numbers come back exactly, whole or not); costs are double precision.
"""

from __future__ import annotations

import asyncpg

from qp.storage.migrations import SchemaTooNew

SCHEMA_VERSION = 6
# pg_advisory_xact_lock key taken while the schema is brought up to date ("qp-mig").
MIGRATION_LOCK = 0x71702D6D6967

STEPS: dict[int, tuple[str, ...]] = {
    1: (
        """
        CREATE TABLE chats (
          chat_id TEXT PRIMARY KEY,
          app TEXT NOT NULL,
          model TEXT NOT NULL,
          prompt_tokens NUMERIC DEFAULT 0,
          completion_tokens NUMERIC DEFAULT 0,
          estimated_cost DOUBLE PRECISION DEFAULT 0,
          created_at TEXT,
          updated_at TEXT,
          pending TEXT,
          messages_bytes BIGINT
        )
        """,
        "CREATE INDEX idx_chats_app_updated_at ON chats(app, updated_at DESC)",
        """
        CREATE TABLE completions (
          id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
          started_at TEXT NOT NULL,
          app TEXT,
          model TEXT NOT NULL,
          payer TEXT NOT NULL CHECK (payer IN ('server', 'app', 'user')),
          prompt_tokens BIGINT,
          completion_tokens BIGINT,
          cost DOUBLE PRECISION,
          status INTEGER NOT NULL,
          outcome TEXT NOT NULL,
          duration_ms BIGINT NOT NULL,
          client_left INTEGER NOT NULL DEFAULT 0,
          client_hash TEXT,
          generation_id TEXT,
          cost_source TEXT,
          cost_owed_until TEXT,
          cost_next_lookup TEXT
        )
        """,
        "CREATE INDEX idx_completions_started_at ON completions(started_at)",
        "CREATE INDEX idx_completions_app_started_at ON completions(app, started_at)",
        "CREATE INDEX idx_completions_client_started_at ON completions(client_hash, started_at)",
        """
        CREATE INDEX idx_completions_cost_next_lookup ON completions(cost_next_lookup)
          WHERE cost_next_lookup IS NOT NULL
        """,
        "CREATE TABLE settings (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
        """
        CREATE TABLE blocks (
          client_hash TEXT PRIMARY KEY,
          blocked_at TEXT NOT NULL,
          blocked_until TEXT NOT NULL
        )
        """,
        """
        CREATE TABLE prices (
          model TEXT PRIMARY KEY,
          prompt DOUBLE PRECISION NOT NULL,
          completion DOUBLE PRECISION NOT NULL,
          fetched_at TEXT NOT NULL
        )
        """,
    ),
    # Several processes: their write leases, and the rate-limit counts and budget accounts
    # they share (one process keeps these in memory on SQLite).
    2: (
        "CREATE TABLE write_leases (owner TEXT PRIMARY KEY, expires_at DOUBLE PRECISION NOT NULL)",
        """
        CREATE TABLE rate_counts (
          client_hash TEXT NOT NULL,
          rate_class TEXT NOT NULL,
          minute BIGINT NOT NULL,
          minute_count INTEGER NOT NULL,
          hour BIGINT NOT NULL,
          hour_count INTEGER NOT NULL,
          PRIMARY KEY (client_hash, rate_class)
        )
        """,
        "CREATE INDEX idx_rate_counts_hour ON rate_counts(hour)",
        """
        CREATE TABLE rate_refusals (
          client_hash TEXT NOT NULL,
          refused_at DOUBLE PRECISION NOT NULL
        )
        """,
        "CREATE INDEX idx_rate_refusals_client ON rate_refusals(client_hash, refused_at)",
        """
        CREATE TABLE budget_accounts (
          kind TEXT NOT NULL,
          name TEXT NOT NULL,
          period TEXT NOT NULL,
          period_start DOUBLE PRECISION NOT NULL,
          spent DOUBLE PRECISION NOT NULL DEFAULT 0,
          reserved DOUBLE PRECISION NOT NULL DEFAULT 0,
          PRIMARY KEY (kind, name, period, period_start)
        )
        """,
        """
        CREATE TABLE budget_reservations (
          id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
          owner TEXT NOT NULL,
          amount DOUBLE PRECISION NOT NULL,
          accounts TEXT NOT NULL
        )
        """,
    ),
    # Copy-on-write chats, as SQLite's step 7.
    3: (
        "ALTER TABLE chats ADD COLUMN blob_rev TEXT",
        """
        CREATE TABLE chat_writes (
          rev TEXT PRIMARY KEY,
          chat_id TEXT NOT NULL,
          started_at DOUBLE PRECISION NOT NULL
        )
        """,
        "CREATE INDEX idx_chat_writes_started_at ON chat_writes(started_at)",
        """
        CREATE TABLE chat_garbage (
          chat_id TEXT NOT NULL,
          rev TEXT NOT NULL,
          since DOUBLE PRECISION NOT NULL,
          PRIMARY KEY (chat_id, rev)
        )
        """,
        "CREATE INDEX idx_chat_garbage_since ON chat_garbage(since)",
    ),
    # Reservations settled exactly once: each remembers when it was made, and when it was
    # settled or swept (its process gone or its request lost), so that a second settlement
    # changes nothing and a late one corrects the estimate instead of adding to it; what its
    # ledger row is if it is swept; and the ledger row of a completion names its
    # reservation (as SQLite's step 8).
    4: (
        "ALTER TABLE budget_reservations ADD COLUMN created_at DOUBLE PRECISION NOT NULL"
        " DEFAULT extract(epoch FROM clock_timestamp())",
        "ALTER TABLE budget_reservations ADD COLUMN swept_at DOUBLE PRECISION",
        "ALTER TABLE budget_reservations ADD COLUMN settled_at DOUBLE PRECISION",
        "ALTER TABLE budget_reservations ADD COLUMN record TEXT",
        "CREATE INDEX idx_budget_reservations_open ON budget_reservations(owner)"
        " WHERE swept_at IS NULL AND settled_at IS NULL",
        "ALTER TABLE completions ADD COLUMN reservation_id BIGINT",
        "CREATE UNIQUE INDEX idx_completions_reservation ON completions(reservation_id)",
    ),
    # The rate-limit counts bounded: each (client, class) falls in a bucket of a few rows
    # (qp/protection/shared_counts.py). Rows from before it are in bucket 0, trimmed too.
    5: (
        "ALTER TABLE rate_counts ADD COLUMN bucket INTEGER NOT NULL DEFAULT 0",
        "CREATE INDEX idx_rate_counts_bucket ON rate_counts(bucket, minute)",
        "CREATE INDEX idx_rate_counts_client ON rate_counts(client_hash)",
    ),
    # The total of all chats' messages, as SQLite's step 9, in 64 shards: a row change adds
    # to the shard of its connection (pg_backend_pid() % 64), so concurrent commits seldom
    # wait on one another's shard and a transaction changing many rows holds one. The
    # trigger comes before the total is taken: it waits for the writes in flight, and
    # holds off new ones until this step commits, so none is counted twice or missed.
    6: (
        "CREATE TABLE chat_bytes (shard INTEGER PRIMARY KEY, bytes BIGINT NOT NULL)",
        "INSERT INTO chat_bytes (shard, bytes) SELECT n, 0 FROM generate_series(0, 63) AS n",
        """
        CREATE FUNCTION count_chat_bytes() RETURNS trigger LANGUAGE plpgsql AS $$
        DECLARE
          delta BIGINT := 0;
        BEGIN
          IF TG_OP <> 'DELETE' THEN
            delta := COALESCE(NEW.messages_bytes, 0);
          END IF;
          IF TG_OP <> 'INSERT' THEN
            delta := delta - COALESCE(OLD.messages_bytes, 0);
          END IF;
          IF delta <> 0 THEN
            UPDATE chat_bytes SET bytes = bytes + delta WHERE shard = pg_backend_pid() % 64;
          END IF;
          RETURN NULL;
        END
        $$
        """,
        """
        CREATE TRIGGER chat_bytes_counted AFTER INSERT OR UPDATE OF messages_bytes OR DELETE
        ON chats FOR EACH ROW EXECUTE FUNCTION count_chat_bytes()
        """,
        """
        UPDATE chat_bytes SET bytes = (SELECT COALESCE(SUM(messages_bytes), 0) FROM chats)
        WHERE shard = 0
        """,
    ),
}


async def migrate(conn: asyncpg.Connection) -> None:
    """Bring the schema to SCHEMA_VERSION, under the migration lock; SchemaTooNew when the
    database was made by a newer qp-server."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute("CREATE TABLE IF NOT EXISTS qp_schema (version INTEGER NOT NULL)")
        version = await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM qp_schema")
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"schema version {version} is newer than this server's ({SCHEMA_VERSION})"
            )
        for step in range(version + 1, SCHEMA_VERSION + 1):
            for statement in STEPS[step]:
                await conn.execute(statement)
        if version < SCHEMA_VERSION:
            await conn.execute("DELETE FROM qp_schema")
            await conn.execute("INSERT INTO qp_schema (version) VALUES ($1)", SCHEMA_VERSION)
