"""The README and docs/ stay true and connected.

The failure table (docs/operating.md, "When something fails") stays tied to the code and the
tests: each row is pinned by the tests named here, each log line it quotes is one the code
writes, and each `/healthz` value it names is one the server reports. Every relative link in
README.md and docs/*.md reaches a file and heading that exist, and the README, a newcomer's
page, names the two commands near its top and links every docs/ file."""

from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path

from tests.processes import ROOT

# A row (the start of its first cell) -> the tests that show what the row says: what clients
# get, what /healthz checks, the log line.
PINNED_BY = {
    "a second `server.py` on the same SQLite database or file blob folder": [
        "test_one_owner.py::test_a_second_server_on_the_same_data_refuses_and_loses_nothing",
        "test_one_owner.py::test_a_second_server_on_the_same_blob_folder_refuses",
    ],
    "a lock file (`qp.sqlite3.lock`, or `.qp-server.lock`": [
        "test_one_owner.py::test_a_removed_lock_file_is_claimed_again",
    ],
    "a second server started on that lock file": [
        "test_one_owner.py::test_a_server_whose_lock_file_another_server_took_refuses_every_write",
    ],
    "another program holds the SQLite database's write lock": [
        "test_group_commit.py::test_a_lock_held_elsewhere_is_503_within_a_busy_timeout_and_reads_go_on",
    ],
    "free disk under `QP_MIN_FREE_MB`": [
        "test_disk_failures.py::test_below_the_free_space_floor_new_chats_and_updates_get_507",
    ],
    "the disk is full": [
        "test_disk_failures.py::test_a_full_disk_answers_503_keeps_what_was_saved_and_deletes_still_work",
    ],
    "a restart on a full disk": [
        "test_disk_failures.py::test_a_restart_on_a_full_disk_serves_reads_and_refuses_writes",
    ],
    "files or folders made read-only": [
        "test_disk_failures.py::test_read_only_blob_files_answer_503_and_the_server_lives_on",
        "test_disk_failures.py::test_a_read_only_database_file_answers_503_and_healthz_says_so",
        "test_disk_failures.py::test_a_filesystem_ext4_turned_read_only_answers_503_and_healthz_says_so",
    ],
    "the database file deleted, replaced, truncated or overwritten": [
        "test_disk_failures.py::test_a_database_file_damaged_under_the_server_takes_no_more_writes",
        "test_disk_failures.py::test_a_damaged_database_file_is_noticed_without_any_write",
    ],
    "S3 unreachable, or accepting and never answering": [
        "test_storage_failures.py::test_s3_down_answers_503_and_nothing_saved_is_lost",
        "test_storage_failures.py::test_a_stalled_s3_answers_503_in_time_and_releases_the_chat",
        "test_slow_storage.py::test_a_put_that_lands_after_its_timeout_leaves_the_chat_wholly_old",
    ],
    "PostgreSQL unreachable or failing": [
        "test_postgres.py::test_postgresql_down_is_503_and_back_is_served_again",
    ],
    "PostgreSQL refuses more connections": [
        "test_database_connections.py::test_start_up_refused_for_too_many_connections_says_why_in_one_line",
        "test_database_connections.py::test_a_pool_growing_past_the_connection_limit_is_503_and_logged",
    ],
    "the database fails at a write's commit": [
        "test_postgres.py::test_a_write_whose_commit_fails_is_503_and_changes_nothing",
    ],
    "the ledger cannot be written": [
        "test_postgres.py::test_a_ledger_postgresql_cannot_take_is_retried_then_dropped_and_counted",
    ],
    "the database refuses a value": [
        "test_text_checks.py::test_a_value_the_database_refuses_is_a_data_error_not_an_outage",
        "test_text_checks.py::test_a_ledger_batch_with_bad_rows_keeps_every_good_row_and_counts_the_drops",
        "test_text_checks.py::test_a_refused_value_reaching_a_handler_is_a_400_logged_without_it",
    ],
    "upstream reports usage the ledger cannot store": [
        "test_completion.py::test_usage_the_ledger_cannot_store_is_null_and_the_ledger_goes_on",
    ],
}
# Words of logged text that come from outside qp: the OS's messages, Python's errors.
OUTSIDE_WORDS = {
    "Operation",
    "permitted",
    "ConnectionRefusedError",
    "TooManyConnectionsError",
    "CharacterNotInRepertoireError",
}
WORD = re.compile(r"[A-Za-z_]{4,}")
LOGGING_CALLS = {"debug", "info", "warning", "error", "exception", "critical", "print"}


def failure_table() -> list[dict[str, str]]:
    """The rows of the failure table, as {column title: cell}."""
    text = (ROOT / "docs" / "operating.md").read_text()
    section = text.split("\n## When something fails\n", 1)[1].split("\n#", 1)[0]
    lines = [line.strip().strip("|") for line in section.splitlines() if line.startswith("|")]
    titles = [cell.strip() for cell in lines[0].split("|")]
    rows = [[cell.strip() for cell in line.split("|")] for line in lines[2:]]
    assert all(len(row) == len(titles) for row in rows), "a row with a stray |"
    return [dict(zip(titles, row, strict=True)) for row in rows]


