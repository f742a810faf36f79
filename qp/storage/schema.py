"""The schema's history: one list of named steps, each with its SQLite and its PostgreSQL
statements side by side (none where that database has nothing to change), applied in order
by qp/storage/migrations.py. schema.sql is the readable whole of SQLite's (a test checks
that the steps build exactly that). A new step goes at the end. The first nine are
SQLite's history as it was numbered before this list; the steps only PostgreSQL has come
after them, so that those numbers still hold.

SQLite keeps timestamps as the worker wrote them. PostgreSQL keeps them as ISO 8601 UTC
text too, so the features' comparisons and orderings by text are the same on both; a
chat's token counts are NUMERIC there (a client's numbers come back exactly, whole or not)
and costs double precision. PostgreSQL alone has the tables that several processes share
(leases, rate counts, budget accounts): one process keeps those in memory on SQLite.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    """One change to the schema: its name and the statements that make it on each database."""

    name: str
    sqlite: tuple[str, ...]
    postgres: tuple[str, ...]

    @classmethod
    def alike(cls, name: str, *statements: str) -> Step:
        """A step whose statements are the same on both databases."""
        return cls(name, sqlite=statements, postgres=statements)


# The ledger's columns and indexes for what each client spent and the costs still to be
# looked up: the same on both databases.
COST_LOOKUPS = (
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
)

STEPS: tuple[Step, ...] = (
    Step(
        "chats",
        # The worker's D1 table, column for column: a D1 export (its chats table, version
        # 0) is left as it is and carries on from here.
        sqlite=(
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
        postgres=(
            """
            CREATE TABLE chats (
              chat_id TEXT PRIMARY KEY,
              app TEXT NOT NULL,
              model TEXT NOT NULL,
              prompt_tokens NUMERIC DEFAULT 0,
              completion_tokens NUMERIC DEFAULT 0,
              estimated_cost DOUBLE PRECISION DEFAULT 0,
              created_at TEXT,
              updated_at TEXT
            )
            """,
            "CREATE INDEX idx_chats_app_updated_at ON chats(app, updated_at DESC)",
        ),
    ),
    Step(
        "ledger",
        sqlite=(
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
        postgres=(
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
              client_left INTEGER NOT NULL DEFAULT 0
            )
            """,
            "CREATE INDEX idx_completions_started_at ON completions(started_at)",
            "CREATE INDEX idx_completions_app_started_at ON completions(app, started_at)",
        ),
    ),
    Step.alike(
        "settings and blocks",
        "CREATE TABLE settings (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
        """
        CREATE TABLE blocks (
          client_hash TEXT PRIMARY KEY,
          blocked_at TEXT NOT NULL,
          blocked_until TEXT NOT NULL
        )
        """,
    ),
    Step.alike("chat pending notes", "ALTER TABLE chats ADD COLUMN pending TEXT"),
    Step(
        "chat sizes",
        sqlite=("ALTER TABLE chats ADD COLUMN messages_bytes INTEGER",),
        postgres=("ALTER TABLE chats ADD COLUMN messages_bytes BIGINT",),
    ),
    Step(
        "cost lookups and prices",
        sqlite=(
            *COST_LOOKUPS,
            """
            CREATE TABLE prices (
              model TEXT PRIMARY KEY,
              prompt REAL NOT NULL,
              completion REAL NOT NULL,
              fetched_at TEXT NOT NULL
            )
            """,
        ),
        postgres=(
            *COST_LOOKUPS,
            """
            CREATE TABLE prices (
              model TEXT PRIMARY KEY,
              prompt DOUBLE PRECISION NOT NULL,
              completion DOUBLE PRECISION NOT NULL,
              fetched_at TEXT NOT NULL
            )
            """,
        ),
    ),
    # Each write's messages under a revision of its own.
    Step(
        "copy-on-write chats",
        sqlite=(
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
        postgres=(
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
    ),
    # The ledger row of a completion names its budget reservation on a shared database: a
    # row swept at its estimate is replaced by the real one.
    Step(
        "ledger reservations",
        sqlite=(
            "ALTER TABLE completions ADD COLUMN reservation_id INTEGER",
            "CREATE UNIQUE INDEX idx_completions_reservation ON completions(reservation_id)",
        ),
        postgres=(
            "ALTER TABLE completions ADD COLUMN reservation_id BIGINT",
            "CREATE UNIQUE INDEX idx_completions_reservation ON completions(reservation_id)",
        ),
    ),
    # The total of all chats' messages, changed by triggers in the transaction of every row
    # change, whoever makes it (the total storage cap is checked in the commit).
    # PostgreSQL keeps it in 64 shards: a row change adds to the shard of its connection
    # (pg_backend_pid() % 64), so concurrent commits seldom wait on one another's shard and
    # a transaction changing many rows holds one. Its trigger comes before the total is
    # taken: it waits for the writes in flight, and holds off new ones until this step
    # commits, so none is counted twice or missed.
    Step(
        "chat bytes",
        sqlite=(
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
        postgres=(
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
    ),
    # Several processes on one database: their write leases, and the rate-limit counts and
    # budget accounts they share.
    Step(
        "shared processes",
        sqlite=(),
        postgres=(
            "CREATE TABLE write_leases"
            " (owner TEXT PRIMARY KEY, expires_at DOUBLE PRECISION NOT NULL)",
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
    ),
    # Reservations settled exactly once: each remembers when it was made, and when it was
    # settled or swept (its process gone or its request lost), so that a second settlement
    # changes nothing and a late one corrects the estimate instead of adding to it; and
    # what its ledger row is if it is swept.
    Step(
        "reservations settled once",
        sqlite=(),
        postgres=(
            "ALTER TABLE budget_reservations ADD COLUMN created_at DOUBLE PRECISION NOT NULL"
            " DEFAULT extract(epoch FROM clock_timestamp())",
            "ALTER TABLE budget_reservations ADD COLUMN swept_at DOUBLE PRECISION",
            "ALTER TABLE budget_reservations ADD COLUMN settled_at DOUBLE PRECISION",
            "ALTER TABLE budget_reservations ADD COLUMN record TEXT",
            "CREATE INDEX idx_budget_reservations_open ON budget_reservations(owner)"
            " WHERE swept_at IS NULL AND settled_at IS NULL",
        ),
    ),
    # The rate-limit counts bounded: each (client, class) falls in a bucket of a few rows
    # (qp/protection/shared_counts.py). Rows from before it are in bucket 0, trimmed too.
    Step(
        "rate count buckets",
        sqlite=(),
        postgres=(
            "ALTER TABLE rate_counts ADD COLUMN bucket INTEGER NOT NULL DEFAULT 0",
            "CREATE INDEX idx_rate_counts_bucket ON rate_counts(bucket, minute)",
            "CREATE INDEX idx_rate_counts_client ON rate_counts(client_hash)",
        ),
    ),
    # Retries and fallbacks: the model that answered and the requests sent upstream; the
    # response cache: what a replayed answer saved.
    Step.alike(
        "ledger attempts and savings",
        "ALTER TABLE completions ADD COLUMN answered_model TEXT",
        "ALTER TABLE completions ADD COLUMN attempts INTEGER NOT NULL DEFAULT 1",
        "ALTER TABLE completions ADD COLUMN saved_cost REAL",
    ),
    # The response cache several processes share (one process keeps it in memory): each
    # answer by its request's key, its bytes, what it cost, and when it was stored.
    Step(
        "response cache",
        sqlite=(),
        postgres=(
            """
            CREATE TABLE response_cache (
              key TEXT PRIMARY KEY,
              app TEXT,
              body BYTEA NOT NULL,
              cost DOUBLE PRECISION NOT NULL,
              stored_at DOUBLE PRECISION NOT NULL,
              size INTEGER NOT NULL
            )
            """,
            "CREATE INDEX idx_response_cache_stored_at ON response_cache(stored_at)",
        ),
    ),
)

# PostgreSQL's qp_schema counted steps of its own before this list: the steps of this list
# that each of its old steps made (its old step 1 made what SQLite's first six did).
POSTGRES_OLD_STEPS: tuple[tuple[str, ...], ...] = (
    (
        "chats",
        "ledger",
        "settings and blocks",
        "chat pending notes",
        "chat sizes",
        "cost lookups and prices",
    ),
    ("shared processes",),
    ("copy-on-write chats",),
    ("ledger reservations", "reservations settled once"),
    ("rate count buckets",),
    ("chat bytes",),
)
