"""One SQLite session of the queue: the pragmas, the write transaction, the file checks and the driver's errors
turned into the store's (errors.py)."""

from __future__ import annotations

import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mflux_server.store.errors import Conflict, FileNotWritable, StorageLost, StoreError
from mflux_server.store.query_files import Query

BUSY_TIMEOUT_MS = 10_000
# Seconds between tries of the write lock when waiting by yielding (begin): doubling from the first to the last.
FIRST_PAUSE = 0.0002
LAST_PAUSE = 0.005


# Statements that write: before each, a connection checks that its files are still the ones it opened.
_WRITE = re.compile(r"\s*(?:INSERT|UPDATE|DELETE|REPLACE|BEGIN)\b", re.IGNORECASE)


class QueueConnection(sqlite3.Connection):
    """A connection that notices its database file or WAL being removed or replaced while it is open.

    SQLite keeps writing to the files it opened, so after a `rm queue.db-wal` every commit lands in an unlinked
    file and is gone at the next restart. Each write first compares the files' identities (device, inode) with
    those seen when the connection first wrote, and refuses with StorageLost once they differ.
    """

    path: str = ""
    files: dict[str, tuple[int, int] | None]
    lost: str | None = None
    # How to wait for the write lock without blocking: set for the session of gevent's event loop (api/context.py).
    wait_turn: Callable[[float], None] | None = None
    # The WAL's size past which this connection's commits checkpoint it (see checkpoint_full); None: never here.
    checkpoint_bytes: int | None = None

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        """Run a statement; a write first checks the files."""
        writes = bool(self.path and _WRITE.match(sql))
        if writes:
            self.check_files()
        try:
            cursor = super().execute(sql, parameters)
        except sqlite3.Error as error:
            raise self.store_error(error) from error
        if writes and not self.in_transaction:  # a write outside BEGIN: it committed on its own
            self.checkpoint_if_due()
        return cursor

    def executescript(self, sql_script: str, /) -> sqlite3.Cursor:
        """Run a script (a pragma that must step to its end); errors as the store's."""
        try:
            return super().executescript(sql_script)
        except sqlite3.Error as error:
            raise self.store_error(error) from error

    def store_error(self, error: sqlite3.Error) -> StoreError:
        """The store's error for a driver error of this connection."""
        if isinstance(error, sqlite3.IntegrityError):
            return Conflict(str(error))
        code = getattr(error, "sqlite_errorcode", 0) & 0xFF
        # A file made read-only under a running process (chattr +i, chmod) fails its writes with a plain
        # I/O error; say what it is, so that it reads storage_read_only and not storage_failed.
        if self.path and code == sqlite3.SQLITE_IOERR and not os.access(self.path, os.W_OK):
            return FileNotWritable(f"{self.path} is not writable any more (read-only or immutable, as after "
                                   f"chattr +i): {error}")
        return StoreError(str(error), problem_of(error))

    # The session the store runs its statements through (base.Session)

    def run(self, query: Query, parameters: Any = ()) -> sqlite3.Cursor:
        """Run one named statement; its cursor."""
        return self.execute(query.sql, parameters)

    def later(self, query: Query, parameters: Any = ()) -> sqlite3.Cursor:
        """A write of the open transaction; SQLite runs it at once (PostgreSQL sends it with what comes next)."""
        return self.execute(query.sql, parameters)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Run a block in one BEGIN IMMEDIATE transaction, so writers queue up instead of deadlocking."""
        self.begin()
        try:
            yield
            self.execute("COMMIT")
            self.checkpoint_if_due()
        except BaseException:
            # SQLite has already rolled back after some errors (a full disk, an I/O error); a second ROLLBACK would
            # raise "no transaction is active" and hide the error that matters.
            if self.in_transaction:
                self.execute("ROLLBACK")
            raise

    def checkpoint_if_due(self) -> None:
        """After a commit: checkpoint (FULL) once the WAL has outgrown this connection's bound.

        SQLite's own automatic checkpoints are PASSIVE, and before 3.51.3 (Debian 12 ships 3.40.1) a PASSIVE
        checkpoint can race a commit that restarts the WAL and silently lose committed transactions (the WAL-reset
        bug, https://sqlite.org/wal.html#walresetbug): a worker here once lost its claims and a completion within
        150 ms, leaving three tasks "processing" under a live worker for good. A FULL checkpoint holds the writer
        lock from before it reads the WAL's header, so no commit can restart the WAL under it; every connection
        turns automatic checkpoints off (connect) and checkpoints this way instead.
        """
        if self.checkpoint_bytes is not None and wal_bytes(self) > self.checkpoint_bytes:
            try:
                self.checkpoint_full()
            except StoreError:
                pass  # the commit stands; the next one tries again

    def checkpoint_full(self) -> tuple[int, int, int]:
        """PRAGMA wal_checkpoint(FULL): (busy, WAL frames, frames checkpointed); StoreError if it fails."""
        busy, frames, done = self.execute("PRAGMA wal_checkpoint(FULL)").fetchone()
        return int(busy), int(frames), int(done)

    def begin(self) -> None:
        """Take the write lock. With wait_turn, another process's hold is waited out by yielding, not sleeping.

        SQLite's busy handler sleeps inside the call (1, 2, 5, 10… ms), and on gevent's event loop that stalls
        every connection of the process, at every submit that meets another process's write (with two server
        processes submitting flat out, a quarter of the loop's time went to writes). Here the lock is tried without
        a busy wait, and between tries the loop serves others. No transaction is open while it yields, so the
        greenlets sharing this session never interleave inside one (api/context.py).
        """
        if self.wait_turn is None:
            self.execute("BEGIN IMMEDIATE")
            return
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        pause = FIRST_PAUSE
        while True:
            super().execute("PRAGMA busy_timeout = 0")
            try:
                self.execute("BEGIN IMMEDIATE")
                return
            except StoreError as error:
                if error.problem != "busy" or time.monotonic() + pause > deadline:
                    raise
            finally:
                # Other greenlets' single statements on this session wait as before while this one yields.
                super().execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self.wait_turn(pause)
            pause = min(pause * 2, LAST_PAUSE)

    def snapshot(self, statements: Sequence[Query]) -> list[list[tuple[Any, ...]]]:
        """Several reads from one read transaction, as plain tuples (several times cheaper than sqlite3.Row)."""
        cursor = self.cursor()
        cursor.row_factory = None
        try:
            cursor.execute("BEGIN")
            try:
                return [cursor.execute(query.sql).fetchall() for query in statements]
            finally:
                cursor.execute("COMMIT")
        except sqlite3.Error as error:
            raise self.store_error(error) from error

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
            busy, _, _ = self.checkpoint_full()
        except StoreError as error:
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


def problem_of(error: sqlite3.Error) -> str | None:
    """What an SQLite error says about the storage: full, io, read_only, busy or corrupt; None for a bug."""
    code = getattr(error, "sqlite_errorcode", None)
    if code is None:
        text = str(error).lower()
        return "full" if "disk is full" in text else "read_only" if "readonly" in text else None
    return STORAGE_PROBLEMS.get(code & 0xFF)


WAL_SIZE_LIMIT = 1 << 20  # bytes the -wal file is cut back to after a checkpoint
# Who checkpoints the WAL (a commit that leaves it past the connection's page count runs a FULL checkpoint:
# checkpoint_if_due): a worker's publisher and writer threads, at 1 MB; the worker's claim loop only should
# nobody else keep up (16 MB), since there a checkpoint's 2-12 ms delays the next generation; an API event
# loop's sessions never (store.connect). The API's housekeeper checkpoints at 1 MB, with or without a worker.
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


def connect(path: str | Path, checkpoint_pages: int | None = None) -> QueueConnection:
    """Open the database in autocommit mode (we issue BEGIN ourselves) with WAL and a busy timeout.

    checkpoint_pages: the WAL's size in pages at which this connection's commits checkpoint it (EAGER_PAGES or
    BACKSTOP_PAGES above; 1,000, SQLite's default, otherwise), always as a FULL checkpoint (checkpoint_if_due).
    A session of gevent's event loop never checkpoints: the housekeeper and the workers do.
    """
    if str(path) != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False,
                               timeout=BUSY_TIMEOUT_MS / 1000, factory=QueueConnection)
    except sqlite3.Error as error:
        raise StoreError(f"cannot open {path}: {error}", problem_of(error)) from error
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
    conn.execute("PRAGMA wal_autocheckpoint = 0")  # never PASSIVE: see checkpoint_if_due
    conn.checkpoint_bytes = (checkpoint_pages or 1000) * 4096
    if str(path) != ":memory:":
        conn.path = str(path)
        conn.files = {str(path): _identity(str(path)), str(path) + "-wal": _identity(str(path) + "-wal")}
    return conn


def wal_bytes(conn: QueueConnection) -> int:
    """How large the connection's -wal file is now (0 for an in-memory queue or no WAL yet)."""
    try:
        return os.path.getsize(conn.path + "-wal") if conn.path else 0
    except OSError:
        return 0


def backup(conn: QueueConnection, target: Path) -> None:
    """Copy a live queue into a new file with SQLite's online backup API: consistent while others write."""
    try:
        copy = sqlite3.connect(target)
        try:
            conn.backup(copy, pages=1024)
            copy.execute("PRAGMA journal_mode = DELETE")  # one self-contained file, no -wal beside it
        finally:
            copy.close()
    except sqlite3.Error as error:
        raise StoreError(f"backing up into {target} failed: {error}", problem_of(error)) from error
