"""Every number in the configuration has a bound: start-up, --check-config and SIGHUP refuse
a value outside it with one line naming the setting and its range, and a value at the
bound works, on PostgreSQL too (whose INTEGER columns hold the rate counts)."""

from __future__ import annotations

import signal
from dataclasses import fields

import aiohttp
import pytest

from qp.config import ConfigError, load_config
from qp.policy.loader import load_policy
from qp.policy.policy import Policy
from qp.policy.settings import SETTINGS
from tests.helpers import call, make_chat, wait_for_log
from tests.processes import QPServer, psql, run_server_once

# Numbers of every kind no setting may take: negative, not a number, endless, huge.
OUT_OF_BOUNDS = ["-1", "nan", "inf", "-inf", "1e300", "3000000000000", "9" * 5000]
ENV_NUMBERS = [
    "QP_PORT",
    "QP_CACHE_MB",
    "QP_MIN_FREE_MB",
    "QP_MAX_CONNECTIONS",
    "QP_MAX_INFLIGHT_MB",
    "QP_SHUTDOWN_TIMEOUT",
    "QP_S3_TIMEOUT",
    "QP_WRITE_LEASE_SECONDS",
    "QP_WRITE_ABANDON_SECONDS",
    "QP_DATABASE_POOL",
    "QP_DATABASE_QUICK_POOL",
    "QP_RATE_LIMIT_CLIENTS",
]
# The policy's numbers: every setting whose value is an int or a float.
POLICY_NUMBERS = [
    s
    for s in SETTINGS
    for f in fields(Policy)
    if f.name == s.field and type(getattr(Policy(), f.name)) in (int, float)
]
TOML_OUT_OF_BOUNDS = ["-1", "nan", "inf", "-inf", "1e300", "3000000000000000"]


def names_a_range(message: str) -> bool:
    return (" from " in message and " to " in message) or (
        "above" in message and "at most" in message
    )


def refusal(result) -> str:
    """The one line a refusal prints, with no traceback."""
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("name", ENV_NUMBERS)
@pytest.mark.parametrize("raw", OUT_OF_BOUNDS)
def test_every_environment_number_out_of_bounds_is_refused_naming_its_range(name, raw):
    with pytest.raises(ConfigError) as refused:
        load_config({name: raw})
    message = str(refused.value)
    assert message.startswith(name) and names_a_range(message), message
    assert "\n" not in message and len(message) < 200


@pytest.mark.parametrize("setting", POLICY_NUMBERS, ids=lambda s: s.field)
@pytest.mark.parametrize("raw", TOML_OUT_OF_BOUNDS)
def test_every_policy_number_out_of_bounds_is_refused_in_the_file(tmp_path, setting, raw):
    path = tmp_path / "qp.toml"
    section = f"[{setting.section}]\n" if setting.section else ""
    path.write_text(f"{section}{setting.key} = {raw}\n")
    where = f"{setting.section}.{setting.key}" if setting.section else setting.key
    with pytest.raises(ConfigError) as refused:
        load_policy({}, path)
    message = str(refused.value)
    assert message.startswith(f"QP_CONFIG {path}: {where} must be"), message
    assert names_a_range(message), message


@pytest.mark.parametrize("setting", [s for s in POLICY_NUMBERS if s.env], ids=lambda s: s.env)
@pytest.mark.parametrize("raw", OUT_OF_BOUNDS)
def test_every_policy_number_out_of_bounds_is_refused_in_the_environment(setting, raw):
    with pytest.raises(ConfigError) as refused:
        load_policy({setting.env: raw}, None)
    message = str(refused.value)
    assert message.startswith(f"{setting.env}: must be") and names_a_range(message), message
    assert "\n" not in message and len(message) < 200


@pytest.mark.parametrize("variable", ["QP_RATE_LIMIT_CHATS", "QP_RATE_LIMIT_COMPLETION"])
@pytest.mark.parametrize("raw", ["3000000000/hour", "1000000001/minute", "9" * 5000 + "/hour"])
def test_a_rate_limit_over_a_billion_is_refused(variable, raw):
    with pytest.raises(ConfigError) as refused:
        load_policy({variable: raw}, None)
    assert str(refused.value).endswith("a window allows from 0 to 1000000000 requests")


def test_a_rate_limit_at_the_bound_is_taken():
    policy = load_policy({"QP_RATE_LIMIT_CHATS": "1000000000/minute,1000000000/hour"}, None)
    assert str(policy.chats_rate_limit) == "1000000000/minute,1000000000/hour"


