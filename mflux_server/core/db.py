"""Opening the queue with the right pragmas and bringing its schema up to date: an SQLite file, or PostgreSQL (pg.py)."""

from __future__ import annotations

import os
import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

from mflux_server.core import pg

BUSY_TIMEOUT_MS = 10_000
_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


# Statements that write: before each, a connection checks that its files are still the ones it opened.
_WRITE = re.compile(r"\s*(?:INSERT|UPDATE|DELETE|REPLACE|BEGIN)\b", re.IGNORECASE)


class StorageLost(sqlite3.DatabaseError):
    """The database file or its WAL was removed or replaced under a running process: writes would not be durable."""


class FileNotWritable(sqlite3.OperationalError):
    """The queue file stopped being writable while the process ran."""

    problem = "read_only"


class QueueConnection(sqlite3.Connection):
    """A connection that notices its database file or WAL being removed or replaced while it is open.

    SQLite keeps writing to the files it opened, so after a `rm queue.db-wal` every commit lands in an unlinked
    file and is gone at the next restart. Each write first compares the files' identities (device, inode) with
    those seen when the connection first wrote, and refuses with StorageLost once they differ.
    """

    path: str = ""
    files: dict[str, tuple[int, int] | None]
    lost: str | None = None

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        """Run a statement; a write first checks the files."""
        if self.path and _WRITE.match(sql):
            self.check_files()
        try:
            return super().execute(sql, parameters)
        except sqlite3.OperationalError as error:
            # A file made read-only under a running process (chattr +i, chmod) fails its writes with a plain
            # I/O error; say what it is, so that it reads storage_read_only and not storage_failed.
            if self.path and (getattr(error, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_IOERR \
                    and not os.access(self.path, os.W_OK):
                raise FileNotWritable(f"{self.path} is not writable any more (read-only or immutable, as after "
                                      f"chattr +i): {error}") from error
            raise

    def check_files(self) -> None:
        """Raise StorageLost if the database file or its WAL is no longer the one this connection uses."""
        if self.lost is None:
            for name, seen in self.files.items():
                now = _identity(name)
                if seen is None:
                    self.files[name] = now  # the WAL appears with the first read; remember it then
                elif now != seen:
                    self.lost = f"{name} was {'removed' if now is None else 'replaced'} while the process ran"
            if self.lost is not None and _identity(self.path) == self.files[self.path]:
                self.lost += self._save_wal()
        if self.lost is not None:
            raise StorageLost(f"{self.lost}: writes stopped, since none would survive a restart; restart the server "
                              "and workers (tasks acknowledged before this are in the file they had open)")


    def _save_wal(self) -> str:
        """Copy what the removed WAL holds into the database file, which is still ours, so acknowledged writes stay."""
        try:
            busy, _, _ = super().execute("PRAGMA wal_checkpoint(FULL)").fetchone()
        except sqlite3.Error as error:
            return f" (saving its contents into the database file failed: {error})"
        if busy:
            return " (another connection was busy, so some of its contents may not be in the database file)"
        return " (its contents were first copied into the database file, so no acknowledged write is lost)"


def _identity(path: str) -> tuple[int, int] | None:
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return None
    return found.st_dev, found.st_ino


STORAGE_PROBLEMS = {sqlite3.SQLITE_FULL: "full", sqlite3.SQLITE_IOERR: "io", sqlite3.SQLITE_READONLY: "read_only",
                    sqlite3.SQLITE_BUSY: "busy", sqlite3.SQLITE_LOCKED: "busy", sqlite3.SQLITE_CANTOPEN: "io",
                    sqlite3.SQLITE_CORRUPT: "corrupt", sqlite3.SQLITE_NOTADB: "corrupt", sqlite3.SQLITE_PERM: "read_only"}


def storage_problem(error: BaseException) -> str | None:
    """What a database error says about the storage: full, io, read_only, busy, corrupt or lost; None for a bug."""
    if isinstance(error, StorageLost):
        return "lost"
    if hasattr(error, "problem"):  # a PostgreSQL error, already classified (pg.PgStorageError)
        problem: str | None = error.problem
        return problem
    if not isinstance(error, sqlite3.Error):
        return None
    code = getattr(error, "sqlite_errorcode", None)
    if code is None:
        text = str(error).lower()
        return "full" if "disk is full" in text else "read_only" if "readonly" in text else None
    return STORAGE_PROBLEMS.get(code & 0xFF)


WAL_SIZE_LIMIT = 1 << 20  # bytes the -wal file is cut back to after a checkpoint
# Who checkpoints the WAL (SQLite runs a checkpoint in the commit that takes the WAL past a connection's page
# count): a worker's publisher and writer threads, at 1 MB; connections on an API event loop or the worker's
# claim loop only should nobody else keep up (16 MB), since there a checkpoint's 2-12 ms stalls every request
# or delays the next generation. The API's housekeeper checkpoints too, for a queue with no worker running.
EAGER_PAGES = WAL_SIZE_LIMIT // 4096
BACKSTOP_PAGES = 4000


ROW_OVERHEAD = 80  # bytes an image row holds besides its blob (record header, task id, mime, numbers), a little over


def blob_disk_bytes(length: int, page: int) -> int:
    """Disk bytes a row with a blob of `length` bytes takes in a WITHOUT ROWID table, from SQLite's file format.

    The row's first part stays in a leaf page (between about 1/8 and 1/4 of a page when the row overflows) and
    the rest fills whole overflow pages of page-4 bytes. Leaf pages are counted two thirds full: rows go in
    by random task id, which leaves a b-tree's pages about 69% full (the soak's ran 71%).
    """
    payload = length + ROW_OVERHEAD
    usable = page - 4  # an overflow page's bytes after its link to the next
    most = (page - 12) * 64 // 255 - 23  # the largest payload an index leaf cell keeps in the page
    least = (page - 12) * 32 // 255 - 23  # what it keeps of one that overflows, at the least
    if payload <= most:
        local = payload
    else:
        fitted = least + (payload - least) % usable
        local = fitted if fitted <= most else least
    overflow_pages = -(-(payload - local) // usable)
    return overflow_pages * page + (local + 8) * 3 // 2  # a cell's pointer and sizes: about 8 bytes


def connect(path: str | Path, checkpoint_pages: int | None = None) -> sqlite3.Connection:
    """Open the database in autocommit mode (we issue BEGIN ourselves) with WAL and a busy timeout.

    checkpoint_pages: the WAL's size in pages at which this connection's commits checkpoint (EAGER_PAGES or
    BACKSTOP_PAGES above); SQLite's default (1,000) otherwise.
    """
    if pg.is_postgres_url(path):
        return pg.connect(str(path))  # type: ignore[return-value]  # the same surface (pg.PgConnection)
    if str(path) != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000,
                           factory=QueueConnection)
    conn.row_factory = sqlite3.Row
    conn.create_function("disk_bytes", 2, blob_disk_bytes, deterministic=True)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    # journal_mode is persistent in the file; setting it again is cheap and idempotent.
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")
    # Under steady load the WAL file keeps its largest size after each checkpoint; this lets the next reset
    # truncate it, so the queue's files stay near what they hold (retention's bound covers the WAL too).
    conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
    if checkpoint_pages is not None:
        conn.execute(f"PRAGMA wal_autocheckpoint = {int(checkpoint_pages)}")
    if str(path) != ":memory:":
        conn.path = str(path)
        conn.files = {str(path): _identity(str(path)), str(path) + "-wal": _identity(str(path) + "-wal")}
    return conn


def wal_bytes(conn: sqlite3.Connection) -> int:
    """How large the connection's -wal file is now (0 for PostgreSQL, an in-memory queue or no WAL yet)."""
    path = getattr(conn, "path", None)
    try:
        return os.path.getsize(path + "-wal") if path else 0
    except OSError:
        return 0


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """Run a block in one BEGIN IMMEDIATE transaction, so writers queue up instead of deadlocking."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        # SQLite has already rolled back after some errors (a full disk, an I/O error); a second ROLLBACK would
        # raise "no transaction is active" and hide the error that matters.
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def execute_later(conn: sqlite3.Connection, sql: str, parameters: Any = ()) -> Any:
    """Run a write of an open transaction; PostgreSQL sends it with what comes next. The result's rowcount is
    known at once on SQLite, and once it was sent (after COMMIT at the latest) on PostgreSQL."""
    defer = getattr(conn, "defer", None)
    return conn.execute(sql, parameters) if defer is None else defer(sql, parameters)


def migration_files(dialect: str = "") -> list[tuple[int, str, str]]:
    """Return (version, name, sql) for every migration of a store ("" for SQLite, "postgresql"), from the installed
    package or the checkout."""
    package = "mflux_server.migrations" + (f".{dialect}" if dialect else "")
    try:
        folder = resources.files(package)
        entries = [(entry.name, entry) for entry in folder.iterdir()]
    except (ModuleNotFoundError, FileNotFoundError):
        entries = []
    if not any(_MIGRATION_NAME.match(name) for name, _ in entries):
        checkout = Path(__file__).resolve().parents[2] / "migrations" / dialect
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
    if pg.is_postgres_url(path):
        try:
            open_database(path).close()
        except (sqlite3.Error, RuntimeError) as error:
            raise SystemExit(f"{program}: cannot use the PostgreSQL queue {pg.redact(str(path))}: {error}") from None
        return
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
        open_database(queue).close()
    except sqlite3.DatabaseError as error:
        problem = storage_problem(error)
        if problem == "corrupt":
            fail(f"it is not an SQLite database, or it is damaged ({error})")
        fail(_why_unwritable(queue) or f"{error} ({problem or 'SQLite error'})")
    except (OSError, RuntimeError) as error:
        fail(str(error))


def open_database(path: str | Path) -> sqlite3.Connection:
    """Connect and migrate: what both processes do at start."""
    if pg.is_postgres_url(path):
        pg_conn = pg.connect(str(path))
        pg.migrate(pg_conn, migration_files("postgresql"))
        return pg_conn  # type: ignore[return-value]
    conn = connect(path)
    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")  # takes effect at once on a new, empty file
    migrate(conn)
    if conn.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
        # Incremental: retention frees pages and hands them back to the file system a few at a time. Switching
        # an existing file over needs one VACUUM (a copy of the file, once).
        conn.execute("VACUUM")
    return conn


def backup(conn: sqlite3.Connection, target: Path) -> None:
    """Copy a live queue into a new file with SQLite's online backup API: consistent while others write."""
    copy = sqlite3.connect(target)
    try:
        conn.backup(copy, pages=1024)
        copy.execute("PRAGMA journal_mode = DELETE")  # one self-contained file, no -wal beside it
    finally:
        copy.close()
