"""The PostgreSQL store: a connection that speaks the SQLite dialect of queries.sql, and LISTEN/NOTIFY wake-ups.

store.py runs the same named statements on both stores. A PgConnection translates each once (placeholders,
`INSERT OR IGNORE`, scalar max/min, SQLite-only hints) or takes its PostgreSQL version from queries_pg.sql, and
raises sqlite3 error classes carrying a storage problem, so the code above the store cannot tell them apart.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from functools import lru_cache
from typing import Any

import psycopg
import psycopg.errors
from psycopg_pool import ConnectionPool

from mflux_server.core import native, pg_one_message, query_files

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


def limit_idle_transactions(seconds: float | None) -> None:
    """Have the server end a session that idles inside a transaction this long (a frozen process holding the write
    lock, core/write_lock.py); applies to the connections this process opens from now on."""
    if seconds:
        SESSION_OPTIONS["options"] = f"-c idle_in_transaction_session_timeout={round(seconds * 1000)}"
    else:
        SESSION_OPTIONS.pop("options", None)

CHANNEL = "mflux"  # what the triggers NOTIFY on every commit that changes a task, an event or a webhook


def is_postgres_url(target: object) -> bool:
    """Whether a --db value names a PostgreSQL server rather than an SQLite file."""
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


# Errors


class PgStorageError(sqlite3.OperationalError):
    """A PostgreSQL failure shaped like SQLite's: `problem` says what it means for the store (io, full, busy...)."""

    def __init__(self, message: str, problem: str | None):
        super().__init__(message)
        self.problem = problem


class PgIntegrityError(sqlite3.IntegrityError):
    """A unique or check constraint refused a write (a key name taken), as sqlite3.IntegrityError."""


def _translate_error(error: psycopg.Error) -> sqlite3.Error:
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, psycopg.errors.IntegrityError):
        return PgIntegrityError(message)
    if isinstance(error, psycopg.errors.DiskFull):
        return PgStorageError(message, "full")
    if isinstance(error, psycopg.errors.ReadOnlySqlTransaction | psycopg.errors.InsufficientPrivilege):
        return PgStorageError(message, "read_only")
    if isinstance(error, psycopg.errors.DeadlockDetected | psycopg.errors.SerializationFailure
                  | psycopg.errors.LockNotAvailable | psycopg.errors.QueryCanceled):
        return PgStorageError(message, "busy")
    if isinstance(error, psycopg.errors.DataCorrupted | psycopg.errors.IndexCorrupted):
        return PgStorageError(message, "corrupt")
    if isinstance(error, psycopg.OperationalError | psycopg.errors.AdminShutdown | psycopg.InterfaceError):
        return PgStorageError(message, "io")  # the server went away or restarts: the next use reconnects
    return PgStorageError(message, None)


# SQL translation


_OVERRIDES_NAME = re.compile(r"^-- name: (\S+)", re.MULTILINE)


@lru_cache(maxsize=1)
def overrides() -> dict[str, str]:
    """PostgreSQL versions of the statements whose SQLite text cannot be translated mechanically, by name."""
    return {name: query.sql for name, query in query_files.load("queries_pg.sql").items()}


@lru_cache(maxsize=1)
def _override_by_sqlite_text() -> dict[str, str]:
    sqlite_queries = query_files.queries()
    unknown = set(overrides()) - set(sqlite_queries)
    if unknown:
        raise RuntimeError(f"queries_pg.sql overrides statements queries.sql does not have: {sorted(unknown)}")
    return {sqlite_queries[name].sql: text for name, text in overrides().items()}


_PARAM = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")
_SCALAR = re.compile(r"\b(max|min)\(", re.IGNORECASE)


def _outside_strings(sql: str, change: Any) -> str:
    parts = re.split(r"('(?:[^']|'')*')", sql)
    return "".join(part if index % 2 else change(part) for index, part in enumerate(parts))


