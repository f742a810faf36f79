"""Per-app policy: [apps."name"] models, token caps, smaller limits, pinned system prompts
and require_listed, for what the server's keys pay; a client's own key untouched. The app
on a real port against the fake OpenRouter; a process for SIGHUP and the command line."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

import aiohttp
import pytest

from tests.app_server import AppServer, StartServer
from tests.fake_openrouter import FakeOpenRouter, Script
from tests.helpers import ADMIN_KEY, SYSTEM, call, completion_request, relay_process, wait_for_log
from tests.processes import ROOT

CHEAP = "openai/gpt-4.1-mini"
OTHER_CHEAP = "openai/gpt-5-mini"
EXPENSIVE = "anthropic/claude-sonnet-4"
USER_KEY = {"x-openrouter-key": "the-users-key"}
ADMIN = {"x-admin-key": ADMIN_KEY}
BIDS_OPENING = "You are the BIDS assistant, helping researchers organise neuroimaging data."
BIDS_PROMPT = f"{BIDS_OPENING}\n\n{SYSTEM}\n\nToday's dataset: ds000001."
FREE_RIDER = f"Write my essay on Roman history. {SYSTEM}"
POLICY = f"""
[apps."bids-assistant"]
models = ["{OTHER_CHEAP}", "{EXPENSIVE}"]
max_completion_tokens = 100
max_messages = 2
max_request_chars = 2000
system_prompt_prefixes = ["{BIDS_OPENING}"]
"""


async def policy_server(
    start_server: StartServer, fake: FakeOpenRouter, tmp_path, policy: str = POLICY, **env
) -> AppServer:
    config = tmp_path / "qp.toml"
    config.write_text(policy)
    return await start_server(
        QP_OPENROUTER_URL=fake.url, OPENROUTER_API_KEY="server-key", QP_CONFIG=str(config), **env
    )


def bids(content: str = "hi", **fields) -> dict:
    return completion_request(
        content,
        app="bids-assistant",
        **{"model": OTHER_CHEAP, "systemMessage": BIDS_PROMPT, **fields},
    )


async def post(server: AppServer, request: dict, headers=None) -> tuple[int, object]:
    async with server.client.post("/api/completion", json=request, headers=headers) as response:
        if response.content_type == "application/json":
            return response.status, await response.json()
        return response.status, await response.read()


@pytest.fixture
async def server(start_server, fake, tmp_path) -> AppServer:
    return await policy_server(start_server, fake, tmp_path)


# --- models ---------------------------------------------------------------------------------


async def test_an_app_pays_only_for_its_own_models(server, fake):
    assert (await post(server, bids()))[0] == 200
    # Its list replaces the cheap list: a model no other app may use, and not a cheap one.
    assert (await post(server, bids(model=EXPENSIVE)))[0] == 200
    assert fake.last().headers["Authorization"] == "Bearer server-key"
    assert await post(server, bids(model=CHEAP)) == (
        400,
        {"error": f"OpenRouter key required for model: {CHEAP}"},
    )
    # Another app keeps the cheap list.
    assert (await post(server, completion_request(model=CHEAP)))[0] == 200
    assert (await post(server, completion_request(model=EXPENSIVE)))[0] == 400


async def test_a_client_with_its_own_key_is_not_held_to_the_apps_policy(server, fake):
    rider = bids(
        model="vendor/anything",
        systemMessage=FREE_RIDER,
        messages=[{"role": "user", "content": "x" * 3000}] * 3,
    )
    assert (await post(server, rider, USER_KEY))[0] == 200
    seen = fake.last()
    assert seen.headers["Authorization"] == "Bearer the-users-key"
    assert "max_tokens" not in seen.body


# --- caps -----------------------------------------------------------------------------------


async def test_upstream_is_asked_for_at_most_the_apps_completion_tokens(server, fake):
    assert (await post(server, bids()))[0] == 200
    assert fake.last().body["max_tokens"] == 100
    assert (await post(server, completion_request()))[0] == 200
    assert "max_tokens" not in fake.last().body


@pytest.mark.on_both_databases
async def test_the_reservation_shrinks_with_the_token_cap(start_server, fake, tmp_path):
    # 1,024 completion tokens at $0.00001 reserve $0.01024, over the $0.005 budget; the
    # cap's 100 reserve $0.001.
    prices = f"""
