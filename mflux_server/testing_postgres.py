"""A throwaway PostgreSQL server for tests and benchmarks: Debian's server binaries driven by pytest-postgresql.

The suite starts one server per run (on a free port, its data in a temporary folder) and gives each test a
database of its own. As root, initdb and postgres refuse to run, so pg_ctl is run as the `postgres` user.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import queue
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

SERVER_USER = "postgres"


def find_pg_ctl() -> str | None:
    """pg_ctl from $PG_CTL, the PATH, or Debian's /usr/lib/postgresql/N/bin (newest first); None when absent."""
    candidates = [os.environ.get("PG_CTL", ""), shutil.which("pg_ctl") or ""]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)
    return next((found for found in candidates if found and os.access(found, os.X_OK)), None)


def why_unavailable() -> str | None:
    """Why no PostgreSQL server can be started here, or None when one can."""
    if find_pg_ctl() is None:
        return ("PostgreSQL's server binaries are not installed (apt-get install postgresql, or set PG_CTL); "
                "`make test` installs them where it can")
    try:
        from pytest_postgresql.executors.proc import PostgreSQLExecutor  # noqa: F401
    except ImportError:
        return "pytest-postgresql is not installed (pip install -e '.[test]')"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser, so initdb cannot run as an unprivileged user"
    return None


