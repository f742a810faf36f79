"""The spend ledger's row: what one completion was, who paid, and what it cost."""

from __future__ import annotations

from dataclasses import dataclass

# What the ledger's INTEGER columns hold (SQLite's signed 64 bits).
MAX_TOKENS = 2**63 - 1


@dataclass
class CompletionRecord:
    """One ledger row. Never holds message contents or keys."""

    started_at: str
    app: str | None
    model: str  # as asked
    payer: str
    status: int = 0
    outcome: str = "pending"
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost: float | None = None
    duration_ms: int = 0
    client_left: bool = False
    client_hash: str | None = None
    generation_id: str | None = None
    cost_source: str | None = None  # stream, generation, estimate, cache; None: nothing billed
    # Set while the cost is to be looked up by the generation id: until when, and next.
    cost_owed_until: str | None = None
    cost_next_lookup: str | None = None
    # The model that answered (a fallback's, or None when none did) and the requests sent
    # upstream for it.
    answered_model: str | None = None
    attempts: int = 0
    # Answered from the response cache: what the answer it replays cost.
    saved_cost: float | None = None
    # Its budget reservation's row on a shared database (qp/spend/shared_budgets.py).
    reservation_id: int | None = None
