"""Configuration: one frozen dataclass, built once at start-up from the environment. The
policy (what a SIGHUP reloads) is not in it: see qp/policy/."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aiohttp import web

from qp.errors import ConfigError
from qp.logs import LOG_FORMATS
from qp.masking import mask_url
from qp.policy.loader import policy_as_toml
from qp.policy.policy import Policy

__all__ = ["Config", "ConfigError", "describe", "load_config"]

DEFAULT_HOST = "127.0.0.1"
# QP_EVENT_LOOP: uvloop where it is installed (Linux, macOS), else asyncio's own.
EVENT_LOOPS = ("uvloop", "asyncio")
DEFAULT_PORT = 8787
DEFAULT_CACHE_MB = 64
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
DEFAULT_S3_TIMEOUT = 30.0
DEFAULT_MIN_FREE_MB = 256
DEFAULT_MAX_CONNECTIONS = 2048
DEFAULT_MAX_INFLIGHT_MB = 256
# What the response cache holds in all, and of one answer, at most.
DEFAULT_RESPONSE_CACHE_MB = 64
DEFAULT_RESPONSE_CACHE_ENTRY_KB = 256
MAX_RESPONSE_CACHE_ENTRY_KB = 16 * 1024
# Rate-limit counters (one per client and class) kept at most (QP_RATE_LIMIT_CLIENTS), in
# memory or in PostgreSQL's rate_counts.
DEFAULT_RATE_LIMIT_CLIENTS = 100_000
MIN_RATE_LIMIT_CLIENTS = 100
MAX_RATE_LIMIT_CLIENTS = 100_000_000
# PostgreSQL connections of a process (QP_DATABASE_POOL, QP_DATABASE_QUICK_POOL): the
# requests' pool, the pool of writes whose commits need not wait for the disk; a server
# keeps two more, its lease's and its listener's.
DEFAULT_DATABASE_POOL = 20
DEFAULT_DATABASE_QUICK_POOL = 5
MAX_DATABASE_POOL = 1000
# Seconds a chat write may take from its intent to its commit (QP_WRITE_ABANDON_SECONDS);
# past it, the write is given up and its blob deleted. At least this many S3 timeouts, so
# that a put the server gave up on has landed (or never will) before its blob is deleted.
DEFAULT_WRITE_ABANDON_SECONDS = 900.0
MIN_ABANDON_S3_TIMEOUTS = 2
# Seconds a server's process lease lasts unrenewed (QP_WRITE_LEASE_SECONDS; PostgreSQL
# only): how long its budget reservations wait after a crash before another server
# settles them.
DEFAULT_WRITE_LEASE_SECONDS = 15.0
MIN_WRITE_LEASE_SECONDS = 3.0
APP_KEY_PREFIX = "OPENROUTER_API_KEY_"


def app_key_variable(app: str) -> str:
    """`bids-assistant` -> `OPENROUTER_API_KEY_BIDS_ASSISTANT`."""
    return APP_KEY_PREFIX + app.upper().replace("-", "_")


# Upper bounds of the numbers above: far past any sensible setting, and within what the
# code and the database hold (the lease's and a write's bound are seconds in a DOUBLE).
MAX_MEGABYTES = 1024 * 1024
MAX_CONNECTIONS = 1_000_000
MAX_SHUTDOWN_TIMEOUT = 86400.0
MAX_S3_TIMEOUT = 3600.0
MAX_WRITE_LEASE_SECONDS = 3600.0
MAX_WRITE_ABANDON_SECONDS = 7 * 86400.0


@dataclass(frozen=True)
class Config:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    unix_socket: str | None = None
    data_dir: Path = Path("data")
    database_path: Path = Path("data/qp.sqlite3")
    # PostgreSQL instead of SQLite (QP_DATABASE=postgresql://...): its URL, password and all.
    postgres_url: str | None = field(default=None, repr=False)
    database_pool: int = DEFAULT_DATABASE_POOL
    database_quick_pool: int = DEFAULT_DATABASE_QUICK_POOL
    storage_url: str = "file://data/blobs"
    s3_endpoint_url: str | None = field(default=None, repr=False)
    aws_region: str | None = None
    admin_key: str | None = field(default=None, repr=False)
    # OPENROUTER_API_KEY, and OPENROUTER_API_KEY_{APP} by variable name.
    openrouter_api_key: str | None = field(default=None, repr=False)
    app_openrouter_keys: Mapping[str, str] = field(default_factory=dict, repr=False)
    cache_bytes: int = DEFAULT_CACHE_MB * 1024 * 1024
    # The policy file (QP_CONFIG), read at start-up and on SIGHUP. The policy in force has
    # one home, the app's PolicyHolder.
    config_path: Path | None = None
    # Salt for client-address hashes; None: the installation's own, kept in the database.
    ip_salt: str | None = field(default=None, repr=False)
    # SIGTERM/SIGINT: seconds requests and streams in flight get to finish.
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    log_format: str = "text"
    # The event loop asked for (QP_EVENT_LOOP); None: uvloop where it imports, else asyncio.
    event_loop: str | None = None
    # Deadline of every S3 call (QP_S3_TIMEOUT).
    s3_timeout: float = DEFAULT_S3_TIMEOUT
    write_lease_seconds: float = DEFAULT_WRITE_LEASE_SECONDS
    write_abandon_seconds: float = DEFAULT_WRITE_ABANDON_SECONDS
    # Free disk below which new chats and updates get 507 (QP_MIN_FREE_MB).
    min_free_bytes: int = DEFAULT_MIN_FREE_MB * 1024 * 1024
    # Connections open at once (QP_MAX_CONNECTIONS); lowered to fit the open-file limit.
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    # Bytes of chats and request bodies held in memory at once (QP_MAX_INFLIGHT_MB).
    max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_MB * 1024 * 1024
    # The response cache's answers in all, and one answer, at most (QP_RESPONSE_CACHE_MB,
    # QP_RESPONSE_CACHE_ENTRY_KB); a longer answer is never stored.
    response_cache_bytes: int = DEFAULT_RESPONSE_CACHE_MB * 1024 * 1024
    response_cache_entry_bytes: int = DEFAULT_RESPONSE_CACHE_ENTRY_KB * 1024
    # Rate-limit counters kept at most (QP_RATE_LIMIT_CLIENTS); past it some are forgotten.
    rate_limit_clients: int = DEFAULT_RATE_LIMIT_CLIENTS
    # Bearer token /metrics asks for (QP_METRICS_TOKEN); None: loopback peers only.
    metrics_token: str | None = field(default=None, repr=False)
    # Where spend alerts are POSTed (QP_ALERT_WEBHOOK_URL); it may hold a secret token.
    alert_webhook_url: str | None = field(default=None, repr=False)


def _int(environ: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise ConfigError(f"{name} must be a whole number from {low} to {high}, got {_quoted(raw)}")
    return value


def _seconds(
    environ: Mapping[str, str],
    name: str,
    default: float,
    high: float,
    *,
    low: float = 0.0,
    low_allowed: bool = True,
) -> float:
    """Seconds from `low` (or above it, unless `low_allowed`) to `high`."""
    raw = _nonempty(environ, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (value >= low if low_allowed else value > low) or not value <= high:  # NaN fails
        bounds = f"from {low:g} to" if low_allowed else f"above {low:g}, at most"
        raise ConfigError(
            f"{name} must be a number of seconds {bounds} {high:g}, got {_quoted(raw)}"
        )
    return value


def _abandon_seconds(environ: Mapping[str, str], s3_timeout: float) -> float:
    """A write is given up only once any put it made has certainly landed or failed."""
    least = MIN_ABANDON_S3_TIMEOUTS * s3_timeout
    seconds = _seconds(
        environ,
        "QP_WRITE_ABANDON_SECONDS",
        DEFAULT_WRITE_ABANDON_SECONDS,
        MAX_WRITE_ABANDON_SECONDS,
    )
    if seconds < least:
        raise ConfigError(
            f"QP_WRITE_ABANDON_SECONDS must be at least {MIN_ABANDON_S3_TIMEOUTS} times"
            f" QP_S3_TIMEOUT ({least:g}), got {seconds:g}"
        )
    return seconds


def _log_format(environ: Mapping[str, str]) -> str:
    value = (_nonempty(environ, "QP_LOG_FORMAT") or "text").lower()
    if value not in LOG_FORMATS:
        raise ConfigError(f"QP_LOG_FORMAT must be text or json, got {_quoted(value)}")
    return value


def _event_loop(environ: Mapping[str, str]) -> str | None:
    value = _nonempty(environ, "QP_EVENT_LOOP")
    if value is None:
        return None
    if value.lower() not in EVENT_LOOPS:
        raise ConfigError(f"QP_EVENT_LOOP must be uvloop or asyncio, got {_quoted(value)}")
    return value.lower()


def _port(name: str, raw: str) -> int:
    try:
        port = int(raw)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise ConfigError(f"{name} must be a port number from 0 to 65535, got {_quoted(raw)}")
    return port


def _webhook(environ: Mapping[str, str]) -> str | None:
    url = _nonempty(environ, "QP_ALERT_WEBHOOK_URL")
    if url is not None and not url.startswith(("http://", "https://")):
        raise ConfigError("QP_ALERT_WEBHOOK_URL: must be an http:// or https:// URL")
    return url


def _quoted(raw: str) -> str:
    """A value as a message quotes it: cut short past 40 characters (a line stays a line)."""
    return repr(raw if len(raw) <= 40 else raw[:40] + "...")


def _nonempty(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name, "").strip()
    return value or None


def validate_storage_url(url: str, name: str = "QP_STORAGE") -> str:
    """Accept `file://PATH` and `s3://BUCKET[/PREFIX]`; anything else is a ConfigError."""
    if url.startswith("file://"):
        if not url[len("file://") :]:
            raise ConfigError(f"{name}: file:// needs a folder, e.g. file://./data/blobs")
        return url
    if url.startswith("s3://"):
        bucket = url[len("s3://") :].split("/", 1)[0]
        if not bucket:
            raise ConfigError(f"{name}: s3:// needs a bucket, e.g. s3://my-bucket/prefix")
        return url
    scheme = url.split("://", 1)[0] if "://" in url else url
    raise ConfigError(
        f"{name}: unknown storage scheme {scheme!r} in {mask_url(url)!r}"
        " (use file://PATH or s3://BUCKET[/PREFIX])"
    )


def load_config(
    environ: Mapping[str, str] | None = None,
    *,
    host: str | None = None,
    port: str | None = None,
    unix_socket: str | None = None,
) -> Config:
    """Build the Config from environment variables; command-line values win."""
    environ = os.environ if environ is None else environ
    data_dir = Path(_nonempty(environ, "QP_DATA_DIR") or "./data")
    if port is not None:
        listen_port = _port("--port", port)
    else:
        raw_port = _nonempty(environ, "QP_PORT")
        listen_port = _port("QP_PORT", raw_port) if raw_port else DEFAULT_PORT
    storage_url = _nonempty(environ, "QP_STORAGE") or f"file://{data_dir / 'blobs'}"
    config_path = Path(raw) if (raw := _nonempty(environ, "QP_CONFIG")) else None
    s3_timeout = _seconds(
        environ, "QP_S3_TIMEOUT", DEFAULT_S3_TIMEOUT, MAX_S3_TIMEOUT, low_allowed=False
    )
    return Config(
        host=host or _nonempty(environ, "QP_HOST") or DEFAULT_HOST,
        port=listen_port,
        unix_socket=unix_socket or _nonempty(environ, "QP_UNIX_SOCKET"),
        data_dir=data_dir,
        **_database(_nonempty(environ, "QP_DATABASE"), data_dir),
        database_pool=_int(
            environ, "QP_DATABASE_POOL", DEFAULT_DATABASE_POOL, 1, MAX_DATABASE_POOL
        ),
        database_quick_pool=_int(
            environ, "QP_DATABASE_QUICK_POOL", DEFAULT_DATABASE_QUICK_POOL, 1, MAX_DATABASE_POOL
        ),
        storage_url=validate_storage_url(storage_url),
        s3_endpoint_url=_nonempty(environ, "QP_S3_ENDPOINT_URL"),
        aws_region=_nonempty(environ, "AWS_REGION") or _nonempty(environ, "AWS_DEFAULT_REGION"),
        admin_key=environ.get("ADMIN_KEY") or None,
        openrouter_api_key=environ.get("OPENROUTER_API_KEY") or None,
        app_openrouter_keys={
            name: value
            for name, value in environ.items()
            if name.startswith(APP_KEY_PREFIX) and value
        },
        cache_bytes=_int(environ, "QP_CACHE_MB", DEFAULT_CACHE_MB, 0, MAX_MEGABYTES) * 1024 * 1024,
        config_path=config_path,
        ip_salt=environ.get("QP_IP_SALT") or None,
        shutdown_timeout=_seconds(
            environ, "QP_SHUTDOWN_TIMEOUT", DEFAULT_SHUTDOWN_TIMEOUT, MAX_SHUTDOWN_TIMEOUT
        ),
        log_format=_log_format(environ),
        event_loop=_event_loop(environ),
        s3_timeout=s3_timeout,
        # A lease renewed every second must last a few seconds, or it lapses between renewals.
        write_lease_seconds=_seconds(
            environ,
            "QP_WRITE_LEASE_SECONDS",
            DEFAULT_WRITE_LEASE_SECONDS,
            MAX_WRITE_LEASE_SECONDS,
            low=MIN_WRITE_LEASE_SECONDS,
        ),
        write_abandon_seconds=_abandon_seconds(environ, s3_timeout),
        min_free_bytes=_int(environ, "QP_MIN_FREE_MB", DEFAULT_MIN_FREE_MB, 0, MAX_MEGABYTES)
        * 1024
        * 1024,
        max_connections=_int(
            environ, "QP_MAX_CONNECTIONS", DEFAULT_MAX_CONNECTIONS, 1, MAX_CONNECTIONS
        ),
        max_inflight_bytes=_int(
            environ, "QP_MAX_INFLIGHT_MB", DEFAULT_MAX_INFLIGHT_MB, 1, MAX_MEGABYTES
        )
        * 1024
        * 1024,
        response_cache_bytes=_int(
            environ, "QP_RESPONSE_CACHE_MB", DEFAULT_RESPONSE_CACHE_MB, 1, MAX_MEGABYTES
        )
        * 1024
        * 1024,
        response_cache_entry_bytes=_int(
            environ,
            "QP_RESPONSE_CACHE_ENTRY_KB",
            DEFAULT_RESPONSE_CACHE_ENTRY_KB,
            1,
            MAX_RESPONSE_CACHE_ENTRY_KB,
        )
        * 1024,
        rate_limit_clients=_int(
            environ,
            "QP_RATE_LIMIT_CLIENTS",
            DEFAULT_RATE_LIMIT_CLIENTS,
            MIN_RATE_LIMIT_CLIENTS,
            MAX_RATE_LIMIT_CLIENTS,
        ),
        metrics_token=environ.get("QP_METRICS_TOKEN") or None,
        alert_webhook_url=_webhook(environ),
    )


def _database(value: str | None, data_dir: Path) -> dict[str, Any]:
    """QP_DATABASE: a PostgreSQL URL (postgresql:// or postgres://), a SQLite URL
    (`sqlite:///relative/path`, `sqlite:////absolute/path`), or a file path (default:
    DATA_DIR/qp.sqlite3)."""
    if value is None:
        return {"database_path": data_dir / "qp.sqlite3"}
    scheme = value.split("://", 1)[0].lower() if "://" in value else ""
    if scheme in ("postgresql", "postgres"):
        return {"postgres_url": value, "database_path": data_dir / "qp.sqlite3"}
    if scheme == "sqlite":
        path = value.split("://", 1)[1]
        if not path.startswith("/") or path == "/":
            raise ConfigError(f"QP_DATABASE {value}: a SQLite URL is sqlite:///PATH")
        return {"database_path": Path(path[1:])}  # sqlite:///rel/path, sqlite:////abs/path
    if scheme:
        raise ConfigError(
            f"QP_DATABASE {mask_url(value)}: not a file path, sqlite:///PATH or postgresql:// URL"
        )
    return {"database_path": Path(value)}


def database_shown(config: Config) -> str:
    """The database as messages name it: the PostgreSQL URL masked, or the SQLite file."""
    return mask_url(config.postgres_url) if config.postgres_url else str(config.database_path)


SECRET = "******** (set)"


def describe(config: Config, policy: Policy, environ: Mapping[str, str] | None = None) -> str:
    """The effective settings: the process's, then the policy as a QP_CONFIG file would
    hold it. Every secret is masked."""
    environ = os.environ if environ is None else environ

    def show(value: object) -> str:
        return "(unset)" if value is None else json.dumps(str(value))

    def secret(value: object) -> str:
        return SECRET if value else "(unset)"

    lines = [
        "# qp-server: effective configuration; secrets are masked",
        f"# host = {show(config.host)}",
        f"# port = {config.port}",
        f"# unix_socket = {show(config.unix_socket)}",
        f"# data_dir = {show(config.data_dir)}",
        f"# database = {show(database_shown(config))}",
        f"# database_pool = {config.database_pool}",
        f"# database_quick_pool = {config.database_quick_pool}",
        f"# storage = {show(mask_url(config.storage_url))}",
        f"# s3_endpoint_url = {show(config.s3_endpoint_url and mask_url(config.s3_endpoint_url))}",
        f"# aws_region = {show(config.aws_region)}",
        f"# aws_access_key_id = {secret(environ.get('AWS_ACCESS_KEY_ID'))}",
        f"# aws_secret_access_key = {secret(environ.get('AWS_SECRET_ACCESS_KEY'))}",
        f"# cache_mb = {config.cache_bytes // (1024 * 1024)}",
        f"# admin_key = {secret(config.admin_key)}",
        f"# openrouter_api_key = {secret(config.openrouter_api_key)}",
        *(f"# {name.lower()} = {SECRET}" for name in sorted(config.app_openrouter_keys)),
        f"# ip_salt = {secret(config.ip_salt) if config.ip_salt else '(kept in the database)'}",
        f"# config file = {show(config.config_path)}",
        f"# shutdown_timeout = {config.shutdown_timeout:g}",
        f"# s3_timeout = {config.s3_timeout:g}",
        f"# write_lease_seconds = {config.write_lease_seconds:g}",
        f"# min_free_mb = {config.min_free_bytes // (1024 * 1024)}",
        f"# max_connections = {config.max_connections}",
        f"# max_inflight_mb = {config.max_inflight_bytes // (1024 * 1024)}",
        f"# response_cache_mb = {config.response_cache_bytes // (1024 * 1024)}",
        f"# response_cache_entry_kb = {config.response_cache_entry_bytes // 1024}",
        f"# rate_limit_clients = {config.rate_limit_clients}",
        f"# metrics_token = {secret(config.metrics_token)}",
        f"# alert_webhook_url = {secret(config.alert_webhook_url)}",
        f"# log_format = {show(config.log_format)}",
        f"# event_loop = {config.event_loop or '(uvloop where installed, else asyncio)'}",
        "# The policy in force (defaults, then the file, then QP_* variables):",
        "",
    ]
    # The upstream's URLs are the operator's, and may carry a token of theirs.
    shown = replace(
        policy,
        openrouter_url=mask_url(policy.openrouter_url),
        openrouter_api_base=mask_url(policy.openrouter_api_base),
    )
    return "\n".join(lines) + policy_as_toml(shown)


CONFIG = web.AppKey("config", Config)
