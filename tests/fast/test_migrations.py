"""Migrations: an empty database becomes the expected schema, idempotently; a newer one is refused."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest

from mflux_server import store
from mflux_server.store import Store
from mflux_server.store.migration_files import migration_files
from mflux_server.store.sqlite.migrations import migrate, split_statements

EXPECTED_COLUMNS = {
    "tasks": {"seq", "id", "status", "priority", "model", "prompt", "width", "height", "steps", "guidance", "seed",
              "count", "format", "quality", "created_at", "started_at", "finished_at", "worker_id", "attempts",
              "image_index", "step", "step_at", "engine", "error", "negative_prompt", "image_strength", "guidance_auto",
              "surface", "callback_url", "link_base", "keep_for", "client_user", "key_id", "forecast_seconds",
              "fair_tag", "fair_start", "input_count", "loras", "control", "image_strengths", "private",
              "forecast_low", "forecast_high", "then_upscale", "upscales_task", "upscales_index"},
    "task_inputs": {"task_id", "role", "mime", "width", "height", "data"},
    "load_stats": {"model", "n", "total", "last", "updated_at"},
    "images": {"task_id", "idx", "seed", "mime", "data", "served", "gen_started", "gen_ended", "credentials"},
    "queue_state": {"id", "changes"},
    "timing_stats": {"model", "width", "height", "kind", "n", "total", "total_sq", "updated_at"},
    "deliveries": {"id", "task_id", "url", "surface", "task", "state", "attempts", "next_at", "lease_until",
                   "last_status", "last_error", "created_at", "delivered_at"},
    "server_secrets": {"name", "value"},
    "api_keys": {"id", "name", "hash", "admin", "priority", "created_at", "last_used_at", "revoked_at"},
    "idempotency": {"key_id", "idem_key", "body_hash", "task_id", "created_at"},
    "expired_tasks": {"id", "expired_at"},
    "rate_windows": {"key_id", "window", "count"},
    "metric_bounds": {"name", "le"},
    "metric_buckets": {"name", "model", "le", "count"},
    "metric_sums": {"name", "model", "sum", "count"},
    "metric_counters": {"name", "label", "value"},
    "fair_keys": {"key_id", "last_finish", "backlog_start"},
    "fair_clock": {"id", "virtual", "last_tag"},
    "events": {"id", "task_id", "kind", "data", "at"},
    "previews": {"task_id", "image", "step", "mime", "data", "at"},
    "workers": {"id", "hostname", "pid", "engine", "model", "quantize", "started_at", "heartbeat_at", "stopped_at",
                "models", "max_pixels", "loading", "affinity_wait", "pixel_limits", "loras"},
    "server_settings": {"name", "value"},
}


# The schema test reads SQLite's catalog itself: introspection of the schema, not access to the queue.


def describe(db: Store) -> dict[str, set[str]]:
    """Every table with its column names."""
    tables = [r[0] for r in db.session.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                               "AND name NOT LIKE 'sqlite_%'")]
    return {table: {r[1] for r in db.session.execute(f"PRAGMA table_info({table})")} for table in tables}


def pragma(db: Store, name: str) -> object:
    """One PRAGMA's value on this connection."""
    return db.session.execute(f"PRAGMA {name}").fetchone()[0]


