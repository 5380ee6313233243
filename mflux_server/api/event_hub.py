"""One watcher per server process turns database commits into wake-ups for every open event stream.

The worker is another process, so events come from the database. Each stream does not poll it: one
watcher per process waits for a commit (on SQLite it checks `PRAGMA data_version`, a number that changes
when another connection commits, every tick; on PostgreSQL it wakes on LISTEN/NOTIFY), reads the new rows
of the events table once, and wakes every stream waiting on a condition. Under gevent the watcher is a
greenlet and its reads take microseconds.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from mflux_server.api import draining
from mflux_server.core.rows import Event
from mflux_server.store import Store

TICK = 0.02  # seconds between checks: an event reaches its streams within about this
RECENT = 20_000  # events kept in memory for streams that fall behind; older ones are read from the database
# Rendered messages kept: each event is rendered (task view, position, forecast) once for every stream of a process.
RENDERED = 2_000


class EventHub:
    """The newest events of the database, and a condition that streams wait on for more."""

    def __init__(self, connect: Callable[[], Store], tick: float = TICK):
        self._connect = connect
        self._tick = tick
        self._changed = threading.Condition()
        self._recent: deque[Event] = deque(maxlen=RECENT)
        self._thread: threading.Thread | None = None
        self._rendered: dict[int, tuple[str, dict[str, Any] | None]] = {}
        # Requests waiting for one task's next event (the synchronous surfaces): woken alone, not with every stream.
        self._task_signals: dict[str, list[threading.Event]] = {}
        self.last_id = 0  # the newest event read
        self.closed = False  # the process is stopping: streams end instead of waiting

    def start(self) -> None:
        """Start watching, once (the first stream does it)."""
        with self._changed:
            if self._thread is not None:
                return
            db = self._connect()
            self.last_id = db.last_event_id()
            self._thread = threading.Thread(target=self._watch, args=(db,), name="event-hub", daemon=True)
            self._thread.start()
        draining.on_drain(self.close)

    def close(self) -> None:
        """Wake every waiting stream and let none wait again: the process is stopping."""
        with self._changed:
            self.closed = True
            self._changed.notify_all()
            for signals in self._task_signals.values():  # the synchronous waits answer now, with their task ids
                for signal in signals:
                    signal.set()

    def _watch(self, db: Store) -> None:
        version = db.data_version()
        while True:
            now_version = db.wait_for_change(version, 1.0, self._tick)
            if now_version == version:
                continue
            version = now_version
            self.take_new(db)

    def take_new(self, db: Store) -> None:
        """Read events newer than the last one seen and wake the streams (the watcher calls it each change)."""
        while new := db.events_after(self.last_id):
            with self._changed:
                self._recent.extend(new)
                self.last_id = new[-1].id
                self._changed.notify_all()
                for event in new:
                    for signal in self._task_signals.get(event.task_id, ()):
                        signal.set()

    def rendered(self, event: Event, render: Callable[[Event], tuple[str, dict[str, Any] | None]]
                 ) -> tuple[str, dict[str, Any] | None]:
        """An event's message (and the task view it used), made once per process for all its streams."""
        found = self._rendered.get(event.id)
        if found is None:
            found = self._rendered[event.id] = render(event)
            if len(self._rendered) > RENDERED:
                for old in sorted(self._rendered)[: len(self._rendered) - RENDERED // 2]:
                    del self._rendered[old]
        return found

    def covers(self, after: int) -> bool:
        """Whether every event newer than `after` is in memory (else the stream reads the database)."""
        return after >= self.last_id or (bool(self._recent) and self._recent[0].id <= after + 1)

    def wait(self, after: int, timeout: float) -> list[Event]:
        """The events newer than `after` in memory, waiting up to `timeout` seconds for one."""
        with self._changed:
            self._changed.wait_for(lambda: self.last_id > after or self.closed, timeout)
            newer: list[Event] = []
            for event in reversed(self._recent):
                if event.id <= after:
                    break
                newer.append(event)
        newer.reverse()
        return newer

    def wait_for_task(self, task_id: str, after: int, timeout: float) -> bool:
        """Wait until an event of this task newer than `after` has been read (True), or the timeout passes (False)."""
        signal = threading.Event()
        with self._changed:
            if self.closed:
                return False
            for event in reversed(self._recent):
                if event.id <= after:
                    break
                if event.task_id == task_id:
                    return True
            self._task_signals.setdefault(task_id, []).append(signal)
        try:
            return signal.wait(timeout)
        finally:
            with self._changed:
                waiting = self._task_signals.get(task_id, [])
                if signal in waiting:
                    waiting.remove(signal)
                if not waiting:
                    self._task_signals.pop(task_id, None)
