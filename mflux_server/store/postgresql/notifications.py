"""LISTEN/NOTIFY wake-ups: one listening session per process and URL, and a counter every NOTIFY moves."""

from __future__ import annotations

import os
import threading
import time

import psycopg

from mflux_server.core import native
from mflux_server.store.postgresql.session import CONNECT_TIMEOUT

CHANNEL = "mflux"  # what the triggers NOTIFY on every commit that changes a task, an event or a webhook


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
