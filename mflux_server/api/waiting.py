"""Waiting for a task to end without holding a thread: the synchronous surfaces (OpenAI, NebulaBlock, AceDataCloud)
sleep on the process's event hub, a greenlet wait under gevent, woken only by an event of their own task."""

from __future__ import annotations

import time

from mflux_server.api.context import db, event_hub
from mflux_server.api.draining import draining
from mflux_server.core.rows import Task

RECHECK = 5.0  # seconds between reads of the task even without an event (a missed wake-up costs at most this)


def wait_for_end(task_id: str, timeout: float) -> Task | None:
    """The task once it is done, failed or canceled; its last state when the timeout passes or the process starts
    stopping (draining); None if deleted."""
    hub = event_hub()
    deadline = time.monotonic() + timeout
    while True:
        seen = hub.last_id  # read before the task, so an event written in between still wakes us
        task = db().get(task_id)
        remaining = deadline - time.monotonic()
        if task is None or not task.status.unfinished or remaining <= 0 or draining():
            return task
        hub.wait_for_task(task_id, seen, min(RECHECK, remaining))
