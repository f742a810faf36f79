-- qp-server's SQLite schema, whole, as the steps in qp/storage/schema.py build it
-- (tests/test_migrations.py checks they agree). The chats table is the worker's D1 table,
-- column for column (plus `pending`, `messages_bytes` and `blob_rev`), so a D1 export loads
-- as is.
-- Timestamps are stored as the worker wrote them: ISO 8601 UTC text with milliseconds and Z,
-- so ordering by text is ordering by time.

CREATE TABLE chats (
  chat_id TEXT PRIMARY KEY,
  app TEXT NOT NULL,
  model TEXT NOT NULL,
  prompt_tokens INTEGER DEFAULT 0,
  completion_tokens INTEGER DEFAULT 0,
  estimated_cost REAL DEFAULT 0,
  created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
  updated_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
  -- Left by versions before schema 7 on a write that may not have reached the blob store
  -- (JSON: the operation, the SHA-256 of its messages, the row as it was). Each such write
  -- is finished or undone once, by that rule, at the first start after the upgrade
  -- (qp/chats/upgrade.py); nothing sets it any more.
  pending TEXT,
  -- Length in bytes of the messages array in the blob store (NULL: not known, as after an
  -- import; filled in from the store in the background).
  messages_bytes INTEGER,
  -- The write whose blob holds the messages: `chats/{chat_id}/{blob_rev}.json`, a key
  -- never reused. NULL: the worker's key, `chats/{chat_id}.json` (an imported row).
  blob_rev TEXT
);

-- Serves both the per-app count (chat limit) and the admin list (newest updated_at first).
CREATE INDEX idx_chats_app_updated_at ON chats(app, updated_at DESC);

-- Chat writes whose blob may be stored and whose row has not committed yet (the intent,
-- recorded before the blob is put; the commit consumes it). One older than
-- QP_WRITE_ABANDON_SECONDS is given up: deleted, its revision put in the garbage.
CREATE TABLE chat_writes (
  rev TEXT PRIMARY KEY,
  chat_id TEXT NOT NULL,
  started_at REAL NOT NULL  -- epoch seconds
);

CREATE INDEX idx_chat_writes_started_at ON chat_writes(started_at);

-- Blobs no row names any more (superseded, deleted, given up), to be deleted; rev '' is
-- the worker's key.
CREATE TABLE chat_garbage (
  chat_id TEXT NOT NULL,
  rev TEXT NOT NULL,
  since REAL NOT NULL,  -- epoch seconds
  PRIMARY KEY (chat_id, rev)
);

CREATE INDEX idx_chat_garbage_since ON chat_garbage(since);

-- The bytes of all chats' messages (the sum of messages_bytes), kept by the triggers below
-- in the transaction of every row change, so the total storage cap is checked in the commit
-- that would pass it. One row here; PostgreSQL keeps 64 shards, summed.
CREATE TABLE chat_bytes (
  shard INTEGER PRIMARY KEY,
  bytes INTEGER NOT NULL
);

INSERT INTO chat_bytes (shard, bytes) VALUES (0, 0);

CREATE TRIGGER chat_bytes_of_insert AFTER INSERT ON chats
WHEN NEW.messages_bytes IS NOT NULL
BEGIN
  UPDATE chat_bytes SET bytes = bytes + NEW.messages_bytes WHERE shard = 0;
END;

CREATE TRIGGER chat_bytes_of_update AFTER UPDATE OF messages_bytes ON chats
WHEN NEW.messages_bytes IS NOT OLD.messages_bytes
BEGIN
  UPDATE chat_bytes
  SET bytes = bytes + COALESCE(NEW.messages_bytes, 0) - COALESCE(OLD.messages_bytes, 0)
  WHERE shard = 0;
END;

CREATE TRIGGER chat_bytes_of_delete AFTER DELETE ON chats
WHEN OLD.messages_bytes IS NOT NULL
BEGIN
  UPDATE chat_bytes SET bytes = bytes - OLD.messages_bytes WHERE shard = 0;
END;

-- The spend ledger: one row per completion sent upstream. Never message contents or keys.
-- payer: who paid (server: OPENROUTER_API_KEY, app: OPENROUTER_API_KEY_{APP}, user: the
-- client's own x-openrouter-key). status: the HTTP status the client got. outcome:
-- completed, client_left, upstream_error, upstream_idle, upstream_died, unreachable, timeout,
-- shutdown (still streaming when the server's shutdown timeout ended), abandoned (written
-- by a sweep: its process's lease expired mid-completion), breaker_open (every model to
-- try was failing: nothing sent). model: the model asked for; answered_model: the one that
-- answered (a fallback's), NULL when none did; attempts: the requests sent upstream for
-- it (failures before the first byte are tried again). A completion answered from the
-- response cache: outcome cached, cost 0, cost_source cache, saved_cost what the answer it
-- replays cost. client_hash: the
-- client's salted address hash (never the address). generation_id: upstream's `gen-...` id.
-- cost_source: stream (usage seen in the stream), generation (looked up afterwards) or
-- estimate (the reservation: no better figure could be had); NULL when nothing was billed.
-- cost_owed_until / cost_next_lookup: set while the cost of a server- or app-paid stream
-- that ended without usage is still to be looked up by its generation id (until then, and
-- when to try next); cleared once it is found or given up. reservation_id: the budget
-- reservation on a shared database (PostgreSQL): a row its sweep wrote at the estimate
-- (outcome abandoned) is replaced by the completion's own row, never doubled.
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
  client_left INTEGER NOT NULL DEFAULT 0,
  client_hash TEXT,
  generation_id TEXT,
  cost_source TEXT,
  cost_owed_until TEXT,
  cost_next_lookup TEXT,
  reservation_id INTEGER,
  answered_model TEXT,
  attempts INTEGER NOT NULL DEFAULT 1,
  saved_cost REAL
);

CREATE INDEX idx_completions_started_at ON completions(started_at);
CREATE INDEX idx_completions_app_started_at ON completions(app, started_at);
-- What each client spent today (its daily allowance), read at start-up.
CREATE INDEX idx_completions_client_started_at ON completions(client_hash, started_at);
-- The cost lookups still owed, soonest first.
CREATE INDEX idx_completions_cost_next_lookup ON completions(cost_next_lookup)
  WHERE cost_next_lookup IS NOT NULL;
CREATE UNIQUE INDEX idx_completions_reservation ON completions(reservation_id);

-- Installation settings, e.g. the random salt for client-address hashes.
CREATE TABLE settings (
  name TEXT PRIMARY KEY,
  value TEXT NOT NULL
);

-- Clients blocked for excessive rate-limit violations, by salted address hash. Kept here so
-- a restart never lifts a block. Times are ISO 8601 UTC like everywhere else.
CREATE TABLE blocks (
  client_hash TEXT PRIMARY KEY,
  blocked_at TEXT NOT NULL,
  blocked_until TEXT NOT NULL
);

-- Model prices (USD per token) from OpenRouter's model list, fetched at start-up and daily,
-- kept so a restart without network still has them. The policy's [prices] win over these.
CREATE TABLE prices (
  model TEXT PRIMARY KEY,
  prompt REAL NOT NULL,
  completion REAL NOT NULL,
  fetched_at TEXT NOT NULL
);

-- The schema version this file describes (SCHEMA_VERSION in qp/storage/migrations.py: the
-- number of steps in qp/storage/schema.py, four of them PostgreSQL's alone).
PRAGMA user_version = 14;
