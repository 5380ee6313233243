"""The upload helper's writer: one OS thread at the server processes' CPU priority that makes the helper's submits.

The helper runs niced (api/upload_lane.py), and a submit holds the queue's write lock while it stores its images.
A niced holder is preempted by the busy server processes, whose own submits then wait for the lock it holds: a
priority inversion (docs/benchmarks.md, benchmark 12). The writer's thread is started before the helper is niced,
so the helper only ever holds the lock at full priority, while its parsing and checking before the write stay niced.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

from mflux_server.store import Store

T = TypeVar("T")


class Writer:
    """A thread of its own, with its own queue session, that runs the helper's writes one at a time."""

    def __init__(self, session: Callable[[], Store]):
        from gevent.threadpool import ThreadPool

        self._session = session
        self._pool = ThreadPool(1)  # its one thread lives as long as the process (no idle timeout)
        self.thread_id: int = self._pool.apply(threading.get_native_id)  # starts it now, at today's priority

    def run(self, write: Callable[[Store], T]) -> T:
        """write(session) on the writer's thread; only the calling greenlet waits."""
        result: T = self._pool.apply(lambda: write(self._session()))
        return result
