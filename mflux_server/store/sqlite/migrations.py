"""Bringing an SQLite queue file's schema up to date (migrations/*.sql), and the checks at start that name a bad file."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import NoReturn

from mflux_server.store.errors import StoreError
from mflux_server.store.migration_files import migration_files
from mflux_server.store.sqlite.connection import QueueConnection, connect


def split_statements(sql: str) -> list[str]:
    """Split a script into complete statements, since executescript() would commit our transaction."""
    statements, current = [], ""
    for line in sql.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            if current.strip():
                statements.append(current.strip())
            current = ""
    if current.strip() and not all(part.strip().startswith("--") for part in current.strip().splitlines()):
        raise ValueError(f"incomplete SQL statement at the end of a migration: {current.strip()[:80]}")
    return statements


def migrate(conn: QueueConnection) -> int:
    """Apply pending migrations in one transaction; safe when several processes start at once."""
    migrations = migration_files()
    # BEGIN IMMEDIATE takes the write lock before reading user_version, so two processes
    # starting together apply each migration exactly once: the second sees the new version.
    with conn.transaction():
        current = conn.execute("PRAGMA user_version").fetchone()[0]
        if current > len(migrations):
            raise RuntimeError(
                f"database schema version {current} is newer than this code knows ({len(migrations)}); upgrade mflux-server"
            )
        for version, _name, sql in migrations[current:]:
            for statement in split_statements(sql):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version}")
    return len(migrations)


def open_migrated(path: str | Path) -> QueueConnection:
    """Connect and migrate: what both processes do at start."""
    conn = connect(path)
    try:
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")  # takes effect at once on a new, empty file
        migrate(conn)
        if conn.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
            # Incremental: retention frees pages and hands them back to the file system a few at a time. Switching
            # an existing file over needs one VACUUM (a copy of the file, once).
            conn.execute("VACUUM")
    except BaseException:
        conn.close()
        raise
    return conn


def _why_unwritable(path: Path) -> str | None:
    """The plain reason a queue file cannot be written here, when the file system or permissions give one."""
    folder = path.parent
    if os.statvfs(folder).f_flag & os.ST_RDONLY:
        return "the file system is mounted read-only"
    if not os.access(folder, os.W_OK):
        return f"no permission to write in {folder} (SQLite's WAL keeps two files beside the queue)"
    if path.exists() and not os.access(path, os.W_OK):
        return "no permission to write the file"
    return None


def open_or_exit(path: str | Path, program: str) -> None:
    """Check at start that the queue file can be opened, migrated and written; else exit 1 with one line naming it."""
    queue = Path(path)

    def fail(reason: str) -> NoReturn:
        raise SystemExit(f"{program}: cannot use the queue file {queue}: {reason}")

    if queue.is_dir():
        fail("it is a directory (give --db a file path, e.g. ~/.local/share/mflux-server/queue.db)")
    try:
        queue.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        fail(f"cannot create the folder {queue.parent}: {error.strerror}")
    try:
        # Migrating runs a write transaction even when nothing is pending, so this also proves the file writable.
        open_migrated(queue).close()
    except StoreError as error:
        if error.problem == "corrupt":
            fail(f"it is not an SQLite database, or it is damaged ({error})")
        fail(_why_unwritable(queue) or f"{error} ({error.problem or 'SQLite error'})")
    except (OSError, RuntimeError) as error:
        fail(str(error))
