"""One PostgreSQL session of the queue: autocommit, explicit write transactions under one advisory lock, writes
pipelined with what comes next, and psycopg's errors turned into the store's (errors.py)."""

from __future__ import annotations

import contextlib
import re
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
import psycopg.errors
from psycopg_pool import ConnectionPool

from mflux_server.store.errors import Conflict, StoreError
from mflux_server.store.postgresql import one_message
from mflux_server.store.query_files import Query

# Every write transaction holds this advisory lock until it ends, as SQLite's BEGIN IMMEDIATE holds the file's
# write lock: writers queue up in arrival order, events get ids in commit order (a stream never skips one), and
# no two transactions can deadlock on the rows they share (fair_clock, queue_state). Reads never wait for it.
WRITE_LOCK = 0x6D666C7578  # "mflux"
MIGRATION_LOCK = WRITE_LOCK + 1
CONNECT_TIMEOUT = 10
_BEGIN_WRITE = ("BEGIN", f"SELECT pg_advisory_xact_lock({WRITE_LOCK})")
_BEGIN_READ = ("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",)
# Server-side binding, every statement prepared on its first use in a session: parsing and planning were most of
# a statement's cost (0.8 ms → 0.26 ms for a task read), and the store runs the same ~150 statements again and again.
SESSION_OPTIONS: dict[str, Any] = {"autocommit": True, "connect_timeout": CONNECT_TIMEOUT, "prepare_threshold": 0}
PREPARED_MAX = 512
returned_at: weakref.WeakKeyDictionary[psycopg.Connection[Any], float] = weakref.WeakKeyDictionary()  # last given back


def limit_idle_transactions(seconds: float | None) -> None:
    """Have the server end a session that idles inside a transaction this long (a frozen process holding the write
    lock, core/write_lock.py); applies to the connections this process opens from now on."""
    if seconds:
        SESSION_OPTIONS["options"] = f"-c idle_in_transaction_session_timeout={round(seconds * 1000)}"
    else:
        SESSION_OPTIONS.pop("options", None)


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


_PARAM = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


def psycopg_placeholders(sql: str) -> str:
    """A statement of the queries files in psycopg's placeholder style (`:name` → %(name)s, ? → %s, % → %%),
    done once as the file is loaded, outside string literals (aiosql's psycopg adapter does the same)."""
    parts = re.split(r"('(?:[^']|'')*')", sql)
    return "".join(part if index % 2 else _PARAM.sub(r"%(\1)s", part.replace("%", "%%")).replace("?", "%s")
                   for index, part in enumerate(parts))


# Errors


