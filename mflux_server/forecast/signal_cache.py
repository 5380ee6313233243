"""Reads a status request repeats, kept on PostgreSQL until the store's change signal moves."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from mflux_server.store import Store

T = TypeVar("T")
MAX_AGE = 1.0  # seconds: what no NOTIFY announces (heartbeats, a worker going stale) shows within this


class SignalCache:
    """Results of reads by key, valid while the LISTEN counter stands still and for at most `max_age` seconds.

    On PostgreSQL each read is a round trip (a quarter of a millisecond or more), and most status requests come
    between two changes of the queue; on SQLite a read costs less than looking it up here, so it always reads.
    """

    def __init__(self, max_age: float = MAX_AGE, clock: Callable[[], float] = time.monotonic) -> None:
        self._max_age = max_age
        self._clock = clock
        self._lock = threading.Lock()
        self._signal = -1
        self._entries: dict[Hashable, tuple[float, Any]] = {}

    def get(self, db: Store, key: Hashable, read: Callable[[], T]) -> T:
        """The cached result of `read` for `key`, or a fresh one."""
        if not db.capabilities.notifies:
            return read()
        signal = db.data_version()  # before the read, so a change during it invalidates what it returns
        now = self._clock()
        with self._lock:
            if signal == self._signal:
                hit = self._entries.get(key)
                if hit is not None and now - hit[0] < self._max_age:
                    return hit[1]  # type: ignore[no-any-return]
        value = read()
        with self._lock:
            if signal != self._signal:
                if signal < self._signal:
                    return value  # another request already stored results of a newer signal
                self._signal, self._entries = signal, {}
            self._entries[key] = (now, value)
        return value
