-- qp-server's SQLite schema, whole, as qp/storage/migrations.py builds it step by step
-- (tests/test_migrations.py checks they agree). The chats table is the worker's D1 table,
-- column for column (plus `pending` and `messages_bytes`), so a D1 export loads as is.
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
  -- Set while a write of this chat may not have reached the blob store: JSON naming the
  -- operation, the SHA-256 of the messages being written, when, and for an update the row
  -- as it was. A restart finishes or undoes each such write (see qp/chats/store.py).
  pending TEXT,
  -- Length in bytes of the messages array in the blob store (NULL: not known, as after an
  -- import; filled in from the store in the background).
  messages_bytes INTEGER
);

-- Serves both the per-app count (chat limit) and the admin list (newest updated_at first).
CREATE INDEX idx_chats_app_updated_at ON chats(app, updated_at DESC);

-- The spend ledger: one row per completion sent upstream. Never message contents or keys.
-- payer: who paid (server: OPENROUTER_API_KEY, app: OPENROUTER_API_KEY_{APP}, user: the
-- client's own x-openrouter-key). status: the HTTP status the client got. outcome:
-- completed, client_left, upstream_error, upstream_idle, upstream_died, unreachable, timeout,
-- shutdown (still streaming when the server's shutdown timeout ended). client_hash: the
-- client's salted address hash (never the address). generation_id: upstream's `gen-...` id.
-- cost_source: stream (usage seen in the stream), generation (looked up afterwards) or
-- estimate (the reservation: no better figure could be had); NULL when nothing was billed.
-- cost_owed_until / cost_next_lookup: set while the cost of a server- or app-paid stream
-- that ended without usage is still to be looked up by its generation id (until then, and
-- when to try next); cleared once it is found or given up.
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
  cost_next_lookup TEXT
);

CREATE INDEX idx_completions_started_at ON completions(started_at);
CREATE INDEX idx_completions_app_started_at ON completions(app, started_at);
-- What each client spent today (its daily allowance), read at start-up.
CREATE INDEX idx_completions_client_started_at ON completions(client_hash, started_at);
-- The cost lookups still owed, soonest first.
CREATE INDEX idx_completions_cost_next_lookup ON completions(cost_next_lookup)
  WHERE cost_next_lookup IS NOT NULL;

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

-- The schema version this file describes (SCHEMA_VERSION in qp/storage/migrations.py).
PRAGMA user_version = 6;