def store_error(error: psycopg.Error) -> StoreError:
    """The store's error for a psycopg error: `problem` says what it means (io, full, busy...)."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, psycopg.errors.IntegrityError):
        return Conflict(message)
    if isinstance(error, psycopg.errors.DiskFull):
        return StoreError(message, "full")
    if isinstance(error, psycopg.errors.ReadOnlySqlTransaction | psycopg.errors.InsufficientPrivilege):
        return StoreError(message, "read_only")
    if isinstance(error, psycopg.errors.DeadlockDetected | psycopg.errors.SerializationFailure
                  | psycopg.errors.LockNotAvailable | psycopg.errors.QueryCanceled):
        return StoreError(message, "busy")
    if isinstance(error, psycopg.errors.DataCorrupted | psycopg.errors.IndexCorrupted):
        return StoreError(message, "corrupt")
    if isinstance(error, psycopg.OperationalError | psycopg.errors.AdminShutdown | psycopg.InterfaceError):
        return StoreError(message, "io")  # the server went away or restarts: the next use reconnects
    return StoreError(message, None)


# Rows and cursors


class Later:
    """A deferred write (PgSession.later) and, once it was sent, its cursor."""

    __slots__ = ("sql", "parameters", "cursor", "_rowcount")

    def __init__(self, sql: str, parameters: Any):
        self.sql, self.parameters = sql, parameters
        self.cursor: psycopg.Cursor[Any] | None = None
        self._rowcount: int | None = None

    @property
    def rowcount(self) -> int:
        """Rows the write changed; known once it was sent (after the transaction's COMMIT at the latest)."""
        if self._rowcount is not None:
            return self._rowcount
        if self.cursor is None:
            raise RuntimeError("a deferred write's rowcount is known only once it was sent")
        return self.cursor.rowcount

    @rowcount.setter
    def rowcount(self, value: int) -> None:
        self._rowcount = value


class PgRow(tuple):  # type: ignore[type-arg]
    """A result row readable by position and by column name, like sqlite3.Row."""

    __slots__ = ()
    names: dict[str, int]

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return tuple.__getitem__(self, self.names[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        """The column names, in order."""
        return list(self.names)


_shapes: dict[tuple[str, ...], type[PgRow]] = {}


def _row_class(result: psycopg.pq.abc.PGresult) -> type[PgRow]:
    """The row class for a result's column names, made once per distinct set of names."""
    # The names straight from libpq: cursor.description builds a Column object per column, which cost more
    # than the query itself for SELECT * FROM tasks.
    columns = tuple((result.fname(index) or b"").decode() for index in range(result.nfields))
    found = _shapes.get(columns)
    if found is None:
        names = {name: index for index, name in reversed(list(enumerate(columns)))}
        found = _shapes[columns] = type("PgRow", (PgRow,), {"names": names, "__slots__": ()})
    return found


class PgCursor:
    """The rows of one statement: fetchone, fetchall, iteration and rowcount, as the store reads them."""

    def __init__(self) -> None:
        self._rows: list[Any] = []
        self._at = 0
        self.rowcount = -1

    def keep(self, result: tuple[int, Any, list[Any] | None]) -> PgCursor:
        """Hold one statement's result: (rowcount, row class, rows or None)."""
        self.rowcount, shape, rows = result
        self._rows = [shape(row) for row in rows] if rows and shape is not None else rows or []
        self._at = 0
        return self

    def fetchone(self) -> Any:
        """The next row, or None."""
        if self._at >= len(self._rows):
            return None
        self._at += 1
        return self._rows[self._at - 1]

    def fetchall(self) -> list[Any]:
        """Every remaining row."""
        rows, self._at = self._rows[self._at:], len(self._rows)
        return rows

    def __iter__(self) -> Iterator[Any]:
        return iter(self.fetchall())


def adapt(parameters: Any) -> Any:
    # psycopg sends bytes as bytea and a memoryview the same way; sqlite3 accepts both, so callers pass either.
    if isinstance(parameters, Mapping):
        return {key: bytes(value) if isinstance(value, memoryview) else value for key, value in parameters.items()}
    return tuple(bytes(value) if isinstance(value, memoryview) else value for value in parameters)


class PgSession:
    """One PostgreSQL session of the store: autocommit, with explicit write transactions under the write lock.

    A broken session (the server restarted, the network dropped) raises an `io` storage error once; the next
    statement outside a transaction opens a new session, so API and workers reconnect by themselves.
    """

    def __init__(self, url: str, pool: ConnectionPool | None = None):
        self.url = url
        self._pool = pool
        self._conn: psycopg.Connection[Any] | None = None
        self._in_transaction = False
        self._pending: tuple[str, ...] | None = None  # the BEGIN that goes out with the transaction's first statement
        self._deferred: list[Later] = []  # writes of the open transaction, sent with what comes next

    @property
    def in_transaction(self) -> bool:
        """Whether a transaction is open."""
        return self._in_transaction

    # The session the store runs its statements through (base.Session)

    def run(self, query: Query, parameters: Any = ()) -> PgCursor:
        """Run one named statement; a write outside a transaction takes the write lock for itself (BEGIN, the
        lock, the write and COMMIT travel as one query: progress and heartbeats are most of a worker's writes)."""
        if not self._in_transaction and query.writes:
            self._pending = _BEGIN_WRITE
            return PgCursor().keep(self._statement(query.sql, parameters, commit=True))
        return PgCursor().keep(self._statement(query.sql, parameters))

    def execute(self, sql: str, parameters: Any = ()) -> PgCursor:
        """Run one statement written in psycopg's style, outside the named ones (tests and tools)."""
        return PgCursor().keep(self._statement(sql, parameters))

    def later(self, query: Query, parameters: Any = ()) -> Later:
        """Queue a write of the open transaction: it goes out with the transaction's next statement or its COMMIT,
        a round trip fewer while the write lock is held. Its rowcount (and its error, if any) come then."""
        later = Later(query.sql, adapt(parameters))
        if not self._in_transaction:
            later.rowcount = self.run(query, parameters).rowcount
            return later
        self._deferred.append(later)
        return later

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Run a block in one write transaction: BEGIN and the write lock go out with its first statement."""
        self._begin(write=True)
        try:
            yield
            self._end(commit=True)
        except BaseException:
            if self._in_transaction:
                self._end(commit=False)
            raise

    def snapshot(self, statements: Sequence[Query]) -> list[list[tuple[Any, ...]]]:
        """Several reads from one read-only snapshot, as plain tuples."""
        self._begin(write=False)
        try:
            return [self._statement(query.sql, ())[2] or [] for query in statements]
        finally:
            self._end(commit=True)

    def write_alone(self, query: Query, parameters: Mapping[str, Any]) -> PgCursor:
        """A lone write under the write lock, sent as one message (one_message.py); its cursor."""
        if self._in_transaction or self._pending is not None or self._deferred:
            return self.run(query, parameters)  # inside a transaction: the usual way, with what it holds
        session = self.session()
        try:
            rowcount, result, rows = one_message.write_alone(session, _BEGIN_WRITE[1], query.sql, parameters)
        except psycopg.Error as error:
            self.after_error()
            raise store_error(error) from error
        cursor = PgCursor()
        shape = _row_class(result) if result.nfields else None
        cursor.rowcount, cursor._rows = rowcount, [shape(row) for row in rows] if shape else []
        return cursor

    def rehearse(self, query: Query, parameters: Mapping[str, Any]) -> None:
        """Run a lone write under the write lock and roll it back: the session is ready for it."""
        session = self.session()
        try:
            one_message.rehearse(session, _BEGIN_WRITE[1], query.sql, parameters)
        except psycopg.Error as error:
            self.after_error()
            raise store_error(error) from error

    def close(self) -> None:
        """End the session (back to the pool when it came from one)."""
        conn, self._conn = self._conn, None
        self._in_transaction, self._pending, self._deferred = False, None, []
        if conn is None:
            return
        if self._pool is not None:
            returned_at[conn] = time.monotonic()
            self._pool.putconn(conn)
        else:
            conn.close()

    def session(self) -> psycopg.Connection[Any]:
        """The live psycopg connection, opened (or reopened after a failure) on demand."""
        if self._conn is not None and self._conn.closed:
            self.close()
        if self._conn is None:
            try:
                if self._pool is not None:
                    self._conn = self._pool.getconn(timeout=CONNECT_TIMEOUT)
                else:
                    self._conn = psycopg.connect(self.url, **SESSION_OPTIONS)
            except Exception as error:
                detail = " ".join(str(error).split())  # psycopg's message spans lines; one line for logs
                raise StoreError(f"cannot reach PostgreSQL at {redact(self.url)}: {detail}", "io") from error
            self._conn.autocommit = True
            self._conn.prepared_max = PREPARED_MAX
        return self._conn

    def _statement(self, sql: str, parameters: Any, commit: bool = False) -> tuple[int, Any, list[Any] | None]:
        """Execute one statement with what the transaction has pending: (rowcount, row class, rows or None)."""
        try:
            session = self.session()
        except StoreError:
            if not self._in_transaction:
                # A lone write that never went out: its BEGIN must not ride with the next statement, which
                # would then hold the write lock in a transaction nobody ends.
                self._pending, self._deferred = None, []
            raise
        prefix, self._pending = self._pending, None
        deferred, self._deferred = self._deferred, []
        try:
            # Parameters always go along, empty or not, so a %% in the statement reads as one %.
            if prefix is None and not deferred and not commit:
                cursor = session.execute(sql, adapt(parameters))
            else:
                cursor = _pipelined(session, prefix, deferred, (sql, adapt(parameters)), commit)
            result = cursor.pgresult
            if result is None or result.status != psycopg.pq.ExecStatus.TUPLES_OK:
                return cursor.rowcount, None, None
            return cursor.rowcount, _row_class(result), cursor.fetchall()
        except psycopg.Error as error:
            self.after_error()
            if commit:
                self._rollback_quietly()  # the failed write left its one-statement transaction open
            raise store_error(error) from error

    def _begin(self, write: bool) -> None:
        # Sent with the transaction's first statement, saving a round trip: BEGIN and the write lock, or for a
        # read transaction (the forecast's queue read) one snapshot, as SQLite's read transactions see.
        self._pending = _BEGIN_WRITE if write else _BEGIN_READ
        self._in_transaction = True

    def _rollback_quietly(self) -> None:
        if self._conn is not None and not self._conn.broken and \
                self._conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            with contextlib.suppress(psycopg.Error):
                self._conn.execute("ROLLBACK")

    def _end(self, commit: bool) -> None:
        if not self._in_transaction:
            return
        self._in_transaction = False
        deferred, self._deferred = self._deferred, []
        if not commit:
            deferred = []  # never sent: nothing to undo for them
        opening, self._pending = self._pending, None  # taken before anything can fail, so none is left over
        if opening is not None and not deferred:  # nothing ran in it: nothing was sent
            return
        try:
            session = self.session()
            if not deferred:
                session.execute("COMMIT" if commit else "ROLLBACK")
            else:
                _pipelined(session, opening, deferred, None, commit=True)
        except psycopg.Error as error:
            self.after_error()
            self._rollback_quietly()  # a deferred write failed: its transaction is aborted, not ended
            raise store_error(error) from error

    def after_error(self) -> None:
        """Forget a session that broke (the next use opens a new one); one still alive stays."""
        conn = self._conn
        if conn is None:
            return
        # Otherwise PostgreSQL refuses every statement after an error until ROLLBACK, which the caller's
        # transaction() sends: the session stays.
        if conn.closed or conn.broken:
            self._in_transaction, self._pending, self._deferred = False, None, []
            self._conn = None
            if self._pool is not None:
                self._pool.putconn(conn)  # the pool discards a broken connection


def _pipelined(session: psycopg.Connection[Any], opening: tuple[str, ...] | None, deferred: list[Later],
               statement: tuple[str, Any] | None, commit: bool) -> Any:
    """BEGIN (and the lock), deferred writes, a statement and COMMIT in one round trip; the statement's cursor."""
    cursor = None
    with session.pipeline():
        for text in opening or ():
            session.execute(text)
        for later in deferred:
            later.cursor = session.execute(later.sql, later.parameters)
        if statement is not None:
            cursor = session.execute(*statement)
        if commit:
            session.execute("COMMIT")
    return cursor
