"""The spend ledger's SQL: one row per completion sent upstream, and its totals."""

from __future__ import annotations

from dataclasses import dataclass

from qp.completions.usage import CompletionRecord
from qp.storage.sqlite import Database

INSERT = """
    INSERT INTO completions (started_at, app, model, payer, prompt_tokens, completion_tokens,
                             cost, status, outcome, duration_ms, client_left)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
TOTALS = """
    SELECT app, model, payer, COUNT(*), COALESCE(SUM(prompt_tokens), 0),
           COALESCE(SUM(completion_tokens), 0), COALESCE(SUM(cost), 0), SUM(client_left)
    FROM completions
    WHERE (:since IS NULL OR started_at >= :since) AND (:app IS NULL OR app = :app)
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


async def insert_records(db: Database, records: list[CompletionRecord]) -> None:
    await db.execute_write_many(
        INSERT,
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
            )
            for record in records
        ],
    )


async def usage_totals(db: Database, since: str | None, app: str | None) -> list[UsageTotal]:
    """Completions, tokens and cost by app, model and payer."""
    rows = await db.fetchall(TOTALS, {"since": since, "app": app})
    return [UsageTotal(*row) for row in rows]
