"""Configuration: one frozen dataclass, built once from the environment at start-up."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from qp.policy import Policy

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8787
DEFAULT_CACHE_MB = 64
APP_KEY_PREFIX = "OPENROUTER_API_KEY_"


class ConfigError(Exception):
    """A configuration value is unusable; the message is one line naming it."""


@dataclass(frozen=True)
class Config:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    unix_socket: str | None = None
    data_dir: Path = Path("data")
    database_path: Path = Path("data/qp.sqlite3")
    storage_url: str = "file://data/blobs"
    s3_endpoint_url: str | None = None
    aws_region: str | None = None
    admin_key: str | None = field(default=None, repr=False)
    # OPENROUTER_API_KEY, and OPENROUTER_API_KEY_{APP} by variable name.
    openrouter_api_key: str | None = field(default=None, repr=False)
    app_openrouter_keys: Mapping[str, str] = field(default_factory=dict, repr=False)
    cache_bytes: int = DEFAULT_CACHE_MB * 1024 * 1024
    policy: Policy = field(default_factory=Policy)


def _int(environ: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


def _seconds(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, got {raw!r}") from None
    if not value > 0:
        raise ConfigError(f"{name} must be more than 0 seconds, got {raw}")
    return value


def _url(environ: Mapping[str, str], name: str, default: str) -> str:
    url = environ.get(name, "").strip() or default
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"{name} must be an http:// or https:// URL, got {url!r}")
    return url


def _names(environ: Mapping[str, str], name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    raw = environ.get(name)
    if raw is None or not raw.strip():
        return default
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def policy_from_env(environ: Mapping[str, str], base: Policy) -> Policy:
    """The policy with the environment's QP_* overrides applied on top of `base`."""
    return Policy(
        allowed_origins=base.allowed_origins,
        cheap_models=_names(environ, "QP_CHEAP_MODELS", base.cheap_models),
        required_phrase_groups=base.required_phrase_groups,
        max_chats_per_app=_int(environ, "QP_MAX_CHATS_PER_APP", base.max_chats_per_app, minimum=1),
        openrouter_url=_url(environ, "QP_OPENROUTER_URL", base.openrouter_url),
        upstream_timeout=_seconds(environ, "QP_UPSTREAM_TIMEOUT", base.upstream_timeout),
        upstream_idle_timeout=_seconds(
            environ, "QP_UPSTREAM_IDLE_TIMEOUT", base.upstream_idle_timeout
        ),
    )


def _port(name: str, raw: str) -> int:
    try:
        port = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a port number, got {raw!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{name} must be a port number from 0 to 65535, got {port}")
    return port


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
        f"{name}: unknown storage scheme {scheme!r} in {url!r} (use file://PATH or s3://BUCKET[/PREFIX])"
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
    return Config(
        host=host or _nonempty(environ, "QP_HOST") or DEFAULT_HOST,
        port=listen_port,
        unix_socket=unix_socket or _nonempty(environ, "QP_UNIX_SOCKET"),
        data_dir=data_dir,
        database_path=Path(_nonempty(environ, "QP_DATABASE") or data_dir / "qp.sqlite3"),
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
        cache_bytes=_int(environ, "QP_CACHE_MB", DEFAULT_CACHE_MB) * 1024 * 1024,
        policy=policy_from_env(environ, Policy()),
    )
