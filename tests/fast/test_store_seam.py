"""The store seam without a server: each backend's SQL files, the placeholder style, the errors, the URL rules."""

from __future__ import annotations

import ast
from pathlib import Path

import psycopg.errors
import pytest

from mflux_server import store
from mflux_server.store import query_files
from mflux_server.store.migration_files import migration_files
from mflux_server.store.postgresql.session import psycopg_placeholders, store_error

STORE = Path(store.__file__).parent


def test_placeholders_become_psycopg_ones_and_literal_percent_signs_are_escaped():
    assert psycopg_placeholders("SELECT * FROM t WHERE a = :a AND b = ? AND c LIKE 'x%'") == \
        "SELECT * FROM t WHERE a = %(a)s AND b = %s AND c LIKE 'x%'"
    assert psycopg_placeholders("SELECT 5 % 2 WHERE x = :x") == "SELECT 5 %% 2 WHERE x = %(x)s"
    assert psycopg_placeholders("SELECT '::text', x::int FROM t") == "SELECT '::text', x::int FROM t", "casts stay"


def test_no_name_is_written_in_the_shared_file_and_a_backend_file_at_once():
    shared = query_files.shared()
    for backend in ("sqlite", "postgresql"):
        assert not set(shared) & set(query_files.own(backend)), backend
    original = query_files.own
    try:
        query_files.own = lambda backend: original(backend) | {"get_task": query_files.shared()["get_task"]}
        query_files.for_backend.cache_clear()
        with pytest.raises(RuntimeError, match=r"repeats statements of store/queries.sql: \['get_task'\]"):
            query_files.for_backend("sqlite")
    finally:
        query_files.own = original
        query_files.for_backend.cache_clear()


def _names_run_in(path: Path) -> set[str]:
    """Every statement name a module's methods pass to _run, _later or self._queries[...], read from its source."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr in ("_run", "_later") and node.args and isinstance(node.args[0], ast.Constant):
            names.add(node.args[0].value)
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and \
                node.value.attr == "_queries" and isinstance(node.slice, ast.Constant):
            names.add(node.slice.value)
    return names


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_each_backend_defines_every_statement_its_methods_run_and_no_other(backend):
    used = _names_run_in(STORE / "base.py") | _names_run_in(STORE / backend / "backend.py")
    assert {"claim_next", "insert_task", "waiting_queue", "max_seq", "queue_changes"} <= used, used
    defined = set(query_files.for_backend(backend))
    assert not used - defined, f"{backend} lacks {sorted(used - defined)}"
    assert not defined - used, f"{backend} defines statements nothing runs: {sorted(defined - used)}"


def test_each_backends_text_is_its_own_dialect():
    sqlite_text = " ".join(q.sql for q in query_files.for_backend("sqlite").values())
    pg_text = " ".join(q.sql for q in query_files.for_backend("postgresql", psycopg_placeholders).values())
    assert "INSERT OR IGNORE" in sqlite_text and "INSERT OR IGNORE" not in pg_text
    assert "PRAGMA" in sqlite_text and "PRAGMA" not in pg_text
    assert "FOR UPDATE SKIP LOCKED" in query_files.for_backend("postgresql", psycopg_placeholders)["claim_next"].sql
    assert "%(worker_id)s" in query_files.for_backend("postgresql", psycopg_placeholders)["claim_next"].sql
    assert ":worker_id" in query_files.for_backend("sqlite")["claim_next"].sql


def test_a_statement_knows_whether_it_writes():
    queries = query_files.for_backend("sqlite")
    assert queries["record_progress"].writes and queries["insert_task"].writes and queries["delete_task"].writes
    assert not queries["get_task"].writes and not queries["waiting_queue"].writes


def test_postgresql_errors_become_the_stores_own_with_their_storage_problem():
    cases = [(psycopg.errors.DiskFull("no space"), "full"), (psycopg.errors.ReadOnlySqlTransaction("ro"), "read_only"),
             (psycopg.errors.DeadlockDetected("dl"), "busy"), (psycopg.OperationalError("gone"), "io"),
             (psycopg.errors.AdminShutdown("restart"), "io"), (psycopg.errors.SyntaxError("bug"), None)]
    for error, problem in cases:
        translated = store_error(error)
        assert isinstance(translated, store.StoreError) and not isinstance(translated, psycopg.Error)
        assert store.storage_problem(translated) == problem, error
    assert isinstance(store_error(psycopg.errors.UniqueViolation("taken")), store.Conflict), "a taken key name"


def test_code_outside_the_store_never_names_a_driver():
    root = STORE.parent
    for path in [*root.rglob("*.py"), *(root.parent / "worker").rglob("*.py")]:
        if STORE in path.parents or path.name in ("testing_postgres.py",):
            continue
        text = path.read_text()
        imports = [node for node in ast.walk(ast.parse(text)) if isinstance(node, ast.Import | ast.ImportFrom)]
        imported = {alias.name for node in imports for alias in node.names} | \
                   {node.module for node in imports if isinstance(node, ast.ImportFrom) and node.module}
        assert not {"sqlite3", "psycopg", "psycopg_pool"} & imported, f"{path} imports a database driver"
        assert "sqlite3." not in text, f"{path} names sqlite3"


@pytest.mark.parametrize("url, expected", [("postgresql://u@h/db", True), ("postgres://u:p@h:5/db?sslmode=require", True),
                                           ("/var/lib/q.db", False), ("queue.db", False), ("postgresql.db", False)])
def test_only_a_postgresql_url_selects_the_store(url, expected):
    assert store.is_server_url(url) is expected


def test_messages_never_show_the_password():
    assert store.redact("postgresql://mflux:s3cret@db:5432/q?sslmode=require") == \
        "postgresql://mflux:***@db:5432/q?sslmode=require"
    assert store.redact("postgresql://mflux@db/q") == "postgresql://mflux@db/q"


def test_the_postgresql_migrations_are_numbered_without_gaps():
    found = migration_files("postgresql")
    assert [version for version, _, _ in found] == list(range(1, len(found) + 1)) and found[0][1] == "0001_initial.sql"
