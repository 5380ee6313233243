"""Migrations: an empty database becomes the expected schema, idempotently, even with concurrent starters."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import zipfile
from pathlib import Path

from mflux_server import db

EXPECTED_COLUMNS = {
    "tasks": {"seq", "id", "status", "priority", "model", "prompt", "width", "height", "steps", "guidance", "seed",
              "count", "format", "quality", "created_at", "started_at", "finished_at", "worker_id", "attempts",
              "image_index", "step", "step_at", "engine", "error"},
    "images": {"task_id", "idx", "seed", "mime", "data", "served", "gen_started", "gen_ended"},
    "queue_state": {"id", "changes"},
    "timing_stats": {"model", "width", "height", "kind", "n", "total", "total_sq", "updated_at"},
    "workers": {"id", "hostname", "pid", "engine", "model", "quantize", "started_at", "heartbeat_at", "stopped_at"},
}


def schema(path: str) -> dict[str, set[str]]:
    conn = db.connect(path)
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'")]
    out = {t: {r[1] for r in conn.execute(f"PRAGMA table_info({t})")} for t in tables}
    conn.close()
    return out


def test_empty_database_gets_expected_schema_and_pragmas(tmp_path: Path):
    path = str(tmp_path / "q.db")
    conn = db.open_database(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(db.migration_files())
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000
    indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert "tasks_queue" in indexes
    conn.close()
    assert schema(path) == EXPECTED_COLUMNS


def test_migrate_twice_is_a_no_op(tmp_path: Path):
    path = str(tmp_path / "q.db")
    db.open_database(path).close()
    conn = db.connect(path)
    conn.execute("INSERT INTO workers VALUES ('w', 'h', 1, 'synthetic', 'schnell', NULL, 0, 0, NULL)")
    assert db.migrate(conn) == len(db.migration_files())
    assert conn.execute("SELECT COUNT(*) FROM workers").fetchone()[0] == 1


def _open(path: str) -> int:
    conn = db.open_database(path)
    return conn.execute("PRAGMA user_version").fetchone()[0]


def test_concurrent_processes_migrate_safely(tmp_path: Path):
    path = str(tmp_path / "q.db")
    with multiprocessing.get_context("spawn").Pool(6) as pool:
        versions = pool.map(_open, [path] * 12)
    assert set(versions) == {len(db.migration_files())}
    assert schema(path) == EXPECTED_COLUMNS


def test_newer_database_is_refused(tmp_path: Path):
    path = str(tmp_path / "q.db")
    conn = db.open_database(path)
    conn.execute("PRAGMA user_version = 999")
    try:
        db.migrate(conn)
    except RuntimeError as exc:
        assert "newer" in str(exc)
    else:
        raise AssertionError("a database from a newer version must not be used")


def test_migrations_ship_in_the_wheel(tmp_path: Path):
    root = Path(__file__).resolve().parent.parent
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(root)],
        check=True, capture_output=True,
    )
    wheel = next(tmp_path.glob("mflux_server-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(n.rsplit("/", 1)[-1] for n in names if n.startswith("mflux_server/migrations/") and n.endswith(".sql"))
    assert shipped == [name for _, name, _ in db.migration_files()]
    assert "mflux_server/queries.sql" in names


def test_split_statements_keeps_triggers_whole():
    sql = "CREATE TABLE a (x);\nCREATE TRIGGER t AFTER INSERT ON a BEGIN SELECT 1; SELECT 2; END;\n-- trailing comment\n"
    statements = db.split_statements(sql)
    assert len(statements) == 2 and statements[1].endswith("END;")
