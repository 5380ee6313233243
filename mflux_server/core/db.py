"""Opening the SQLite queue with the right pragmas and bringing its schema up to date."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

BUSY_TIMEOUT_MS = 10_000
_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def connect(path: str | Path) -> sqlite3.Connection:
    """Open the database in autocommit mode (we issue BEGIN ourselves) with WAL and a busy timeout."""
    if str(path) != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    # journal_mode is persistent in the file; setting it again is cheap and idempotent.
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """Run a block in one BEGIN IMMEDIATE transaction, so writers queue up instead of deadlocking."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def migration_files() -> list[tuple[int, str, str]]:
    """Return (version, name, sql) for every migration, from the installed package or the checkout."""
    try:
        folder = resources.files("mflux_server.migrations")
        entries = [(entry.name, entry) for entry in folder.iterdir()]
    except (ModuleNotFoundError, FileNotFoundError):
        entries = []
    if not any(_MIGRATION_NAME.match(name) for name, _ in entries):
        checkout = Path(__file__).resolve().parents[2] / "migrations"
        entries = [(entry.name, entry) for entry in checkout.iterdir()]
    found = []
    for name, entry in entries:
        match = _MIGRATION_NAME.match(name)
        if match:
            found.append((int(match.group(1)), name, entry.read_text(encoding="utf-8")))
    found.sort()
    versions = [version for version, _, _ in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migrations must be numbered 0001, 0002, … without gaps; found {versions}")
    return found


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


def migrate(conn: sqlite3.Connection) -> int:
    """Apply pending migrations in one transaction; safe when several processes start at once."""
    migrations = migration_files()
    # BEGIN IMMEDIATE takes the write lock before reading user_version, so two processes
    # starting together apply each migration exactly once: the second sees the new version.
    with transaction(conn):
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


def open_database(path: str | Path) -> sqlite3.Connection:
    """Connect and migrate: what both processes do at start."""
    conn = connect(path)
    migrate(conn)
    return conn