def _arguments(text: str, open_at: int) -> tuple[int, int]:
    """The end of a call's parentheses opened at open_at, and how many top-level arguments it has."""
    depth, commas = 0, 0
    for index in range(open_at, len(text)):
        char = text[index]
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                return index, commas + 1
        elif char == "," and depth == 1:
            commas += 1
    raise ValueError(f"unbalanced parentheses in {text[:80]!r}")


def _scalar_max_min(text: str) -> str:
    """SQLite's two-argument max()/min() are PostgreSQL's GREATEST/LEAST (one argument stays the aggregate)."""
    out, position = [], 0
    for match in _SCALAR.finditer(text):
        if match.start() < position:
            continue
        _, count = _arguments(text, match.end() - 1)
        if count >= 2:
            out.append(text[position:match.start()])
            out.append("GREATEST(" if match.group(1).lower() == "max" else "LEAST(")
            position = match.end()
    out.append(text[position:])
    return "".join(out)


def _rewrite(part: str) -> str:
    part = part.replace("%", "%%")
    part = _PARAM.sub(r"%(\1)s", part)
    part = part.replace("?", "%s")
    part = re.sub(r"\s+INDEXED BY \w+", "", part)
    part = re.sub(r"\+(t\.)", r"\1", part)
    part = re.sub(r"\bwindow\b", '"window"', part)
    return part


@lru_cache(maxsize=512)
def translate(sql: str) -> str:
    """The PostgreSQL form of one statement of queries.sql (or of a store-side literal statement)."""
    if sql.startswith("EXPLAIN "):
        return "EXPLAIN " + translate(sql.removeprefix("EXPLAIN "))
    override = _override_by_sqlite_text().get(sql.strip().rstrip(";"))
    if override is not None:
        return _outside_strings(override, lambda part: _PARAM.sub(r"%(\1)s", part.replace("%", "%%")))
    text = _scalar_max_min(_outside_strings(sql, _rewrite))
    if re.match(r"\s*INSERT OR IGNORE\b", text, re.IGNORECASE):
        text = re.sub(r"INSERT OR IGNORE", "INSERT", text, count=1, flags=re.IGNORECASE) + " ON CONFLICT DO NOTHING"
    return text


# Rows and cursors


class Later:
    """A deferred write (PgConnection.defer) and, once it was sent, its cursor."""

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
    """The part of sqlite3.Cursor the store uses, over a psycopg cursor."""

    def __init__(self, owner: PgConnection):
        self._owner = owner
        self._rows: list[Any] = []
        self._at = 0
        self.rowcount = -1
        self.row_factory: Any = PgRow

    def execute(self, sql: str, parameters: Any = ()) -> PgCursor:
        """Run one statement and keep its rows."""
        result = self._owner.run(sql, parameters)
        self.rowcount, shape, rows = result
        if self.row_factory is None or rows is None or shape is None:
            self._rows = rows or []
        else:
            self._rows = [shape(row) for row in rows]
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


def _adapt(parameters: Any) -> Any:
    # psycopg sends bytes as bytea and a memoryview the same way; sqlite3 accepts both, so callers pass either.
    if isinstance(parameters, Mapping):
        return {key: bytes(value) if isinstance(value, memoryview) else value for key, value in parameters.items()}
    return tuple(bytes(value) if isinstance(value, memoryview) else value for value in parameters)


