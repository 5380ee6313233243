"""This process's connection pools, one per URL (a fork gets its own), and the sessions the store opens."""

from __future__ import annotations

import atexit
import contextlib
import os
import time
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from mflux_server.store.postgresql.session import PREPARED_MAX, SESSION_OPTIONS, PgSession, returned_at

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
    returned = returned_at.get(conn)
    if conn.broken or returned is None or time.monotonic() - returned > TRUST_IDLE_SECONDS:
        ConnectionPool.check_connection(conn)


TRUST_IDLE_SECONDS = 2.0


def _close_quietly(opened: ConnectionPool) -> None:
    with contextlib.suppress(Exception):
        opened.close(timeout=2.0)


def connect(url: str, pooled: bool = False) -> PgSession:
    """A session with the server at url: its own, or one borrowed from the process's pool."""
    return PgSession(url, pool(url) if pooled else None)
