"""Who holds the SQLite queue's write lock, and the watchdog that ends a worker frozen while it holds it.

Every write to the queue takes one lock. A worker stopped inside a write transaction (SIGSTOP, a debugger, a
machine swapping to death) keeps it, and every submit waits for it and then answers 503 `storage_busy`; heartbeats
cannot help, since the lock outlives them. Each API process therefore looks, twice a second, at which process holds
the lock (fcntl F_GETLK on the WAL index, where SQLite's unix VFS keeps its writer lock). When one worker of this
machine has held it for --write-lock-limit seconds it is sent SIGKILL: the kernel drops its locks, SQLite rolls its
open transaction back, systemd starts it again and its task is retried (tasks are never lost to a dead worker).
A process that is not a registered worker (an operator's sqlite3 shell) is only named in the log.

On PostgreSQL the database server bounds a session idle inside a transaction (idle_in_transaction_session_timeout,
set per session in store/postgresql/session.py), but not one stopped in the middle of a pipeline: before its Sync
the session is reading, not idle, and it holds the lock for as long as its process stays stopped. So each API
process also asks the server, twice a second, for the sessions that have held the write lock past the limit while
waiting for their client (not those running a long statement), and has the server end them
(PostgresStore.end_frozen_writers): the process then finds its connection gone, and reconnects when it runs
again, as after a cut connection.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

from mflux_server import store
from mflux_server.core import native

log = logging.getLogger("mflux_server")

# The unix VFS's WAL-index locks start at byte 120 of the -shm file; the writer's lock is the first of them.
WAL_WRITE_LOCK_BYTE = 120
EVERY = 0.5  # seconds between looks at the lock
# struct flock, field order per platform (the kernel reads its own size from the larger buffer fcntl passes).
_FLOCK_DARWIN = "@qqihh"  # l_start, l_len, l_pid, l_type, l_whence
_FLOCK_LINUX = "@hhqqi"  # l_type, l_whence, l_start, l_len, l_pid
_FLOCK_SIZE = 64

# Opened once per file and never closed: closing any descriptor of a file drops every POSIX lock this process
# holds on it, which would silently take the read locks of this process's own SQLite connections.
_shm_files: dict[tuple[str, int], int] = {}


def _pack_query() -> bytes:
    if sys.platform == "darwin":
        packed = struct.pack(_FLOCK_DARWIN, WAL_WRITE_LOCK_BYTE, 1, 0, fcntl.F_WRLCK, os.SEEK_SET)
    else:
        packed = struct.pack(_FLOCK_LINUX, fcntl.F_WRLCK, os.SEEK_SET, WAL_WRITE_LOCK_BYTE, 1, 0)
    return packed.ljust(_FLOCK_SIZE, b"\0")


def _unpack_answer(answer: bytes) -> tuple[int, int]:
    """(lock type, pid) out of F_GETLK's answer."""
    if sys.platform == "darwin":
        _, _, pid, kind, _ = struct.unpack_from(_FLOCK_DARWIN, answer)
    else:
        kind, _, _, _, pid = struct.unpack_from(_FLOCK_LINUX, answer)
    return kind, pid


def _shm_descriptor(db_path: str) -> int | None:
    path = db_path + "-shm"
    try:
        inode = os.stat(path).st_ino
    except OSError:
        return None
    fd = _shm_files.get((path, inode))
    if fd is None:
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            return None
        _shm_files[(path, inode)] = fd
    return fd


def _wal_mark(db_path: str) -> tuple[int, int] | None:
    try:
        found = os.stat(db_path + "-wal")
    except OSError:
        return None
    return found.st_size, found.st_mtime_ns


def holder(db_path: str) -> int | None:
    """The pid of another process that holds the write lock of the SQLite queue at db_path, or None."""
    fd = _shm_descriptor(db_path)
    if fd is None:
        return None
    kind, pid = _unpack_answer(fcntl.fcntl(fd, fcntl.F_GETLK, _pack_query()))
    return None if kind == fcntl.F_UNLCK or pid <= 0 else pid