class PgConnection:
    """One PostgreSQL session behaving like the store's sqlite3 connection: autocommit, explicit BEGIN IMMEDIATE.

    A broken session (the server restarted, the network dropped) raises an `io` storage error once; the next
    statement outside a transaction opens a new session, so API and workers reconnect by themselves.
    """

    dialect = "postgresql"

    def __init__(self, url: str, pool: ConnectionPool | None = None):
        self.url = url
        self._pool = pool
        self._conn: psycopg.Connection[Any] | None = None
        self._in_transaction = False
        self._pending: tuple[str, ...] | None = None  # the BEGIN that goes out with the transaction's first statement
        self._deferred: list[Later] = []  # writes of the open transaction, sent with what comes next
        self.row_factory: Any = PgRow

    # sqlite3.Connection's surface

    @property
    def in_transaction(self) -> bool:
        """Whether a BEGIN is open."""
        return self._in_transaction

    def execute(self, sql: str, parameters: Any = ()) -> PgCursor:
        """Run one statement (SQLite dialect) and return a cursor over its rows."""
        cursor = PgCursor(self)
        cursor.row_factory = self.row_factory
        return cursor.execute(sql, parameters)

    def cursor(self) -> PgCursor:
        """A cursor whose row_factory may be set to None for plain tuples."""
        return PgCursor(self)

    def defer(self, sql: str, parameters: Any = ()) -> Later:
        """Queue a write of the open transaction: it goes out with the transaction's next statement or its COMMIT,
        a round trip fewer while the write lock is held. Its rowcount (and its error, if any) come then."""
        later = Later(translate(sql), _adapt(parameters))
        if not self._in_transaction:
            later.rowcount = self.execute(sql, parameters).rowcount
            return later
        self._deferred.append(later)
        return later

    def close(self) -> None:
        """End the session (back to the pool when it came from one)."""
        conn, self._conn = self._conn, None
        self._in_transaction, self._pending, self._deferred = False, None, []
        if conn is None:
            return
        if self._pool is not None:
            _returned_at[conn] = time.monotonic()
            self._pool.putconn(conn)
        else:
            conn.close()

    # PostgreSQL

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
                raise PgStorageError(f"cannot reach PostgreSQL at {redact(self.url)}: {detail}", "io") from error
            self._conn.autocommit = True
            self._conn.prepared_max = PREPARED_MAX
        return self._conn

    def run(self, sql: str, parameters: Any) -> tuple[int, Any, list[Any] | None]:
        """Execute one statement: (rowcount, row class, rows or None)."""
        verb = sql.lstrip()[:16].upper()
        if verb.startswith("BEGIN"):
            return self._begin(write="IMMEDIATE" in verb)
        if verb.startswith(("COMMIT", "ROLLBACK", "END")):
            return self._end(commit=not verb.startswith("ROLLBACK"))
        if not self._in_transaction and verb.startswith(("INSERT", "UPDATE", "DELETE")):
            # A lone write takes the write lock too, so its events keep commit order: BEGIN, the lock, the
            # write and COMMIT travel as one query (progress and heartbeats are most of a worker's writes).
            self._begin(write=True)
            self._in_transaction = False
            return self._statement(sql, parameters, commit=True)
        return self._statement(sql, parameters)

    def _statement(self, sql: str, parameters: Any, commit: bool = False) -> tuple[int, Any, list[Any] | None]:
        try:
            session = self.session()
        except PgStorageError:
            if not self._in_transaction:
                # A lone write that never went out: its BEGIN must not ride with the next statement, which
                # would then hold the write lock in a transaction nobody ends.
                self._pending, self._deferred = None, []
            raise
        prefix, self._pending = self._pending, None
        deferred, self._deferred = self._deferred, []
        text = translate(sql)
        try:
            # Parameters always go along, empty or not, so the %% that translate() escaped reads as one %.
            if prefix is None and not deferred and not commit:
                cursor = session.execute(text, _adapt(parameters))
            else:
                cursor = _pipelined(session, prefix, deferred, (text, _adapt(parameters)), commit)
            result = cursor.pgresult
            if result is None or result.status != psycopg.pq.ExecStatus.TUPLES_OK:
                return cursor.rowcount, None, None
            return cursor.rowcount, _row_class(result), cursor.fetchall()
        except psycopg.Error as error:
            self._after_error()
            if commit:
                self._rollback_quietly()  # the failed write left its one-statement transaction open
            raise _translate_error(error) from error

    def write_alone(self, sql: str, parameters: Mapping[str, Any]) -> PgCursor:
        """A lone write (SQLite dialect) under the write lock, sent as one message (pg_one_message); its cursor."""
        if self._in_transaction or self._pending is not None or self._deferred:
            return self.execute(sql, parameters)  # inside a transaction: the usual way, with what it holds
        session = self.session()
        try:
            rowcount, result, rows = pg_one_message.write_alone(session, _BEGIN_WRITE[1], translate(sql), parameters)
        except psycopg.Error as error:
            self._after_error()
            raise _translate_error(error) from error
        cursor = PgCursor(self)
        shape = _row_class(result) if result.nfields else None
        cursor.rowcount, cursor._rows = rowcount, [shape(row) for row in rows] if shape else []
        return cursor

    def rehearse(self, sql: str, parameters: Mapping[str, Any]) -> None:
        """Run a lone write (SQLite dialect) under the write lock and roll it back: the session is ready for it."""
        session = self.session()
        try:
            pg_one_message.rehearse(session, _BEGIN_WRITE[1], translate(sql), parameters)
        except psycopg.Error as error:
            self._after_error()
            raise _translate_error(error) from error

    def _begin(self, write: bool) -> tuple[int, Any, None]:
        # Sent with the transaction's first statement, saving a round trip: BEGIN and the write lock, or for a
        # read transaction (the forecast's queue read) one snapshot, as SQLite's read transactions see.
        self._pending = _BEGIN_WRITE if write else _BEGIN_READ
        self._in_transaction = True
        return -1, None, None

    def _rollback_quietly(self) -> None:
        if self._conn is not None and not self._conn.broken and \
                self._conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            with contextlib.suppress(psycopg.Error):
                self._conn.execute("ROLLBACK")

    def _end(self, commit: bool) -> tuple[int, Any, None]:
        if not self._in_transaction:
            return -1, None, None
        self._in_transaction = False
        deferred, self._deferred = self._deferred, []
        if not commit:
            deferred = []  # never sent: nothing to undo for them
        opening, self._pending = self._pending, None  # taken before anything can fail, so none is left over
        if opening is not None and not deferred:  # nothing ran in it: nothing was sent
            return -1, None, None
        try:
            session = self.session()
            if not deferred:
                session.execute("COMMIT" if commit else "ROLLBACK")
            else:
                _pipelined(session, opening, deferred, None, commit=True)
        except psycopg.Error as error:
            self._after_error()
            self._rollback_quietly()  # a deferred write failed: its transaction is aborted, not ended
            raise _translate_error(error) from error
        return -1, None, None

    def _after_error(self) -> None:
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


