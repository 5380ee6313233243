"""The API's per-app state, for blueprints to import: this thread's queue connection, the settings, the forecaster."""

from __future__ import annotations

import sqlite3

from flask import Flask, current_app, g, has_app_context

from mflux_server.api.event_hub import EventHub
from mflux_server.core import capabilities, db, native, pg
from mflux_server.core.settings import Settings
from mflux_server.forecast.queue_view import Forecaster


class Connections:
    """One SQLite connection per OS thread, opened on first use; the database is the only shared state.

    Under gevent every request greenlet of a process shares the loop thread's connection. That is safe because
    no store function yields to the loop in the middle (sqlite calls do not), so transactions never interleave.
    psycopg does yield to gevent while it waits for the server, so on PostgreSQL each request borrows a session
    from the process's pool instead, and gives it back when the request ends.
    """

    def __init__(self, path: str):
        self.path = path
        self._local = native.thread_local()
        self._per_request = capabilities.of(path).pooled and native.gevent_active()

    def get(self) -> sqlite3.Connection:
        """This thread's connection (on PostgreSQL under gevent: this request's)."""
        if self._per_request and has_app_context():
            found = g.get("mflux_conn")
            if found is None:
                found = g.mflux_conn = pg.connect(self.path, pooled=True)
            return found  # type: ignore[no-any-return]
        conn = getattr(self._local, "conn", None)
        if conn is None:
            # On the event loop (the production server), checkpoints are left to others (db.BACKSTOP_PAGES).
            conn = db.connect(self.path, db.BACKSTOP_PAGES if native.gevent_active() else None)
            self._local.conn = conn
        return conn


def init_app(app: Flask, config: Settings) -> None:
    """Migrate the queue and attach the settings, the connections and the forecaster to the app."""
    db.open_database(config.db).close()
    app.extensions["mflux_settings"] = config
    app.extensions["mflux_connections"] = Connections(config.db)
    app.teardown_appcontext(_give_back_connection)
    app.extensions["mflux_forecaster"] = Forecaster(connect=lambda: db.connect(config.db))
    app.extensions["mflux_event_hub"] = EventHub(connect=lambda: db.connect(config.db))


def _give_back_connection(_error: BaseException | None) -> None:
    borrowed = g.pop("mflux_conn", None)
    if borrowed is not None:
        borrowed.close()  # back to the pool


def conn() -> sqlite3.Connection:
    """The current thread's connection to the app's queue."""
    connections: Connections = current_app.extensions["mflux_connections"]
    return connections.get()


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