class Watchdog:
    """Follows the write lock's holder and ends a worker of this machine that keeps it past the limit."""

    def __init__(self, db_path: str, limit: float, connect: Callable[[], Any]) -> None:
        self.db_path = db_path
        self.limit = limit
        self.connect = connect
        self.state: tuple[int | None, tuple[int, int] | None] = (None, None)  # the holder and the WAL's size and time
        self.since = 0.0
        self.named = False  # the current holder has been logged (a non-worker is named once, not twice a second)

    def look(self, now: float | None = None) -> int | None:
        """Look once; returns the pid it sent SIGKILL, if it did."""
        now = time.monotonic() if now is None else now
        # A healthy worker that is busy commits often, so the WAL changes under it; a frozen one leaves it still.
        state = (holder(self.db_path), _wal_mark(self.db_path))
        pid = state[0]
        if state != self.state:
            self.state, self.since, self.named = state, now, False
            return None
        if pid is None or now - self.since < self.limit:
            return None
        held = now - self.since
        db = self.connect()
        try:
            worker = pid in db.worker_pids(socket.gethostname())  # a read: WAL readers need no write lock
        finally:
            db.close()
        if not worker:
            if not self.named:
                self.named = True
                log.error("process %d (not a worker) has held the queue's write lock for %.0f s; submits wait for it "
                          "and then answer 503 storage_busy until it lets go", pid, held)
            return None
        try:
            os.kill(pid, signal.SIGKILL)  # a stopped process cannot act on SIGTERM; SIGKILL ends it even then
        except ProcessLookupError:
            return None
        except PermissionError:
            if not self.named:
                self.named = True
                log.error("worker process %d has held the queue's write lock for %.0f s (--write-lock-limit %g) but "
                          "this process may not stop it: run the API and the workers as the same user", pid, held,
                          self.limit)
            return None
        log.error("worker process %d held the queue's write lock for %.0f s (--write-lock-limit %g), frozen inside a "
                  "write; stopped it with SIGKILL so that submits and the other workers go on (its service restarts "
                  "it and its task is retried)", pid, held, self.limit)
        self.state, self.named = (None, None), False
        return pid


_named_sessions: set[int] = set()  # sessions this role may not end, already logged


def end_frozen_sessions(limit: float, connect: Callable[[], Any]) -> list[int]:
    """On PostgreSQL: have the server end the sessions that held the write lock past the limit; their pids."""
    db = connect()
    try:
        ended = db.end_frozen_writers(limit)
    finally:
        db.close()
    for pid, held, done in ended:
        if done:
            log.error("a PostgreSQL session (server pid %d) held the queue's write lock for %.0f s (--write-lock-limit "
                      "%g), its client stopped inside a write; ended it so that submits and the other workers go on",
                      pid, held, limit)
        elif pid not in _named_sessions:  # once, not twice a second
            _named_sessions.add(pid)
            log.error("a PostgreSQL session (server pid %d) has held the queue's write lock for %.0f s but this role "
                      "may not end it: run every process as the same database role", pid, held)
    return [pid for pid, _, done in ended if done]


def start(db_path: str, limit: float | None, connect: Callable[[], Any]) -> Any:
    """Run the watchdog on an OS thread of its own; returns its stop signal, or None where there is nothing to do."""
    if not limit:
        return None
    if store.capabilities_of(db_path).local_file:
        look: Callable[[], Any] = Watchdog(db_path, limit, connect).look
    else:
        look = functools.partial(end_frozen_sessions, limit, connect)

    def run(stop: Any) -> None:
        while not stop.wait(EVERY):
            try:
                look()
            except Exception:  # a fault here must not end the watch for good
                log.exception("write-lock watchdog")

    return native.daemon(run, "write-lock-watchdog")
