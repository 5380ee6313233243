"""The supervisor: one worker process's roles (claim loop, progress publisher, result writer) and its clean stop."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from mflux_server import store
from mflux_server.core import service_notify
from mflux_server.core.settings import Settings
from mflux_server.store import Store
from mflux_server.worker.claim_loop import ClaimLoop, WorkerBroken
from mflux_server.worker.content_credentials import ContentCredentials
from mflux_server.worker.engines.base import Engine
from mflux_server.worker.engines.memory import memory_budget, pixel_limits
from mflux_server.worker.messages import SHUTDOWN
from mflux_server.worker.publisher import ProgressPublisher, recover
from mflux_server.worker.result_writer import ResultWriter

log = logging.getLogger("mflux_worker")

# EX_TEMPFAIL: the engine could not be recovered after a fault; systemd's Restart=on-failure starts a fresh process.
EXIT_BROKEN = 75


class Supervisor:
    """Registers the worker, runs the claim loop with the publisher and the writer beside it, never loses a task."""

    def __init__(self, settings: Settings, engine: Engine, servable: Sequence[str] = (), load_seconds: float | None = None):
        self.settings = settings
        self.engine = engine
        store.open_migrated(settings.db).close()  # migrated
        # The claim loop's commits leave checkpoints to the publisher and writer threads (store.EAGER_PAGES): one
        # there would delay the next generation.
        self.db = store.connect(settings.db, store.BACKSTOP_PAGES)
        servable = list(servable or [engine.model or settings.model])
        limits = pixel_limits(servable, memory_budget(settings.gpu_memory, engine.name), engine.quantize,
                              settings.max_pixels)
        self.worker_id = self.db.register_worker(engine.name, engine.model or "", engine.quantize,
                                               models=servable, max_pixels=settings.max_pixels,
                                               affinity_wait=settings.max_affinity_wait, pixel_limits=limits)
        if load_seconds is not None and engine.model:
            self.db.record_load(engine.model, load_seconds)
        self.stopping = threading.Event()
        self.crashed: str | None = None  # the role whose thread died, which makes the exit status say so
        self.publisher = ProgressPublisher(settings, self.worker_id)
        credentials = ContentCredentials.from_settings(settings.c2pa, settings.c2pa_cert, settings.c2pa_key,
                                                       settings.c2pa_dir, settings.db)
        self.writer = ResultWriter(self.worker_id, self.stopping, credentials)
        self.claim_loop = ClaimLoop(settings, engine, self.worker_id, self.db, self.publisher, self.writer, self.stopping,
                                    servable, limits)

    def run(self) -> int:
        """Recover orphans, then claim and run tasks until asked to stop; returns the exit code."""
        recover(self.db, self.settings)
        self.db.prepare_claims(self.worker_id, self.engine.name, self.engine.model or "")
        log.info("worker %s ready: engine=%s model=%s (serves %s) quantize=%s db=%s", self.worker_id, self.engine.name,
                 self.engine.model, ",".join(self.claim_loop.servable), self.engine.quantize, self.settings.db)
        service_notify.notify("READY=1\nSTATUS=worker " + self.worker_id + " serving")
        publishing = self._start(self.publisher.run, "progress")
        writing = self._start(self.writer.run, "store")
        code = 0
        try:
            self.claim_loop.run()
        except WorkerBroken as exc:
            log.error("%s; exiting with status %d so the service manager restarts the worker", exc, EXIT_BROKEN)
            code = EXIT_BROKEN
        finally:
            # Finish encoding and storing what was generated before exiting: that work is not lost.
            if writing.is_alive():
                self.writer.send(SHUTDOWN)
            writing.join()
            self.publisher.stop()
            publishing.join(timeout=5)
            try:
                self.publisher.flush_timings(self.db)
                self.db.stop_worker(self.worker_id)
            except Exception as exc:  # the storage failed under us: the heartbeat stops, so recovery still happens
                log.error("could not record this worker's stop (%s); its tasks are recovered once its heartbeat is "
                          "stale", exc)
            self.db.close()
            if self.crashed and code == 0:
                code = EXIT_BROKEN
            log.info("%s", self.claim_loop.preview_cost.summary())
            log.info("worker %s stopped", self.worker_id)
        return code

    def stop(self) -> None:
        """Ask the claim loop to stop at the next step boundary (signal handlers call this)."""
        self.stopping.set()

    def _start(self, target: Callable[[Store], None], name: str) -> threading.Thread:
        """Run a role on a thread with its own connection; if it crashes, the whole worker stops."""

        def run() -> None:
            db = store.connect(self.settings.db, store.EAGER_PAGES)
            try:
                target(db)
            except Exception:
                log.exception("%s thread crashed; stopping the worker", name)
                self.crashed = name
                self.stopping.set()
            finally:
                db.close()

        thread = threading.Thread(target=run, name=name, daemon=True)
        thread.start()
        return thread