# Migrations


def migrate(conn: PgConnection, migrations: list[tuple[int, str, str]]) -> int:
    """Apply pending migrations, each in its own transaction, under an advisory lock that several processes starting
    at once take in turn (the second finds nothing left to do)."""
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
        conn._after_error()
        raise _translate_error(error) from error
    return len(migrations)


# Copying an SQLite queue in (mflux-server migrate-to)

# What a queue holds, parents first. Workers are left behind (each re-registers on its host), and so are request
# counts of past minutes and the metric bounds, which the migration has already written.
COPIED_TABLES = ("tasks", "images", "task_inputs", "previews", "timing_stats", "load_stats", "events", "deliveries",
                 "server_secrets", "api_keys", "idempotency", "expired_tasks", "metric_buckets", "metric_sums",
                 "metric_counters", "fair_keys")
SINGLE_ROWS = ("queue_state", "fair_clock")  # one row each, seeded by the migration: updated, not inserted
SERIALS = (("tasks", "seq"), ("events", "id"), ("api_keys", "id"))


def copy_from_sqlite(source: sqlite3.Connection, target: PgConnection, batch: int = 500) -> dict[str, int]:
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
                        writer.executemany(statement, [_adapt(tuple(row)) for row in rows])
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
        target._after_error()
        raise _translate_error(error) from error
    return copied


# Pools, one per URL and process