def test_start_up_refuses_a_rate_limit_postgresql_cannot_count(tmp_path):
    result = run_server_once(
        tmp_path / "data", "--port", "0", timeout=30, QP_RATE_LIMIT_CHATS="3000000000/hour"
    )
    assert result.returncode == 2
    assert refusal(result) == (
        "qp-server: QP_RATE_LIMIT_CHATS: '3000000000/hour': a window allows from 0 to"
        " 1000000000 requests"
    )


@pytest.mark.parametrize(
    ("env", "line"),
    [
        (
            {"QP_RATE_LIMIT_COMPLETION": "3000000000/hour"},
            "qp-server: QP_RATE_LIMIT_COMPLETION: '3000000000/hour': a window allows from 0"
            " to 1000000000 requests",
        ),
        (
            {"QP_HEADER_TIMEOUT": "inf"},
            "qp-server: QP_HEADER_TIMEOUT: must be a number of seconds above 0, at most 86400,"
            " got inf",
        ),
        (
            {"QP_CACHE_MB": "-5"},
            "qp-server: QP_CACHE_MB must be a whole number from 0 to 1048576, got '-5'",
        ),
        (
            {"QP_SHUTDOWN_TIMEOUT": "nan"},
            "qp-server: QP_SHUTDOWN_TIMEOUT must be a number of seconds from 0 to 86400, got 'nan'",
        ),
    ],
)
def test_check_config_refuses_a_number_out_of_bounds_in_one_line(tmp_path, env, line):
    result = run_server_once(tmp_path / "data", "--check-config", **env)
    assert result.returncode == 1
    assert result.stdout == ""
    assert refusal(result) == line


def test_check_config_refuses_a_file_number_out_of_bounds(tmp_path):
    path = tmp_path / "qp.toml"
    path.write_text(
        '[budgets]\nclient_max_streams = 3000000000\n[chats]\nrate_limit = "5/minute"\n'
    )
    result = run_server_once(tmp_path / "data", "--check-config", QP_CONFIG=str(path))
    assert result.returncode == 1
    assert refusal(result) == (
        f"qp-server: QP_CONFIG {path}: budgets.client_max_streams must be a whole number from"
        " 0 to 1000000000 (0: off), got 3000000000"
    )


def over_the_minute(limit: int) -> dict:
    return {
        "error": "Rate limit exceeded",
        "retryAfter": 60,
        "message": f"Rate limit exceeded: {limit} requests per minute",
    }


async def create(http: aiohttp.ClientSession) -> int:
    return (await call(http, "POST", "/api/chats", json={"chat": make_chat()}))[0]


async def test_sighup_with_a_number_out_of_bounds_keeps_the_old_policy(tmp_path):
    path = tmp_path / "qp.toml"
    path.write_text('[chats]\nrate_limit = "2/minute"\n')
    server = QPServer(tmp_path / "qp", {"QP_CONFIG": str(path), "QP_RATE_LIMIT_CHATS": ""})
    server.start()
    try:
        path.write_text('[chats]\nrate_limit = "3000000000/hour"\n')
        server.signal(signal.SIGHUP)
        await wait_for_log(server, "policy reload refused")
        async with aiohttp.ClientSession(server.url) as http:
            assert [await create(http), await create(http)] == [200, 200]
            # The old limit holds.
            assert await call(http, "POST", "/api/chats", json={"chat": make_chat()}) == (
                429,
                over_the_minute(2),
            )
    finally:
        server.stop()
    refused = [line for line in server.log().splitlines() if "policy reload" in line]
    assert len(refused) == 1
    assert refused[0].endswith(
        f"policy reload refused, the old policy stays: QP_CONFIG {path}: chats.rate_limit"
        " '3000000000/hour': a window allows from 0 to 1000000000 requests"
    )
    assert "Traceback" not in server.log()


async def test_a_rate_limit_at_the_bound_counts_on_postgresql(tmp_path, postgres):
    url = postgres.create_database()
    server = QPServer(
        tmp_path / "qp",
        {
            "QP_DATABASE": url,
            "QP_RATE_LIMIT_CHATS": "1000000000/minute,1000000000/hour",
            "QP_RATE_LIMIT_COMPLETION": "1/minute,1000000000/hour",
        },
    ).start()
    try:
        async with aiohttp.ClientSession(server.url) as http:
            assert [await create(http) for _ in range(3)] == [200, 200, 200]
            body = {"model": "m", "messages": []}
            first = await call(http, "POST", "/api/completion", json=body)
            assert first[0] == 400  # counted, then refused for what it asks
            assert await call(http, "POST", "/api/completion", json=body) == (
                429,
                over_the_minute(1),
            )
    finally:
        server.stop()
    counts = psql(url, "SELECT rate_class, minute_count, hour_count FROM rate_counts ORDER BY 1")
    assert counts.splitlines() == ["chats|3|3", "completion|1|1"]
    assert "Traceback" not in server.log()
