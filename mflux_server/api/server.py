"""The mflux-server command: serve the API with gunicorn's gevent worker, or Flask's server with --debug."""

from __future__ import annotations

import gc
import json
import logging
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from mflux_server import __version__, store
from mflux_server.api import admin_commands
from mflux_server.api.app import create_app
from mflux_server.api.errors import DEFAULT_CODES
from mflux_server.core import disk_reserve, housekeeping, webhooks, write_lock
from mflux_server.core.logs import configure_logging, shorten_gil_switch_interval
from mflux_server.core.settings import Settings, load_settings


def spreads_connections() -> bool:
    """Whether SO_REUSEPORT balances connections across server processes here (Linux does; macOS does not)."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def check_port_free(host: str, port: int) -> None:
    """Exit with a clear message if host:port cannot be listened on (in use, or not allowed)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as probe:
        # Without SO_REUSEPORT this bind fails if anything listens on the port, even another
        # mflux-server whose per-process sockets would otherwise silently share it with us.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            raise SystemExit(f"mflux-server: cannot listen on {host}:{port}: {error.strerror}") from None


# The field at fault in each error gunicorn finds before the app sees the request.
_SERVER_ERROR_FIELDS = {414: "url", 431: "headers"}


def write_json_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's error page, as our JSON error body: what it finds before the app runs (a bad request line or
    header, a URL or headers too long) is answered like every other error, not as HTML."""
    from gunicorn import util

    body = json.dumps({"code": DEFAULT_CODES.get(status_int, "bad_request"),
                       "message": f"{reason}: {mesg}" if mesg else reason,
                       "field": _SERVER_ERROR_FIELDS.get(status_int)}).encode()
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    util.write_nonblock(sock, head.encode("latin-1") + body)


KEEPALIVE_SECONDS = 75
# Seconds a read waits at most for the event loop to be idle (take_turns), so a flood of writes cannot starve it.
IDLE_WAIT = 0.05
# A write that follows its connection's previous answer this closely (seconds) comes from a client writing flat out.
BACK_TO_BACK = 0.002
# Methods that change the queue: served as soon as they are read.
WRITE_METHODS = ("POST", "PUT", "PATCH", "DELETE")


def take_turns(app: Callable[[dict[str, Any], Any], Any]) -> Callable[[dict[str, Any], Any], Any]:
    """Let every connection take its turn: a read waits for the event loop to be idle before it runs.

    gevent's server reads a keep-alive connection's next request without yielding when it has already arrived,
    so under load a few busy connections were served over and over while others waited (flat-out status p99
    190-360 ms at a 4-9 ms median). gevent.idle() puts each read behind every pending event, in arrival order,
    so reads are served first come first served and newly arrived requests are read before queued reads run.
    Requests that change the queue skip the wait: a submit never queues behind a crowd of status polls
    (bench/explanations.md has the measurements). The wait is bounded (IDLE_WAIT): with clients submitting flat
    out the loop is never idle, and a new connection's status read waited for the whole flood (6-30 s).
    A connection's first request skips the wait: it already waited its turn to be accepted and started (two
    passes of the loop, tens of milliseconds when it is saturated). A write sent back to back with its
    connection's previous answer yields once, so that connections accepted meanwhile start before it.
    """
    import gevent

    def wsgi(environ: dict[str, Any], start_response: Any) -> Any:
        connection = environ.get("gunicorn.socket")
        if environ.get("REQUEST_METHOD") in WRITE_METHODS:
            if time.monotonic() - getattr(connection, "last_done", 0.0) < BACK_TO_BACK:
                gevent.sleep(0)  # a client writing flat out lets the connections accepted meanwhile start first
        elif getattr(connection, "served", 1):
            with gevent.Timeout(IDLE_WAIT, False):
                gevent.idle()
        return app(environ, start_response)

    return wsgi


def start_background(settings: Settings) -> None:
    """Run this process's webhook deliverer and housekeeper (core/webhooks.py, core/housekeeping.py)."""
    webhooks.start(lambda: store.connect(settings.db), settings.webhook_secret, settings.webhook_allow_private)
    disk_reserve.ensure(settings.db)
    housekeeping.start(lambda: store.connect(settings.db), settings.keep_finished, settings.max_store_bytes,
                       settings.housekeeping_interval, settings.db, settings.stale_after, settings.unserved_timeout)
    write_lock.start(settings.db, settings.write_lock_limit, lambda: store.connect(settings.db))


class ListeningAt(logging.Filter):
    """Puts the address into gunicorn's "Listening at:" line, which it leaves empty when each process binds its own
    socket."""

    def __init__(self, address: str) -> None:
        super().__init__()
        self.address = address

    def filter(self, record: logging.LogRecord) -> bool:
        """Fill the line's empty address; every record passes."""
        if record.msg == "Listening at: %s (%s)" and isinstance(record.args, tuple) and not record.args[0]:
            record.args = (self.address, *record.args[1:])
        return True


