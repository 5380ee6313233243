"""Bringing a PostgreSQL queue's schema up to date (migrations/postgresql/*.sql), and copying an SQLite queue in."""

from __future__ import annotations

import psycopg

from mflux_server.store.migration_files import migration_files
from mflux_server.store.postgresql.session import MIGRATION_LOCK, WRITE_LOCK, PgSession, adapt, store_error
from mflux_server.store.sqlite.connection import QueueConnection


def migrate(conn: PgSession) -> int:
    """Apply pending migrations, each in its own transaction, under an advisory lock that several processes starting
    at once take in turn (the second finds nothing left to do)."""
    migrations = migration_files("postgresql")
    try:
        session = conn.session()
        session.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
        try:
            session.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, "
                            "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
            found = session.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()
            current = int(found[0]) if found else 0
            if current > len(migrations):
                raise RuntimeError(f"database schema version {current} is newer than this code knows "
                                   f"({len(migrations)}); upgrade mflux-server")
            for version, name, text in migrations[current:]:
                with session.transaction():
                    session.execute(text.encode(), prepare=False)  # a script: the simple protocol, unprepared
                    session.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (version, name))
        finally:
            if not session.closed:
                session.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
    except psycopg.Error as error:
        conn.after_error()
        raise store_error(error) from error
    return len(migrations)


# Copying an SQLite queue in (mflux-server migrate-to)

# What a queue holds, parents first. Workers are left behind (each re-registers on its host), and so are request
# counts of past minutes and the metric bounds, which the migration has already written.
COPIED_TABLES = ("tasks", "images", "task_inputs", "previews", "timing_stats", "load_stats", "events", "deliveries",
                 "server_secrets", "api_keys", "idempotency", "expired_tasks", "metric_buckets", "metric_sums",
                 "metric_counters", "fair_keys")
SINGLE_ROWS = ("queue_state", "fair_clock")  # one row each, seeded by the migration: updated, not inserted
SERIALS = (("tasks", "seq"), ("events", "id"), ("api_keys", "id"))


def copy_from_sqlite(source: QueueConnection, target: PgSession, batch: int = 500) -> dict[str, int]:
    """Copy every row of an SQLite queue into an empty, migrated PostgreSQL one, in one transaction; returns the
    rows copied per table. Triggers are off meanwhile: the events, metrics and webhooks copied are the history."""
    session = target.session()
    try:
        with session.transaction():
            held = session.execute("SELECT EXISTS (SELECT 1 FROM tasks) OR EXISTS (SELECT 1 FROM api_keys)").fetchone()
            if held and held[0]:
                raise RuntimeError("the PostgreSQL queue already holds tasks or keys; migrate into an empty database")
            session.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
            for table in ("tasks", "previews", "deliveries"):
                session.execute(f"ALTER TABLE {table} DISABLE TRIGGER USER")
            copied = {}
            for table in COPIED_TABLES:
                cursor = source.execute(f"SELECT * FROM {table}")
                columns = ", ".join(f'"{column[0]}"' for column in cursor.description)
                marks = ", ".join(["%s"] * len(cursor.description))
                statement = f"INSERT INTO {table} ({columns}) VALUES ({marks})"
                copied[table] = 0
                while rows := cursor.fetchmany(batch):
                    with session.cursor() as writer:
                        writer.executemany(statement, [adapt(tuple(row)) for row in rows])
                    copied[table] += len(rows)
            for table in SINGLE_ROWS:
                cursor = source.execute(f"SELECT * FROM {table} WHERE id = 1")
                row = cursor.fetchone()
                if row is not None:
                    names = [column[0] for column in cursor.description if column[0] != "id"]
                    sets = ", ".join(f"{name} = %s" for name in names)
                    session.execute(f"UPDATE {table} SET {sets} WHERE id = 1", [row[name] for name in names])
            for table, column in SERIALS:
                session.execute(f"SELECT setval(pg_get_serial_sequence('{table}', '{column}'), "
                                f"coalesce((SELECT max({column}) FROM {table}), 0) + 1, false)")
            for table in ("tasks", "previews", "deliveries"):
                session.execute(f"ALTER TABLE {table} ENABLE TRIGGER USER")
    except psycopg.Error as error:
        target.after_error()
        raise store_error(error) from error
    return copied
