"""mflux-worker: load the model once, then run queued tasks until SIGTERM."""

from __future__ import annotations

import logging
import signal
from collections.abc import Sequence

from mflux_server import __version__
from mflux_server.cli import configure_logging, shorten_gil_switch_interval
from mflux_server.config import load_settings
from worker.engines import make_engine
from worker.runner import Runner


def main(argv: Sequence[str] | None = None) -> int:
    """Parse settings, load the engine, and run the claim loop; exits 0 after a graceful stop."""
    settings, _ = load_settings(
        "worker",
        argv,
        prog="mflux-worker",
        description=f"mflux-server {__version__} worker: holds one model and generates queued tasks one at a time.",
    )
    configure_logging(settings.log_level, "mflux-worker")
    shorten_gil_switch_interval()  # the claim between two generations competes with the encoder thread
    log = logging.getLogger("mflux_worker")
    try:
        engine = make_engine(settings)
    except Exception as exc:
        log.error("could not start the %s engine: %s", settings.engine, exc)
        return 1
    runner = Runner(settings, engine)

    def request_stop(signum: int, _frame) -> None:
        log.info("%s received: stopping at the next step boundary", signal.Signals(signum).name)
        runner.stop()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    return runner.run()
