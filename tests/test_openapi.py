"""The contract as a document: GET /api/openapi.json, and schemathesis fuzzing the real
server against it: no server error, every answer as the document says, every request the
document rules out refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.helpers import ADMIN_KEY, call
from tests.processes import ROOT

SCHEMATHESIS = Path(sys.executable).parent / "st"
HOOKS = "tests.schemathesis_hooks"
CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,"
    "response_headers_conformance,response_schema_conformance,negative_data_rejection"
)


async def test_the_document_is_served_as_openapi_3_1(qp_server):
    server = qp_server()
    async with aiohttp.ClientSession(server.url) as http:
        status, document = await call(http, "GET", "/api/openapi.json")
    assert status == 200
    assert document["openapi"] == "3.1.0"
    assert set(document["paths"]) == {
        "/api/chats",
        "/api/chats/{chatId}",
        "/api/completion",
        "/api/usage",
        "/api/admin/overview",
        "/api/admin/spend",
        "/api/admin/apps",
        "/api/admin/policies",
        "/api/admin/blocks",
        "/api/admin/blocks/{client}",
        "/api/openapi.json",
        "/healthz",
        "/metrics",
    }


@pytest.mark.parametrize(
    ("database", "seed"), [("sqlite", "1"), ("sqlite", "2"), ("postgres", "1")]
)
def test_schemathesis_finds_nothing(qp_server, fake, database, seed, tmp_path, request):
    """Strings poisoned with NULs and lone surrogates included (tests/schemathesis_hooks.py),
    on both databases: PostgreSQL's text refuses a NUL that SQLite would take."""
    env = {"QP_OPENROUTER_URL": fake.url, "OPENROUTER_API_KEY": "fuzz-key"}
    if database == "postgres":
        env["QP_DATABASE"] = request.getfixturevalue("postgres").create_database()
    server = qp_server(**env)
    result = subprocess.run(
        [
            str(SCHEMATHESIS),
            "run",
            f"{server.url}/api/openapi.json",
            "--checks",
            CHECKS,
            "--header",
            f"x-admin-key: {ADMIN_KEY}",
            "--max-examples",
            "100",
            "--seed",
            seed,
            # One worker: two threads building Python ASTs at once trip a CPython 3.11 bug
            # ("AST constructor recursion depth mismatch", fixed in 3.12).
            "--workers",
            "1",
            "--request-timeout",
            "20",
            "--report-dir",
            str(tmp_path / "report"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "SCHEMATHESIS_HOOKS": HOOKS, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout
    server.stop()
    assert "Traceback" not in server.log()
