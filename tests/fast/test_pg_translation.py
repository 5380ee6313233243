"""The PostgreSQL store's SQL translation and error mapping, without a server (the store tests run it on one)."""

from __future__ import annotations

import sqlite3

import psycopg.errors
import pytest

from mflux_server.core import db, pg, query_files, store


def test_placeholders_become_psycopg_ones_and_literal_percent_signs_are_escaped():
    assert pg.translate("SELECT * FROM t WHERE a = :a AND b = ? AND c LIKE 'x%'") == \
        "SELECT * FROM t WHERE a = %(a)s AND b = %s AND c LIKE 'x%'"
    assert pg.translate("SELECT 5 % 2 WHERE x = :x") == "SELECT 5 %% 2 WHERE x = %(x)s"
    assert pg.translate("SELECT '::text', x::int FROM t") == "SELECT '::text', x::int FROM t", "casts are not names"


def test_scalar_max_and_min_become_greatest_and_least_but_aggregates_stay():
    assert pg.translate("UPDATE t SET a = MAX(a - 1, 0)") == "UPDATE t SET a = GREATEST(a - 1, 0)"
    assert pg.translate("SELECT max(id) FROM t") == "SELECT max(id) FROM t"
    assert pg.translate("SELECT min(max(a, coalesce(b, 0))) FROM t") == "SELECT min(GREATEST(a, coalesce(b, 0))) FROM t"


def test_sqlite_only_syntax_is_rewritten():
    assert pg.translate("INSERT OR IGNORE INTO t (a) VALUES (:a)") == "INSERT INTO t (a) VALUES (%(a)s) ON CONFLICT DO NOTHING"
    assert pg.translate("DELETE FROM tasks INDEXED BY tasks_finished WHERE x < 1") == "DELETE FROM tasks WHERE x < 1"
    assert pg.translate("SELECT 1 FROM tasks t WHERE +t.status = 'a'") == "SELECT 1 FROM tasks t WHERE t.status = 'a'"
    assert pg.translate("DELETE FROM rate_windows WHERE window < :before") == \
        'DELETE FROM rate_windows WHERE "window" < %(before)s'


def test_statements_that_need_their_own_postgresql_text_take_it_by_name():
    overrides = pg.overrides()
    assert set(overrides) <= set(query_files.queries()), "every override names a statement of queries.sql"
    claim = pg.translate(store.sql("claim_next"))
    assert "FOR UPDATE SKIP LOCKED" in claim and "%(worker_id)s" in claim
    assert "FOR UPDATE SKIP LOCKED" in pg.translate(store.sql("claim_delivery"))
    assert "PRAGMA" not in " ".join(pg.translate(query.sql) for query in query_files.queries().values())


def test_postgresql_errors_read_as_sqlite_storage_problems():
    cases = [(psycopg.errors.DiskFull("no space"), "full"), (psycopg.errors.ReadOnlySqlTransaction("ro"), "read_only"),
             (psycopg.errors.DeadlockDetected("dl"), "busy"), (psycopg.OperationalError("gone"), "io"),
             (psycopg.errors.AdminShutdown("restart"), "io"), (psycopg.errors.SyntaxError("bug"), None)]
    for error, problem in cases:
        translated = pg._translate_error(error)
        assert isinstance(translated, sqlite3.Error)
        assert db.storage_problem(translated) == problem, error
    unique = pg._translate_error(psycopg.errors.UniqueViolation("taken"))
    assert isinstance(unique, sqlite3.IntegrityError), "a taken key name reads as it does on SQLite"


@pytest.mark.parametrize("url, expected", [("postgresql://u@h/db", True), ("postgres://u:p@h:5/db?sslmode=require", True),
                                           ("/var/lib/q.db", False), ("queue.db", False), ("postgresql.db", False)])
def test_only_a_postgresql_url_selects_the_store(url, expected):
    assert pg.is_postgres_url(url) is expected


def test_messages_never_show_the_password():
    assert pg.redact("postgresql://mflux:s3cret@db:5432/q?sslmode=require") == \
        "postgresql://mflux:***@db:5432/q?sslmode=require"
    assert pg.redact("postgresql://mflux@db/q") == "postgresql://mflux@db/q"


def test_the_postgresql_migrations_are_numbered_without_gaps():
    found = db.migration_files("postgresql")
    assert [version for version, _, _ in found] == list(range(1, len(found) + 1)) and found[0][1] == "0001_initial.sql"
