"""Schema migrations on SQLite: the named steps build what schema.sql describes, and a
database made by each earlier version migrates to the current one with its rows intact."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from qp.storage.migrations import SCHEMA_VERSION, SchemaTooNew, applied_steps
from qp.storage.schema import POSTGRES_OLD_STEPS, STEPS
from qp.storage.sqlite import SqliteDatabase
from tests.processes import ROOT

# The versions SQLite databases were left at before the one list of named steps: its first
# nine steps, as they were (0: the worker's D1 export, its chats table only).
OLD_VERSIONS = range(10)

# Rows as each table first had them: table -> (the version that made it, columns, row).
FIRST_ROWS = {
    "chats": (
        1,
        (
            "chat_id",
            "app",
            "model",
            "prompt_tokens",
            "completion_tokens",
            "estimated_cost",
            "created_at",
            "updated_at",
        ),
        (
            "old-chat",
            "nwb",
            "m",
            12,
            40,
            0.5,
            "2025-01-01T00:00:00.000Z",
            "2025-01-02T00:00:00.000Z",
        ),
    ),
    "completions": (
        2,
        (
            "started_at",
            "app",
            "model",
            "payer",
            "prompt_tokens",
            "completion_tokens",
            "cost",
            "status",
            "outcome",
            "duration_ms",
            "client_left",
        ),
        ("2025-01-03T00:00:00.000Z", "nwb", "m", "server", 1, 2, 0.25, 200, "completed", 99, 0),
    ),
    "settings": (3, ("name", "value"), ("ip_salt", "kept-salt")),
    "blocks": (
        3,
        ("client_hash", "blocked_at", "blocked_until"),
        ("ab" * 32, "2025-01-04T00:00:00.000Z", "2999-01-01T00:00:00.000Z"),
    ),
}


def structure(path: Path) -> dict[str, object]:
    """Every table's columns (name, type, not null, default, key), every index's columns and
    order, as SQLite reports them, every trigger's text (its spacing aside), and the rows a
    new database starts with: the same for equal schemas, however written."""
    with sqlite3.connect(path) as db:
        shape: dict[str, object] = {"version": db.execute("PRAGMA user_version").fetchone()[0]}
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in sorted(tables):
            shape[table] = [row[1:] for row in db.execute(f"PRAGMA table_info({table})")]
            for index in db.execute(f"PRAGMA index_list({table})"):
                name = index[1]
                shape[f"{table}.{name}"] = (
                    index[2:],
                    [row for row in db.execute(f"PRAGMA index_xinfo({name})")],
                )
        for name, sql in db.execute("SELECT name, sql FROM sqlite_master WHERE type='trigger'"):
            shape[f"trigger {name}"] = " ".join(sql.split())
        shape["chat_bytes rows"] = db.execute("SELECT * FROM chat_bytes").fetchall()
    return shape


def made_by_version(path: Path, version: int) -> None:
    """A database as version `version` of qp-server left it, one row in each table."""
    with sqlite3.connect(path) as db:
        for step in STEPS[: max(version, 1)]:  # 0: the D1 export's chats table, no version
            for statement in step.sqlite:
                db.execute(statement)
        for table, (made_in, columns, row) in FIRST_ROWS.items():
            if made_in <= max(version, 1 if table == "chats" else 0):
                marks = ", ".join("?" * len(row))
                db.execute(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", row)
        db.execute(f"PRAGMA user_version = {version}")


def rows_of(path: Path, table: str, columns: tuple[str, ...]) -> list[tuple]:
    with sqlite3.connect(path) as db:
        return db.execute(f"SELECT {', '.join(columns)} FROM {table}").fetchall()


def test_each_step_has_a_name_of_its_own_and_the_old_numbering_names_each_once():
    names = [step.name for step in STEPS]
    assert len(set(names)) == len(names) == SCHEMA_VERSION
    old = [name for made in POSTGRES_OLD_STEPS for name in made]
    # The old numbering named each step of its time once; steps added since are the last.
    assert len(set(old)) == len(old) and set(old) == set(names[: len(old)])
    # Its numbers are below any the runner leaves, so the two are never taken for each other.
    assert len(POSTGRES_OLD_STEPS) < SCHEMA_VERSION
    assert applied_steps(len(POSTGRES_OLD_STEPS), POSTGRES_OLD_STEPS) == set(old)
    assert applied_steps(SCHEMA_VERSION, POSTGRES_OLD_STEPS) == set(names)
    assert applied_steps(3, ()) == {"chats", "ledger", "settings and blocks"}


async def test_the_steps_build_what_schema_sql_describes(tmp_path):
    with sqlite3.connect(tmp_path / "from-file.sqlite3") as db:
        db.executescript((ROOT / "schema.sql").read_text())
    db = await SqliteDatabase.open(tmp_path / "from-steps.sqlite3")
    await db.close()
    from_file = structure(tmp_path / "from-file.sqlite3")
    assert from_file["version"] == SCHEMA_VERSION
    assert structure(tmp_path / "from-steps.sqlite3") == from_file


@pytest.mark.parametrize("version", OLD_VERSIONS)
async def test_a_database_of_each_earlier_version_migrates_with_its_rows(tmp_path, version):
    path = tmp_path / "qp.sqlite3"
    made_by_version(path, version)
    before = {
        table: rows_of(path, table, columns)
        for table, (made_in, columns, _) in FIRST_ROWS.items()
        if made_in <= max(version, 1)
    }
    assert before["chats"] == [FIRST_ROWS["chats"][2]]
    db = await SqliteDatabase.open(path)
    await db.close()
    with sqlite3.connect(tmp_path / "current.sqlite3") as current:
        current.executescript((ROOT / "schema.sql").read_text())
    assert structure(path) == structure(tmp_path / "current.sqlite3")
    for table, rows in before.items():
        assert rows_of(path, table, FIRST_ROWS[table][1]) == rows, table
    # Columns added since come in empty: not pending, size not known yet.
    assert rows_of(path, "chats", ("pending", "messages_bytes")) == [(None, None)]


async def test_the_count_of_bytes_stored_starts_from_the_rows_and_follows_every_change(
    tmp_path,
):
    path = tmp_path / "qp.sqlite3"
    made_by_version(path, 7)  # before the count
    insert = "INSERT INTO chats (chat_id, app, model, messages_bytes) VALUES (?, 'a', 'm', ?)"
    with sqlite3.connect(path) as db:
        db.executemany(insert, [("one", 100), ("two", 250), ("imported", None)])
    db = await SqliteDatabase.open(path)
    await db.close()
    total = "SELECT SUM(bytes) FROM chat_bytes"
    with sqlite3.connect(path) as db:
        assert db.execute(total).fetchone() == (350,)
        db.execute("UPDATE chats SET messages_bytes = 40 WHERE chat_id = 'imported'")
        db.execute("UPDATE chats SET messages_bytes = 200 WHERE chat_id = 'two'")
        db.execute("DELETE FROM chats WHERE chat_id = 'one'")
        db.execute(insert, ("three", 5))
        db.execute("UPDATE chats SET model = 'n'")
        db.execute("UPDATE chats SET messages_bytes = NULL WHERE chat_id = 'three'")
        assert db.execute(total).fetchone() == (240,)


async def test_a_database_of_a_newer_version_is_refused_and_left_as_it_is(tmp_path):
    path = tmp_path / "qp.sqlite3"
    made_by_version(path, SCHEMA_VERSION)
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    before = structure(path)
    with pytest.raises(SchemaTooNew, match=f"schema version {SCHEMA_VERSION + 1} is newer"):
        await SqliteDatabase.open(path)
    assert structure(path) == before
    assert rows_of(path, "chats", FIRST_ROWS["chats"][1]) == [FIRST_ROWS["chats"][2]]


async def test_a_step_that_fails_leaves_the_database_at_its_version(tmp_path):
    path = tmp_path / "qp.sqlite3"
    made_by_version(path, 3)
    with sqlite3.connect(path) as db:  # the column step 5 adds is already there
        db.execute("ALTER TABLE chats ADD COLUMN messages_bytes INTEGER")
    with pytest.raises(sqlite3.OperationalError, match="duplicate column name"):
        await SqliteDatabase.open(path)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 3
        columns = [row[1] for row in db.execute("PRAGMA table_info(chats)")]
    assert "pending" not in columns  # step 4 was rolled back with step 5