def _rows_and_sequences(url: str) -> tuple[list[str], dict[str, bytes], dict[str, int]]:
    """A migrated database's tables, the rows the migrations put in them, and its sequences' values."""
    import psycopg

    with psycopg.connect(url) as db, db.cursor() as cursor:
        tables = [f'public."{name}"' for (name,) in
                  cursor.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()]
        rows: dict[str, bytes] = {}
        for table in tables:
            with cursor.copy(f"COPY {table} TO STDOUT") as copy:
                data = b"".join(bytes(block) for block in copy)
            if data:
                rows[table] = data
        sequences = {f'{schema}."{name}"': value for schema, name, value in cursor.execute(
            "SELECT schemaname, sequencename, last_value FROM pg_sequences WHERE last_value IS NOT NULL").fetchall()}
    return tables, rows, sequences


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresServer:
    """One PostgreSQL server on 127.0.0.1 with trust authentication, and fresh databases on it."""

    def __init__(self, base: Path | None = None, running_on: int | None = None):
        """A server to start in base (a new temporary folder by default), or, with running_on, a handle on one
        another process started on that port (pytest-xdist's controller): it makes databases, never stops it."""
        from pytest_postgresql.executors.proc import PostgreSQLExecutor

        self._names = itertools.count(1)
        self._template: str | None = None  # a migrated database to copy (create_database(migrated=True))
        self._ready: queue.Queue[str] = queue.Queue()  # migrated databases, made ahead or emptied after use
        self._taken = threading.Event()
        self._seed: tuple[list[str], dict[str, bytes], dict[str, int]] | None = None  # what recycle restores
        self._maker: threading.Thread | None = None
        self._stopped = False
        self.executor: PostgreSQLExecutor | None = None
        if running_on is not None:
            self.port = running_on
            return
        pg_ctl = find_pg_ctl()
        if pg_ctl is None:
            raise RuntimeError(why_unavailable())
        self.base = Path(base or tempfile.mkdtemp(prefix="mflux-pg-"))
        self.base.mkdir(parents=True, exist_ok=True)
        executable = pg_ctl
        if os.geteuid() == 0:
            # pg_ctl through runuser: the server's files belong to the postgres user, as on a Debian host.
            wrapper = self.base / "pg_ctl"
            wrapper.write_text(f'#!/bin/sh\nexec runuser -u {SERVER_USER} -- "{pg_ctl}" "$@"\n')
            wrapper.chmod(0o755)
            executable = str(wrapper)
            shutil.chown(self.base, SERVER_USER)
            os.chmod(self.base, 0o755)
        self.port = _free_port()
        self.executor = PostgreSQLExecutor(
            executable=executable, host="127.0.0.1", port=self.port, datadir=str(self.base / "data"),
            unixsocketdir=str(self.base), logfile=str(self.base / "server.log"), startparams="-w", dbname="postgres",
            user="postgres", postgres_options="-c fsync=off -c max_connections=300", timeout=120)

    def start(self) -> PostgresServer:
        """Initialise the data folder and start the server (a few seconds); a handle waits until it answers."""
        if self.executor is not None:
            self.executor.start()
        self._wait_until_ready()
        return self

    def _wait_until_ready(self, timeout: float = 60.0) -> None:
        """Wait for connections to be accepted: the port opens while the server still says it is starting up."""
        import time

        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(self.url(), connect_timeout=5).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def url(self, dbname: str = "postgres") -> str:
        """The URL of one database on this server."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, prefix: str = "queue", migrated: bool = False) -> str:
        """A new database, empty or (migrated) with the queue's schema; returns its URL.

        A migrated one is copied from a template migrated once per server: a file-level copy, a tenth of the
        time the migrations take."""
        import psycopg

        if migrated and self._template is not None and prefix == "queue":
            try:
                url = self._ready.get(timeout=5)  # emptied or made ahead, while the previous test ran
                self._taken.set()
                return url
            except queue.Empty:
                pass  # the server was restarting: make one here
        template = ""
        if migrated:
            if self._template is None:
                self._template = self.create_database("template")
                from mflux_server import store

                store.open_migrated(self._template).close()  # unpooled: a template must have no session left open
                self._seed = _rows_and_sequences(self._template)
            template = f' TEMPLATE "{self._template.rsplit("/", 1)[1]}"'
        name = f"{prefix}_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as db:
            db.execute(f'CREATE DATABASE "{name}"{template}')
        if migrated and self._maker is None:
            # A CREATE DATABASE takes 130 ms of the server's CPU: one thread keeps one made ahead, for when no used
            # database came back.
            self._maker = threading.Thread(target=self._make_ahead, daemon=True, name="make-databases")
            self._maker.start()
        return self.url(name)

    def _make_ahead(self) -> None:
        while not self._stopped:
            if self._ready.qsize() >= 1:
                self._taken.wait(0.5)
                self._taken.clear()
                continue
            try:
                self._ready.put(self.create_database("ahead", migrated=True))
            except Exception:  # a restart or the stop: try again shortly, or end
                time.sleep(0.5)

    def recycle(self, url: str) -> None:
        """Give a test's migrated database back, emptied to the template's rows, for a later create_database.

        Emptying takes a third of a CREATE DATABASE's server CPU (46 ms against 130 ms on the 2-core VM). The
        database is renamed first (which fails while anyone is still connected), so that a session a test left behind
        can never reach the next test's data."""
        import psycopg

        if self._seed is None or self._stopped:
            return
        old, new = url.rsplit("/", 1)[1], f"reused_{os.getpid()}_{next(self._names)}"
        try:
            with psycopg.connect(self.url(), autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                              "AND pid <> pg_backend_pid()", (old,))
                admin.execute(f'ALTER DATABASE "{old}" RENAME TO "{new}"')
            tables, rows, sequences = self._seed
            with psycopg.connect(self.url(new)) as db, db.cursor() as cursor:  # one transaction
                cursor.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY")
                for table, data in rows.items():
                    with cursor.copy(f"COPY {table} FROM STDIN") as copy:
                        copy.write(data)
                for sequence, value in sequences.items():
                    cursor.execute("SELECT setval(%s, %s)", (sequence, value))
        except psycopg.Error:
            return  # still in use, or the server restarts: the next test gets a new database
        self._ready.put(self.url(new))

    def restart(self) -> None:
        """Stop the server (fast: connections are cut) and start it again on the same port and data."""
        if self.executor is None:
            raise RuntimeError("a handle on another process's server cannot restart it")
        self.executor.stop()
        self.executor.start()
        self._wait_until_ready()

    def stop(self) -> None:
        """Stop the server and remove its files (a handle only stops making databases)."""
        self._stopped = True
        if self.executor is None:
            return
        try:
            # Immediate: no shutdown checkpoint of data nobody will read again (fast mode took most of a second).
            done = subprocess.run([self.executor.executable, "stop", "-D", self.executor.datadir, "-m", "immediate"],
                                  capture_output=True, timeout=60, check=False)
            if done.returncode != 0:
                self.executor.stop()
            else:  # what PostgreSQLExecutor.stop does after its pg_ctl: let the process runner forget the server
                from mirakuru.exceptions import ProcessFinishedWithError
                from pytest_postgresql.executors.proc import PostgreSQLExecutor

                with contextlib.suppress(ProcessFinishedWithError):
                    super(PostgreSQLExecutor, self.executor).stop()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)
