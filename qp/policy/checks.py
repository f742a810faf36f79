"""The checks of the policy's values: each takes a value as the QP_CONFIG file or a QP_*
variable gives it and answers it as the Policy holds it, or raises ValueError saying what it
must be. The bounds are what any sensible setting needs and what the database holds."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from qp.policy.policy import AppPolicy, AppRules, is_app_name
from qp.protection.client_address import parse_networks
from qp.protection.rate_limits import RateLimit

_ORIGIN = re.compile(r"https?://[A-Za-z0-9*.-]+(:\d{1,5})?")


def origins(value: Any) -> tuple[str, ...]:
    items = strings(value)
    for origin in items:
        if not _ORIGIN.fullmatch(origin) or "***" in origin:
            raise ValueError(f"{origin!r} is not an origin (scheme://host[:port], * or ** labels)")
    return items


def strings(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v for v in value):
        raise ValueError("must be a list of non-empty strings")
    return tuple(value)


def phrase_groups(value: Any) -> tuple[tuple[str, ...], ...]:
    if not isinstance(value, list | tuple):
        raise ValueError("must be a list of lists of phrases")
    groups = tuple(strings(group) for group in value)
    if any(not group for group in groups):
        raise ValueError("a group of phrases is empty")
    return groups


def _whole(low: int, high: int, off: str = "") -> Callable[[Any], int]:
    """A check of a whole number from `low` to `high` (`off`: what 0 means, if anything)."""

    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"must be a whole number from {low} to {high}{off}, got {value!r}")
        return value

    return check


def _amount(unit: str) -> Callable[[Any], float]:
    """A check of an amount from 0 (off) to MAX_AMOUNT, in `unit`."""

    def check(value: Any) -> float:
        number = not isinstance(value, bool) and isinstance(value, int | float)
        if not number or not 0 <= value <= MAX_AMOUNT:  # NaN fails this too
            raise ValueError(f"must be {unit} from 0 to {MAX_AMOUNT:.0f} (0: off), got {value!r}")
        return float(value)

    return check


# The bounds of the policy's numbers: what any sensible setting needs, and what the
# database's columns and Python's floats hold exactly (rate counts are INTEGER columns;
# a cap of MAX_AMOUNT GiB in bytes fits a BIGINT).
MAX_COUNT = 1_000_000_000
MAX_BODY_BYTES = 1024**3
MAX_DAILY_BYTES = 1024**4
MAX_AMOUNT = 1e9
MAX_SECONDS = 86400.0
MAX_FALLBACKS = 8
count = _whole(1, MAX_COUNT)
quantity = _whole(0, MAX_COUNT, " (0: off)")
tokens = _whole(0, MAX_COUNT)
body_bytes = _whole(1, MAX_BODY_BYTES)
daily_bytes = _whole(0, MAX_DAILY_BYTES, " (0: off)")
prefix = _whole(1, 128)
retries = _whole(0, 10)
gigabytes = _amount("a number of GiB")
usd = _amount("an amount in USD")


def apps(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError("must be a list of app names")
    for app in value:
        if not is_app_name(app):
            raise ValueError(f"{app!r} is not an app name (at most 100 printable characters)")
    return tuple(value)


def seconds(value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 < value <= MAX_SECONDS
    ):
        raise ValueError(
            f"must be a number of seconds above 0, at most {MAX_SECONDS:g}, got {value!r}"
        )
    return float(value)


def ttl(value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 <= value <= MAX_SECONDS
    ):
        raise ValueError(
            f"must be a number of seconds from 0 (off) to {MAX_SECONDS:g}, got {value!r}"
        )
    return float(value)


def app_ttls(value: Any) -> tuple[tuple[str, float], ...]:
    if not isinstance(value, dict):
        raise ValueError('must be a table of app = seconds ("*" for every other app)')
    for app in value:
        if app != "*" and not is_app_name(app):
            raise ValueError(f"{app!r} is not an app name (at most 100 printable characters)")
    return tuple(sorted((app, ttl(seconds)) for app, seconds in value.items()))


def url(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith(("http://", "https://")):
        # Not the value itself: a URL may carry a password or a token.
        got = repr(value) if not isinstance(value, str) else "text with no http(s) scheme"
        if isinstance(value, str) and "://" in value:
            got = f"{value.partition('://')[0]}://..."
        raise ValueError(f"must be an http:// or https:// URL, got {got}")
    return value


def app_caps(value: Any) -> tuple[tuple[str, float], ...]:
    if not isinstance(value, dict):
        raise ValueError('must be a table of app = USD ("*" for every other app)')
    for app in value:
        if app != "*" and not is_app_name(app):
            raise ValueError(f"{app!r} is not an app name (at most 100 printable characters)")
    return tuple(sorted((app, usd(cap)) for app, cap in value.items()))


def app_models(value: Any) -> tuple[tuple[str, tuple[str, ...]], ...]:
    if not isinstance(value, dict):
        raise ValueError('must be a table of app = ["model", ...] ("*" for every other app)')
    for app in value:
        if app != "*" and not is_app_name(app):
            raise ValueError(f"{app!r} is not an app name (at most 100 printable characters)")
    listed = []
    for app, models in value.items():
        if not isinstance(models, list) or len(models) > MAX_FALLBACKS:
            raise ValueError(f"{app!r} must be a list of at most {MAX_FALLBACKS} models")
        listed.append((app, strings(models)))
    return tuple(sorted(listed))


APP_POLICY_KEYS = {
    "models",
    "max_completion_tokens",
    "max_messages",
    "max_request_chars",
    "system_prompt_prefixes",
}


def app_rules(value: Any) -> AppRules:
    """The [apps] table: `require_listed`, and a table per app ("*": every app not named)."""
    if not isinstance(value, dict):
        raise ValueError('must be a table: require_listed, and [apps."name"] sections')
    require_listed = value.get("require_listed", False)
    if not isinstance(require_listed, bool):
        raise ValueError(f"require_listed must be true or false, got {require_listed!r}")
    apps = []
    for app, rules in value.items():
        if app == "require_listed":
            continue
        if app != "*" and not is_app_name(app):
            raise ValueError(f"{app!r} is not an app name (at most 100 printable characters)")
        if not isinstance(rules, dict):
            raise ValueError(f'{app!r} must be a table ([apps."{app}"])')
        unknown = set(rules) - APP_POLICY_KEYS
        if unknown:
            raise ValueError(f"{app!r}: unknown setting {sorted(unknown)[0]!r}")
        apps.append((app, _app_policy(app, rules)))
    return AppRules(tuple(sorted(apps)), require_listed)


def _app_policy(app: str, rules: dict[str, Any]) -> AppPolicy:
    def optional(name: str, check: Callable[[Any], Any]) -> Any:
        if name not in rules:
            return None
        try:
            return check(rules[name])
        except ValueError as err:
            raise ValueError(f"{app!r} {name} {err}") from None

    prefixes = optional("system_prompt_prefixes", strings)
    return AppPolicy(
        models=optional("models", strings),
        max_completion_tokens=optional("max_completion_tokens", count),
        max_messages=optional("max_messages", count),
        max_request_chars=optional("max_request_chars", count),
        system_prompt_prefixes=prefixes,
    )


def app_caps_from_env(text: str) -> dict[str, float]:
    caps: dict[str, float] = {}
    for item in comma_list(text):
        app, equals, cap = item.rpartition("=")
        if not equals or not app.strip():
            raise ValueError(f"{item!r} is not app=USD")
        caps[app.strip()] = number(cap.strip())
    return caps


def prices(value: Any) -> tuple[tuple[str, float, float], ...]:
    if not isinstance(value, dict):
        raise ValueError('must be a table of "model" = { prompt = USD, completion = USD }')
    prices = []
    for model, price in value.items():
        if not isinstance(price, dict) or set(price) != {"prompt", "completion"}:
            raise ValueError(f"{model!r} must be {{ prompt = USD, completion = USD }} per token")
        prices.append((model, usd(price["prompt"]), usd(price["completion"])))
    return tuple(sorted(prices))


def optional_url(value: Any) -> str:
    return "" if value == "" else url(value)


def rate_limit(value: Any) -> RateLimit:
    if not isinstance(value, str):
        raise ValueError(f"must be a string like '100/minute,1000/hour' or 'off', got {value!r}")
    return RateLimit.parse(value)


def networks(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError("must be a list of addresses and CIDR ranges")
    parse_networks(value)
    return tuple(value)


def comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"must be a number, got {text!r}") from None