# No lock guards these: one imported before gevent patches threading would block the whole loop while a greenlet
# holding it waits for the server. dict.setdefault is atomic, and a pool or listener that loses the race to be
# first is dropped before it opens anything.
_pools: dict[tuple[str, int], ConnectionPool] = {}


def pool(url: str) -> ConnectionPool:
    """This process's connection pool for a URL (made on first use; a fork gets its own)."""
    key = (url, os.getpid())
    found = _pools.get(key)
    if found is None:
        made = ConnectionPool(
            url, min_size=1, max_size=int(os.environ.get("MFLUX_SERVER_PG_POOL", "20")), open=False,
            kwargs=SESSION_OPTIONS, configure=_configure, check=_check_if_idle, name="mflux-server")
        found = _pools.setdefault(key, made)
        if found is made:
            made.open()
            atexit.register(_close_quietly, made)  # before gevent's teardown, which breaks the pool's own __del__
    return found


def _configure(conn: psycopg.Connection[Any]) -> None:
    conn.prepared_max = PREPARED_MAX


def _check_if_idle(conn: psycopg.Connection[Any]) -> None:
    # A round trip before every request's first statement was a seventh of a status request's time under load.
    # A session given back moments ago is almost surely alive (and if the server restarted just then, that one
    # statement fails as a storage error and the session is replaced); one idle longer is checked.
    returned = _returned_at.get(conn)
    if conn.broken or returned is None or time.monotonic() - returned > TRUST_IDLE_SECONDS:
        ConnectionPool.check_connection(conn)


TRUST_IDLE_SECONDS = 2.0
_returned_at: weakref.WeakKeyDictionary[psycopg.Connection[Any], float] = weakref.WeakKeyDictionary()  # last given back


def _close_quietly(opened: ConnectionPool) -> None:
    with contextlib.suppress(Exception):
        opened.close(timeout=2.0)


def connect(url: str, pooled: bool = False) -> PgConnection:
    """A store connection to the server at url: its own session, or one borrowed from the process's pool."""
    return PgConnection(url, pool(url) if pooled else None)


# Wake-ups


class Notifications:
    """One LISTEN session per process and URL; a counter that moves on every NOTIFY, and a wait for it to move.

    The counter also moves whenever the session had to reconnect, since notifications sent meanwhile are lost:
    a waiter then rereads the store rather than sleep through a change.
    """

    def __init__(self, url: str):
        self.url = url
        self.version = 0
        # Under gevent the listener is an OS thread and waiters are greenlets, which watch the counter instead.
        self._changed = None if native.gevent_active() else threading.Condition()

    def start(self) -> None:
        """Start listening (an OS thread, under gevent too)."""
        native.start(self._listen, "pg-listen")

    def _bump(self) -> None:
        if self._changed is None:
            self.version += 1
            return
        with self._changed:
            self.version += 1
            self._changed.notify_all()

    def _listen(self) -> None:
        while True:
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._bump()
                    while True:
                        # Each notification wakes the waiters as it arrives; the generator ends after a quiet
                        # second, and the query then notices a dead server.
                        for _ in conn.notifies(timeout=1.0):
                            self._bump()
                        conn.execute("SELECT 1")
            except psycopg.Error:
                time.sleep(0.5)

    def wait(self, version: int, timeout: float) -> int:
        """The counter once it differs from version, or after timeout seconds."""
        if self._changed is None:
            import gevent

            deadline = time.monotonic() + timeout
            while self.version == version and time.monotonic() < deadline:
                gevent.sleep(0.002)
            return self.version
        with self._changed:
            self._changed.wait_for(lambda: self.version != version, timeout)
            return self.version


_listeners: dict[tuple[str, int], Notifications] = {}


def notifications(url: str) -> Notifications:
    """This process's listener for a URL, started on first use."""
    key = (url, os.getpid())
    found = _listeners.get(key)
    if found is None:
        made = Notifications(url)
        found = _listeners.setdefault(key, made)
        if found is made:
            made.start()
    return found
