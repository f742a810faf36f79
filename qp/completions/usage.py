"""What one completion cost and used, read from the stream as it passes."""

from __future__ import annotations

import contextlib
import logging
import math
import re
from typing import Any

import orjson

from qp.spend.record import MAX_TOKENS

log = logging.getLogger("qp.completions.usage")

# A partial SSE line longer than this is not usage accounting; it is dropped, not kept.
MAX_PARTIAL_LINE = 256 * 1024


# Upstream's generation id, in the first chunk already: what its cost is looked up by.
_GENERATION_ID = re.compile(rb'"id"\s*:\s*"(gen-[A-Za-z0-9_-]{1,100})"')
GENERATION_ID_SEAM = 128


class UsageScanner:
    """Finds OpenRouter's `usage` object in the SSE lines relayed to the client.

    It only ever looks at bytes already sent, keeps at most one partial line, and parses
    only lines that mention `"usage"`, so the relay never waits on it.
    """

    def __init__(self) -> None:
        self._partial = b""
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.cost: float | None = None
        self.generation_id: str | None = None

    def feed(self, chunk: bytes) -> None:
        if self.generation_id is None:
            found = _GENERATION_ID.search(self._partial[-GENERATION_ID_SEAM:] + chunk)
            if found:
                self.generation_id = found.group(1).decode()
        end = chunk.rfind(b"\n")
        if end < 0:
            self._keep(self._partial + chunk)
            return
        # Only lines that mention "usage" are parsed; the test for it runs on the chunk and
        # the partial line as they are, and on the few bytes around the seam between them.
        seam = self._partial[-8:] + chunk[:8]
        if b'"usage"' in chunk or b'"usage"' in seam or b'"usage"' in self._partial:
            for line in (self._partial + chunk[:end]).split(b"\n"):
                if line.startswith(b"data:") and b'"usage"' in line:
                    self._read_usage(line[5:].strip())
        self._keep(chunk[end + 1 :])

    def _keep(self, partial: bytes) -> None:
        self._partial = partial if len(partial) <= MAX_PARTIAL_LINE else b""

    def _read_usage(self, payload: bytes) -> None:
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        usage = event.get("usage") if isinstance(event, dict) else None
        if not isinstance(usage, dict):
            return
        if "prompt_tokens" in usage:
            self.prompt_tokens = _tokens(usage["prompt_tokens"], "prompt_tokens")
        if "completion_tokens" in usage:
            self.completion_tokens = _tokens(usage["completion_tokens"], "completion_tokens")
        if "cost" in usage:
            self.cost = _cost(usage["cost"])


def _tokens(value: Any, name: str) -> int | None:
    """A token count the ledger can store, or None (with a warning) for anything else."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOKENS:
        return value
    _unstorable(name)
    return None


def _cost(value: Any) -> float | None:
    """A cost the ledger can store, or None (with a warning) for anything else."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        with contextlib.suppress(OverflowError):
            cost = float(value)
            if math.isfinite(cost) and cost >= 0:
                return cost
    _unstorable("cost")
    return None


def _unstorable(name: str) -> None:
    log.warning("upstream reported a %s the ledger cannot store; it is kept as NULL", name)
