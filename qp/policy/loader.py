"""Building the Policy: the contract's defaults, then the TOML file (QP_CONFIG), then QP_*
environment variables, which win. Every value is checked; a bad one is a ConfigError
naming where it came from.

Over 300 lines because most of it is data: SETTINGS, one entry per policy key (where it
lives in the file, its variable, its check), beside the small checks they name.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from qp.errors import ConfigError
from qp.policy.policy import Policy, is_app_name
from qp.protection.client_address import parse_networks
from qp.protection.rate_limits import RateLimit

_ORIGIN = re.compile(r"https?://[A-Za-z0-9*.-]+(:\d{1,5})?")


def _origins(value: Any) -> tuple[str, ...]:
    items = _strings(value)
    for origin in items:
        if not _ORIGIN.fullmatch(origin) or "***" in origin:
            raise ValueError(f"{origin!r} is not an origin (scheme://host[:port], * or ** labels)")
    return items


def _strings(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v for v in value):
        raise ValueError("must be a list of non-empty strings")
    return tuple(value)


def _phrase_groups(value: Any) -> tuple[tuple[str, ...], ...]:
    if not isinstance(value, list | tuple):
        raise ValueError("must be a list of lists of phrases")
    groups = tuple(_strings(group) for group in value)
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
_count = _whole(1, MAX_COUNT)
_quantity = _whole(0, MAX_COUNT, " (0: off)")
_tokens = _whole(0, MAX_COUNT)
_body_bytes = _whole(1, MAX_BODY_BYTES)
_daily_bytes = _whole(0, MAX_DAILY_BYTES, " (0: off)")
_prefix = _whole(1, 128)
_gigabytes = _amount("a number of GiB")
_usd = _amount("an amount in USD")


def _apps(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError("must be a list of app names")
    for app in value:
        if not is_app_name(app):
            raise ValueError(f"{app!r} is not an app name (at most 100 printable characters)")
    return tuple(value)


def _seconds(value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 < value <= MAX_SECONDS
    ):
        raise ValueError(
            f"must be a number of seconds above 0, at most {MAX_SECONDS:g}, got {value!r}"
        )
    return float(value)


def _url(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith(("http://", "https://")):
        # Not the value itself: a URL may carry a password or a token.
        got = repr(value) if not isinstance(value, str) else "text with no http(s) scheme"
        if isinstance(value, str) and "://" in value:
            got = f"{value.partition('://')[0]}://..."
        raise ValueError(f"must be an http:// or https:// URL, got {got}")
    return value


def _app_caps(value: Any) -> tuple[tuple[str, float], ...]:
    if not isinstance(value, dict):
        raise ValueError('must be a table of app = USD ("*" for every other app)')
    for app in value:
        if app != "*" and not is_app_name(app):
            raise ValueError(f"{app!r} is not an app name (at most 100 printable characters)")
    return tuple(sorted((app, _usd(cap)) for app, cap in value.items()))


def _app_caps_from_env(text: str) -> dict[str, float]:
    caps: dict[str, float] = {}
    for item in _comma_list(text):
        app, equals, cap = item.rpartition("=")
        if not equals or not app.strip():
            raise ValueError(f"{item!r} is not app=USD")
        caps[app.strip()] = _number(cap.strip())
    return caps


def _prices(value: Any) -> tuple[tuple[str, float, float], ...]:
    if not isinstance(value, dict):
        raise ValueError('must be a table of "model" = { prompt = USD, completion = USD }')
    prices = []
    for model, price in value.items():
        if not isinstance(price, dict) or set(price) != {"prompt", "completion"}:
            raise ValueError(f"{model!r} must be {{ prompt = USD, completion = USD }} per token")
        prices.append((model, _usd(price["prompt"]), _usd(price["completion"])))
    return tuple(sorted(prices))


def _optional_url(value: Any) -> str:
    return "" if value == "" else _url(value)


def _rate_limit(value: Any) -> RateLimit:
    if not isinstance(value, str):
        raise ValueError(f"must be a string like '100/minute,1000/hour' or 'off', got {value!r}")
    return RateLimit.parse(value)


def _networks(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError("must be a list of addresses and CIDR ranges")
    parse_networks(value)
    return tuple(value)


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"must be a number, got {text!r}") from None


@dataclass(frozen=True)
class Setting:
    """One Policy field: where it lives in the file, its variable, and how it is checked."""

    field: str
    section: str | None
    key: str
    env: str | None
    check: Callable[[Any], Any]
    from_env: Callable[[str], Any] = str
    # The value as the file holds it (for --check-config), when not the Policy's own.
    to_file: Callable[[Any], Any] = lambda value: value


SETTINGS = (
    Setting(
        "allowed_origins", None, "allowed_origins", "QP_ALLOWED_ORIGINS", _origins, _comma_list
    ),
    Setting(
        "trusted_proxies", None, "trusted_proxies", "QP_TRUSTED_PROXIES", _networks, _comma_list
    ),
    Setting("ipv6_prefix", None, "ipv6_prefix", "QP_IPV6_PREFIX", _prefix, _number),
    Setting("apps", None, "apps", "QP_APPS", _apps, _comma_list),
    Setting(
        "max_chat_bytes_per_client_daily",
        None,
        "max_chat_bytes_per_client_daily",
        "QP_MAX_CHAT_BYTES_PER_CLIENT_DAILY",
        _daily_bytes,
        _number,
    ),
    Setting(
        "max_total_storage_gb",
        None,
        "max_total_storage_gb",
        "QP_MAX_TOTAL_STORAGE_GB",
        _gigabytes,
        _number,
    ),
    Setting("header_timeout", None, "header_timeout", "QP_HEADER_TIMEOUT", _seconds, _number),
    Setting(
        "body_idle_timeout", None, "body_idle_timeout", "QP_BODY_IDLE_TIMEOUT", _seconds, _number
    ),
    Setting("body_timeout", None, "body_timeout", "QP_BODY_TIMEOUT", _seconds, _number),
    Setting(
        "keepalive_timeout", None, "keepalive_timeout", "QP_KEEPALIVE_TIMEOUT", _seconds, _number
    ),
    Setting("max_chats_per_app", "chats", "max_per_app", "QP_MAX_CHATS_PER_APP", _count, _number),
    Setting("max_chat_body_bytes", "chats", "max_body_bytes", None, _body_bytes),
    Setting("chats_rate_limit", "chats", "rate_limit", "QP_RATE_LIMIT_CHATS", _rate_limit),
    Setting("openrouter_url", "completion", "openrouter_url", "QP_OPENROUTER_URL", _url),
    Setting(
        "openrouter_api_base",
        "completion",
        "openrouter_api_base",
        "QP_OPENROUTER_API_BASE",
        _optional_url,
    ),
    Setting("cheap_models", "completion", "cheap_models", "QP_CHEAP_MODELS", _strings, _comma_list),
    Setting("required_phrase_groups", "completion", "required_phrase_groups", None, _phrase_groups),
    Setting(
        "completion_rate_limit", "completion", "rate_limit", "QP_RATE_LIMIT_COMPLETION", _rate_limit
    ),
    Setting("max_completion_body_bytes", "completion", "max_body_bytes", None, _body_bytes),
    Setting("max_messages", "completion", "max_messages", None, _count),
    Setting("max_message_chars", "completion", "max_message_chars", None, _count),
    Setting(
        "upstream_timeout",
        "completion",
        "upstream_timeout",
        "QP_UPSTREAM_TIMEOUT",
        _seconds,
        _number,
    ),
    Setting(
        "upstream_idle_timeout",
        "completion",
        "upstream_idle_timeout",
        "QP_UPSTREAM_IDLE_TIMEOUT",
        _seconds,
        _number,
    ),
    Setting(
        "budget_server_daily_usd",
        "budgets",
        "server_daily_usd",
        "QP_BUDGET_SERVER_DAILY_USD",
        _usd,
        _number,
    ),
    Setting(
        "budget_server_monthly_usd",
        "budgets",
        "server_monthly_usd",
        "QP_BUDGET_SERVER_MONTHLY_USD",
        _usd,
        _number,
    ),
    Setting(
        "budget_app_daily_usd",
        "budgets",
        "app_daily_usd",
        "QP_BUDGET_APP_DAILY_USD",
        _app_caps,
        _app_caps_from_env,
        dict,
    ),
    Setting(
        "budget_client_daily_usd",
        "budgets",
        "client_daily_usd",
        "QP_BUDGET_CLIENT_DAILY_USD",
        _usd,
        _number,
    ),
    Setting(
        "budget_client_max_streams",
        "budgets",
        "client_max_streams",
        "QP_BUDGET_CLIENT_MAX_STREAMS",
        _quantity,
        _number,
    ),
    Setting(
        "reserve_completion_tokens",
        "budgets",
        "reserve_completion_tokens",
        "QP_BUDGET_RESERVE_COMPLETION_TOKENS",
        _tokens,
        _number,
    ),
    Setting(
        "default_reserve_usd",
        "budgets",
        "default_reserve_usd",
        "QP_BUDGET_DEFAULT_RESERVE_USD",
        _usd,
        _number,
    ),
    Setting(
        "prices",
        "prices",
        "*",
        None,
        _prices,
        to_file=lambda prices: {m: {"prompt": p, "completion": c} for m, p, c in prices},
    ),
)
assert {s.field for s in SETTINGS} == {f.name for f in fields(Policy)}
# Sections that are one setting whole, their keys free (model names).
WHOLE_SECTIONS = {s.section for s in SETTINGS if s.key == "*"}


def load_policy(environ: Mapping[str, str], config_path: Path | None) -> Policy:
    """Defaults, then the file, then the environment; ConfigError on the first bad value."""
    values: dict[str, Any] = {}
    if config_path is not None:
        values.update(_from_file(config_path))
    for setting in SETTINGS:
        raw = environ.get(setting.env) if setting.env else None
        # An empty QP_TRUSTED_PROXIES means "trust nobody" (QP_APPS: "any app"); other empty
        # variables are unset.
        if raw is None or (not raw.strip() and setting.field not in ("trusted_proxies", "apps")):
            continue
        try:
            values[setting.field] = setting.check(setting.from_env(raw))
        except ValueError as err:
            raise ConfigError(f"{setting.env}: {err}") from None
    return Policy(**values)


def _from_file(path: Path) -> dict[str, Any]:
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"QP_CONFIG {path}: cannot read it: {err.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"QP_CONFIG {path}: not valid TOML: {err}") from None
    known = {(s.section, s.key): s for s in SETTINGS}
    values: dict[str, Any] = {}
    for name, value in document.items():
        entries: list[tuple[str | None, str, Any]]
        if name in WHOLE_SECTIONS:
            entries = [(name, "*", value)]
        elif isinstance(value, dict):
            entries = [(name, key, item) for key, item in value.items()]
        else:
            entries = [(None, name, value)]
        for section, key, item in entries:
            setting = known.get((section, key))
            where = (section if key == "*" else f"{section}.{key}") if section else key
            if setting is None:
                raise ConfigError(f"QP_CONFIG {path}: unknown setting {where!r}")
            try:
                values[setting.field] = setting.check(item)
            except ValueError as err:
                raise ConfigError(f"QP_CONFIG {path}: {where} {err}") from None
    return values


def policy_as_toml(policy: Policy) -> str:
    """The policy in the file's own shape: a valid QP_CONFIG file."""
    lines: list[str] = []
    for section in (None, "chats", "completion", "budgets", "prices"):
        if section is not None:
            lines += ["", f"[{section}]"]
        for setting in SETTINGS:
            if setting.section != section:
                continue
            value = setting.to_file(getattr(policy, setting.field))
            if setting.key == "*":
                lines += [
                    f"{_toml_value(key)} = {_toml_value(item)}" for key, item in value.items()
                ]
            else:
                lines.append(f"{setting.key} = {_toml_value(value)}")
    return "\n".join(lines).lstrip("\n") + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, dict):
        items = [f"{_toml_value(str(key))} = {_toml_value(item)}" for key, item in value.items()]
        return "{ " + ", ".join(items) + " }" if items else "{}"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, bool | int | float):
        return json.dumps(value)
    # A JSON string is a TOML basic string.
    return json.dumps(str(value), ensure_ascii=False)
