"""The event hub: one reader of new event rows per process, waking streams and single-task waiters."""

from __future__ import annotations

import threading
import time

from mflux_server import store
from mflux_server.api.event_hub import EventHub
from tests.conftest import queue_task


def test_a_task_waiter_wakes_for_its_own_task_only(db_path, db):
    hub = EventHub(lambda: store.connect(db_path))
    hub.take_new(db)
    mine, other = queue_task(db), queue_task(db)
    hub.take_new(db)
    seen = hub.last_id
    woke: list[bool] = []
    waiter = threading.Thread(target=lambda: woke.append(hub.wait_for_task(mine.id, seen, timeout=5)))
    waiter.start()
    time.sleep(0.05)
    db.cancel_or_delete(other.id)
    hub.take_new(db)
    waiter.join(0.2)
    assert waiter.is_alive(), "another task's event must not wake it"
    db.cancel_or_delete(mine.id)
    hub.take_new(db)
    waiter.join(5)
    assert woke == [True]


def test_an_event_read_before_the_wait_returns_at_once_and_a_quiet_task_times_out(db_path, db):
    hub = EventHub(lambda: store.connect(db_path))
    hub.take_new(db)
    seen = hub.last_id
    task = queue_task(db)
    hub.take_new(db)  # the event arrives between reading the task and starting to wait
    assert hub.wait_for_task(task.id, seen, timeout=5) is True
    started = time.monotonic()
    assert hub.wait_for_task(task.id, hub.last_id, timeout=0.2) is False
    assert time.monotonic() - started >= 0.2
    assert hub._task_signals == {}, "a finished wait leaves nothing registered"
