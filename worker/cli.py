"""mflux-worker: load the model once, then run queued tasks until SIGTERM."""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Sequence
from types import FrameType

from mflux_server import __version__, store
from mflux_server.core.logs import configure_logging, shorten_gil_switch_interval
from mflux_server.core.settings import load_settings
from mflux_server.worker.engines import make_engine, served_models
from mflux_server.worker.engines.memory import memory_budget, refusal
from mflux_server.worker.supervisor import Supervisor


class NothingFits(Exception):
    """No model this worker was given fits its memory, so it must not register and claim tasks it would fail."""


def fitting(models: list[str], memory_gib: float | None, quantize: int | None) -> list[str]:
    """The models whose smallest image fits this worker's memory; each one refused is logged with the fix."""
    log = logging.getLogger("mflux_worker")
    kept = []
    for model in models:
        why = refusal(model, memory_gib, quantize)
        if why is None:
            kept.append(model)
        else:
            log.error("not serving %s: %s", model, why)
    if not kept:
        raise NothingFits("no model given to this worker fits its memory, so it does not start (see above)")
    return kept


def main(argv: Sequence[str] | None = None) -> int:
    """Parse settings, load the engine, and run the claim loop; exits 0 after a graceful stop."""
    settings = load_settings(
        "worker",
        argv,
        prog="mflux-worker",
        description=f"mflux-server {__version__} worker: holds one model at a time and generates queued tasks one at "
                    "a time, switching among --models as the queue needs.",
    )
    configure_logging(settings.log_level, "mflux-worker")
    store.limit_idle_transactions(settings.write_lock_limit)
    shorten_gil_switch_interval()  # the claim between two generations competes with the encoder thread
    log = logging.getLogger("mflux_worker")
    store.open_or_exit(settings.db, "mflux-worker")  # before loading a model: a bad --db should fail in a second
    try:
        servable = served_models(settings)
        engine = make_engine(settings)
        servable = fitting(servable, memory_budget(settings.gpu_memory, engine.name), settings.quantize)
        started = time.perf_counter()
        engine.load(servable[0])
        load_seconds = time.perf_counter() - started
    except NothingFits as exc:
        log.error("%s", exc)
        return 1
    except Exception as exc:
        log.error("could not start the %s engine: %s", settings.engine, exc)
        return 1
    supervisor: Supervisor | None = None
    stop_requested = False

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stop_requested
        log.info("%s received: stopping at the next step boundary", signal.Signals(signum).name)
        stop_requested = True
        if supervisor is not None:
            supervisor.stop()

    # Before registering: once the worker is in the workers table a SIGTERM must be a clean stop, not a kill.
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    supervisor = Supervisor(settings, engine, servable, load_seconds)
    if stop_requested:
        supervisor.stop()
    return supervisor.run()
