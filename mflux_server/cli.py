"""mflux-server: serve the API with gunicorn (threads), or Flask's development server with --debug."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from mflux_server import __version__, db
from mflux_server.config import Settings, load_settings

# Requests and the worker's threads release the GIL for many short sqlite and socket calls; with Python's
# default 5 ms switch interval each release can cost a thread up to 5 ms to get it back. 1 ms measured
# better tails for the API under load (bench/explanations.md).
GIL_SWITCH_INTERVAL = 0.001


def shorten_gil_switch_interval() -> None:
    """Let threads that return from I/O get the GIL back sooner (see GIL_SWITCH_INTERVAL)."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)


def configure_logging(level: str, name: str) -> None:
    """One log format for both processes, on stderr (journald picks it up)."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s {name} %(levelname)s %(message)s",
        stream=sys.stderr,
    )


def serve(settings: Settings) -> None:
    """Run the API under gunicorn's threaded workers until SIGTERM or Ctrl-C."""
    from gunicorn.app.base import BaseApplication

    from mflux_server.app import create_app

    class Server(BaseApplication):
        def load_config(self) -> None:
            self.cfg.set("bind", f"{settings.host}:{settings.port}")
            self.cfg.set("workers", settings.http_workers)
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("threads", settings.threads)
            self.cfg.set("loglevel", settings.log_level)
            self.cfg.set("graceful_timeout", 10)
            self.cfg.set("timeout", 60)
            self.cfg.set("proc_name", "mflux-server")
            if "control_socket_disable" in self.cfg.settings:
                # gunicorn ≥ 24 opens a control socket in $HOME by default; we have no use for it.
                self.cfg.set("control_socket_disable", True)

        def load(self):
            shorten_gil_switch_interval()
            return create_app(settings)

    Server().run()


def main(argv: Sequence[str] | None = None) -> int:
    """Parse settings, migrate the queue, and serve."""
    settings, _ = load_settings(
        "api",
        argv,
        prog="mflux-server",
        description=f"mflux-server {__version__}: the HTTP API in front of the mflux worker queue.",
    )
    configure_logging(settings.log_level, "mflux-server")
    # Migrate once here, before gunicorn forks, so server processes never race on an empty file.
    db.open_database(settings.db).close()
    logging.getLogger("mflux_server").info("queue %s; listening on http://%s:%d", settings.db, settings.host, settings.port)
    if settings.debug:
        from mflux_server.app import create_app

        create_app(settings).run(host=settings.host, port=settings.port, debug=True, use_reloader=False)
    else:
        serve(settings)
    return 0
