"""Secrets in URLs (a password in the user info or the query, an sslpassword, a token, an S3
endpoint's keys) are masked wherever a URL is shown: the log, --check-config, the admin
overview, and the errors of the drivers that may echo a URL."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from qp import masking
from qp.masking import mask_url
from tests.helpers import ADMIN_KEY, call, run_qp, wait_for_log
from tests.processes import PostgresServer, QPServer, run_server_once

SECRET = "Sekr3t-Pw"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://qp:Sekr3t-Pw@db:5432/qp", "postgresql://qp:********@db:5432/qp"),
        ("postgres://qp@db/qp?password=Sekr3t-Pw", "postgres://qp@db/qp?password=********"),
        (
            "postgresql://qp@db/qp?sslmode=require&sslpassword=Sekr3t-Pw&sslcert=/c",
            "postgresql://qp@db/qp?sslmode=require&sslpassword=********&sslcert=/c",
        ),
        (
            "postgresql://qp@/qp?host=/run/pg&PASSWORD=Sekr3t-Pw",
            "postgresql://qp@/qp?host=/run/pg&PASSWORD=********",
        ),
        ("postgresql://qp:Sek/r3t?Pw@db/qp", "postgresql://qp:********@db/qp"),
        (
            "postgresql://qp:Sek@r3t@db/qp?application_name=a@b",
            "postgresql://qp:********@db/qp?application_name=a@b",
        ),
        ("postgresql://db:5432/qp?user=me@example", "postgresql://db:5432/qp?user=me@example"),
        (
            "https://hooks.example/x?token=Sekr3t-Pw&channel=ops",
            "https://hooks.example/x?token=********&channel=ops",
        ),
        ("https://api.example/v1?api_key=Sekr3t-Pw", "https://api.example/v1?api_key=********"),
        (
            "https://s3.example/b/k?X-Amz-Credential=AKIA&X-Amz-Signature=Sekr3t-Pw",
            "https://s3.example/b/k?X-Amz-Credential=********&X-Amz-Signature=********",
        ),
        (
            "https://app.example/cb#access_token=Sekr3t-Pw&state=1",
            "https://app.example/cb#access_token=********&state=1",
        ),
        ("http://AKIA:Sekr3t-Pw@minio:9000", "http://AKIA:********@minio:9000"),
        ("s3://bucket/prefix", "s3://bucket/prefix"),
        ("postgresql://qp@db/qp?sslmode=require", "postgresql://qp@db/qp?sslmode=require"),
    ],
)
def test_every_form_of_secret_in_a_url_is_masked(url, shown):
    assert mask_url(url) == shown


def test_a_drivers_error_echoing_a_piece_of_the_password_is_redacted():
    url = "postgresql://qp:Sekr3t/Pw@db/qp"
    message = "ValueError: invalid literal for int() with base 10: 'Sekr3t'"
    assert (
        masking.redact(message, url)
        == "ValueError: invalid literal for int() with base 10: '********'"
    )
    assert (
        masking.redact(f"cannot reach {url}/x", url)
        == "cannot reach postgresql://qp:********@db/qp/x"
    )
    assert masking.redact("p@ss: no", "postgresql://qp:p%40ss@db/qp") == "********: no"


def check_config(tmp_path, **env: str) -> str:
    result = run_server_once(tmp_path / "data", "--check-config", **env)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://qp:Sekr3t-Pw@db/qp", "postgresql://qp:********@db/qp"),
        ("postgresql://qp@db/qp?password=Sekr3t-Pw", "postgresql://qp@db/qp?password=********"),
        (
            "postgresql://qp@db/qp?sslpassword=Sekr3t-Pw&sslmode=require",
            "postgresql://qp@db/qp?sslpassword=********&sslmode=require",
        ),
    ],
)
def test_check_config_masks_the_database_password(tmp_path, url, shown):
    out = check_config(tmp_path, QP_DATABASE=url)
    assert SECRET not in out
    assert f'# database = "{shown}"' in out


def test_check_config_masks_the_endpoint_webhook_and_upstream_urls(tmp_path):
    out = check_config(
        tmp_path,
        QP_STORAGE="s3://bucket",
        QP_S3_ENDPOINT_URL=f"http://AKIA:{SECRET}@minio:9000",
        QP_ALERT_WEBHOOK_URL=f"https://hooks.slack.example/services/T1/B2/{SECRET}",
        QP_OPENROUTER_URL=f"https://proxy.example/v1/chat/completions?key={SECRET}",
        QP_OPENROUTER_API_BASE=f"https://u:{SECRET}@proxy.example",
    )
    assert SECRET not in out
    assert '# s3_endpoint_url = "http://AKIA:********@minio:9000"' in out
    assert "# alert_webhook_url = ******** (set)" in out
    assert 'openrouter_url = "https://proxy.example/v1/chat/completions?key=********"' in out
    assert 'openrouter_api_base = "https://u:********@proxy.example"' in out


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://qp@127.0.0.1:1/qp?password=Sekr3t-Pw",
        "postgresql://qp:Sekr3t-Pw@127.0.0.1:1/qp",
        # A bare "/" in the password: asyncpg takes what follows the ":" for a port.
        "postgresql://qp:Sekr3t-Pw/x@127.0.0.1/qp",
    ],
)
def test_start_up_failing_on_the_database_masks_its_password(tmp_path, url):
    result = run_server_once(tmp_path / "data", "--port", "0", QP_DATABASE=url)
    assert result.returncode == 1
    assert SECRET not in result.stderr + result.stdout
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"qp-server: QP_DATABASE {mask_url(url)}: ")
    assert "********" in line


def test_start_up_failing_on_s3_masks_the_endpoints_credentials(tmp_path):
    result = run_server_once(
        tmp_path / "data",
        "--port",
        "0",
        QP_STORAGE="s3://bucket",
        QP_S3_ENDPOINT_URL=f"http://AKIA:{SECRET}@127.0.0.1:1",
        AWS_ACCESS_KEY_ID="id",
        AWS_SECRET_ACCESS_KEY="key",
        QP_S3_TIMEOUT="5",
        QP_WRITE_ABANDON_SECONDS="10",
    )
    assert result.returncode == 1
    assert SECRET not in result.stderr + result.stdout
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("qp-server: QP_STORAGE s3://bucket: ")
    assert "http://AKIA:********@127.0.0.1:1" in line


def test_migrate_db_masks_the_password_in_the_query(tmp_path):
    target = "postgresql://qp@127.0.0.1:1/qp?password=Sekr3t-Pw"
    source = f"sqlite:///{tmp_path / 'qp.sqlite3'}"
    result = run_qp(tmp_path / "data", "migrate-db", "--from", source, "--to", target)
    assert result.returncode != 0
    assert SECRET not in result.stderr + result.stdout
    assert "password=********" in result.stderr


async def test_a_password_in_the_query_is_never_shown_by_a_running_server(
    tmp_path, postgres: PostgresServer
):
    plain = postgres.create_database()
    database = plain.rsplit("/", 1)[1]
    url = f"postgresql://{postgres.USER}@127.0.0.1:{postgres.port}/{database}?password={postgres.PASSWORD}"
    shown = f"postgresql://{postgres.USER}@127.0.0.1:{postgres.port}/{database}?password=********"
    server = QPServer(tmp_path / "qp", {"QP_DATABASE": url, "ADMIN_KEY": ADMIN_KEY}).start()
    try:
        async with aiohttp.ClientSession(server.url) as http:
            status, overview = await call(
                http, "GET", "/api/admin/overview", headers={"x-admin-key": ADMIN_KEY}
            )
            assert status == 200
            assert f'# database = "{shown}"' in overview["settings"]
            assert postgres.PASSWORD not in str(overview)
            # A lost listening connection is logged naming the database.
            pid = postgres.psql(
                "SELECT pid FROM pg_stat_activity WHERE query LIKE 'LISTEN%'"
                " AND datname = current_database()",
                database,
            )
            await asyncio.to_thread(postgres.psql, f"SELECT pg_terminate_backend({pid})", database)
            await wait_for_log(server, f"changes to {shown} was lost")
    finally:
        server.stop()
    assert postgres.PASSWORD not in server.log()
