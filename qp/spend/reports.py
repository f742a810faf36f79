"""The ledger read for the operator's page: cost per UTC day by app or model, cost by where
it came from, and completions per hour by how they ended. Days and hours are cut from
`started_at` (ISO 8601 UTC), so a completion belongs to the day and hour it started in.
Each report counts what the server's and the apps' keys paid for, or with `everyone` the
completions paid with the users' own keys too."""

from __future__ import annotations

from dataclasses import dataclass

from qp.storage.database import Database

# Two statements, not one with the column spliced in: the grouping column is part of the SQL.
COST_PER_DAY_BY_APP = """
    SELECT substr(started_at, 1, 10) AS day, COALESCE(app, ''), SUM(cost)
    FROM completions WHERE started_at >= :since AND cost > 0 AND (:everyone OR payer <> 'user')
    GROUP BY day, app ORDER BY day
"""
COST_PER_DAY_BY_MODEL = """
    SELECT substr(started_at, 1, 10) AS day, model, SUM(cost)
    FROM completions WHERE started_at >= :since AND cost > 0 AND (:everyone OR payer <> 'user')
    GROUP BY day, model ORDER BY day
"""
COST_SINCE = """
    SELECT COALESCE(SUM(cost), 0) FROM completions
    WHERE started_at >= :since AND (:everyone OR payer <> 'user')
"""
COST_BY_SOURCE = """
    SELECT cost_source, COUNT(*), COALESCE(SUM(cost), 0) FROM completions
    WHERE started_at >= :since AND cost_source IS NOT NULL AND (:everyone OR payer <> 'user')
    GROUP BY cost_source
"""
OUTCOMES_PER_HOUR = """
    SELECT substr(started_at, 1, 13) AS hour, outcome, COUNT(*)
    FROM completions WHERE started_at >= :since AND (:everyone OR payer <> 'user')
    GROUP BY hour, outcome
"""
COST_SOURCES = ("stream", "generation", "estimate")
# The response cache per app (it answers only what the operator pays for): the completions
# it answered, all the app's completions, and what the answers it replayed cost.
CACHE_BY_APP = """
    SELECT COALESCE(app, ''), COUNT(*) FILTER (WHERE cost_source = 'cache'), COUNT(*),
           COALESCE(SUM(saved_cost), 0)
    FROM completions WHERE started_at >= :since AND payer <> 'user'
    GROUP BY app HAVING COUNT(*) FILTER (WHERE cost_source = 'cache') > 0
    ORDER BY COALESCE(app, '')
"""


@dataclass(frozen=True, slots=True)
class CacheSaving:
    app: str  # "" for none
    hits: int
    completions: int
    saved: float


@dataclass(frozen=True, slots=True)
class DayCost:
    day: str  # YYYY-MM-DD
    name: str  # the app ("" for none) or the model
    cost: float


async def cost_per_day(db: Database, since: str, by: str, everyone: bool) -> list[DayCost]:
    """Cost per UTC day from `since` on, by "app" or by "model"."""
    sql = COST_PER_DAY_BY_APP if by == "app" else COST_PER_DAY_BY_MODEL
    return [DayCost(*row) for row in await db.fetchall(sql, _params(since, everyone))]


async def cost_since(db: Database, since: str, everyone: bool) -> float:
    ((cost,),) = await db.fetchall(COST_SINCE, _params(since, everyone))
    return float(cost)


async def cost_by_source(db: Database, since: str, everyone: bool) -> dict[str, dict[str, float]]:
    """For each cost source: the completions costed by it and their cost."""
    found = {
        source: {"completions": count, "cost": cost}
        for source, count, cost in await db.fetchall(COST_BY_SOURCE, _params(since, everyone))
    }
    return {source: found.get(source, {"completions": 0, "cost": 0.0}) for source in COST_SOURCES}


async def outcomes_per_hour(db: Database, since: str, everyone: bool) -> dict[str, dict[str, int]]:
    """Hour (YYYY-MM-DDTHH) -> outcome -> completions that started in it."""
    hours: dict[str, dict[str, int]] = {}
    for hour, outcome, count in await db.fetchall(OUTCOMES_PER_HOUR, _params(since, everyone)):
        hours.setdefault(hour, {})[outcome] = count
    return hours


async def cache_savings(db: Database, since: str) -> list[CacheSaving]:
    """Per app with a hit from `since` on: the response cache's hits and what they saved."""
    rows = await db.fetchall(CACHE_BY_APP, {"since": since})
    return [CacheSaving(app, hits, count, float(saved)) for app, hits, count, saved in rows]


def _params(since: str, everyone: bool) -> dict[str, object]:
    return {"since": since, "everyone": everyone}
