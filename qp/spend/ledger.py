"""The spend ledger's SQL: one row per completion sent upstream, and its totals."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web

from qp.spend.record import CompletionRecord
from qp.storage.batches import BatchWriter
from qp.storage.database import Database

_COLUMNS = """started_at, app, model, payer, prompt_tokens, completion_tokens, cost, status,
               outcome, duration_ms, client_left, client_hash, generation_id, cost_source,
               cost_owed_until, cost_next_lookup, answered_model, attempts, saved_cost"""
# A row as it was (copying a database: the reservations it named stay behind).
INSERT = f"INSERT INTO completions ({_COLUMNS}) VALUES ({', '.join('?' * 19)})"
# A completion's own row: it replaces the row a sweep wrote at the estimate for its
# reservation, if any (the process was taken for dead while it still streamed).
INSERT_RECORD = f"""
    INSERT INTO completions ({_COLUMNS}, reservation_id) VALUES ({", ".join("?" * 20)})
    ON CONFLICT (reservation_id) DO UPDATE SET
      {", ".join(f"{name} = excluded.{name}" for name in _COLUMNS.replace(",", " ").split())}
"""
# The row a sweep writes for a reservation whose completion never reported (its process
# died): what it held is taken as spent. The completion's own row, if it ever comes, wins.
INSERT_SWEPT = f"""
    INSERT INTO completions ({_COLUMNS}, reservation_id)
    VALUES (?, ?, ?, ?, NULL, NULL, ?, 0, 'abandoned', 0, 0, ?, NULL, 'estimate', NULL, NULL,
            NULL, 1, NULL, ?)
    ON CONFLICT (reservation_id) DO NOTHING
"""
# A page of rows by id (copying a database): the INSERT's columns, then the id.
PAGE_AFTER = """
    SELECT started_at, app, model, payer, prompt_tokens, completion_tokens, cost, status,
           outcome, duration_ms, client_left, client_hash, generation_id, cost_source,
           cost_owed_until, cost_next_lookup, answered_model, attempts, saved_cost, id
    FROM completions WHERE id > ? ORDER BY id LIMIT ?
"""
COUNT = "SELECT COUNT(*) FROM completions"
# Cost lookups owed now (at most a batch), and what settles or postpones each.
LOOKUPS_DUE = """
    SELECT id, started_at, app, model, payer, client_hash, generation_id, cost,
           cost_owed_until, cost_next_lookup
    FROM completions WHERE cost_next_lookup <= ? ORDER BY cost_next_lookup LIMIT ?
"""
# A process takes a lookup by moving its next time on, as it saw it: another process that
# saw the same lookup finds it moved and leaves it alone.
CLAIM_LOOKUP = "UPDATE completions SET cost_next_lookup = ? WHERE id = ? AND cost_next_lookup = ?"
LOOKUP_FOUND = """
    UPDATE completions SET cost = ?, prompt_tokens = ?, completion_tokens = ?,
                           cost_source = 'generation', cost_owed_until = NULL,
                           cost_next_lookup = NULL
    WHERE id = ?
"""
LOOKUP_LATER = "UPDATE completions SET cost_next_lookup = ? WHERE id = ?"
LOOKUP_GIVEN_UP = (
    "UPDATE completions SET cost_owed_until = NULL, cost_next_lookup = NULL WHERE id = ?"
)
# What the server's and the apps' keys spent from a moment on: the budgets' starting point.
SERVER_SPENT_SINCE = """
    SELECT COALESCE(SUM(cost), 0) FROM completions WHERE payer = 'server' AND started_at >= ?
"""
APPS_SPENT_SINCE = """
    SELECT app, SUM(cost) FROM completions
    WHERE payer IN ('server', 'app') AND started_at >= ? AND cost > 0
    GROUP BY app
"""
CLIENTS_SPENT_SINCE = """
    SELECT client_hash, SUM(cost) FROM completions
    WHERE payer IN ('server', 'app') AND started_at >= ? AND cost > 0
          AND client_hash IS NOT NULL
    GROUP BY client_hash