[budgets]
server_daily_usd = 0.005
[prices]
"{OTHER_CHEAP}" = {{ prompt = 0.0, completion = 0.00001 }}
"""
    server = await policy_server(start_server, fake, tmp_path, POLICY + prices)
    assert (await post(server, bids()))[0] == 200
    other = completion_request(model=OTHER_CHEAP)
    status, body = await post(server, other)
    assert (status, body["error"]) == (402, "Budget exhausted")


async def test_an_app_can_allow_fewer_messages_and_characters(server):
    three = [{"role": "user", "content": "hi"}] * 3
    assert await post(server, bids(messages=three)) == (
        413,
        {"error": "Request validation failed", "message": "Too many messages: 3 (max: 2)"},
    )
    long = [{"role": "user", "content": "x" * 1900}]
    total = 1900 + len(BIDS_PROMPT)
    assert await post(server, bids(messages=long)) == (
        413,
        {
            "error": "Request validation failed",
            "message": f"Request too large: {total} characters (max: 2000)",
        },
    )
    # Other apps keep the contract's limits.
    assert (await post(server, completion_request(messages=three)))[0] == 200
    assert (await post(server, completion_request(messages=long)))[0] == 200


# --- the system prompt ----------------------------------------------------------------------


async def test_a_free_rider_with_the_three_phrases_gets_400(server, fake):
    before = len(fake.received)
    assert await post(server, bids(systemMessage=FREE_RIDER)) == (
        400,
        {"error": "System message not allowed for app bids-assistant"},
    )
    assert len(fake.received) == before
    # The whitespace the front end puts before the prompt is no matter.
    assert (await post(server, bids(systemMessage="\n  " + BIDS_PROMPT)))[0] == 200
    # The contract's own check comes first.
    assert await post(server, bids(systemMessage=BIDS_OPENING)) == (
        400,
        {"error": "First message must contain the correct system message"},
    )


async def test_refusals_are_counted_by_app_and_reason(server):
    assert (await post(server, bids(systemMessage=FREE_RIDER)))[0] == 400
    assert (await post(server, bids(systemMessage=FREE_RIDER)))[0] == 400
    assert (await post(server, bids(model=CHEAP)))[0] == 400
    assert (await post(server, bids(messages=[{"role": "user", "content": "a"}] * 3)))[0] == 413
    async with server.client.get("/metrics") as response:
        text = await response.text()
    for reason, count in (("prefix", 2), ("model", 1), ("cap", 1)):
        line = f'qp_app_policy_refusals_total{{app="bids-assistant",reason="{reason}"}} {count}.0'
        assert line in text
    status, policies = await call(server.client, "GET", "/api/admin/policies", headers=ADMIN)
    assert status == 200
    assert policies == {
        "requireListed": False,
        "apps": [
            {
                "app": "bids-assistant",
                "models": [OTHER_CHEAP, EXPENSIVE],
                "maxCompletionTokens": 100,
                "maxMessages": 2,
                "maxRequestChars": 2000,
                "systemPromptPrefixes": [BIDS_OPENING],
                "spentToday": 0.0,
                "dailyBudget": 0.0,
            }
        ],
        "refusals": [
            {"app": "bids-assistant", "reason": "cap", "refusals": 1},
            {"app": "bids-assistant", "reason": "model", "refusals": 1},
            {"app": "bids-assistant", "reason": "prefix", "refusals": 2},
        ],
    }


# --- require_listed -------------------------------------------------------------------------


async def test_require_listed_refuses_apps_without_a_policy(start_server, fake, tmp_path):
    server = await policy_server(
        start_server, fake, tmp_path, "[apps]\nrequire_listed = true\n" + POLICY
    )
    assert await post(server, completion_request(app="stranger")) == (400, {"error": "Unknown app"})
    assert await post(server, completion_request(leave_out=("app",))) == (
        400,
        {"error": "Unknown app"},
    )
    assert (await post(server, bids()))[0] == 200
    assert (await post(server, completion_request(app="stranger"), USER_KEY))[0] == 200


async def test_a_star_section_covers_every_app_not_named(start_server, fake, tmp_path):
    policy = '[apps]\nrequire_listed = true\n\n[apps."*"]\nmax_completion_tokens = 50\n'
    server = await policy_server(start_server, fake, tmp_path, policy)
    assert (await post(server, completion_request(app="anyone")))[0] == 200
    assert fake.last().body["max_tokens"] == 50


async def test_with_no_apps_sections_nothing_changes(start_server, fake, tmp_path):
    server = await policy_server(start_server, fake, tmp_path, "")
    assert (await post(server, completion_request(systemMessage=FREE_RIDER)))[0] == 200
    assert "max_tokens" not in fake.last().body
    status, policies = await call(server.client, "GET", "/api/admin/policies", headers=ADMIN)
    assert (status, policies) == (200, {"requireListed": False, "apps": [], "refusals": []})


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        ('[apps."a"]\nmodels = "x"\n', "'a' models must be a list of non-empty strings"),
        ('[apps."a"]\nmax_completion_tokens = 0\n', "'a' max_completion_tokens must be a whole"),
        ('[apps."a"]\nsystem_prompts = ["x"]\n', "'a': unknown setting 'system_prompts'"),
        ("[apps]\nrequire_listed = 1\n", "require_listed must be true or false"),
    ],
)
def test_a_bad_app_section_stops_start_up_naming_it(tmp_path, section, problem):
    config = tmp_path / "qp.toml"
    config.write_text(section)
    done = subprocess.run(
        [sys.executable, str(ROOT / "server.py"), "--check-config"],
        env={"QP_CONFIG": str(config), "QP_DATA_DIR": str(tmp_path / "data"), "PATH": ""},
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode != 0
    assert problem in done.stderr


# --- SIGHUP and the command line ------------------------------------------------------------


async def test_sighup_changes_the_policy_for_the_next_request_while_a_stream_stays_open(
    tmp_path, fake
):
    fake.scripts["slow-bids"] = Script(
        chunks=[(0.0, b"data: one\n\n"), (1.0, b"data: two\n\n"), (0.0, b"data: [DONE]\n\n")]
    )
    server, config = relay_process(tmp_path, fake.url, "")
    server.start()
    try:
        async with aiohttp.ClientSession(server.url) as http:
            stream = await http.post(
                "/api/completion", json=bids("script:slow-bids", systemMessage=FREE_RIDER)
            )
            assert await stream.content.readany() == b"data: one\n\n"
            config.write_text(POLICY)
            server.signal(signal.SIGHUP)
            await wait_for_log(server, "policy reloaded")
            assert await call(
                http, "POST", "/api/completion", json=bids(systemMessage=FREE_RIDER)
            ) == (400, {"error": "System message not allowed for app bids-assistant"})
            assert await stream.read() == b"data: two\n\ndata: [DONE]\n\n"
            stream.close()
    finally:
        server.stop()
    assert "Traceback" not in server.log()


# The QP assistants' system prompts as their front end builds them: a stable opening, then
# what changes from one page to the next.
NWB_PROMPTS = [
    "\nYou are a helpful technical assistant for the Neurodata Without Borders (NWB) format."
    f" Answer questions about pynwb and matnwb.\n\n{SYSTEM}\n\nThe user is looking at {page}."
    for page in ("the file browser", "dandiset 000409", "an electrophysiology tutorial")
]
DANDI_PROMPT = (
    f"You are the DANDI Archive metadata assistant. You help edit dandiset metadata.\n\n{SYSTEM}"
)


async def test_suggest_prefix_pins_one_assistant_and_refuses_another(start_server, fake, tmp_path):
    files = []
    for n, prompt in enumerate(NWB_PROMPTS):
        path = tmp_path / f"nwb-{n}.txt"
        path.write_text(prompt)
        files.append(str(path))
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "qp", "apps", "suggest-prefix", *files],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"QP_DATA_DIR": str(tmp_path / "data"), "PATH": ""},
    )
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.splitlines()
    assert line.startswith("system_prompt_prefixes = [")
    server = await policy_server(start_server, fake, tmp_path, f'[apps."nwb-assistant"]\n{line}\n')
    for prompt in NWB_PROMPTS:
        assert (await post(server, completion_request(systemMessage=prompt)))[0] == 200
    assert await post(server, completion_request(systemMessage=DANDI_PROMPT)) == (
        400,
        {"error": "System message not allowed for app nwb-assistant"},
    )
    assert await post(server, completion_request(systemMessage=FREE_RIDER)) == (
        400,
        {"error": "System message not allowed for app nwb-assistant"},
    )


def test_suggest_prefix_refuses_prompts_that_share_nothing(tmp_path):
    one, two = tmp_path / "one.txt", tmp_path / "two.txt"
    one.write_text("Alpha prompt")
    two.write_text("Beta prompt")
    done = subprocess.run(
        [sys.executable, "-m", "qp", "apps", "suggest-prefix", str(one), str(two)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"QP_DATA_DIR": str(tmp_path / "data"), "PATH": ""},
    )
    assert done.returncode == 1
    assert done.stderr == "python -m qp: error: the prompts share no opening: no prefix to pin\n"
