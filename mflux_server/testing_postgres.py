"""A throwaway PostgreSQL server for tests and benchmarks: Debian's server binaries driven by pytest-postgresql.

The suite starts one server per run (on a free port, its data in a temporary folder) and gives each test a
database of its own. As root, initdb and postgres refuse to run, so pg_ctl is run as the `postgres` user.
"""

from __future__ import annotations

import glob
import itertools
import os
import queue
import shutil
import socket
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresServer:
    """One PostgreSQL server on 127.0.0.1 with trust authentication, and fresh databases on it."""

    def __init__(self, base: Path | None = None):
        from pytest_postgresql.executors.proc import PostgreSQLExecutor

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
        self._names = itertools.count(1)
        self._template: str | None = None  # a migrated database to copy (create_database(migrated=True))
        self._ready: queue.Queue[str] = queue.Queue(maxsize=4)  # migrated databases made ahead
        self._maker: threading.Thread | None = None
        self._stopped = False
        self.executor = PostgreSQLExecutor(
            executable=executable, host="127.0.0.1", port=self.port, datadir=str(self.base / "data"),
            unixsocketdir=str(self.base), logfile=str(self.base / "server.log"), startparams="-w", dbname="postgres",
            user="postgres", postgres_options="-c fsync=off -c max_connections=300", timeout=120)

    def start(self) -> PostgresServer:
        """Initialise the data folder and start the server (a few seconds)."""
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
                return self._ready.get(timeout=5)  # made ahead, while the previous test ran
            except queue.Empty:
                pass  # the server was restarting: make one here
        template = ""
        if migrated:
            if self._template is None:
                self._template = self.create_database("template")
                from mflux_server import store

                store.open_migrated(self._template).close()  # unpooled: a template must have no session left open
            template = f' TEMPLATE "{self._template.rsplit("/", 1)[1]}"'
        name = f"{prefix}_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as db:
            db.execute(f'CREATE DATABASE "{name}"{template}')
        if migrated and self._maker is None:
            # CREATE DATABASE waits on the disk, not the CPU (100 ms each): one thread keeps four made ahead.
            self._maker = threading.Thread(target=self._make_ahead, daemon=True, name="make-databases")
            self._maker.start()
        return self.url(name)

    def _make_ahead(self) -> None:
        while not self._stopped:
            try:
                self._ready.put(self.create_database("ahead", migrated=True))
            except Exception:  # a restart or the stop: try again shortly, or end
                time.sleep(0.5)

    def restart(self) -> None:
        """Stop the server (fast: connections are cut) and start it again on the same port and data."""
        self.executor.stop()
        self.executor.start()
        self._wait_until_ready()

    def stop(self) -> None:
        """Stop the server and remove its files."""
        self._stopped = True
        try:
            self.executor.stop()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)
