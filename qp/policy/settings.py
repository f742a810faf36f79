"""The policy's settings: one entry per Policy field, saying where it lives in the QP_CONFIG
file, its QP_* variable, and its check (qp/policy/checks.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from qp.policy.checks import (
    app_caps,
    app_caps_from_env,
    app_models,
    app_rules,
    app_ttls,
    apps,
    body_bytes,
    comma_list,
    count,
    daily_bytes,
    gigabytes,
    networks,
    number,
    optional_url,
    origins,
    phrase_groups,
    prefix,
    prices,
    quantity,
    rate_limit,
    retries,
    seconds,
    strings,
    tokens,
    ttl,
    url,
    usd,
)
from qp.policy.policy import AppPolicy, Policy


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
    Setting("allowed_origins", None, "allowed_origins", "QP_ALLOWED_ORIGINS", origins, comma_list),
    Setting("trusted_proxies", None, "trusted_proxies", "QP_TRUSTED_PROXIES", networks, comma_list),
    Setting("ipv6_prefix", None, "ipv6_prefix", "QP_IPV6_PREFIX", prefix, number),
    Setting("apps", None, "apps", "QP_APPS", apps, comma_list),
    Setting(
        "max_chat_bytes_per_client_daily",
        None,
        "max_chat_bytes_per_client_daily",
        "QP_MAX_CHAT_BYTES_PER_CLIENT_DAILY",
        daily_bytes,
        number,
    ),
    Setting(
        "max_total_storage_gb",
        None,
        "max_total_storage_gb",
        "QP_MAX_TOTAL_STORAGE_GB",
        gigabytes,
        number,
    ),
    Setting("header_timeout", None, "header_timeout", "QP_HEADER_TIMEOUT", seconds, number),
    Setting(
        "body_idle_timeout", None, "body_idle_timeout", "QP_BODY_IDLE_TIMEOUT", seconds, number
    ),
    Setting("body_timeout", None, "body_timeout", "QP_BODY_TIMEOUT", seconds, number),
    Setting(
        "keepalive_timeout", None, "keepalive_timeout", "QP_KEEPALIVE_TIMEOUT", seconds, number
    ),
    Setting("max_chats_per_app", "chats", "max_per_app", "QP_MAX_CHATS_PER_APP", count, number),
    Setting("max_chat_body_bytes", "chats", "max_body_bytes", None, body_bytes),
    Setting("chats_rate_limit", "chats", "rate_limit", "QP_RATE_LIMIT_CHATS", rate_limit),
    Setting("openrouter_url", "completion", "openrouter_url", "QP_OPENROUTER_URL", url),
    Setting(
        "openrouter_api_base",
        "completion",
        "openrouter_api_base",
        "QP_OPENROUTER_API_BASE",
        optional_url,
    ),
    Setting("cheap_models", "completion", "cheap_models", "QP_CHEAP_MODELS", strings, comma_list),
    Setting("required_phrase_groups", "completion", "required_phrase_groups", None, phrase_groups),
    Setting(
        "completion_rate_limit", "completion", "rate_limit", "QP_RATE_LIMIT_COMPLETION", rate_limit
    ),
    Setting("max_completion_body_bytes", "completion", "max_body_bytes", None, body_bytes),
    Setting("max_messages", "completion", "max_messages", None, count),
    Setting("max_message_chars", "completion", "max_message_chars", None, count),
    Setting(
        "upstream_timeout",
        "completion",
        "upstream_timeout",
        "QP_UPSTREAM_TIMEOUT",
        seconds,
        number,
    ),
    Setting(
        "upstream_idle_timeout",
        "completion",
        "upstream_idle_timeout",
        "QP_UPSTREAM_IDLE_TIMEOUT",
        seconds,
        number,
    ),
    Setting("upstream_retries", "completion", "retries", "QP_UPSTREAM_RETRIES", retries, number),
    Setting(
        "fallback_models",
        "completion",
        "fallback_models",
        None,
        app_models,
        to_file=lambda listed: {app: list(models) for app, models in listed},
    ),
    Setting(
        "breaker_failures",
        "completion",
        "breaker_failures",
        "QP_BREAKER_FAILURES",
        quantity,
        number,
    ),
    Setting(
        "breaker_cooloff",
        "completion",
        "breaker_cooloff_seconds",
        "QP_BREAKER_COOLOFF_SECONDS",
        seconds,
        number,
    ),
    Setting(
        "budget_server_daily_usd",
        "budgets",
        "server_daily_usd",
        "QP_BUDGET_SERVER_DAILY_USD",
        usd,
        number,
    ),
    Setting(
        "budget_server_monthly_usd",
        "budgets",
        "server_monthly_usd",
        "QP_BUDGET_SERVER_MONTHLY_USD",
        usd,
        number,
    ),
    Setting(
        "budget_app_daily_usd",
        "budgets",
        "app_daily_usd",
        "QP_BUDGET_APP_DAILY_USD",
        app_caps,
        app_caps_from_env,
        dict,
    ),
    Setting(
        "budget_client_daily_usd",
        "budgets",
        "client_daily_usd",
        "QP_BUDGET_CLIENT_DAILY_USD",
        usd,
        number,
    ),
    Setting(
        "budget_client_max_streams",
        "budgets",
        "client_max_streams",
        "QP_BUDGET_CLIENT_MAX_STREAMS",
        quantity,
        number,
    ),
    Setting(
        "reserve_completion_tokens",
        "budgets",
        "reserve_completion_tokens",
        "QP_BUDGET_RESERVE_COMPLETION_TOKENS",
        tokens,
        number,
    ),
    Setting(
        "default_reserve_usd",
        "budgets",
        "default_reserve_usd",
        "QP_BUDGET_DEFAULT_RESERVE_USD",
        usd,
        number,
    ),
    Setting("cache_ttl", "cache", "ttl_seconds", "QP_CACHE_TTL_SECONDS", ttl, number),
    Setting(
        "cache_app_ttl",
        "cache",
        "app_ttl_seconds",
        None,
        app_ttls,
        to_file=dict,
    ),
    Setting(
        "app_rules",
        "apps",
        "*",
        None,
        app_rules,
        to_file=lambda rules: {
            **({"require_listed": True} if rules.require_listed else {}),
            **{app: _app_policy_table(policy) for app, policy in rules.apps},
        },
    ),
    Setting(
        "prices",
        "prices",
        "*",
        None,
        prices,
        to_file=lambda prices: {m: {"prompt": p, "completion": c} for m, p, c in prices},
    ),
)
assert {s.field for s in SETTINGS} == {f.name for f in fields(Policy)}


def _app_policy_table(policy: AppPolicy) -> dict[str, Any]:
    return {f.name: getattr(policy, f.name) for f in fields(policy) if getattr(policy, f.name)}


# Sections that are one setting whole, their keys free (model names).
WHOLE_SECTIONS = {s.section for s in SETTINGS if s.key == "*"}