def quoted(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def sources() -> list[Path]:
    return [ROOT / "server.py", *sorted((ROOT / "qp").rglob("*.py"))]


def template(node: ast.expr) -> str | None:
    """A message as a regular expression: its fixed text, anything where a value goes."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        parts = re.split(r"%[-#0 +]*\d*(?:\.\d+)?[sdrif]", node.value)
        return ".+".join(re.escape(part) for part in parts)
    if isinstance(node, ast.JoinedStr):
        return "".join(
            re.escape(value.value) if isinstance(value, ast.Constant) else ".+"
            for value in node.values
        )
    return None


def messages() -> list[re.Pattern[str]]:
    """What the code logs or prints (the first argument of each call), the messages of the
    errors it raises, and the middleware's line for each StorageUnavailable, as patterns."""
    found = []
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else None
            name = node.func.id if isinstance(node.func, ast.Name) else name
            first = template(node.args[0])
            if first is None:
                continue
            if name in LOGGING_CALLS or (name or "").endswith("Error"):
                found.append(first)
            if name == "__init__":  # an error's own message, as the middleware logs it too
                found += [first, r".+ .+: " + first]
            if name == "StorageUnavailable":  # the middleware logs `METHOD ROUTE: what: detail`
                detail = template(node.args[1]) if len(node.args) > 1 else None
                found.append(r".+ .+: " + first + ": " + (detail or ".+"))
    # A pattern with no word of its own (the middleware's `%s %s: %s`) would match anything.
    return [re.compile(p, re.DOTALL) for p in found if re.search(r"[A-Za-z]{2}", p)]


def string_constants(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    }


def test_every_row_of_the_failure_table_is_pinned_by_a_test():
    rows = [row["what happens"] for row in failure_table()]
    matched = {row: [key for key in PINNED_BY if row.startswith(key)] for row in rows}
    assert {row: keys for row, keys in matched.items() if len(keys) != 1} == {}, (
        "each row needs exactly one entry in PINNED_BY"
    )
    stale = set(PINNED_BY) - {key for keys in matched.values() for key in keys}
    assert stale == set(), "PINNED_BY names rows the table no longer has"
    for test in (test for tests in PINNED_BY.values() for test in tests):
        module, name = test.split("::")
        tree = ast.parse((ROOT / "tests" / module).read_text())
        defined = {
            n.name for n in tree.body if isinstance(n, ast.AsyncFunctionDef | ast.FunctionDef)
        }
        assert name in defined, f"{test} does not exist"


def test_each_log_line_the_failure_table_quotes_is_one_the_code_writes():
    patterns = messages()
    words = {w for path in sources() for text in string_constants(path) for w in WORD.findall(text)}
    for row in failure_table():
        for line in quoted(row["the log says"]):
            assert any(p.fullmatch(line) for p in patterns), f"{line!r} is logged nowhere"
            # A value in a pattern matches any text: the line's words must be the code's too
            # (or the outside sources' named above).
            unknown = set(WORD.findall(line)) - words - OUTSIDE_WORDS
            assert unknown == set(), f"{line!r}: {sorted(unknown)} are not the code's"


def test_each_health_value_the_failure_table_names_is_one_the_server_reports():
    health = ROOT / "qp" / "ops" / "health.py"
    (healthz,) = [
        node
        for node in ast.parse(health.read_text()).body
        if isinstance(node, ast.AsyncFunctionDef) and node.name == "healthz"
    ]
    documented = ast.get_docstring(healthz) or ""
    reported = set().union(*(string_constants(path) for path in sources()))
    for row in failure_table():
        for check in quoted(row["`/healthz` checks"]):
            for value in re.findall(r'"([^"]+)"', check):
                assert value in reported, f"/healthz never reports {value!r}"
                assert f"`{value}`" in documented, f"healthz's docstring does not name {value!r}"


PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCED = re.compile(r"^\s*```.*?^\s*```", re.DOTALL | re.MULTILINE)
INLINE_CODE = re.compile(r"`[^`]*`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


def relative_links(page: Path) -> list[str]:
    """The targets of the page's links that name no scheme, outside code."""
    text = INLINE_CODE.sub("", FENCED.sub("", page.read_text()))
    return [target for target in LINK.findall(text) if not SCHEME.match(target)]


def anchors(page: Path) -> set[str]:
    """The `#anchor` of each heading of a page, made as GitHub makes them."""
    found: set[str] = set()
    seen: Counter[str] = Counter()
    for line in FENCED.sub("", page.read_text()).splitlines():
        heading = re.match(r"#{1,6} (.+)", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading[1].strip().lower()).replace(" ", "-")
            found.add(f"{slug}-{seen[slug]}" if seen[slug] else slug)
            seen[slug] += 1
    return found


def test_anchors_are_made_from_headings_as_github_makes_them():
    assert {
        "configuration-and-limits",
        "cors-rate-limits-and-client-addresses",
        "the-database-sqlite-or-postgresql",
    } <= anchors(ROOT / "docs" / "configuration.md")
    assert "the-operators-command-line" in anchors(ROOT / "docs" / "operating.md")


def test_every_relative_link_reaches_a_file_and_heading_that_exist():
    broken, links = [], 0
    for page in PAGES:
        for target in relative_links(page):
            links += 1
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.is_file():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and anchor not in anchors(linked):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert broken == []
    assert links > len(PAGES)


def test_the_readme_links_every_page_of_docs():
    readme = ROOT / "README.md"
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in relative_links(readme)}
    pages = {page.resolve() for page in (ROOT / "docs").glob("*.md")}
    assert len(pages) >= 6
    assert pages - linked == set()


def test_the_readme_names_the_two_commands_near_its_top():
    top = "\n".join((ROOT / "README.md").read_text().splitlines()[:15])
    assert "make run" in top
    assert "make test" in top
