"""Policy as configuration: the TOML file, the environment over it, SIGHUP, --check-config."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from qp.policy.loader import load_policy
from qp.policy.policy import Policy
from tests.fake_openrouter import FakeOpenRouter, Script
from tests.helpers import call, completion_request, wait_for_log
from tests.processes import ROOT, QPServer

EXAMPLE = ROOT / "qp.example.toml"


def test_the_example_file_holds_exactly_the_defaults():
    assert load_policy({}, EXAMPLE) == Policy()


def check_config(tmp_path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("QP_", "AWS_"))}
    return subprocess.run(
        [sys.executable, str(ROOT / "server.py"), "--check-config"],
        env={**clean, "QP_DATA_DIR": str(tmp_path / "data"), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_config_prints_the_policy_with_secrets_masked(tmp_path):
    config = tmp_path / "qp.toml"
    config.write_text('[completion]\ncheap_models = ["vendor/a"]\nupstream_timeout = 7\n')
    result = check_config(
        tmp_path,
        QP_CONFIG=str(config),
        ADMIN_KEY="admin-secret-1",
        OPENROUTER_API_KEY="sk-or-secret-2",
        OPENROUTER_API_KEY_NWB_ASSISTANT="sk-or-secret-3",
        AWS_SECRET_ACCESS_KEY="aws-secret-4",
        QP_IP_SALT="salt-secret-5",
        QP_RATE_LIMIT_CHATS="7/minute",
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for secret in ("admin-secret-1", "sk-or-secret-2", "sk-or-secret-3", "aws-secret-4", "salt-"):
        assert secret not in out
    assert 'cheap_models = ["vendor/a"]' in out
    assert "upstream_timeout = 7.0" in out
    assert 'rate_limit = "7/minute"' in out
    assert "admin_key = ******** (set)" in out
    # What it prints is itself a valid policy file.
    printed = tmp_path / "printed.toml"
    printed.write_text(out)
    assert load_policy({}, printed) == load_policy({"QP_RATE_LIMIT_CHATS": "7/minute"}, config)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("allowed_origins = [", ["not valid TOML"]),
        ("alowed_origins = []", ["unknown setting", "alowed_origins"]),
        ('[chats]\nrate_limit = "lots"', ["chats.rate_limit"]),
        ("[chats]\nmax_per_app = 0", ["chats.max_per_app"]),
        ('allowed_origins = ["not an origin"]', ["allowed_origins"]),
        ('trusted_proxies = ["10.0.0.0/33"]', ["trusted_proxies"]),
        ('[completion]\nopenrouter_url = "ftp://x"', ["completion.openrouter_url"]),
        ("[completion]\nrequired_phrase_groups = [[]]", ["required_phrase_groups"]),
    ],
)
def test_a_bad_file_fails_the_check_with_one_line(tmp_path, content, words):
    config = tmp_path / "qp.toml"
    config.write_text(content)
    result = check_config(tmp_path, QP_CONFIG=str(config))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "QP_CONFIG" in line
    for word in words:
        assert word in line


def test_a_missing_file_fails_the_check(tmp_path):
    result = check_config(tmp_path, QP_CONFIG=str(tmp_path / "nowhere.toml"))
    assert result.returncode == 1
    assert "cannot read" in result.stderr


def test_a_bad_variable_fails_the_check(tmp_path):
    result = check_config(tmp_path, QP_RATE_LIMIT_COMPLETION="10 per minute")
    assert result.returncode == 1
    assert "QP_RATE_LIMIT_COMPLETION" in result.stderr


def test_the_environment_wins_over_the_file(tmp_path):
    config = tmp_path / "qp.toml"
    config.write_text('[completion]\ncheap_models = ["from/file"]\nmax_messages = 3\n')
    policy = load_policy({"QP_CHEAP_MODELS": "from/env"}, config)
    assert policy.cheap_models == ("from/env",)
    assert policy.max_messages == 3
    assert policy.max_chats_per_app == Policy().max_chats_per_app


# --- SIGHUP -------------------------------------------------------------------------------


def write_policy(path: Path, origins: list[str], models: list[str]) -> None:
    quoted = ", ".join(f'"{o}"' for o in origins)
    cheap = ", ".join(f'"{m}"' for m in models)
    path.write_text(f"allowed_origins = [{quoted}]\n[completion]\ncheap_models = [{cheap}]\n")


async def origin_allowed(http, origin: str) -> bool:
    async with http.get("/api/chats/x", headers={"Origin": origin}) as response:
        return response.headers.get("Access-Control-Allow-Origin") == origin


async def test_sighup_applies_a_new_origin_and_model_while_a_stream_stays_open(tmp_path):
    fake = FakeOpenRouter().start()
    fake.scripts["slow"] = Script(
        chunks=[(0.0, b"data: one\n\n"), (2.0, b"data: two\n\n"), (0.0, b"data: [DONE]\n\n")]
    )
    config = tmp_path / "qp.toml"
    write_policy(config, ["https://old.example"], ["vendor/old"])
    server = QPServer(
        tmp_path / "qp",
        {"QP_CONFIG": str(config), "QP_OPENROUTER_URL": fake.url, "OPENROUTER_API_KEY": "k"},
    ).start()
    try:
        async with aiohttp.ClientSession(server.url) as http:
            assert await origin_allowed(http, "https://old.example")
            assert not await origin_allowed(http, "https://new.example")
            new_model = completion_request(model="vendor/new", leave_out=("app",))
            assert (await call(http, "POST", "/api/completion", json=new_model))[0] == 400
            old_model = completion_request("script:slow", model="vendor/old", leave_out=("app",))
            stream = await http.post("/api/completion", json=old_model)
            assert await stream.content.readany() == b"data: one\n\n"

            write_policy(config, ["https://new.example"], ["vendor/new"])
            server.signal(signal.SIGHUP)
            await wait_for_log(server, "policy reloaded")

            assert await origin_allowed(http, "https://new.example")
            assert not await origin_allowed(http, "https://old.example")
            async with http.post("/api/completion", json=new_model) as response:
                assert response.status == 200
                await response.read()
            # The stream opened before the reload runs to its end.
            assert await stream.read() == b"data: two\n\ndata: [DONE]\n\n"
            stream.close()

            # A broken file is refused; the policy in force stays, and so does the server.
            config.write_text("allowed_origins = [oops")
            server.signal(signal.SIGHUP)
            await wait_for_log(server, "policy reload refused")
            assert "not valid TOML" in server.log()
            assert await origin_allowed(http, "https://new.example")
    finally:
        server.stop()
        fake.stop()
    assert "Traceback" not in server.log()