def test_empty_database_gets_expected_schema_and_pragmas(tmp_path: Path):
    db = store.open_migrated(str(tmp_path / "q.db"))
    assert pragma(db, "user_version") == len(migration_files())
    assert pragma(db, "journal_mode") == "wal"
    assert pragma(db, "foreign_keys") == 1
    assert pragma(db, "synchronous") == 1  # NORMAL
    assert pragma(db, "busy_timeout") >= 1000  # type: ignore[operator]
    assert "tasks_queue" in {r[0] for r in db.session.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert describe(db) == EXPECTED_COLUMNS
    db.close()


def test_migrations_are_numbered_without_gaps_and_each_says_what_it_does():
    migrations = migration_files()
    assert [version for version, _, _ in migrations] == list(range(1, len(migrations) + 1))
    for _, name, sql in migrations:
        assert sql.lstrip().startswith("--"), f"{name} should open with a comment saying what it does"


def test_migrate_twice_is_a_no_op(tmp_path: Path):
    path = str(tmp_path / "q.db")
    store.open_migrated(path).close()
    db = store.connect(path)
    worker = db.register_worker("synthetic", "schnell", None)
    assert migrate(db.session) == len(migration_files())
    assert [w.id for w in db.live_workers(60)] == [worker]


def test_a_database_from_before_the_last_migration_is_brought_up_to_date(tmp_path: Path):
    db = store.connect(str(tmp_path / "q.db"))
    first = migration_files()[:1]
    with db.session.transaction():
        for statement in split_statements(first[0][2]):
            db.session.execute(statement)
        db.session.execute("PRAGMA user_version = 1")
    assert "total_sq" in describe(db)["timing_stats"]
    migrate(db.session)
    assert describe(db) == EXPECTED_COLUMNS


def test_input_images_survive_the_rebuild_that_allows_several_references(tmp_path: Path):
    from mflux_server.core.rows import InputImage
    from tests.conftest import new_task

    db = store.connect(str(tmp_path / "q.db"))
    with db.session.transaction():
        for version, _, sql in migration_files()[:4]:
            for statement in split_statements(sql):
                db.session.execute(statement)
            db.session.execute(f"PRAGMA user_version = {version}")
    picture, mask = InputImage("image", "image/png", 8, 8, b"png"), InputImage("mask", "image/png", 8, 8, b"m")
    # The store speaks the newest schema, so the old rows are written the way version 4 took them.
    db.session.execute("INSERT INTO tasks (id, model, prompt, width, height, steps, guidance, seed, format, quality, "
                 "created_at) VALUES ('old', 'dev', 'p', 64, 64, 1, 0, 1, 'PNG', 85, 0)")
    for image in (picture, mask):
        db.session.execute("INSERT INTO task_inputs VALUES ('old', ?, ?, ?, ?, ?)",
                     (image.role, image.mime, image.width, image.height, image.data))
    with pytest.raises(store.Conflict):
        db.session.execute("INSERT INTO task_inputs VALUES ('old', 'image2', 'image/png', 8, 8, x'00')")
    migrate(db.session)
    assert db.inputs("old") == {"image": picture, "mask": mask}
    assert db.get("old").input_count == 2  # counted by migration 0013
    several = db.submit(new_task(inputs=(picture, InputImage("image2", "image/png", 8, 8, b"x"))))
    assert list(db.inputs(several.id)) == ["image", "image2"]
    guided = db.submit(new_task(inputs=(InputImage("control", "image/png", 8, 8, b"c"),)))  # 0018's rebuild
    assert list(db.inputs(guided.id)) == ["control"]
    db.cancel_or_delete(several.id)  # canceled first, then deleted
    db.cancel_or_delete(several.id)
    assert db.inputs(several.id) == {}, "the rebuilt table still cascades with its task"


def test_newer_database_is_refused(tmp_path: Path):
    db = store.open_migrated(str(tmp_path / "q.db"))
    db.session.execute("PRAGMA user_version = 999")
    with pytest.raises(RuntimeError, match="newer"):
        migrate(db.session)


def test_split_statements_keeps_triggers_whole():
    sql = "CREATE TABLE a (x);\nCREATE TRIGGER t AFTER INSERT ON a BEGIN SELECT 1; SELECT 2; END;\n-- trailing comment\n"
    statements = split_statements(sql)
    assert len(statements) == 2 and statements[1].endswith("END;")


# Triggers only PostgreSQL has: they NOTIFY the listening sessions of a change SQLite's readers see by polling
# PRAGMA data_version (a new API key, a new webhook delivery).
NOTIFY_ONLY = {("api_keys", "INSERT"), ("deliveries", "INSERT")}


def sqlite_schema(path: str) -> dict[str, object]:
    """Tables with their columns, named indexes, unique columns and the (table, event) pairs triggers watch."""
    db = sqlite3.connect(path)
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                             "AND name NOT LIKE 'sqlite_%'")]
        unique = set()
        for table in tables:
            for index in db.execute(f"PRAGMA index_list({table})"):
                if index[3] == "u":  # a UNIQUE constraint's own index
                    unique.update((table, col[2]) for col in db.execute(f"PRAGMA index_info({index[1]})"))
        triggers = set()
        for table, text in db.execute("SELECT tbl_name, sql FROM sqlite_master WHERE type = 'trigger'"):
            event = re.search(r"\b(INSERT|UPDATE|DELETE)\b", text, re.IGNORECASE)
            assert event is not None, text
            triggers.add((table, event.group(1).upper()))
        return {
            "columns": {t: {r[1] for r in db.execute(f"PRAGMA table_info({t})")} for t in tables},
            "indexes": {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")},
            "unique": unique,
            "triggers": triggers,
        }
    finally:
        db.close()


def postgres_schema(url: str) -> dict[str, object]:
    """The same description of a PostgreSQL database (its migrations' own bookkeeping table left out)."""
    import psycopg

    with psycopg.connect(url) as db:
        columns: dict[str, set[str]] = {}
        for table, column in db.execute("SELECT table_name, column_name FROM information_schema.columns "
                                          "WHERE table_schema = 'public' AND table_name <> 'schema_migrations'"):
            columns.setdefault(table, set()).add(column)
        unique = set(db.execute(
            "SELECT tc.table_name, kcu.column_name FROM information_schema.table_constraints tc "
            "JOIN information_schema.key_column_usage kcu USING (constraint_schema, constraint_name) "
            "WHERE tc.constraint_type = 'UNIQUE' AND tc.table_schema = 'public'").fetchall())
        constraint_indexes = {r[0] for r in db.execute(
            "SELECT conname FROM pg_constraint WHERE contype IN ('p', 'u')")}
        indexes = {r[0] for r in db.execute("SELECT indexname FROM pg_indexes WHERE schemaname = 'public' "
                                              "AND tablename <> 'schema_migrations'")} - constraint_indexes
        triggers = set(db.execute("SELECT event_object_table, event_manipulation FROM information_schema.triggers "
                                    "WHERE trigger_schema = 'public'").fetchall())
    return {"columns": columns, "indexes": indexes, "unique": unique, "triggers": triggers}


def test_both_stores_migrate_from_empty_to_the_same_schema(tmp_path: Path, postgres_server):
    path = str(tmp_path / "queue.db")
    store.open_migrated(path).close()
    url = postgres_server.create_database()
    store.open_migrated(url).close()
    lite, pg = sqlite_schema(path), postgres_schema(url)
    assert lite["columns"] == pg["columns"], "the same tables with the same columns"
    assert lite["indexes"] == pg["indexes"], "the same named indexes"
    assert lite["unique"] == pg["unique"], "the same unique columns"
    assert lite["triggers"] == pg["triggers"] - NOTIFY_ONLY, "triggers watch the same tables for the same changes"
    assert NOTIFY_ONLY <= pg["triggers"]
    assert "tasks" in lite["columns"] and lite["triggers"], "the schema was read"
