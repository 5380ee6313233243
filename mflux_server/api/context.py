"""The API's per-app state, for blueprints to import: this thread's queue session, the settings, the forecaster."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from flask import Flask, current_app, g, has_app_context

from mflux_server import store
from mflux_server.api.event_hub import EventHub
from mflux_server.core import native
from mflux_server.core.lora_library import Library
from mflux_server.core.settings import Settings
from mflux_server.forecast.queue_view import Forecaster
from mflux_server.store import Store

T = TypeVar("T")


class Sessions:
    """One store session per OS thread, opened on first use; the database is the only shared state.

    Under gevent every request greenlet of a process shares the loop thread's SQLite session. That is safe because
    no store method yields to the loop in the middle (sqlite calls do not), so transactions never interleave.
    psycopg does yield to gevent while it waits for the server, so on PostgreSQL each request borrows a session
    from the process's pool instead, and gives it back when the request ends.
    """

    def __init__(self, path: str):
        self.path = path
        self._local = native.thread_local()
        self._per_request = store.capabilities_of(path).pooled and native.gevent_active()

    def get(self) -> Store:
        """This thread's session (on PostgreSQL under gevent: this request's)."""
        if self._per_request and has_app_context():
            found: Store | None = g.get("mflux_store")
            if found is None:
                found = g.mflux_store = store.connect(self.path, pooled=True)
            return found
        db: Store | None = getattr(self._local, "db", None)
        if db is None:
            # On the event loop (the production server), checkpoints are left to others (store.connect).
            db = store.connect(self.path, store.BACKSTOP_PAGES if native.gevent_active() else None,
                               wait_turn=native.loop_waiter())
            self._local.db = db
        return db


def init_app(app: Flask, config: Settings) -> None:
    """Migrate the queue and attach the settings, the sessions and the forecaster to the app."""
    store.open_migrated(config.db).close()
    app.extensions["mflux_settings"] = config
    app.extensions["mflux_sessions"] = Sessions(config.db)
    app.teardown_appcontext(_give_back_session)
    app.extensions["mflux_forecaster"] = Forecaster(connect=lambda: store.connect(config.db))
    app.extensions["mflux_event_hub"] = EventHub(connect=lambda: store.connect(config.db))
    app.extensions["mflux_loras"] = Library(config.lora_dir)


def _give_back_session(_error: BaseException | None) -> None:
    borrowed = g.pop("mflux_store", None)
    if borrowed is not None:
        borrowed.close()  # back to the pool


def db() -> Store:
    """The current thread's (or request's) session with the app's queue."""
    sessions: Sessions = current_app.extensions["mflux_sessions"]
    return sessions.get()


# Bytes of input images past which a submit's write runs on an OS thread: copying them into the queue takes
# milliseconds, which on the event loop every other connection of the process would wait for.
LARGE_WRITE = 256 << 10


def writes(write: Callable[[Store], T], size: int) -> T:
    """Run a submit's write of `size` bytes of images: a large one on an OS thread of its own at the loop's
    priority, with that thread's session (a niced one would hold the queue's write lock while preempted; one
    thread, since writes take turns at the lock anyway); others here."""
    if size < LARGE_WRITE:
        return write(db())
    sessions: Sessions = current_app.extensions["mflux_sessions"]
    return native.call_bounded(lambda: write(sessions.get()), "large-writes", 1, niced=False)


def lora_library() -> Library:
    """The LoRA files requests may name (--lora-dir)."""
    library: Library = current_app.extensions["mflux_loras"]
    return library


def settings() -> Settings:
    """The app's settings."""
    config: Settings = current_app.extensions["mflux_settings"]
    return config


def forecaster() -> Forecaster:
    """The app's forecaster (cost model and queue snapshot)."""
    found: Forecaster = current_app.extensions["mflux_forecaster"]
    return found


def event_hub() -> EventHub:
    """The process's event watcher, started by the first stream."""
    hub: EventHub = current_app.extensions["mflux_event_hub"]
    hub.start()
    return hub
