"""The queue's store: open one with connect() or open_migrated() and call its methods (base.Store).

A --db value names an SQLite file or a postgresql:// URL; each has its backend package (sqlite/, postgresql/)
with its session, its SQL and its migrations. Callers hold a Store, catch errors.StoreError and ask
capabilities.Capabilities what the store can do; they never see a connection, a driver or a dialect.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mflux_server.store.base import EVENT_RETENTION, FORGET_WORKERS_AFTER, Store, clip_outliers, new_task_id, pid_alive
from mflux_server.store.capabilities import Capabilities, is_server_url
from mflux_server.store.capabilities import of as capabilities_of
from mflux_server.store.errors import Conflict, FileNotWritable, StorageLost, StoreError, storage_problem
from mflux_server.store.sqlite import migrations as sqlite_migrations
from mflux_server.store.sqlite.backend import SqliteStore
from mflux_server.store.sqlite.connection import BACKSTOP_PAGES, EAGER_PAGES

__all__ = ["BACKSTOP_PAGES", "Capabilities", "Conflict", "EAGER_PAGES", "EVENT_RETENTION", "FORGET_WORKERS_AFTER",
           "FileNotWritable", "SqliteStore", "StorageLost", "Store", "StoreError", "capabilities_of",
           "clip_outliers", "connect", "is_server_url", "limit_idle_transactions", "new_task_id", "open_migrated",
           "open_or_exit", "pid_alive", "redact", "storage_problem"]


def connect(target: str | Path, checkpoint_pages: int | None = None, pooled: bool = False,
            wait_turn: Callable[[float], None] | None = None) -> Store:
    """A session with the queue a --db value names, its schema as it is.

    checkpoint_pages: on SQLite, the WAL's size in pages at which this session's commits checkpoint it, FULL
    (EAGER_PAGES, BACKSTOP_PAGES; SQLite's default otherwise; never with wait_turn). pooled: on PostgreSQL, borrow
    the session from this process's pool (close() gives it back). wait_turn: on SQLite, how to pause between tries of the write
    lock instead of sleeping in SQLite's busy handler (gevent.sleep on an event loop; psycopg yields by itself).
    """
    if is_server_url(target):
        from mflux_server.store.postgresql.backend import PostgresStore

        return PostgresStore(str(target), pooled)
    found = SqliteStore(target, checkpoint_pages)
    found.session.wait_turn = wait_turn
    if wait_turn is not None:
        # A FULL checkpoint waits in SQLite's busy handler, which would stall the event loop: the housekeeper
        # (every 0.25 s) and the workers' threads checkpoint instead.
        found.session.checkpoint_bytes = None
    return found


def open_migrated(target: str | Path) -> Store:
    """Connect and bring the schema up to date: what every process does at start."""
    if is_server_url(target):
        from mflux_server.store.postgresql import migrations
        from mflux_server.store.postgresql.backend import PostgresStore

        found = PostgresStore(str(target))
        try:
            migrations.migrate(found.session)
        except BaseException:
            found.close()
            raise
        return found
    return SqliteStore(target, session=sqlite_migrations.open_migrated(target))


def open_or_exit(target: str | Path, program: str) -> None:
    """Check at start that the queue can be opened, migrated and written; else exit 1 with one line naming it."""
    if not is_server_url(target):
        sqlite_migrations.open_or_exit(target, program)
        return
    try:
        open_migrated(target).close()
    except (StoreError, RuntimeError) as error:
        raise SystemExit(f"{program}: cannot use the PostgreSQL queue {redact(str(target))}: {error}") from None


def redact(target: str) -> str:
    """A --db value fit for messages and logs: a URL without its password."""
    if not is_server_url(target):
        return target
    from mflux_server.store.postgresql.session import redact as redact_url

    return redact_url(target)


def limit_idle_transactions(seconds: float | None) -> None:
    """Have a PostgreSQL server end a session idle inside a transaction this long (core/write_lock.py): for the
    sessions this process opens from now on. An SQLite queue's bound is the write-lock watchdog's alone."""
    from mflux_server.store.postgresql import session

    session.limit_idle_transactions(seconds)
