"""Waiting out storage faults: a full disk, an I/O error or a locked file pauses the worker's writes, never a task.

The worker keeps what it has (a finished image stays in memory) and tries again with a growing pause, so
everything resumes by itself once space is freed. A database file removed or replaced under the process
(StorageLost) cannot heal on this connection: it stops the worker, and its service manager starts it afresh.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from mflux_server.store import storage_problem

log = logging.getLogger("mflux_worker")
T = TypeVar("T")

FIRST_PAUSE = 0.2
LONGEST_PAUSE = 10.0
# Problems that may pass while the process waits; "lost" and "corrupt" do not.
TRANSIENT = {"full", "io", "busy", "read_only"}


class Outage:
    """One stretch of storage faults: logged when it starts and when it ends, with a growing pause between tries."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.since: float | None = None
        self.pause = FIRST_PAUSE

    def failed(self, exc: BaseException) -> None:
        """A try failed: re-raise what cannot pass, else log the outage's start and sleep before the next try."""
        problem = storage_problem(exc)
        if problem not in TRANSIENT:
            raise exc
        if self.since is None:
            self.since = time.monotonic()
            log.warning("%s: storage %s (%s); retrying until it passes", self.what, problem, exc)
        time.sleep(self.pause)
        self.pause = min(self.pause * 2, LONGEST_PAUSE)

    def passed(self) -> None:
        """A try succeeded: the outage, if any, is over."""
        if self.since is not None:
            log.warning("%s: storage is back after %.1f s", self.what, time.monotonic() - self.since)
        self.since, self.pause = None, FIRST_PAUSE


class StorageRetry:
    """Runs a storage action until it succeeds, pausing between tries while the fault lasts."""

    def __init__(self, what: str, stopping: threading.Event, give_up_after_stop: float = 30.0) -> None:
        self.what = what
        self.stopping = stopping
        self.give_up_after_stop = give_up_after_stop

    def run(self, action: Callable[[], T]) -> T:
        """action()'s result; re-raises a fault that cannot pass, or a transient one still there once stopping has
        lasted give_up_after_stop seconds (so a worker asked to stop does not wait on a full disk forever)."""
        outage, stop_seen = Outage(self.what), None
        while True:
            try:
                result = action()
            except Exception as exc:
                if self.stopping.is_set():
                    stop_seen = stop_seen or time.monotonic()
                    if time.monotonic() - stop_seen >= self.give_up_after_stop:
                        raise
                outage.failed(exc)
                continue
            outage.passed()
            return result
