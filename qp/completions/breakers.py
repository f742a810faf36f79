"""A circuit breaker per model: a model that failed `breaker_failures` times in a row before
its first byte is skipped for `breaker_cooloff` seconds (straight to a fallback, or 503).

Only the models the operator pays for are watched (the cheap list, so the state is bounded
by the policy), and only attempts paid by the server's or an app's key count: a client's
own key failing says nothing of the model. After the cool-off the next request is let
through alone (the one trial; the others are refused meanwhile): if it fails the breaker
opens again, if it answers it closes.

Each process keeps its own breakers: a breaker is a guess at upstream's health, not a
guarantee to clients, and each process learns it from its own attempts within seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from qp.policy.policy import Policy


@dataclass
class _Breaker:
    failures: int = 0  # in a row
    open_until: float = 0.0


class ModelBreakers:
    def __init__(self, clock: Callable[[], float]):
        self._clock = clock
        self._breakers: dict[str, _Breaker] = {}

    def allows(self, model: str, policy: Policy) -> bool:
        """Whether an attempt on `model` may go upstream now. After a cool-off, the first
        caller gets the one trial (the others stay refused for another cool-off, unless
        the trial answers first)."""
        breaker = self._breakers.get(model)
        if breaker is None:
            return True
        now = self._clock()
        if breaker.open_until > now:
            return False
        if breaker.failures >= policy.breaker_failures > 0:
            breaker.open_until = now + policy.breaker_cooloff  # the trial's, alone
        return True

    def _open(self, model: str) -> bool:
        breaker = self._breakers.get(model)
        return breaker is not None and breaker.open_until > self._clock()

    def retry_after(self, model: str) -> int:
        """Whole seconds until `model` is tried again (at least 1)."""
        breaker = self._breakers.get(model)
        left = breaker.open_until - self._clock() if breaker is not None else 0.0
        return max(1, int(left + 0.999))

    def failed(self, model: str, policy: Policy) -> None:
        if not policy.breaker_failures or model not in policy.cheap_model_set:
            return
        breaker = self._breakers.setdefault(model, _Breaker())
        breaker.failures += 1
        if breaker.failures >= policy.breaker_failures:
            breaker.open_until = self._clock() + policy.breaker_cooloff

    def succeeded(self, model: str) -> None:
        self._breakers.pop(model, None)

    def open_models(self, policy: Policy) -> dict[str, int]:
        """The models skipped now, each with the seconds until it is tried again; models no
        longer in the policy's cheap list are let go."""
        for model in [model for model in self._breakers if model not in policy.cheap_model_set]:
            del self._breakers[model]
        return {model: self.retry_after(model) for model in self._breakers if self._open(model)}


BREAKERS = web.AppKey("model_breakers", ModelBreakers)