def serve(settings: Settings) -> None:
    """Run the API under gunicorn until SIGTERM or Ctrl-C.

    The gevent worker holds each connection on a greenlet, so open event streams and idle keep-alive
    connections cost memory, not threads. CPU-bound work runs on OS threads (core/native.py).
    """
    from gunicorn.app.base import BaseApplication

    from mflux_server.api import upload_lane
    from mflux_server.api.deadlines import DeadlineGeventWorker

    class Server(BaseApplication):
        def load_config(self) -> None:
            self.cfg.set("bind", f"{settings.host}:{settings.port}")
            self.cfg.set("workers", settings.http_workers)
            self.cfg.set("worker_class", DeadlineGeventWorker)
            self.cfg.set("worker_connections", settings.max_connections)
            # An idle keep-alive connection costs a greenlet, so keep it as long as common proxies do (gunicorn's
            # default of 2 s made clients that poll every few seconds reconnect each time).
            self.cfg.set("keepalive", KEEPALIVE_SECONDS)
            # With one shared listening socket the process that wakes first accepts, and under load one
            # process can end up with most kept-alive connections and a single core's worth of GIL.
            # One socket per process lets the kernel spread connections evenly (bench/explanations.md).
            self.cfg.set("reuse_port", spreads_connections())
            self.cfg.set("loglevel", settings.log_level)
            self.cfg.set("graceful_timeout", 10)
            self.cfg.set("timeout", 60)
            self.cfg.set("proc_name", "mflux-server")
            # Each server process sends webhooks beside its requests (after the fork: threads do not survive one).
            self.cfg.set("post_worker_init", lambda _worker: start_background(settings))
            if "control_socket_disable" in self.cfg.settings:
                # gunicorn ≥ 24 opens a control socket in $HOME by default; we have no use for it.
                self.cfg.set("control_socket_disable", True)

        def load(self) -> Any:
            shorten_gil_switch_interval()
            app = take_turns(create_app(settings))
            upload_lane.install(upload_lane.UploadHelper(settings.log_level))
            # Everything made so far (modules, the app, the catalog) lives as long as the process: keep it out
            # of the garbage collector's full passes, which otherwise pause every connection of the loop.
            gc.collect()
            gc.freeze()
            return app

    import gunicorn.util

    # gunicorn's workers answer the requests they cannot parse through util.write_error, with an HTML page.
    gunicorn.util.write_error = write_json_error
    # One socket per process (reuse_port) leaves gunicorn's master no listener of its own to name: it logged
    # "Listening at:  (pid)". It is told the address.
    logging.getLogger("gunicorn.error").addFilter(ListeningAt(f"http://{settings.host}:{settings.port}"))
    DeadlineGeventWorker.header_timeout = settings.header_timeout
    DeadlineGeventWorker.request_timeout = settings.request_timeout
    check_port_free(settings.host, settings.port)
    Server().run()


def warn_if_open(settings: Settings) -> None:
    """A loud warning when the server listens beyond loopback and anyone who reaches it may use it."""
    db = store.connect(settings.db)
    try:
        keys = db.keys_exist()
    finally:
        db.close()
    if settings.auth != "required" and not keys and not ipaddress_is_loopback(settings.host):
        logging.getLogger("mflux_server").warning(
            "\n%s\nlistening on %s with NO API KEYS: anyone who can reach this port can submit, jump the queue and "
            "read or delete every task. Create a key: mflux-server keys create NAME --admin\n%s",
            "!" * 78, settings.host, "!" * 78)


def ipaddress_is_loopback(host: str) -> bool:
    """Whether a listen address only accepts local connections."""
    import ipaddress

    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: Sequence[str] | None = None) -> int:
    """Parse settings, migrate the queue, and serve (or run `keys` or `backup`)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments and arguments[0] in admin_commands.COMMANDS:
        return admin_commands.main(arguments)
    settings = load_settings(
        "api",
        arguments,
        prog="mflux-server",
        description=f"mflux-server {__version__}: the HTTP API in front of the mflux worker queue.",
    )
    configure_logging(settings.log_level, "mflux-server")
    store.limit_idle_transactions(settings.write_lock_limit)
    # Migrate once here, before gunicorn forks, so server processes never race on an empty file.
    store.open_or_exit(settings.db, "mflux-server")
    if settings.print_webhook_secret:
        db = store.connect(settings.db)
        print(webhooks.signing_secret(db, settings.webhook_secret))
        db.close()
        return 0
    logging.getLogger("mflux_server").info("queue %s; listening on http://%s:%d", settings.db, settings.host, settings.port)
    warn_if_open(settings)
    if settings.debug:
        start_background(settings)
        create_app(settings).run(host=settings.host, port=settings.port, debug=True, use_reloader=False)
    else:
        serve(settings)
    return 0