"""
TOTALS = """
    SELECT app, model, payer, COUNT(*), COALESCE(SUM(prompt_tokens), 0),
           COALESCE(SUM(completion_tokens), 0), COALESCE(SUM(cost), 0), SUM(client_left),
           COUNT(*) FILTER (WHERE cost_source = 'stream'),
           COUNT(*) FILTER (WHERE cost_source = 'generation'),
           COUNT(*) FILTER (WHERE cost_source = 'estimate')
    FROM completions
    WHERE (CAST(:since AS TEXT) IS NULL OR started_at >= :since)
      AND (CAST(:app AS TEXT) IS NULL OR app = :app)
    GROUP BY app, model, payer
    ORDER BY app, model, payer
"""


@dataclass(frozen=True, slots=True)
class UsageTotal:
    app: str | None
    model: str
    payer: str
    completions: int
    prompt_tokens: int
    completion_tokens: int
    cost: float
    client_left: int
    # Rows costed by each source: the stream's usage, a lookup afterwards, the estimate.
    from_stream: int
    from_generation: int
    from_estimate: int


async def insert_records(db: Database, records: list[CompletionRecord]) -> None:
    await db.execute_write_many(
        INSERT_RECORD,
        [
            (
                record.started_at,
                record.app,
                record.model,
                record.payer,
                record.prompt_tokens,
                record.completion_tokens,
                record.cost,
                record.status,
                record.outcome,
                record.duration_ms,
                int(record.client_left),
                record.client_hash,
                record.generation_id,
                record.cost_source,
                record.cost_owed_until,
                record.cost_next_lookup,
                record.answered_model,
                record.attempts,
                record.saved_cost,
                record.reservation_id,
            )
            for record in records
        ],
    )


async def usage_totals(db: Database, since: str | None, app: str | None) -> list[UsageTotal]:
    """Completions, tokens and cost by app, model and payer."""
    rows = await db.fetchall(TOTALS, {"since": since, "app": app})
    return [UsageTotal(*row[:8], *(count or 0 for count in row[8:])) for row in rows]


@dataclass(frozen=True)
class SpentSince:
    """What was spent from `day` (and the server also from `month`) on."""

    server_day: float
    server_month: float
    apps_day: dict[str | None, float]
    clients_day: dict[str, float]


async def spent_since(db: Database, day: str, month: str) -> SpentSince:
    ((server_day,),) = await db.fetchall(SERVER_SPENT_SINCE, (day,))
    ((server_month,),) = await db.fetchall(SERVER_SPENT_SINCE, (month,))
    apps = {app: spent for app, spent in await db.fetchall(APPS_SPENT_SINCE, (day,))}
    clients = {client: spent for client, spent in await db.fetchall(CLIENTS_SPENT_SINCE, (day,))}
    return SpentSince(server_day, server_month, apps, clients)


@dataclass(frozen=True, slots=True)
class OwedLookup:
    """A ledger row whose cost is still to be looked up by its generation id."""

    row_id: int
    started_at: str
    app: str | None
    model: str
    payer: str
    client_hash: str | None
    generation_id: str
    estimate: float
    owed_until: str
    next_lookup: str


async def lookups_due(db: Database, now: str, limit: int = 50) -> list[OwedLookup]:
    return [OwedLookup(*row) for row in await db.fetchall(LOOKUPS_DUE, (now, limit))]


async def claim_lookup(db: Database, owed: OwedLookup, until: str) -> bool:
    """Take the lookup for this process until `until` (then it is due again, should this
    process die meanwhile); False when another process took it first."""
    return await db.execute_write(CLAIM_LOOKUP, (until, owed.row_id, owed.next_lookup)) > 0


async def lookup_found(
    db: Database, row_id: int, cost: float, prompt_tokens: int | None, completion_tokens: int | None
) -> None:
    await db.execute_write(LOOKUP_FOUND, (cost, prompt_tokens, completion_tokens, row_id))


async def lookup_later(db: Database, row_id: int, next_lookup: str) -> None:
    await db.execute_write(LOOKUP_LATER, (next_lookup, row_id))


async def lookup_given_up(db: Database, row_id: int) -> None:
    await db.execute_write(LOOKUP_GIVEN_UP, (row_id,))


async def ledger_page(db: Database, after_id: int, limit: int) -> list[tuple[Any, ...]]:
    """Up to `limit` rows whose id is above `after_id`, in id order: INSERT's values, then
    the id."""
    return await db.fetchall(PAGE_AFTER, (after_id, limit))


async def ledger_size(db: Database) -> int:
    ((count,),) = await db.fetchall(COUNT)
    return int(count)


# The spend ledger: completion records, written in batches.
LEDGER = web.AppKey("ledger", BatchWriter)
