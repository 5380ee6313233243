"""Per-key request counts shared by every server process, written in batches so a request rarely costs a write.

Each process counts a key's requests of the current minute locally and adds them to the queue file's count
(one upsert, which returns the total of all processes) once `batch` have gathered or FLUSH_EVERY has passed.
A request is refused when the last total read plus what this process has not written yet exceeds the limit.
So the limit holds across processes to within `batch` requests per other process; `batch` is a hundredth of the
limit (1 for limits under 200, which are then exact).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

FLUSH_EVERY = 0.1  # seconds: a key's pending count is written at least this often while it makes requests


@dataclass
class _Window:
    minute: int
    total: int = 0  # every process's count, as last written and read back
    pending: int = 0  # this process's requests not written yet
    written_at: float = 0.0


class RateCounts:
    """This process's view of every key's count in the current minute."""

    def __init__(self, add: Callable[[int, int, int], int], clock: Callable[[], float] = time.time):
        self._add = add  # (key id, minute, n) -> the minute's total after adding n
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[int, _Window] = {}

    def count(self, key_id: int, limit: int) -> tuple[bool, float]:
        """Count one request; returns whether it is within the limit, and the seconds left in the minute."""
        now = self._clock()
        minute = int(now // 60)
        batch = max(1, limit // 100)
        with self._lock:
            window = self._windows.get(key_id)
            if window is None or window.minute != minute:
                window = self._windows[key_id] = _Window(minute)
            window.pending += 1
            due = window.pending >= batch or now - window.written_at >= FLUSH_EVERY
            if due:
                n, window.pending, window.written_at = window.pending, 0, now
        if due:
            total = self._add(key_id, minute, n)
            with self._lock:
                window.total = max(window.total, total)
        return window.total + window.pending <= limit, (minute + 1) * 60 - now
